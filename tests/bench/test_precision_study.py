"""The precision-quality study's own arithmetic (issue 27): the known degradation has the stated
size, and the verdicts call a disjoint interval resolved and an overlapping one not."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

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
                             "--out", "x", "--force", "bf16", "--steps", "4", "--w", "1",
                             "--data", "digits", "--seed", "3", "--rounds", "9"])
    assert study == precision.StudyConfig(data="digits", precisions=("fp32", "int8"),
                                          noise=(0.2,), n=7, steps=4, w=1.0, out="x",
                                          force=("bf16",), seed=3, rounds=9)
    assert precision.parse([]) == precision.StudyConfig()


U_BF16 = 2.0 ** -9  # bf16's unit roundoff (8 significant bits, round to nearest)


def _rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x - ref).norm() / ref.norm())


def test_bf16_emulation_computes_what_autocast_bf16_computes():
    """On a tiny UNet (convs, linears, attention, GroupNorm on their bf16 outputs) the emulation
    rounds exactly where autocast's bf16 kernels round, so the two differ only where a different
    fp32 summation order flips a rounding by one ulp. Missing (or adding) one rounded tensor on
    the way to ε would alone move it by about one rounding's RMS error, u/√3 ≈ 1.1e-3; the
    tolerance u/8 ≈ 2.4e-4 rules that out. fp32 itself sits at least u away (several roundings
    deep), so an emulation that rounded nothing would fail."""
    net = random_unet("tiny").eval()
    gen = torch.Generator().manual_seed(0)
    z = torch.randn((8, *net.sample_shape), generator=gen)
    logsnr = torch.empty(8).uniform_(-15.0, 15.0, generator=gen)
    labels = torch.randint(0, net.num_classes + 1, (8,), generator=gen)
    with torch.no_grad():
        fp32 = net(z, logsnr, labels)
        with torch.autocast("cpu", torch.bfloat16):
            real = net(z, logsnr, labels).float()
        emulated = precision.Bf16Emulated(net)(z, logsnr, labels)
    assert emulated.dtype == torch.float32
    assert _rel(emulated, real) < U_BF16 / 8
    assert _rel(emulated, fp32) > U_BF16 > 8 * _rel(emulated, real)


def test_bf16_emulated_attention_follows_the_kernel_torch_picks():
    """bf16 q, k, v of the UNet's layout (strided views) go to torch's math kernel, fp32 on the
    bf16 inputs: the emulation gives the same bits. Contiguous ones go to the flash kernel
    (bf16 probabilities): the emulation lands closer to it than the math arithmetic does."""
    gen = torch.Generator().manual_seed(0)
    qkv = torch.randn((2, 3, 2, 32, 64), generator=gen).bfloat16()  # (N, 3, heads, C/h, HW)
    strided = qkv.transpose(-1, -2).unbind(1)
    real = F.scaled_dot_product_attention(*strided).float()
    assert torch.equal(precision._attention(*[t.float() for t in strided]).float(), real)
    packed = [t.contiguous() for t in strided]
    real = F.scaled_dot_product_attention(*packed).float()
    math_kernel = F.scaled_dot_product_attention(*[t.float() for t in packed]).bfloat16().float()
    flash = precision._attention(*[t.float() for t in packed]).float()
    assert _rel(flash, real) < _rel(math_kernel, real) / 2


def test_the_emulated_arm_samples_through_torch_at_fp32():
    study = precision.StudyConfig(precisions=("fp32", "bf16-emulated"), noise=())
    net = random_unet("tiny")
    (_, fp32, p32), (name, emulated, p) = precision.variants(net, study)
    assert (name, p, p32) == ("bf16-emulated", "fp32", "fp32") and fp32 is net
    assert isinstance(emulated, precision.Bf16Emulated) and emulated.net is net


def test_the_study_runs_on_digits_and_writes_its_files(tmp_path, monkeypatch):
    """--data digits end to end at a tiny n: the NFE study's digits model (here its quick
    stand-in, a tiny net trained for 2 steps, so the test does not train the teacher), every
    arm the CPU runs fast sampled and scored, precision-digits.json/.md written."""
    from cfgengine.bench.studies import nfe

    monkeypatch.setitem(nfe.STUDIES, "digits", nfe.replace(nfe.STUDIES["quick"],
                                                            out=str(tmp_path / "model")))
    study = precision.parse(["--data", "digits", "--n", "20", "--steps", "3", "--rounds", "10",
                             "--noise", "0.5", "--precisions", "fp32,bf16-emulated,int8",
                             "--out", str(tmp_path)])
    result = precision.run(study, log=lambda line: None)
    assert result["dataset"] == "digits"
    got = {r["variant"]: r for r in result["variants"]}
    assert set(got) == {"fp32", "bf16-emulated", "int8", "fp32+noise 0.5"}
    assert got["bf16-emulated"]["network_precision"] == "bf16 emulated in fp32"
    for row in got.values():
        assert row["fid"]["low"] <= row["fid"]["value"] <= row["fid"]["high"]
    paths = precision.write(result, "python -m cfgengine.bench.studies.precision --data digits")
    assert [p.name for p in paths] == ["precision-digits.json", "precision-digits.md"]
    assert "bf16-emulated" in paths[1].read_text()


def test_digits_takes_no_shapes_model():
    with pytest.raises(ValueError, match="--model"):
        precision.study_model(precision.StudyConfig(data="digits", model="tiny"))
