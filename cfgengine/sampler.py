"""The sampling loop: backend call → fused step, nothing else (Algorithm 2, DDIM and
DPM-Solver++(2M) via the table; the guidance rule and thresholding inside the step).

The coefficient table and the λ grid live on the device before the loop; which steps are guided
(the rule's interval) and which draw no noise is decided on the host from the float64 grid before
the loop, so the loop makes no host sync (no `.item()`, no branch on a device value) and can run
ahead of the GPU. Outside the guidance interval the network runs on B rows, not 2B.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass, replace

import torch

from cfgengine import rng
from cfgengine.cudagraph import CudaGraphLoop
from cfgengine.guidance import APG, CFG, RULES, DynamicThreshold, ZeroStar
from cfgengine.kernels import CounterNoise, RowState, guided_step
from cfgengine.runtime import (autocast_dtype, check_backend, check_device, check_precision,
                                move_model, split_model)
from cfgengine.schedule import GRIDS, LOGSNR_RANGE, check_logsnr_range
from cfgengine.tables import NOISE, check_sampler_args, grid_logsnr, table_from_logsnr


@dataclass(frozen=True)
class Plan:
    """One call's validated settings (shared by every chunk); `logsnr` is the float64 grid."""

    sampler: str
    v: float
    eta: float
    logsnr: tuple[float, ...]
    rule: CFG | ZeroStar | APG
    clip: float | DynamicThreshold | None
    seed: int
    shape: tuple[int, ...]

    @property
    def steps(self) -> int:
        return len(self.logsnr)

    def in_interval(self) -> tuple[bool, ...]:
        """Per step, whether the rule guides it: lo ≤ λ_t ≤ hi of its interval (all without one)."""
        interval = self.rule.interval
        if interval is None:
            return (True,) * self.steps
        lo, hi = interval
        return tuple(lo <= lam <= hi for lam in self.logsnr)


@dataclass(frozen=True)
class Steps:
    """What the loop reads per step: the table and the net's λ on the device; which steps run the
    doubled batch (the interval) and which draw no noise (s = 0), on the host."""

    table: torch.Tensor  # float32 [T, 6]
    logsnr: torch.Tensor  # float32 [T]
    guided: tuple[bool, ...]
    quiet: tuple[bool, ...]


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
        self.logsnr_range = tuple(getattr(model, "logsnr_range", None) or LOGSNR_RANGE)
        self.model_grid = getattr(model, "logsnr_grid", None)  # e.g. a diffusers scheduler's
        self.model_name = str(getattr(model, "path", None) or type(model).__name__)
        self.guided_net, self.net = split_model(model, self.backend, self.precision, self.device,
                                                auto=backend in (None, "auto"))
        self._steps: dict[tuple, Steps] = {}
        self._graphs: dict[tuple, CudaGraphLoop] = {}

    def sample(self, labels: torch.Tensor | None, *, w: float | torch.Tensor = 0.3,
               steps: int | None = 256, sampler: str = "ancestral", v: float = 0.3,
               eta: float = 0.0, grid: str = "cosine", logsnr_range=None,
               logsnr: torch.Tensor | None = None, guidance=None,
               clip: float | str | DynamicThreshold | None = "auto", seed: int = 0,
               sample_ids: torch.Tensor | None = None, shape: tuple[int, ...] | None = None,
               batch_size: int | None = None, n: int | None = None,
               progress: bool = False) -> torch.Tensor:
        """Samples x̂ [N, *S]; sample i depends only on (seed, sample_ids[i], labels[i], w[i],
        settings). `grid`/`logsnr_range`/`logsnr` choose the λ grid, `guidance` the rule (CFG(),
        ZeroStar(), APG(); default CFG()), `clip` a bound or a DynamicThreshold."""
        with torch.inference_mode():  # a user's net may still require grad: build no graphs
            plan = self._plan(steps, sampler, v, eta, grid, logsnr_range, logsnr, guidance, clip,
                              seed, shape)
            return self._sample(plan, labels, w, sample_ids, batch_size, n, progress)

    def _sample(self, plan: Plan, labels, w, sample_ids, batch_size, n, progress) -> torch.Tensor:
        labels, count = self._check_labels(labels, n)
        w = self._check_w(w, count)
        sample_ids = _check_sample_ids(sample_ids, count, self.device)
        size = _check_batch_size(batch_size, count)
        chunks = [(i, min(i + size, count)) for i in range(0, count, size)]
        guided = labels is not None and bool((w != 0).any())  # once, before any loop
        steps = self._steps_of(plan)
        if hasattr(self.guided_net, "plan"):  # onnxruntime: export only when the work pays
            self.guided_net.plan(rows=count, steps=plan.steps)
        bar = _progress_bar(progress, len(chunks) * plan.steps)
        finite = FiniteFlag(plan.steps, self.device)  # shared by the chunks, read once below
        parts = [self._sample_chunk(plan, steps, _rows(labels, a, b), w[a:b], sample_ids[a:b],
                                    guided, bar, finite) for a, b in chunks]
        finite.check(self.model_name, self.precision)
        if bar is not None:
            bar.close()
        x_hat = torch.cat(parts)
        self._check_finite(x_hat)
        return x_hat

    def _sample_chunk(self, plan: Plan, steps: Steps, labels, w, sample_ids, guided: bool,
                      bar, finite: FiniteFlag | None = None) -> torch.Tensor:
        """The loop over T steps for one chunk of rows; no host sync inside. The chunk owns its
        per-sample state (APG momentum, DPM-Solver++'s x̂_prev), zero before the first step."""
        batch = sample_ids.shape[0]
        if labels is None:
            labels = torch.full((batch,), self.num_classes, device=self.device)
        z = rng.randn_like_rows(plan.seed, sample_ids, 0, plan.shape)  # z_0 ~ N(0, I)
        doubled = steps.guided if guided else (False,) * plan.steps
        if self.backend == "cudagraph":
            x_hat = self._graph(plan, steps, batch, doubled).sample(
                z, labels, w, sample_ids, plan.seed, doubled)
            _advance(bar, plan.steps)
            return x_hat
        state, x_hat = self._buffers(plan, z)
        silence = torch.zeros_like(z) if any(steps.quiet) else None
        # CPU: the noise of many steps per Philox call (rng.StepNoise); CUDA draws it in-kernel
        drawn = rng.StepNoise(plan.seed, sample_ids, plan.shape, plan.steps) \
            if self.device.type == "cpu" else None
        finite = finite or FiniteFlag(plan.steps, self.device)
        for t in range(plan.steps):
            eps2 = self._eps(z, steps.logsnr[t].expand(batch), labels, doubled[t])  # (2B|B, *S)
            finite.update(eps2, t)  # before the step: its clip would hide ±inf
            noise = silence if steps.quiet[t] else None if drawn is None else drawn[t]
            z = guided_step(eps2, z, w, steps.table, t, rule=plan.rule, clip=plan.clip,
                            state=RowState(momentum=state, x_hat=x_hat),
                            noise=CounterNoise(plan.seed, sample_ids) if noise is None else noise)
            _advance(bar, 1)
        return z

    def _buffers(self, plan: Plan, z: torch.Tensor):
        """(APG momentum or None, x̂_prev or None) for one chunk: fp32 [B, *S] zeros."""
        state = torch.zeros_like(z) if isinstance(plan.rule, APG) else None
        x_hat = torch.zeros_like(z) if plan.sampler == "dpmpp_2m" else None
        return state, x_hat

    def _eps(self, z, logsnr, labels, doubled: bool) -> torch.Tensor:
        with torch.autocast(self.device.type, dtype=self.autocast_dtype,
                            enabled=self.autocast_dtype is not None):
            if doubled:
                return _check_rows(self.guided_net(z, logsnr, labels), 2 * z.shape[0],
                                   self.model_name)
            if self.net is not None:
                return _check_rows(self.net(z, logsnr, labels), z.shape[0], self.model_name)
            return _check_rows(self.guided_net(z, logsnr, labels), 2 * z.shape[0],
                               self.model_name)[: z.shape[0]]

    def _graph(self, plan: Plan, steps: Steps, batch: int,
               doubled: tuple[bool, ...]) -> CudaGraphLoop:
        """The captured loop for this chunk size and plan: a 2B-row graph for guided steps and a
        B-row graph for the others, each captured only when some step needs it."""
        kinds = tuple(sorted(set(doubled)))
        key = (batch, kinds, replace(plan, seed=0))  # the seed is a device tensor: no re-capture
        if key not in self._graphs:
            self._graphs[key] = CudaGraphLoop(
                self.net, num_classes=self.num_classes, batch=batch, shape=plan.shape,
                kinds=kinds, table=steps.table, logsnr=steps.logsnr, rule=plan.rule,
                clip=plan.clip, multistep=plan.sampler == "dpmpp_2m",
                autocast_dtype=self.autocast_dtype)
        return self._graphs[key]

    def _steps_of(self, plan: Plan) -> Steps:
        """The plan's table and per-step host facts, built once per (sampler, v, η, grid, rule)."""
        key = (plan.sampler, plan.v, plan.eta, plan.logsnr, plan.rule.interval)
        if key not in self._steps:
            lam = torch.tensor(plan.logsnr, dtype=torch.float64)
            table = table_from_logsnr(lam, plan.sampler, v=plan.v, eta=plan.eta)  # float64
            on_cpu = self.device.type == "cpu"  # the GPU kernel tests s on the device instead
            quiet = tuple(on_cpu and s == 0 for s in table[:, NOISE].tolist())
            self._steps[key] = Steps(table.to(self.device, torch.float32),
                                     lam.to(torch.float32).to(self.device),
                                     plan.in_interval(), quiet)
        return self._steps[key]

    def _plan(self, steps, sampler, v, eta, grid, logsnr_range, logsnr, guidance, clip, seed,
              shape) -> Plan:
        lam = self._grid(steps, grid, logsnr_range, logsnr)
        check_sampler_args(lam.numel(), sampler, v, eta)
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) \
                or not 0 <= seed < 2**63:  # numpy integers are integers too
            raise ValueError(f"seed must be an integer in [0, 2^63), got {seed!r}")
        seed = int(seed)
        shape = tuple(shape) if shape is not None else self.sample_shape
        if not shape or any(not isinstance(d, int) or d < 1 for d in shape):
            raise ValueError(f"shape must be a tuple of positive integers, got {shape!r}")
        return Plan(sampler, float(v), float(eta), tuple(lam.tolist()), _check_rule(guidance),
                    self._check_clip(clip), seed, shape)

    def _grid(self, steps, grid, logsnr_range, logsnr) -> torch.Tensor:
        """The float64 λ grid: `logsnr` verbatim, else the model's own `logsnr_grid(steps)` when
        the caller kept the default grid and range, else `grid` on the range."""
        if grid not in GRIDS:
            raise ValueError(f"grid must be one of {', '.join(GRIDS)}, got {grid!r}")
        if logsnr_range is not None:
            logsnr_range = check_logsnr_range(logsnr_range)
        if logsnr is None and grid == "cosine" and logsnr_range is None \
                and self.model_grid is not None:
            check_sampler_args(steps, "ancestral", 0.0, 0.0)  # steps only
            logsnr = self.model_grid(steps)
        return grid_logsnr(steps, grid=grid, logsnr_range=logsnr_range or self.logsnr_range,
                           logsnr=logsnr)

    def _check_clip(self, clip):
        """`clip` resolved: "auto" → the model's bound; None, a positive number or a
        DynamicThreshold."""
        clip = self.clip if isinstance(clip, str) and clip == "auto" else clip
        if clip is None or isinstance(clip, DynamicThreshold):
            return clip
        if isinstance(clip, bool) or not isinstance(clip, (int, float)) or not clip > 0:
            raise ValueError(f"clip must be 'auto', None, a positive number or a "
                             f"DynamicThreshold, got {clip!r}")
        return float(clip)

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


def _check_rows(eps: torch.Tensor, rows: int, name: str) -> torch.Tensor:
    """eps if it has `rows` rows (shape metadata: no sync); a B-row answer where 2B are due
    would make every guided step silently unguided."""
    if eps.shape[0] != rows:
        raise ValueError(f"{name}: returned {eps.shape[0]} rows where {rows} are due (a guided "
                         "call computes the conditional and the null rows: 2B)")
    return eps


class FiniteFlag:
    """First and last step whose network output held NaN/inf, kept on the device (0-d tensors
    updated every step, no host sync) and read once after the loop."""

    def __init__(self, steps: int, device: torch.device):
        self.steps = steps
        self.first = torch.full((), steps, dtype=torch.int64, device=device)
        self.last = torch.full((), -1, dtype=torch.int64, device=device)

    def update(self, eps: torch.Tensor, t: int) -> None:
        bad = ~torch.isfinite(eps).all()
        self.first = torch.where(bad & (self.first == self.steps), t, self.first)
        self.last = torch.where(bad, t, self.last)

    def check(self, name: str, precision: str) -> None:
        last = int(self.last)  # the loop's one read of the flag
        if last >= 0:
            raise FloatingPointError(f"{name}: the network returned NaN/inf at steps "
                                     f"{int(self.first)}..{last} of {self.steps} "
                                     f"(precision {precision})")


def _check_sample_ids(ids: torch.Tensor | None, count: int, device) -> torch.Tensor:
    """The noise key of each row: 0..N−1 by default, else a Tensor[N] of ids in [0, 2^63)."""
    if ids is None:
        return torch.arange(count, device=device)
    if isinstance(ids, (list, tuple)) or (not isinstance(ids, torch.Tensor)
                                          and hasattr(ids, "__array__")):
        ids = torch.as_tensor(ids)
    if not isinstance(ids, torch.Tensor) or ids.dim() != 1 or ids.is_floating_point() \
            or ids.is_complex() or ids.dtype == torch.bool:
        raise ValueError("sample_ids must be a 1-D integer tensor (LongTensor[N])")
    if ids.numel() != count:
        raise ValueError(f"sample_ids has {ids.numel()} entries for {count} samples")
    if bool((ids < 0).any()):
        raise ValueError("sample_ids must be non-negative (≥ 0)")
    return ids.to(device, torch.int64)


def _check_rule(guidance):
    """The guidance rule: None → CFG(); else one of CFG, ZeroStar, APG (frozen dataclasses that
    validate their own parameters)."""
    if guidance is None:
        return CFG()
    if not isinstance(guidance, RULES):
        raise ValueError(f"guidance must be CFG(...), ZeroStar(...) or APG(...), got "
                         f"{guidance!r}")
    return guidance


def _rows(t: torch.Tensor | None, start: int, stop: int):
    return None if t is None else t[start:stop]


def _advance(bar, count: int) -> None:
    if bar is not None:
        bar.update(count)


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
           steps: int | None = 256, sampler: str = "ancestral", v: float = 0.3, eta: float = 0.0,
           grid: str = "cosine", logsnr_range=None, logsnr: torch.Tensor | None = None,
           guidance=None, clip: float | str | DynamicThreshold | None = "auto", seed: int = 0,
           sample_ids: torch.Tensor | None = None, shape: tuple[int, ...] | None = None,
           batch_size: int | None = None, n: int | None = None,
           device: torch.device | str | None = None, backend: str | None = None,
           precision: str | None = None, progress: bool = False) -> torch.Tensor:
    """Guided samples x̂ [N, *S] from a Denoiser or backend (docs/design.md); one-shot `Sampler`."""
    engine = Sampler(model, device=device, backend=backend, precision=precision)
    return engine.sample(labels, w=w, steps=steps, sampler=sampler, v=v, eta=eta, grid=grid,
                         logsnr_range=logsnr_range, logsnr=logsnr, guidance=guidance, clip=clip,
                         seed=seed, sample_ids=sample_ids, shape=shape, batch_size=batch_size,
                         n=n, progress=progress)
