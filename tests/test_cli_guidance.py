"""`cfgengine sample`'s grid, sampler and guidance-rule flags end to end on the `gmm` built-in: the
written samples equal the Python API's with the same settings; bad values are one line on stderr,
exit code 2, no output file."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import cfgengine
from cfgengine import APG, CFG, DynamicThreshold, ZeroStar, cli

BASE = ["sample", "--ckpt", "gmm", "--steps", "6", "--n", "3", "--w", "0.5"]
LABELS = torch.arange(5).repeat_interleave(3)

CASES = [
    (["--sampler", "dpmpp_2m", "--grid", "karras"], dict(sampler="dpmpp_2m", grid="karras")),
    (["--grid", "uniform", "--logsnr-range", "-12,9"],
     dict(grid="uniform", logsnr_range=(-12.0, 9.0))),
    (["--grid", "cosine-authors"], dict(grid="cosine-authors")),
    (["--rescale", "0.7", "--interval", "-0.95,3.32"],
     dict(guidance=CFG(rescale=0.7, interval=(-0.95, 3.32)))),
    (["--refresh", "3", "--sampler", "ddim"], dict(guidance=CFG(refresh=3), sampler="ddim")),
    (["--guidance", "zero_star", "--sampler", "ddim"],
     dict(guidance=ZeroStar(), sampler="ddim")),
    (["--guidance", "apg", "--apg-eta", "0.5", "--apg-momentum", "-0.5", "--apg-norm", "2",
      "--sampler", "dpmpp_2m"],
     dict(guidance=APG(eta=0.5, momentum=-0.5, norm_threshold=2.0), sampler="dpmpp_2m")),
    (["--threshold", "0.9,1.5"], dict(clip=DynamicThreshold(0.9, 1.5))),
]


@pytest.mark.parametrize("flags, kwargs", CASES, ids=lambda c: " ".join(c) if
                         isinstance(c, list) else None)
def test_flags_give_the_python_apis_samples(capsys, tmp_path, flags, kwargs):
    npz = tmp_path / "s.npz"
    code = cli.main([*BASE, *flags, "--out", str(tmp_path / "s.png"), "--npz", str(npz)])
    assert code == 0, capsys.readouterr().err
    got = np.load(npz)["arr_0"]
    ref = cfgengine.sample(cfgengine.load("gmm"), LABELS, w=torch.full((15,), 0.5), steps=6,
                           **kwargs)
    np.testing.assert_allclose(got, ref.numpy(), rtol=0, atol=1e-6)


BAD = [
    (["--grid", "linear"], "--grid"),
    (["--sampler", "euler"], "--sampler"),
    (["--logsnr-range", "5,-5"], "lo < hi"),
    (["--logsnr-range", "1,2,3"], "two numbers"),
    (["--interval", "3,-3"], "lo ≤ hi"),
    (["--interval", "a,b"], "--interval"),
    (["--guidance", "pag"], "--guidance"),
    (["--rescale", "1.5"], "rescale"),
    (["--rescale", "0.5", "--guidance", "apg"], "--rescale applies"),
    (["--apg-eta", "1"], "--apg-eta applies"),
    (["--refresh", "2", "--guidance", "zero_star"], "--refresh applies"),
    (["--refresh", "0"], "refresh must be an integer ≥ 1"),
    (["--refresh", "2", "--rescale", "0.5"], "one of rescale or refresh"),
    (["--guidance", "apg", "--apg-momentum", "1"], "momentum"),
    (["--threshold", "0"], "--threshold"),
    (["--threshold", "0.9,0.5"], "max_value"),
    (["--threshold", "0.9,2,3"], "P or P,MAX"),
]


@pytest.mark.parametrize("flags, match", BAD, ids=[" ".join(f) for f, _ in BAD])
def test_bad_values_are_one_line_exit_2_and_no_file(capsys, tmp_path, flags, match):
    out = tmp_path / "s.png"
    code = cli.main([*BASE, *flags, "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and match in err and err.count("\n") == 1, err
    assert not out.exists()
