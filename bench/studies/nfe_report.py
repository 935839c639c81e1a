"""The NFE study's stored cells and report (bench/studies/nfe.py): the cells of an earlier run to
reuse, results.md with its tables, and the FID-against-NFE plot."""
from __future__ import annotations

import dataclasses
import itertools
import json
from pathlib import Path


def find_cell(cells: list[dict], **match) -> dict | None:
    """The first cell whose fields equal every `match`, or None."""
    return next((c for c in cells if all(c.get(k) == v for k, v in match.items())), None)


def _arm_key(cell_or_arm) -> tuple:
    c = cell_or_arm if isinstance(cell_or_arm, dict) else dataclasses.asdict(cell_or_arm)
    return c["sampler"], c["grid"], c["steps"], c["rule"], c["v"]


def stored_cells(study) -> dict[tuple, list[dict]]:
    """The cells of `study.reuse` by arm, where that run sampled and scored exactly as `study`
    does (data, model, n, seed, bootstrap rounds); {} otherwise."""
    if study.reuse is None:
        return {}
    stored = json.loads(Path(study.reuse).read_text())
    same = ("data", "model", "n", "seed", "rounds")
    if any(stored["study"][k] != getattr(study, k) for k in same):
        return {}
    by_arm: dict[tuple, list[dict]] = {}
    for cell in stored["cells"]:
        by_arm.setdefault(_arm_key(cell), []).append(cell)
    return by_arm


def reused(arm, stored: dict[tuple, list[dict]]) -> list[dict] | None:
    """The stored cells of `arm` (every w of it), marked with where they come from; else None."""
    by_w = {c["w"]: c for c in stored.get(_arm_key(arm), [])}
    if not all(w in by_w for w in arm.w):
        return None
    return [dict(by_w[w], part=arm.part, reused=True) for w in arm.w]


def markdown(result: dict) -> str:
    s = result["study"]
    lines = [f"# Quality per network evaluation: {s['data']}\n",
             f"{s['n']} class-balanced samples per cell, seed {s['seed']}, {s['rounds']} "
             f"bootstrap rounds; model {result['ckpt']}; {result['seconds'] / 60:.1f} min on "
             f"{result['device']}.", *[f"Note: {n}." for n in s["notes"]], "",
             "## A. Fewest NFE matching the paper's sampler at T = 256 (FID not significantly "
             "worse: intervals overlap, or lower)\n",
             "NFE: network evaluations per sample from the step plan (rows forwarded per sample: "
             "2 per guided evaluation).\n",
             "| sampler | grid | " + " | ".join(f"w = {w:g}" for w in s["w_samplers"]) + " |",
             "|---|---|" + "---|" * len(s["w_samplers"])]
    for sampler, grid in itertools.product(s["samplers"], s["grids"]):
        row = [m for m in result["fewest_nfe"] if m["sampler"] == sampler and m["grid"] == grid]
        lines.append(f"| {sampler} | {grid} | " + " | ".join(
            "—" if m["fewest_nfe"] is None else
            f"{m['fewest_nfe']} ({m.get('fewest_rows', '?')} rows)" for m in row) + " |")
    lines += ["", f"Recommended: {result['recommendation']}", ""]
    check = result.get("reuse_check")
    if check:
        lines += [f"Reused cells (marked *) come from {s['reuse']}; re-sampling "
                  f"{check['arm']['sampler']} / {check['arm']['grid']} / T = "
                  f"{check['arm']['steps']} gave FID {_fmt(check['resampled_fid'])} against the "
                  f"stored {_fmt(check['stored_fid'])}.", ""]
    if result["rules"]:
        lines += rules_section(result)
    if result["convention"]:
        lines += convention_section(result)
    return "\n".join(lines) + "\n\n" + cells_table(result["cells"])


def rules_section(result: dict) -> list[str]:
    s = result["study"]
    lines = ["## B. Guidance rules against CFG at equal w (T = "
             f"{s['rule_steps']}, ancestral)\n",
             "| rule | w | rows/sample (CFG) | FID | precision | recall | accuracy |",
             "|---|---|---|---|---|---|---|"]
    for f in result["rules"]:
        lines.append(f"| {f['rule']} | {f['w']:g} | {f['rows']} ({f['cfg_rows']}) | "
                     f"{f['fid_vs_cfg']} | {f['precision_vs_cfg']} | {f['recall_vs_cfg']} | "
                     f"{f.get('accuracy_vs_cfg', '—')} |")
    claim = result["interval_claim"]
    return lines + ["", f"Claim (Kynkäänniemi et al. 2024): {claim['claim']} — "
                    f"**{claim['verdict']}**", ""]


def convention_section(result: dict) -> list[str]:
    lines = ["## C. The last evaluation at λmax (cosine vs cosine-authors)\n",
             "Noise in uint8 levels: injected into the last z by the last transition, and the "
             "largest noise the last prediction can remove (σ/α at the last grid point); where "
             "the second is ≪ the first the injected noise stays in the sample.\n",
             "| T | v | w | FID cosine | FID authors | cosine vs authors | cosine: injected / "
             "removable | authors: injected / removable |", "|---|---|---|---|---|---|---|---|"]
    for c in result["convention"]:
        lines.append(f"| {c['steps']} | {c['v']:g} | {c['w']:g} | {_fmt(c['fid_cosine'])} | "
                     f"{_fmt(c['fid_authors'])} | {c['cosine_vs_authors']} | "
                     f"{c['injected_levels_cosine']:.3g} / {c['removable_levels_cosine']:.2g} | "
                     f"{c['injected_levels_authors']:.3g} / {c['removable_levels_authors']:.3g} |")
    return lines + [""]


def _fmt(interval: dict) -> str:
    return f"{interval['value']:.3g} [{interval['low']:.3g}, {interval['high']:.3g}]"


def cells_table(cells: list[dict]) -> str:
    lines = ["## Every cell\n", "| part | sampler | grid | T | v | rule | w | nfe | rows | FID | "
             "precision | recall | accuracy |", "|" + "---|" * 13]
    for c in cells:
        lines.append(f"| {c['part']}{'*' if c.get('reused') else ''} | {c['sampler']} | {c['grid']} | {c['steps']} | "
                     f"{c['v'] if c['v'] is not None else '—'} | {c['rule']} | {c['w']:g} | "
                     f"{c['nfe']} | {c['rows']} | {_fmt(c['fid'])} | {_fmt(c['precision'])} | "
                     f"{_fmt(c['recall'])} | {_fmt(c['accuracy']) if 'accuracy' in c else '—'} |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    """FID against network evaluations, one panel per w, one line per sampler × grid; the
    reference's interval shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s, cells = result["study"], [c for c in result["cells"] if c["rule"] == "cfg"
                                 and c["v"] is None]
    fig, axes = plt.subplots(1, len(s["w_samplers"]), figsize=(5 * len(s["w_samplers"]), 4),
                             squeeze=False)
    for ax, w in zip(axes[0], s["w_samplers"]):
        for sampler, grid in itertools.product(s["samplers"], s["grids"]):
            line = sorted((c for c in cells if c["sampler"] == sampler and c["grid"] == grid
                           and c["w"] == w), key=lambda c: c["nfe"])
            if line:  # colour: the sampler; line style: the grid
                ax.plot([c["nfe"] for c in line], [c["fid"]["value"] for c in line], marker="o",
                        color=f"C{s['samplers'].index(sampler) % 10}",
                        linestyle=("-", "--", ":", "-.")[s["grids"].index(grid) % 4],
                        label=f"{sampler} / {grid}")
        ref = find_cell(cells, sampler="ancestral", grid="cosine", steps=s["reference_steps"], w=w)
        if ref:
            ax.axhspan(ref["fid"]["low"], ref["fid"]["high"], color="grey", alpha=0.25)
        ax.set(xscale="log", xlabel="NFE (network calls per sample)", ylabel="FID",
               title=f"{s['data']}, w = {w:g}")
    axes[0][0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
