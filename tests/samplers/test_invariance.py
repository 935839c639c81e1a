"""The per-row state of every sampler is per sample: chunking the batch, reordering its rows, or
stepping rows that are at different rows of the plan in one call (serving's batches) leaves each
sample's result as it is — through `guided_step`, reference and kernel (TRITON_INTERPRET=1)."""
from __future__ import annotations

import pytest
import torch

from cfgengine.kernels import CounterNoise, RowState, guided_step
from cfgengine.samplers import sampler_rows
from cfgengine.schedule import logsnr_grid
from cfgengine.toy import image_mixture
from tests.samplers.peers import start_noise

SAMPLERS = [("euler_ancestral", {}), ("heun", {}), ("dpmpp_2s_ancestral", {}),
            ("dpmpp_2m_sde", {}), ("dpmpp_3m_sde", {}), ("unipc", {"order": 3})]
LAM = logsnr_grid(6, -10.0, 9.0)
SEED, W = 5, 2.0
MIXTURE = image_mixture(shape=(1, 4, 4))


def eps2(z: torch.Tensor, lam: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    labels = ids % MIXTURE.num_classes
    null = torch.full_like(labels, MIXTURE.num_classes)
    return torch.cat([MIXTURE(z, lam, labels), MIXTURE(z, lam, null)])


def advance(rows, z, state, ids, steps, impl="torch"):
    """One call: row i of the batch takes plan row steps[i]."""
    step = torch.as_tensor(steps, dtype=torch.int64)
    lam = rows.logsnr[step].float()
    return guided_step(eps2(z, lam, ids), z, W, rows.table.float(), step, state=state,
                       noise=CounterNoise(SEED, ids), impl=impl)


def run(rows, ids, start=0, stop=None, z=None, state=None, impl="torch"):
    """Rows [start, stop) of the plan for the samples `ids` together."""
    z = start_noise(SEED, ids, MIXTURE.sample_shape).float() if z is None else z
    state = RowState.zeros_like(z, rows.state) if state is None else state
    for r in range(start, rows.table.shape[0] if stop is None else stop):
        z = advance(rows, z, state, ids, [r] * ids.numel(), impl)
    return z, state


@pytest.mark.parametrize("sampler, options", SAMPLERS)
def test_chunks_and_order_do_not_change_a_sample(sampler, options):
    rows = sampler_rows(sampler, LAM, **options)
    ids = torch.tensor([7, 0, 3, 12, 5, 9, 2])
    whole, _ = run(rows, ids)
    parts = torch.cat([run(rows, ids[:3])[0], run(rows, ids[3:4])[0], run(rows, ids[4:])[0]])
    assert torch.equal(parts, whole)
    order = torch.tensor([4, 6, 0, 2, 1, 5, 3])
    assert torch.equal(run(rows, ids[order])[0], whole[order])


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("sampler, options", SAMPLERS)
def test_rows_at_different_plan_rows_share_a_call(sampler, options, impl):
    """Sample a starts `lead` rows before sample b; after that the two step together, each at
    its own plan row, its x̂ history moved in place: each ends where it ends alone."""
    if impl == "triton":
        pytest.importorskip("triton")
    rows = sampler_rows(sampler, LAM, **options)
    total, lead = rows.table.shape[0], 3
    a, b = torch.tensor([4]), torch.tensor([11])
    z_a, state_a = run(rows, a, stop=lead, impl=impl)
    z_b = start_noise(SEED, b, MIXTURE.sample_shape).float()
    z = torch.cat([z_a, z_b])
    state = RowState(**{name: torch.cat([t, torch.zeros_like(t)])
                        for name, t in state_a.kept().items()})
    for r in range(lead, total):
        z = advance(rows, z, state, torch.cat([a, b]), [r, r - lead], impl)
    alone_a, _ = run(rows, a, impl=impl)
    alone_b, _ = run(rows, b, stop=total - lead, impl=impl)
    tol = 0.0 if impl == "torch" else 1e-5  # the kernel's per-row tile differs from one row's
    assert float((z[:1] - alone_a).abs().max()) <= tol
    assert float((z[1:] - alone_b).abs().max()) <= tol
