"""The precision-quality study's own arithmetic (issue 27): the known degradation has the stated
size, and the verdicts call a disjoint interval resolved and an overlapping one not."""
from __future__ import annotations

import torch

from cfgengine.bench.studies import precision
from cfgengine.bench.workload import random_unet


def test_noise_has_the_stated_relative_size():
    net = random_unet("tiny")
    copied = precision.noisy(net, 0.1, seed=0)
    for (name, p), q in zip(net.named_parameters(), copied.parameters()):
        if p.numel() >= 1000 and p.abs().max() > 0:  # enough draws for the sample std to
            # sit near its expectation; an all-zero tensor (RMS 0) is left as it is
            rel = (q - p).std() / p.pow(2).mean().sqrt()
            assert 0.08 < float(rel) < 0.12, name
    fresh = random_unet("tiny").parameters()
    assert all(torch.equal(a, b) for a, b in zip(net.parameters(), fresh))  # the original kept


def _row(variant: str, fid: tuple[float, float, float]) -> dict:
    interval = dict(value=fid[0], low=fid[1], high=fid[2])
    return dict(variant=variant, **{m: interval for m in precision.SCORED})


def test_verdicts_resolve_only_disjoint_intervals():
    rows = [_row("fp32", (10, 9, 11)), _row("int8", (10.5, 9.5, 11.5)),
            _row("fp32+noise 0.03", (10.8, 10, 12)), _row("fp32+noise 0.1", (14, 12, 16))]
    v = precision.verdicts(rows)
    assert v["variants"]["int8"]["overlaps_fp32"]["fid"]
    assert not v["variants"]["fp32+noise 0.1"]["overlaps_fp32"]["fid"]
    assert v["smallest_resolved_fid_gap"] == 4
    assert v["fp32_fid_half_width"] == 1


def test_command_line_sets_every_field():
    study = precision.parse(["--n", "7", "--precisions", "fp32,int8", "--noise", "0.2",
                             "--out", "x", "--force", "bf16", "--steps", "4", "--w", "1"])
    assert study == precision.StudyConfig(precisions=("fp32", "int8"), noise=(0.2,), n=7,
                                          steps=4, w=1.0, out="x", force=("bf16",))
    assert precision.parse([]) == precision.StudyConfig()
