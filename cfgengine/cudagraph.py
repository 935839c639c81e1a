"""The whole sampling step captured as one CUDA graph and replayed T times with no host sync.

The net reads a static input buffer z2 [2B, *S] (rows B..2B−1 carry the null label); the fused
step kernel reads ε from the net's output and z from z2[:B], and writes z' straight into both
halves of z2 (`out` of 2B rows), so the next replay's forward input is ready. The step index and the seed
are 0-d device tensors the kernel reads, so replays advance through the table and a new seed needs
no re-capture. Steps on B rows replay another graph whose net runs on B rows (with w inside the
guidance interval, where CFG(refresh) reuses its stored Δ; with w = 0 outside it). One loop per
(batch, kinds of step, plan).
"""
from __future__ import annotations

from typing import Callable

import torch

from cfgengine.kernels import CounterNoise, RowState, guided_step

WARMUP_STEPS = 3  # Triton compilation and cuDNN autotuning happen here, outside the capture


def capture(fn: Callable[[], object], warmup: int = WARMUP_STEPS) -> torch.cuda.CUDAGraph:
    """`fn` captured as a CUDA graph after `warmup` calls on a side stream (compilation and
    autotuning must happen outside the capture). The engine's loop and the bench share it."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


class CudaGraphLoop:
    """Static buffers + one captured step per kind of step for `batch` rows of `shape` on a CUDA
    device: `kinds` holds the (doubled, guided) pairs of the plan's steps (StepPlan.kinds): the
    net on 2B rows or on the first B, and the step given w or w = 0 (outside the interval). The
    step plan gives the table, the λ per step and the per-row state."""

    def __init__(self, model, plan, *, batch: int, shape: tuple[int, ...],
                 kinds: tuple[bool, ...], rule, clip):
        device = model.device
        rows = 2 * batch if any(doubled for doubled, _ in kinds) else batch
        self.net, self.batch, self.rule, self.clip = model.net, batch, rule, clip
        self.autocast_dtype = model.autocast_dtype
        self.table, self.logsnr = plan.on(device)
        self.z2 = torch.zeros((rows, *shape), device=device)
        self.logsnr2 = torch.zeros(rows, device=device)
        null = model.info.null_label
        self.labels2 = torch.full((rows,), null, device=device)  # the null half stays null
        self.w = torch.zeros(batch, device=device)
        self.w_off = torch.zeros(batch, device=device)  # w outside the interval, always 0
        self.sample_ids = torch.zeros(batch, dtype=torch.int64, device=device)
        self.step = torch.zeros((), dtype=torch.int64, device=device)
        self.seed = torch.zeros((), dtype=torch.int64, device=device)
        self.state = RowState.zeros_like(self.z2[:batch], plan.state)
        self.noise = CounterNoise(self.seed, self.sample_ids)
        self.graphs = {kind: self._capture(*kind) for kind in kinds}

    def _capture(self, doubled: bool, guided: bool) -> torch.cuda.CUDAGraph:
        """One kind of step, captured; its warm-up starts at step 0 so it stays on the table."""
        self.step.zero_()
        return capture(lambda: self._step(doubled, guided))

    def _step(self, doubled: bool, guided: bool) -> None:
        """λ for this step → net on z2 (2B rows, or its first B) → fused step into z2 → step += 1
        (all on the device). z' goes to both halves of z2 whenever it has two, so a guided step
        may follow a plain one."""
        rows = 2 * self.batch if doubled else self.batch
        lam = self.logsnr.index_select(0, self.step.reshape(1))
        self.logsnr2[:rows].copy_(lam.expand(rows))
        with torch.autocast("cuda", dtype=self.autocast_dtype, cache_enabled=False,
                            enabled=self.autocast_dtype is not None):
            eps2 = self.net(self.z2[:rows], self.logsnr2[:rows], self.labels2[:rows])  # (rows, *S)
        z = self.z2[: self.batch]
        w = self.w if guided else self.w_off
        guided_step(eps2, z, w, self.table, self.step, rule=self.rule, clip=self.clip,
                    state=self.state, noise=self.noise, out=self.z2)
        self.step.add_(1)

    def sample(self, z0: torch.Tensor, labels: torch.Tensor, w: torch.Tensor,
               sample_ids: torch.Tensor, seed: int,
               kinds: tuple[tuple[bool, bool], ...]) -> torch.Tensor:
        """Load this chunk into the static buffers (state zeroed: capture's warm-up ran steps),
        replay each step's kind of graph, return x̂ [B, *S]."""
        self.z2[: self.batch].copy_(z0)
        if self.z2.shape[0] > self.batch:
            self.z2[self.batch:].copy_(z0)
        self.labels2[: self.batch].copy_(labels)
        self.w.copy_(w)
        self.sample_ids.copy_(sample_ids)
        self.seed.fill_(seed)
        self.step.zero_()
        self.state.zero_()
        for kind in kinds:
            self.graphs[kind].replay()
        return self.z2[: self.batch].clone()
