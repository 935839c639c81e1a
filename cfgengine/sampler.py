"""The sampling loop: backend call → fused step, nothing else (Algorithm 2 and DDIM via the table).

The coefficient table and the λ grid live on the device before the loop; the loop makes no host
sync (no `.item()`, no branch on a device value), so it can run ahead of the GPU.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from cfgengine import rng
from cfgengine.runtime import (autocast_dtype, check_backend, check_device, check_precision,
                                move_model, split_model)
from cfgengine.cudagraph import CudaGraphLoop
from cfgengine.kernels import guided_step
from cfgengine.schedule import logsnr_grid
from cfgengine.tables import check_sampler_args, coefficient_table


@dataclass(frozen=True)
class Plan:
    """One call's validated settings (shared by every chunk)."""

    steps: int
    sampler: str
    v: float
    eta: float
    clip: float | None
    seed: int
    shape: tuple[int, ...]


class Sampler:
    """Stateful sampler: built once for a model/backend, a device and a precision; caches the
    tables, compiled modules and captured CUDA graphs that make repeated calls fast.

    `backend`: auto (cudagraph on CUDA; on CPU onnxruntime when it is installed, else torch),
    torch, compile, onnxruntime or cudagraph; an exported model runs on its own backend.
    `precision` is the network's (fp32, bf16, fp16 by autocast); the step is always fp32. A model
    on another device is moved there (in place, like `.to`).
    """

    def __init__(self, model, *, device: torch.device | str | None = None,
                 backend: str | None = None, precision: str | None = None):
        self.device = check_device(device, model)
        self.precision = check_precision(precision, model)
        self.backend = check_backend(backend, model, self.device, self.precision)
        exported = getattr(model, "backend_name", None) is not None or \
            self.backend == "onnxruntime"  # ONNX Runtime runs its graph at its own precision
        self.autocast_dtype = None if exported else autocast_dtype(self.precision)
        model = move_model(model, self.device)
        self.num_classes = model.num_classes
        self.sample_shape = tuple(model.sample_shape)
        self.clip = getattr(model, "clip", None)
        self.guided_net, self.net = split_model(model, self.backend, self.precision, self.device,
                                                auto=backend in (None, "auto"))
        self._tables: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self._graphs: dict[tuple, CudaGraphLoop] = {}

    def sample(self, labels: torch.Tensor | None, *, w: float | torch.Tensor = 0.3,
               steps: int = 256, sampler: str = "ancestral", v: float = 0.3, eta: float = 0.0,
               clip: float | str | None = "auto", seed: int = 0,
               shape: tuple[int, ...] | None = None, batch_size: int | None = None,
               n: int | None = None, progress: bool = False) -> torch.Tensor:
        """Samples x̂ [N, *S]; sample i depends only on (seed, i, labels[i], w[i], settings)."""
        with torch.inference_mode():  # a user's net may still require grad: build no graphs
            return self._sample(labels, w, steps, sampler, v, eta, clip, seed, shape, batch_size,
                                n, progress)

    def _sample(self, labels, w, steps, sampler, v, eta, clip, seed, shape, batch_size, n,
                progress) -> torch.Tensor:
        plan = self._plan(steps, sampler, v, eta, clip, seed, shape)
        labels, count = self._check_labels(labels, n)
        w = self._check_w(w, count)
        size = _check_batch_size(batch_size, count)
        chunks = [(i, min(i + size, count)) for i in range(0, count, size)]
        guided = labels is not None and bool((w != 0).any())  # once, before any loop
        if hasattr(self.guided_net, "plan"):  # onnxruntime: export only when the work pays
            self.guided_net.plan(rows=count, steps=plan.steps)
        bar = _progress_bar(progress, len(chunks) * plan.steps)
        parts = [self._sample_chunk(plan, _rows(labels, a, b), _rows(w, a, b),
                                    torch.arange(a, b, device=self.device), guided, bar)
                 for a, b in chunks]
        if bar is not None:
            bar.close()
        x_hat = torch.cat(parts)
        self._check_finite(x_hat)
        return x_hat

    def _sample_chunk(self, plan: Plan, labels, w, sample_ids, guided: bool, bar) -> torch.Tensor:
        """The loop over T steps for one chunk of rows; no host sync inside."""
        table, logsnr = self._table(plan)
        batch = sample_ids.shape[0]
        if labels is None:
            labels = torch.full((batch,), self.num_classes, device=self.device)
        z = rng.randn_like_rows(plan.seed, sample_ids, 0, plan.shape)  # z_0 ~ N(0, I)
        if self.backend == "cudagraph":
            graph = self._graph(plan, batch, guided)
            x_hat = graph.sample(z, labels, w, sample_ids, plan.seed, plan.steps)
            if bar is not None:
                bar.update(plan.steps)
            return x_hat
        quiet = self._quiet_steps(plan)
        silence = torch.zeros_like(z) if any(quiet) else None
        # CPU: the noise of many steps per Philox call (rng.StepNoise); CUDA draws it in-kernel
        drawn = rng.StepNoise(plan.seed, sample_ids, plan.shape, plan.steps) \
            if self.device.type == "cpu" else None
        for t in range(plan.steps):
            eps2 = self._eps(z, logsnr[t].expand(batch), labels, guided)  # (2B|B, *S)
            noise = silence if quiet[t] else None if drawn is None else drawn[t]
            z = guided_step(eps2, z, w, table, t, clip=plan.clip, seed=plan.seed,
                            sample_ids=sample_ids, noise=noise)
            if bar is not None:
                bar.update(1)
        return z

    def _eps(self, z, logsnr, labels, guided: bool) -> torch.Tensor:
        with torch.autocast(self.device.type, dtype=self.autocast_dtype,
                            enabled=self.autocast_dtype is not None):
            if guided:
                return self.guided_net(z, logsnr, labels)
            if self.net is not None:
                return self.net(z, logsnr, labels)
            return self.guided_net(z, logsnr, labels)[: z.shape[0]]

    def _graph(self, plan: Plan, batch: int, guided: bool) -> CudaGraphLoop:
        key = (batch, guided, plan.shape, plan.steps, plan.sampler, plan.v, plan.eta, plan.clip)
        if key not in self._graphs:
            table, logsnr = self._table(plan)
            self._graphs[key] = CudaGraphLoop(
                self.net, num_classes=self.num_classes, batch=batch, shape=plan.shape,
                guided=guided, table=table, logsnr=logsnr, clip=plan.clip,
                autocast_dtype=self.autocast_dtype)
        return self._graphs[key]

    def _quiet_steps(self, plan: Plan) -> list[bool]:
        """Per step, whether the CPU reference may skip its noise draw (s = 0: DDIM η = 0 and the
        last step). Known on the host from the table; the GPU kernel tests s on the device."""
        deterministic = plan.sampler == "ddim" and plan.eta == 0
        on_cpu = self.device.type == "cpu"
        return [on_cpu and (deterministic or t == plan.steps - 1) for t in range(plan.steps)]

    def _table(self, plan: Plan):
        key = (plan.steps, plan.sampler, plan.v, plan.eta)
        if key not in self._tables:
            table = coefficient_table(plan.steps, plan.sampler, v=plan.v, eta=plan.eta,
                                      device=self.device)
            logsnr = logsnr_grid(plan.steps, dtype=torch.float32).to(self.device)
            self._tables[key] = (table, logsnr)
        return self._tables[key]

    def _plan(self, steps, sampler, v, eta, clip, seed, shape) -> Plan:
        check_sampler_args(steps, sampler, v, eta)
        clip = self.clip if clip == "auto" else clip
        if clip is not None and (isinstance(clip, bool) or not isinstance(clip, (int, float))
                                 or not clip > 0):
            raise ValueError(f"clip must be 'auto', None or a positive number, got {clip!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
            raise ValueError(f"seed must be an integer in [0, 2^63), got {seed!r}")
        shape = tuple(shape) if shape is not None else self.sample_shape
        if not shape or any(not isinstance(d, int) or d < 1 for d in shape):
            raise ValueError(f"shape must be a tuple of positive integers, got {shape!r}")
        return Plan(steps, sampler, float(v), float(eta), clip, seed, shape)

    def _check_labels(self, labels, n):
        if labels is None:
            if n is None or isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise ValueError("unconditional sampling (labels=None) needs n ≥ 1 samples")
            return None, n
        if n is not None:
            raise ValueError("n is only for unconditional sampling (labels=None)")
        if not isinstance(labels, torch.Tensor) or labels.dim() != 1 or labels.is_floating_point() \
                or labels.is_complex() or labels.dtype == torch.bool:
            raise ValueError("labels must be a 1-D integer tensor (LongTensor[N])")
        if labels.numel() == 0:
            raise ValueError("labels is empty: nothing to sample")
        if bool((labels == self.num_classes).any()):
            raise ValueError(f"label {self.num_classes} is the null label; pass labels=None for "
                             "unconditional samples")
        bad = labels[(labels < 0) | (labels >= self.num_classes)]
        if bad.numel():
            raise ValueError(f"labels must be in [0, {self.num_classes}), got {bad[0].item()}")
        return labels.to(self.device, torch.int64), labels.numel()

    def _check_w(self, w, count: int) -> torch.Tensor:
        w = torch.as_tensor(w, dtype=torch.float32)
        if w.dim() > 1 or (w.dim() == 1 and w.numel() != count):
            raise ValueError(f"w must be a float or a Tensor[{count}], got shape {tuple(w.shape)}")
        if not bool(torch.isfinite(w).all()):
            raise ValueError("w must be finite")
        return w.expand(count).to(self.device)

    def _check_finite(self, x_hat: torch.Tensor) -> None:
        if not bool(torch.isfinite(x_hat).all()):  # one check after the loop, never per step
            raise FloatingPointError(f"sampling produced NaN/inf at precision {self.precision}")


def _rows(t: torch.Tensor | None, start: int, stop: int):
    return None if t is None else t[start:stop]


def _check_batch_size(batch_size: int | None, count: int) -> int:
    if batch_size is None:
        return count
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    return batch_size


def _progress_bar(enabled: bool, total: int):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="step", leave=False)


def sample(model, labels: torch.Tensor | None, *, w: float | torch.Tensor = 0.3,
           steps: int = 256, sampler: str = "ancestral", v: float = 0.3, eta: float = 0.0,
           clip: float | str | None = "auto", seed: int = 0, shape: tuple[int, ...] | None = None,
           batch_size: int | None = None, n: int | None = None,
           device: torch.device | str | None = None, backend: str | None = None,
           precision: str | None = None, progress: bool = False) -> torch.Tensor:
    """Guided samples x̂ [N, *S] from a Denoiser or backend (DESIGN.md §3); one-shot `Sampler`."""
    engine = Sampler(model, device=device, backend=backend, precision=precision)
    return engine.sample(labels, w=w, steps=steps, sampler=sampler, v=v, eta=eta, clip=clip,
                         seed=seed, shape=shape, batch_size=batch_size, n=n, progress=progress)
