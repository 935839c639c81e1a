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
