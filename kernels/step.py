"""The public guided step: one call per sampler step, dispatched to the fused Triton kernels
(kernels/launch.py) on CUDA or to the torch reference (kernels/reference.py) elsewhere.

The layers, each readable alone: kernels/contract.py (the formula, constants, operand types and
checks), reference.py (the definition in torch), triton_step.py (the kernels), launch.py (tiles
and launches), and this dispatch. CPU sampling never imports Triton.
"""
from __future__ import annotations

import functools
import importlib.util

import torch

from cfgengine.guidance import APG, CFG, DynamicThreshold, ZeroStar
from cfgengine.kernels.contract import CounterNoise, RowState, check_step_args, first_half
from cfgengine.kernels.reference import guided_step_reference


def guided_step(eps2: torch.Tensor, z: torch.Tensor, w: float | torch.Tensor,
                table: torch.Tensor, step: int | torch.Tensor, *,
                rule: CFG | ZeroStar | APG | None = None,
                clip: float | DynamicThreshold | None = None,
                state: RowState | None = None,
                noise: torch.Tensor | CounterNoise | None = None,
                out: torch.Tensor | None = None, impl: str = "auto") -> torch.Tensor:
    """One sampler step for B rows (kernels/contract.py has the formula); returns z'.

    `rule` defaults to CFG(); its `interval` is the caller's to apply: outside it the caller
    passes eps2 with B rows (ε̃ = ε_c). `state` holds the per-row state kept across steps
    (RowState: APG's momentum, the x̂ history for c_p ≠ 0), updated in place. `step` is an int,
    a 0-d int64 tensor or an int64 Tensor[B]. `noise` is used as given when a tensor, else drawn
    at key (seed, sample_ids[i], step_i + 1) of its CounterNoise (None: CounterNoise(0, 0..B−1)).
    `out` of B rows receives z'; one of 2B rows receives z' in both halves and the call returns
    out[:B]. `impl` is "auto" (the kernels on CUDA when Triton is installed), "triton" or "torch".
    """
    rule = CFG() if rule is None else rule
    check_step_args(eps2, z, w, table, step, rule=rule, clip=clip, state=state, noise=noise,
                    out=out, impl=impl)
    if _use_triton(impl, z):
        return _launcher().launch_step(eps2, z, w, table, step, rule=rule, clip=clip,
                                       state=state, noise=noise, out=out)
    z_next, x_hat = guided_step_reference(eps2, z, w, table, step, rule=rule, clip=clip,
                                          state=state, noise=noise)
    if state is not None:
        state.push(x_hat)
    return _store(z_next, z.dtype, out)


@functools.cache
def triton_installed() -> bool:
    """Whether Triton can be imported here (Linux x86-64), found without importing it."""
    try:
        return importlib.util.find_spec("triton") is not None
    except ValueError:  # a module entry without a spec: treated as absent
        return False


def _use_triton(impl: str, z: torch.Tensor) -> bool:
    """impl "auto" takes the kernel on CUDA when Triton is installed; "triton" insists on it.

    On CPU "auto" stays the eager reference, measured against torch.compile of it
    (bench/results/step-cpu-*.json): compiled, a step runs 6–30× faster, but each dtype, shape
    and flag set compiles for 20–40 s (cold cache), which a CPU run earns back only after
    hundreds of steps of megabytes each — and every short run and test would pay it. A caller
    holding state across runs (the Sampler) is the place to opt into compiling.
    """
    if impl == "auto":
        return z.device.type == "cuda" and triton_installed()
    return impl == "triton"


def _launcher():
    """kernels/launch.py, imported on first use; a RuntimeError that says why when it cannot."""
    if not triton_installed():
        raise RuntimeError("impl='triton' needs the `triton` package (Linux x86-64); "
                           "use impl='torch' or impl='auto'")
    from cfgengine.kernels import launch

    return launch


def _store(z_next: torch.Tensor, dtype: torch.dtype, out: torch.Tensor | None) -> torch.Tensor:
    """The reference's fp32 z' stored the way the kernel stores it: rounded once, into each half
    of a 2B-row `out`."""
    if out is None:
        return z_next.to(dtype)
    z_out = first_half(out, z_next.shape[0])
    z_out.copy_(z_next)
    if out.shape[0] > z_out.shape[0]:
        out[z_out.shape[0]:].copy_(z_out)
    return z_out
