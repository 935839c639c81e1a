"""Sample figures: one labelled panel per guidance weight w — scatter plots for 2-D points, image
grids (one row per class) for images."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def to_uint8_images(x: torch.Tensor) -> np.ndarray:
    """[N, C, H, W] in [−1, 1] → uint8 NHWC (the ADM evaluator layout)."""
    x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def image_grid(images: np.ndarray, rows: int, pad: int = 1) -> np.ndarray:
    """uint8 NHWC, N = rows·cols in row order → one uint8 HWC grid with `pad` white pixels."""
    n, h, w, c = images.shape
    cols = n // rows
    grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), 255, np.uint8)
    for i, img in enumerate(images):
        r, k = divmod(i, cols)
        grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + k * (w + pad):][:, :w] = img
    return grid


def save_panels(path: str | Path, panels: list[tuple[float, torch.Tensor, torch.Tensor]],
                class_names: list[str]) -> None:
    """One panel per (w, samples, labels); points → scatter, images → grid with rows per class."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.8), squeeze=False)
    for ax, (w, x, labels) in zip(axes[0], panels):
        if x.dim() == 2:
            _scatter(ax, x, labels, class_names)
        else:
            _grid(ax, x, labels, class_names)
        ax.set_title(f"w = {w:g}")
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=110)
    plt.close(fig)


def _scatter(ax, x: torch.Tensor, labels: torch.Tensor, class_names: list[str]) -> None:
    x, labels = x.cpu().numpy(), labels.cpu().numpy()
    for k, name in enumerate(class_names):
        pts = x[labels == k]
        ax.scatter(pts[:, 0], pts[:, 1], s=3, alpha=0.6, label=name)
    ax.set_aspect("equal")
    ax.set_xlim(-1.25, 1.25)
    ax.set_ylim(-1.25, 1.25)
    ax.legend(fontsize=6, markerscale=3, loc="upper right")


def _grid(ax, x: torch.Tensor, labels: torch.Tensor, class_names: list[str]) -> None:
    order = torch.argsort(labels.cpu(), stable=True)
    rows = len(torch.unique(labels))
    grid = image_grid(to_uint8_images(x.cpu()[order]), rows)
    ax.imshow(grid.squeeze(-1) if grid.shape[-1] == 1 else grid,
              cmap="gray" if grid.shape[-1] == 1 else None, interpolation="nearest")
    ax.set_xticks([])
    shown = sorted(set(labels.tolist()))
    height = grid.shape[0] / rows
    ax.set_yticks([height * (i + 0.5) for i in range(rows)],
                  [class_names[k] for k in shown], fontsize=6)


def save_metric_plots(cells: list[dict], paths: list[str]) -> None:
    """The four eval plots (paths in evaluate.PLOTS order): FID vs w and IS vs w (one line per
    model and T), the FID–IS trade-off curve per model at the largest T (Ho & Salimans 2022,
    Fig. 4), and FID vs T at each model's best w. Error bars: the cells' bootstrap intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fid_w, is_w, fid_is, fid_t = paths
    _plot_lines(plt, cells, "w", "fid", fid_w, "FID (classifier features) vs w")
    _plot_lines(plt, cells, "w", "inception_score", is_w, "IS (classifier softmax) vs w")
    _plot_tradeoff(plt, cells, fid_is)
    _plot_steps(plt, cells, fid_t)


def _scalar(value) -> float:
    return value["value"] if isinstance(value, dict) else value


def _series(cells: list[dict], key, x: str, y: str) -> dict:
    """{key(cell): (xs, values, lows, highs)} of metric y against x (a setting or a metric)."""
    groups: dict = {}
    for c in cells:
        if y in c and x in c:
            for part, value in zip(groups.setdefault(key(c), ([], [], [], [])),
                                   (_scalar(c[x]), c[y]["value"], c[y]["low"], c[y]["high"])):
                part.append(value)
    return groups


def _errorbar(ax, xs, values, lows, highs, label, **kwargs) -> None:
    values, lows, highs = map(np.asarray, (values, lows, highs))
    ax.errorbar(xs, values, yerr=[values - lows, highs - values], capsize=2, marker="o",
                markersize=3, label=label, **kwargs)


def _finish(plt, fig, ax, path: str, xlabel: str, ylabel: str, title: str) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=110)
    plt.close(fig)


def _plot_lines(plt, cells, x: str, y: str, path: str, title: str) -> None:
    fig, ax = plt.subplots(figsize=(5, 3.6))
    for label, series in _series(cells, lambda c: f"{c['model']}, T={c['steps']}", x, y).items():
        _errorbar(ax, *series, label)
    ax.set_xscale("symlog", linthresh=0.1)  # w spans 0 … 4 with most points below 1
    _finish(plt, fig, ax, path, "guidance weight w", y, title)


def _plot_tradeoff(plt, cells, path: str) -> None:
    fig, ax = plt.subplots(figsize=(5, 3.6))
    top = max(c["steps"] for c in cells)
    chosen = [c for c in cells if c["steps"] == top and "inception_score" in c]
    for label, (xs, values, lows, highs) in _series(chosen, lambda c: c["model"],
                                                    "inception_score", "fid").items():
        _errorbar(ax, xs, values, lows, highs, label)
    _finish(plt, fig, ax, path, "IS (higher: more fidelity)", "FID",
            f"FID vs IS along w, T={top}")


def _plot_steps(plt, cells, path: str) -> None:
    fig, ax = plt.subplots(figsize=(5, 3.6))
    for model in dict.fromkeys(c["model"] for c in cells):
        own = [c for c in cells if c["model"] == model]
        best = min(own, key=lambda c: c["fid"]["value"])["w"]  # the model's best w at any T
        chosen = sorted((c for c in own if c["w"] == best), key=lambda c: c["steps"])
        for label, series in _series(chosen, lambda c: f"{model}, w={best:g}", "steps", "fid").items():
            _errorbar(ax, *series, label)
    ax.set_xscale("log", base=2)
    _finish(plt, fig, ax, path, "sampling steps T", "FID", "FID vs T at each model's best w")
