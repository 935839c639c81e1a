"""The quality-per-second study (bench/studies/fewer.py): rows per sample of each method, and the
quick study end to end (tiny model, few samples), with a student that answers the teacher's exact
guided ε̃_w — it must match the doubled batch, from half the rows."""
from __future__ import annotations

import json

import torch

from cfgengine.bench.studies import fewer, nfe
from cfgengine.guidance import guided_eps


def test_rows_per_sample_of_each_method():
    assert fewer.rows_per_sample(fewer.Method("doubled"), 10) == 20
    assert fewer.rows_per_sample(fewer.Method("refresh-2", refresh=2), 10) == 15
    assert fewer.rows_per_sample(fewer.Method("refresh-3", refresh=3), 10) == 14
    assert fewer.rows_per_sample(fewer.Method("student", student=True), 10) == 10


class ExactStudent:
    """Guidance-embedded: the teacher's own eq. 6 from one call of two passes."""

    guidance_embedded = True

    def __init__(self, teacher):
        self.teacher = teacher
        self.num_classes, self.sample_shape = teacher.num_classes, teacher.sample_shape
        self.clip = teacher.clip

    def __call__(self, z, logsnr, labels, w):
        null = torch.full_like(labels, self.num_classes)
        return guided_eps(self.teacher(z, logsnr, labels), self.teacher(z, logsnr, null), w)


def test_quick_study_writes_results_with_findings_and_resolution(tmp_path, monkeypatch):
    loaded = {}
    load = nfe.load_model

    def load_once(study):
        loaded.setdefault("teacher", load(study))
        return loaded["teacher"]
    monkeypatch.setattr(nfe, "load_model", load_once)
    monkeypatch.setattr(fewer, "load_student",
                        lambda study, notes, ckpt=None: ExactStudent(loaded["teacher"][0]))
    study = fewer.replace(fewer.STUDIES["quick"], out=str(tmp_path))
    result = fewer.run_study(study, log=lambda m: None)
    out = tmp_path / study.data
    assert {p.name for p in out.iterdir()} == {"results.json", "results.md", "pareto.png"}
    stored = json.loads((out / "results.json").read_text())
    assert len(stored["cells"]) == 3 * len(study.steps) * len(study.w)  # doubled, refresh-2, student
    assert {"median_fid_interval_width", "steps_separated"} <= set(stored["resolution"])
    again = fewer.report(out / "results.json")  # re-derived from the stored cells alone
    assert again["findings"] == json.loads(json.dumps(result["findings"]))
    student = [f for f in result["findings"] if f["method"] == "student"]
    assert student and all(abs(f["fid"] - f["fid_doubled"]) < 1e-3 * f["fid_doubled"] + 1e-6
                           for f in student)


def _cell(method, steps, fid, low, high, speed, w=1.0):
    return dict(method=method, steps=steps, w=w, images_per_cpu_s=speed,
                fid=dict(value=fid, low=low, high=high))


def test_pareto_front_and_recommendation():
    cells = [_cell("doubled", 64, 2.0, 1.8, 2.2, 1.0), _cell("doubled", 16, 3.0, 2.7, 3.3, 4.0),
             _cell("student", 64, 2.1, 1.9, 2.3, 2.0), _cell("refresh-2", 64, 2.5, 2.3, 2.7, 1.3),
             _cell("student", 16, 2.9, 2.6, 3.2, 8.0), _cell("doubled", 64, 9.0, 8, 10, 1.0, w=0.0)]
    front = fewer.pareto(cells, 1.0)
    # refresh-2 is beaten by the student at T=64 (lower FID, faster); doubled T=16 by student T=16
    assert [(c["method"], c["steps"]) for c in front] == [("doubled", 64), ("student", 64),
                                                           ("student", 16)]
    (rec,) = fewer.recommend(cells, fewer.replace(fewer.STUDIES["quick"], w=(0.0, 1.0)))
    # the fastest cell whose interval overlaps the best (doubled T=64: [1.8, 2.2]) is student T=64
    assert (rec["method"], rec["steps"], rec["speedup_vs_best"]) == ("student", 64, 2.0)


def test_resolution_names_the_smallest_resolved_and_largest_unresolved_difference():
    cells = [_cell("doubled", 8, 2.0, 1.8, 2.2, 1.0), _cell("doubled", 16, 2.3, 2.1, 2.5, 1.0),
             _cell("doubled", 32, 3.0, 2.8, 3.2, 1.0), _cell("student", 8, 9.0, 8.0, 10.0, 2.0)]
    study = fewer.replace(fewer.STUDIES["quick"], w=(1.0,), steps=(8, 16, 32))
    found = fewer.resolution(cells, study)
    assert found["smallest_resolved"].startswith("0.7: w=1 T=16")  # 2.3 vs 3.0, disjoint
    assert found["largest_unresolved"].startswith("0.3: w=1 T=8")  # 2.0 vs 2.3, overlapping
    assert found["steps_separated"] == "T=8 vs T=32 at w=1: lower"


def test_distilling_needs_a_teacher_checkpoint_and_names_the_student_by_its_steps(tmp_path):
    import pytest

    with pytest.raises(ValueError, match="distills a trained teacher checkpoint"):
        fewer.distilled_student("default")
    run = tmp_path / "digits-tiny-p0.2"
    run.mkdir()
    (run / "ckpt.pt").write_bytes(b"")
    made = tmp_path / f"digits-tiny-p0.2-distilled-{fewer.DISTILL_STEPS}" / "student.safetensors"
    made.parent.mkdir()
    made.write_bytes(b"")  # a finished student of these settings is reused, not distilled again
    assert fewer.distilled_student(str(run / "ckpt.pt")) == str(made)
