"""The files of one end-to-end benchmark run, written atomically side by side in one folder:
the JSON document, a markdown table (also printed), and a PNG of images/s against T."""
from __future__ import annotations

import json
from pathlib import Path

from cfgengine.atomic import atomic_path


def stem(report: dict, sweep: str) -> str:
    """`e2e-{sweep}-{device}-{date}`: one file set per sweep, device and day."""
    return f"e2e-{sweep}-{report['device']}-{report['date'][:10]}"


def write(report: dict, out_dir: str | Path, name: str, command: str) -> dict[str, Path]:
    """JSON, markdown and PNG as `out_dir/name.*`; returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {kind: out_dir / f"{name}.{kind}" for kind in ("json", "md", "png")}
    report = dict(report, command=command)
    _write_text(paths["json"], json.dumps(report, indent=1) + "\n")
    _write_text(paths["md"], markdown(report, paths["png"].name))
    plot(report, paths["png"])
    return paths


def _write_text(path: Path, text: str) -> None:
    with atomic_path(path, path.suffix) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")


def markdown(report: dict, figure: str | None = None) -> str:
    """The run as markdown: where, the per-cell table, the a + b·T fits and the goals."""
    lines = [_header(report), "", *cell_table(report), "", *fit_table(report), "",
             *goal_table(report)]
    rounds = [r for r in report["cells"] if r.get("speedup_by_round")]
    if rounds:
        lines += ["", "Speed-ups per round (the i-th process of each runner): " + "; ".join(
            f"{r['runner']} {r['precision']} B={r['batch']} T={r['steps']}: " + ", ".join(
                f"× {p} " + "/".join(f"{x:.2f}" for x in xs)
                for p, xs in r["speedup_by_round"].items()) for r in rounds)]
    lines += _peer_lines(report["cells"])
    if report.get("precision_goals"):
        lines += ["", *goal_table(dict(goals={"issue 27": report["precision_goals"]}))]
    if report.get("skipped"):
        lines += ["", "Not measured: " + "; ".join(f"{s['runner']} ({s['reason']})"
                                                    for s in report["skipped"])]
    if figure:
        lines += ["", f"![images/s against T]({figure})"]
    return "\n".join(lines) + "\n"


def _peer_lines(cells: list[dict]) -> list[str]:
    """A peer's speed-up over the engine at the same precision, B and T (above 1: faster)."""
    peers = [r for r in cells if r.get("speedup_over_engine")]
    if not peers:
        return []
    return ["", "Peers (another runtime on the engine's loop and step) against the engine: "
            + "; ".join(f"{r['runner']} {r['precision']} B={r['batch']} T={r['steps']}: "
                        + ", ".join(f"{x:.2f}× {e}" for e, x in r["speedup_over_engine"].items())
                        for r in peers)]


def _header(report: dict) -> str:
    cfg = report["config"]
    return (f"Device **{report['device']}** ({report['device_name']}, {report['cpu_threads']} "
            f"torch threads), load average {report['load_average']} at the start, "
            f"{report.get('load_average_after')} at the end; torch {report['torch']}, "
            f"diffusers {report['diffusers']}, onnxruntime {report.get('onnxruntime')}, "
            f"openvino {report.get('openvino')}; commit `{report['git_commit'][:12]}`, "
            f"{report['date']}. Model: {report['model']}. Sampler {cfg['sampler']}, w = {cfg['w']}"
            f" (guidance_scale {1 + cfg['w']:g}), median of {cfg['repeats']} interleaved rounds."
            + _isolation(report)
            + (f"\n\n`{report['command']}`" if report.get("command") else ""))


def _isolation(report: dict) -> str:
    """How the runners were separated and the GEMM roofline the GFLOP/s compare with."""
    if "isolation" not in report:
        return ""
    rates = report["roofline"].get("gflops_per_s", {})
    sizes, kinds = report["roofline"].get("gemm_size", {}), report["roofline"].get("gemm", {})
    gemm = ", ".join(f"{k} {v:.3g} ({kinds.get(k)}, n = {sizes.get(k)})"
                     for k, v in rates.items()) or "not measured"
    return (f" Runners: {report['isolation']} ({report['config']['processes']} processes each, "
            f"{report['config']['repeats']} timed loops per process). GEMM roofline in its own "
            f"process, GFLOP/s: {gemm}.")


def cell_table(report: dict) -> list[str]:
    """One row per (runner, precision, B, T); speed-ups are baseline time / engine time."""
    names = list(report["baselines"])
    flops = any("gflops_per_s" in r for r in report["cells"])
    head = ["runner", "prec", "B", "T", "images/s", "ms/step", "t_fwd(2B) ms", "η", "step %",
            *[f"× {n}" for n in names], *(["GFLOP/s", "% roofline"] if flops else [])]
    rows = [_row(head), _row(["---"] * len(head))]
    for r in report["cells"]:
        speedup = r.get("speedup", {})
        name = f"{r['runner']} (peer)" if r["role"] == "peer" else r["runner"]
        rows.append(_row([name, r["precision"], r["batch"], r["steps"],
                          f"{r['images_per_s']:.3g}", f"{r['ms_per_step']:.3g}",
                          f"{1e3 * r['t_forward_2B']:.3g}", f"{r['eta']:.2f}",
                          f"{100 * r['step_share']:.2f}" if "step_share" in r else "",
                          *[f"{speedup[n]:.2f}" if n in speedup else "" for n in names],
                          *(_flop_cells(r) if flops else [])]))
    return rows


def _flop_cells(row: dict) -> list[str]:
    share = row.get("roofline_fraction")
    return [f"{row['gflops_per_s']:.3g}", "" if share is None else f"{100 * share:.0f}"]


def fit_table(report: dict) -> list[str]:
    head = ["runner", "prec", "B", "a (ms)", "b (ms/step)", "images·steps/s spread over T"]
    rows = [_row(head), _row(["---"] * len(head))]
    for f in report["fits"]:
        rows.append(_row([f["runner"], f["precision"], f["batch"], f"{1e3 * f['a_seconds']:.3g}",
                          f"{1e3 * f['b_seconds_per_step']:.3g}",
                          f"{100 * f['images_steps_per_s_spread']:.1f} %"]))
    return rows


def goal_table(report: dict) -> list[str]:
    rows = [_row(["runner", "goal", "worst case", "met"]), _row(["---"] * 4)]
    for runner, goals in report["goals"].items():
        for goal, g in goals.items():
            worst = "not measured" if g["worst"] is None else f"{g['worst']:.3g}"
            met = {None: "–", True: "yes", False: "**no**"}[g["met"]]
            rows.append(_row([runner, goal, worst, met]))
    return rows


def _row(cells: list) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def plot(report: dict, path: Path) -> None:
    """images/s against T (log-log), one line per runner, one panel per (precision, B)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r["precision"], r["batch"]) for r in report["cells"]})
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    for ax, (precision, batch) in zip(axes[0], panels):
        _panel(ax, [r for r in report["cells"]
                    if (r["precision"], r["batch"]) == (precision, batch)])
        ax.set_title(f"{report['device']} {precision}, B = {batch}", fontsize=9)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path, ".png") as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def _panel(ax, rows: list[dict]) -> None:
    for runner in dict.fromkeys(r["runner"] for r in rows):
        mine = [r for r in rows if r["runner"] == runner]
        style = {"engine": "-o", "peer": "-.^"}.get(mine[0]["role"], "--s")
        ax.plot([r["steps"] for r in mine], [r["images_per_s"] for r in mine], style,
                label=runner, markersize=4)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("steps T")
    ax.set_ylabel("images/s")
    ax.grid(True, which="both", alpha=0.3)
