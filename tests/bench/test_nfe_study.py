"""The NFE study: its arms, its honest NFE counts, its findings logic on synthetic cells, and the
quick study end to end (tiny model, few samples)."""
import json

import pytest

from cfgengine.bench.studies import nfe
from cfgengine.schedule import logsnr_grid


def test_interval_arms_count_one_row_per_unguided_step():
    arm = nfe.Arm("B", "ancestral", "cosine", 64, (1.0,), "interval-kynkaanniemi")
    lo, hi = nfe.KYNKAANNIEMI
    grid = logsnr_grid(64, -20.0, 20.0, grid="cosine")
    inside = int(((grid >= lo) & (grid <= hi)).sum())
    assert 0 < inside < 64
    assert nfe.evaluations(arm) == (64, 64 + inside)
    assert nfe.evaluations(nfe.Arm("A", "ddim", "karras", 16, (1.0,))) == (16, 32)


def test_arms_are_unique_and_hold_the_reference():
    study = nfe.STUDIES["digits"]
    arms = nfe.arms(study)
    keys = [(a.sampler, a.grid, a.steps, a.w, a.rule, a.v) for a in arms]
    assert len(keys) == len(set(keys))
    assert ("ancestral", "cosine", 256, study.w_samplers, "cfg", None) in keys
    assert max(a.steps for a in arms if a.part == "A" and a.sampler != "ancestral") == 128


def test_the_last_transition_at_lambda_max_leaves_its_noise():
    injected, removable = nfe.residual_noise("cosine", 16, 1.0)
    assert removable < 0.01 < injected  # λmax = 20: σ/α = e^-10, nothing can be removed
    small, _ = nfe.residual_noise("cosine", 16, 0.3)
    assert small < injected  # v = 1 injects the "fixed large" variance
    _, removable_authors = nfe.residual_noise("cosine-authors", 16, 1.0)
    assert removable_authors > 1.0


def _cell(sampler, grid, steps, fid, low, high, w=1.0):
    return dict(sampler=sampler, grid=grid, steps=steps, w=w, rule="cfg", v=None, nfe=steps,
                fid=dict(value=fid, low=low, high=high))


def test_fewest_nfe_is_the_first_overlap_with_the_reference():
    study = nfe.NfeStudyConfig(data="d", model="m", n=1, samplers=("ddim",),
                                     grids=("cosine",), w_samplers=(1.0,), reference_steps=256)
    cells = [_cell("ancestral", "cosine", 256, 1.0, 0.9, 1.1), _cell("ddim", "cosine", 8, 3, 2.5, 3.5),
             _cell("ddim", "cosine", 16, 1.3, 1.05, 1.5), _cell("ddim", "cosine", 32, 1.0, 0.9, 1.1)]
    (found,) = nfe.fewest_nfe(cells, study)
    assert found["fewest_nfe"] == 16
    assert nfe.recommend([found]) == dict(sampler="ddim", grid="cosine", steps=16)


def test_quick_study_writes_results_plot_and_findings(tmp_path):
    study = nfe.STUDIES["quick"]
    result = nfe.run_study(nfe.replace(study, out=str(tmp_path)), log=lambda m: None)
    out = tmp_path / study.data
    assert {p.name for p in out.iterdir()} == {"results.json", "results.md", "fid_vs_nfe.png"}
    stored = json.loads((out / "results.json").read_text())
    assert len(stored["cells"]) == sum(len(a.w) for a in nfe.arms(study))
    assert stored["interval_claim"]["verdict"] in ("holds", "holds in part", "contradicted",
                                                   "inconclusive")
    for cell in result["cells"]:
        assert cell["rows"] <= 2 * cell["nfe"] and {"fid", "precision", "recall"} <= set(cell)
    assert "## C." in (out / "results.md").read_text()


def test_every_sampler_is_in_part_a_and_counted_from_its_step_plan():
    from cfgengine.samplers import SAMPLERS

    study = nfe.STUDIES["shapes-samplers"]
    assert set(study.samplers) == set(SAMPLERS)
    found = {(a.sampler, a.grid): [] for a in nfe.arms(study)}
    for arm in nfe.arms(study):
        found[(arm.sampler, arm.grid)].append((arm.steps, nfe.evaluations(arm)))
    # Heun and DPM++ 2S a: 2 evaluations per step, 1 on the last (σ = 0) step
    assert found[("heun", "karras")] == [(4, (7, 14)), (8, (15, 30)), (16, (31, 62))]
    assert found[("dpmpp_2s_ancestral", "cosine")] == found[("heun", "cosine")]
    assert found[("unipc", "cosine")] == [(8, (8, 16)), (16, (16, 32)), (32, (32, 64))]


def test_a_stored_run_is_reused_and_checked(tmp_path):
    study = nfe.replace(nfe.STUDIES["quick"], out=str(tmp_path / "first"), rules=(),
                        convention_steps=(), samplers=("heun",), grids=("cosine",))
    first = nfe.run_study(study, log=lambda m: None)
    again = nfe.replace(study, out=str(tmp_path / "again"),
                        reuse=str(tmp_path / "first" / study.data / "results.json"))
    result = nfe.run_study(again, log=lambda m: None)
    assert all(c.get("reused") for c in result["cells"])
    assert [c["fid"] for c in result["cells"]] == [c["fid"] for c in first["cells"]]
    check = result["reuse_check"]
    assert check["resampled_fid"]["value"] == pytest.approx(check["stored_fid"]["value"])
    assert nfe.stored_cells(nfe.replace(again, n=study.n + 1)) == {}
    assert "Reused cells" in (tmp_path / "again" / study.data / "results.md").read_text()
