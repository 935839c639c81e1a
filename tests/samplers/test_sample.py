"""The registry's samplers through `cfgengine.sample` (the Sampler's loop on the step plan): equal
to the float64 meaning of their rows (which equals k-diffusion's and diffusers' samplers) within
fp32 rounding, independent of batch_size, with each sampler's own defaults and options."""
from __future__ import annotations

import pytest
import torch

from cfgengine import sample
from cfgengine.samplers import sampler_rows
from cfgengine.schedule import logsnr_grid
from cfgengine.toy import ring_mixture
from tests.samplers.peers import GuidedMixture, start_noise
from tests.samplers.rows import run_rows

LAM = logsnr_grid(8, -12.0, 10.0, grid="karras")
IDS = torch.arange(10)
SEED, W = 3, 1.5
FP32_TOL = 1e-4


@pytest.mark.parametrize("sampler, options", [
    ("euler_ancestral", {}), ("heun", {}), ("dpmpp_2s_ancestral", {}), ("dpmpp_2m_sde", {}),
    ("dpmpp_2m_sde", {"solver": "heun"}), ("dpmpp_3m_sde", {"s_noise": 0.5}),
    ("unipc", {}), ("unipc", {"order": 3}),
])
def test_sample_equals_the_rows(sampler, options):
    mixture = ring_mixture()
    labels = IDS % mixture.num_classes
    got = sample(mixture, labels, w=W, logsnr=LAM, steps=None, sampler=sampler, seed=SEED,
                 sampler_options=options, backend="torch")
    rows = sampler_rows(sampler, LAM, **options)
    want = run_rows(rows, GuidedMixture(mixture, labels, W).eps,
                    start_noise(SEED, IDS, mixture.sample_shape), SEED, IDS)
    assert float((got.double() - want).abs().max()) < FP32_TOL
    chunked = sample(mixture, labels, w=W, logsnr=LAM, steps=None, sampler=sampler, seed=SEED,
                     sampler_options=options, backend="torch", batch_size=3)
    assert torch.equal(chunked, got)


def test_eta_none_is_each_samplers_default():
    mixture = ring_mixture()
    labels = IDS % mixture.num_classes

    def run(**settings):
        return sample(mixture, labels, w=W, logsnr=LAM, steps=None, seed=SEED, backend="torch",
                      **settings)
    assert torch.equal(run(sampler="euler_ancestral"), run(sampler="ddim", eta=1.0))
    assert torch.equal(run(sampler="ddim"), run(sampler="euler_ancestral", eta=0.0))


@pytest.mark.parametrize("sampler, options, message", [
    ("unipc", {"order": 5}, "order must be one of"), ("heun", {"s_noise": 1.0}, "no option"),
    ("ddim", [("eta", 1)], "sampler_options must be a dict"),
])
def test_bad_sampler_options_fail_in_one_line(sampler, options, message):
    mixture = ring_mixture()
    with pytest.raises(ValueError, match=message) as info:
        sample(mixture, IDS[:2] % 5, logsnr=LAM, steps=None, sampler=sampler,
               sampler_options=options, backend="torch")
    assert "\n" not in str(info.value)
