"""The samplers through the engine's one fused step: every sampler's rows run by `guided_step`
(guided, counter noise drawn by the step at each row's key, the x̂ history in RowState) — the
Triton kernel under the interpreter (TRITON_INTERPRET=1, tests/conftest.py; compiled on a GPU)
against the torch reference, and the fp32 reference against the float64 meaning of the rows
(tests/samplers/rows.py, which equals k-diffusion's and diffusers' samplers)."""
from __future__ import annotations

import pytest
import torch

from cfgengine.kernels import CounterNoise, RowState, guided_step
from cfgengine.samplers import sampler_rows
from cfgengine.schedule import logsnr_grid
from cfgengine.toy import image_mixture
from tests.samplers.peers import GuidedMixture, start_noise
from tests.samplers.rows import run_rows

triton = pytest.importorskip("triton")

SAMPLERS = [("euler_ancestral", {}), ("heun", {}), ("dpmpp_2s_ancestral", {}),
            ("dpmpp_2m_sde", {}), ("dpmpp_2m_sde", {"solver": "heun"}), ("dpmpp_3m_sde", {}),
            ("unipc", {"order": 2}), ("unipc", {"order": 3})]
LAM = logsnr_grid(7, -10.0, 9.0, grid="karras")
SEED = 11
W = 1.5
KERNEL_TOL = 1e-6  # one step's fp32 roundings, the kernel's against torch's
FP32_TOL = 1e-4  # fp32 step against the float64 rows


def run_step(rows, mixture, labels, ids, impl: str) -> tuple[torch.Tensor, RowState]:
    """z after every row of `rows`, each a `guided_step` on the mixture's exact ε (2B rows)."""
    table = rows.table.float()
    z = start_noise(SEED, ids, mixture.sample_shape).float()
    state = RowState.zeros_like(z, rows.state)
    null = torch.full_like(labels, mixture.num_classes)
    for r in range(table.shape[0]):
        lam = rows.logsnr[r].float().expand(z.shape[0])
        eps2 = torch.cat([mixture(z, lam, labels), mixture(z, lam, null)])
        z = guided_step(eps2, z, W, table, r, state=state, noise=CounterNoise(SEED, ids),
                        impl=impl)
    return z, state


def copied(state: RowState) -> RowState:
    return RowState(**{name: t.clone() for name, t in state.kept().items()})


@pytest.mark.parametrize("sampler, options", SAMPLERS)
def test_triton_equals_the_reference(sampler, options):
    """Row by row from the same z and state: z' and the moved x̂ history agree."""
    mixture = image_mixture(shape=(1, 6, 6))
    ids = torch.arange(3) + 40
    labels, null = ids % mixture.num_classes, torch.full((3,), mixture.num_classes)
    rows = sampler_rows(sampler, LAM, **options)
    table = rows.table.float()
    z = start_noise(SEED, ids, mixture.sample_shape).float()
    state = RowState.zeros_like(z, rows.state)
    for r in range(table.shape[0]):
        lam = rows.logsnr[r].float().expand(3)
        eps2 = torch.cat([mixture(z, lam, labels), mixture(z, lam, null)])
        kernel_state = copied(state)
        got = guided_step(eps2, z, W, table, r, state=kernel_state,
                          noise=CounterNoise(SEED, ids), impl="triton")
        z = guided_step(eps2, z, W, table, r, state=state, noise=CounterNoise(SEED, ids),
                        impl="torch")
        assert float((got - z).abs().max()) <= KERNEL_TOL * (1 + float(z.abs().max())), r
        for name in rows.state:
            diff = (getattr(kernel_state, name) - getattr(state, name)).abs().max()
            assert float(diff) <= KERNEL_TOL, (r, name)


@pytest.mark.parametrize("sampler, options", SAMPLERS)
def test_fp32_step_equals_the_rows(sampler, options):
    mixture = image_mixture(shape=(1, 4, 4))
    ids = torch.arange(16)
    labels = ids % mixture.num_classes
    rows = sampler_rows(sampler, LAM, **options)
    got, _ = run_step(rows, mixture, labels, ids, "torch")
    exact = run_rows(rows, GuidedMixture(mixture, labels, W).eps,
                     start_noise(SEED, ids, mixture.sample_shape), SEED, ids)
    assert float((got.double() - exact).abs().max()) < FP32_TOL
