"""The per-step callback and image-to-image (issue 28): the callback sees every grid step without
changing the sample; image-to-image equals the float64 reference started at its grid step."""
from __future__ import annotations

import pytest
import torch

from cfgengine import rng
from cfgengine.sampler import sample
from cfgengine.schedule import alpha_sigma, logsnr_grid
from tests.test_sampler_api import (FP32_VS_FP64_TOL, LABELS, STEPS, reference_sample, rel_err,
                                    run)

def test_callback_sees_every_grid_step_with_its_lambda_z_and_x_hat(gmm):
    seen = []
    x = sample(gmm, LABELS, w=0.3, steps=STEPS, seed=7,
               callback=lambda step, lam, z, x_hat: seen.append((step, lam, z.clone(),
                                                                x_hat.clone())))
    assert [s for s, *_ in seen] == list(range(STEPS))
    assert [lam for _, lam, *_ in seen] == logsnr_grid(STEPS).tolist()
    assert torch.equal(seen[-1][2], x) and torch.equal(seen[-1][3], x)  # the last step: z' = x̂
    assert torch.equal(x, run(gmm))  # watching changes nothing


def test_callback_fires_once_per_step_for_two_stage_samplers(gmm):
    steps = []
    sample(gmm, LABELS, steps=5, sampler="heun", callback=lambda s, *_: steps.append(s))
    assert steps == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("sampler", ["ddim", "ancestral", "dpmpp_2m"])
def test_image_to_image_starts_from_the_forward_process_at_its_grid_step(gmm, sampler):
    init = torch.randn(len(LABELS), 2, generator=torch.Generator().manual_seed(3))
    strength, steps = 0.5, 8
    start = steps - int(strength * steps)  # diffusers' convention
    lam = logsnr_grid(steps)
    x = sample(gmm, LABELS, w=1.0, steps=steps, sampler=sampler, seed=2, init=init,
               strength=strength)
    alpha, sigma = (float(t) for t in alpha_sigma(lam[start]))
    z0 = alpha * init.double() + sigma * rng.randn_like_rows(2, torch.arange(len(LABELS)), 0,
                                                             (2,)).double()
    ref = reference_sample(gmm, LABELS, 1.0, steps=steps - start, sampler=sampler, seed=2,
                           lam=lam[start:], z0=z0, clip=gmm.clip)
    assert rel_err(x, ref) < FP32_VS_FP64_TOL


@pytest.mark.parametrize("kwargs, message", [
    (dict(strength=0.5), "needs both"),
    (dict(init=torch.zeros(9, 2)), "needs both"),
    (dict(init=torch.zeros(9, 2), strength=0.0), "strength must be"),
    (dict(init=torch.zeros(9, 2), strength=1.5), "strength must be"),
    (dict(init=torch.zeros(9, 2), strength=0.01), "leaves 0 of"),
    (dict(init=torch.zeros(4, 2), strength=0.5), "init must be a float Tensor"),
])
def test_bad_image_to_image_settings_raise_one_line(gmm, kwargs, message):
    with pytest.raises(ValueError, match=message):
        sample(gmm, LABELS, steps=STEPS, **kwargs)


def test_cli_init_image_runs_and_bad_init_is_one_line(tmp_path, capsys):
    import numpy as np
    from PIL import Image

    from cfgengine.cli import main

    image = tmp_path / "init.png"
    Image.fromarray(np.full((20, 24, 3), 200, dtype=np.uint8)).save(image)
    out = tmp_path / "x.png"
    args = ["sample", "--steps", "6", "--per-class", "1", "--classes", "0,1", "--backend",
            "torch", "--out", str(out)]
    assert main(args + ["--init", str(image), "--strength", "0.5"]) == 0 and out.exists()
    array = tmp_path / "bad.npy"
    np.save(array, np.zeros((2, 2), dtype=np.float32))
    assert main(args + ["--init", str(array), "--strength", "0.5"]) == 2
    assert main(args + ["--init", str(image)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "shape (2, 2)" in err[0] and "--strength" in err[1]
