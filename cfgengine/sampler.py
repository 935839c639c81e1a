"""The sampling loop: network call → fused step, nothing else. What each step does comes from
the step plan (cfgengine/tables.py): the table (Algorithm 2, DDIM, DPM-Solver++(2M)), the λ the
net sees, which steps run the doubled batch (the rule's interval) and which draw no noise — all
decided on the host before the loop, so the loop makes no host sync (no `.item()`, no branch on a
device value) and can run ahead of the GPU. Outside the guidance interval the network runs on B
rows, not 2B.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass, replace

import torch

from cfgengine import rng
from cfgengine.conditioning import check_conditioning, prompt_rows
from cfgengine.cudagraph import CudaGraphLoop
from cfgengine.guidance import RULES, CFG, DynamicThreshold, check_embedded_rule
from cfgengine.kernels import CounterNoise, RowState, guided_step
from cfgengine.backends import Prepared, prepare
from cfgengine.schedule import GRIDS, alpha_sigma, check_logsnr_range
from cfgengine.tables import StepPlan, check_sampler_args, grid_logsnr, step_plan


@dataclass(frozen=True)
class Call:
    """One call's validated settings (shared by every chunk); `logsnr` is the float64 grid."""

    sampler: str
    v: float
    eta: float | None  # None: the sampler's default
    logsnr: tuple[float, ...]
    rule: object
    clip: float | DynamicThreshold | None
    seed: int
    shape: tuple[int, ...]
    options: tuple[tuple[str, object], ...] = ()  # the sampler's own options, sorted
    start: int = 0  # the grid step an image-to-image run starts at
    targets: tuple[float, ...] | None = None  # the model's own steps_to on its own grid

    @property
    def steps(self) -> int:
        return len(self.logsnr)


class Sampler:
    """Stateful sampler: built once for a model/backend, a device and a precision; caches the
    step plans, compiled modules and captured CUDA graphs that make repeated calls fast.

    `backend`: auto (cudagraph on CUDA; on CPU onnxruntime when it is installed, else torch),
    torch, compile, onnxruntime or cudagraph; an exported model runs on its own backend.
    `precision` is the network's (fp32, bf16, fp16 by autocast); the step is always fp32. A model
    on another device is moved there (in place, like `.to`).
    """

    def __init__(self, model, *, device: torch.device | str | None = None,
                 backend: str | None = None, precision: str | None = None):
        self.model: Prepared = prepare(model, device=device, backend=backend,
                                       precision=precision, sample=sample)
        self.info = self.model.info
        self.device, self.backend = self.model.device, self.model.backend
        self.precision = self.model.precision
        self._plans: dict[tuple, StepPlan] = {}
        self._graphs: dict[tuple, CudaGraphLoop] = {}

    def sample(self, labels: torch.Tensor | None = None, *, prompts=None, negative_prompts=None,
               w: float | torch.Tensor = 0.3,
               steps: int | None = 256, sampler: str = "ancestral", v: float = 0.3,
               eta: float | None = None, grid: str = "cosine", logsnr_range=None,
               logsnr: torch.Tensor | None = None, guidance=None,
               clip: float | str | DynamicThreshold | None = "auto", seed: int = 0,
               sample_ids: torch.Tensor | None = None, shape: tuple[int, ...] | None = None,
               batch_size: int | None = None, n: int | None = None,
               progress: bool = False, sampler_options: dict | None = None,
               init: torch.Tensor | None = None, strength: float | None = None,
               callback=None) -> torch.Tensor:
        """Samples x̂ [N, *S]; sample i depends only on (seed, sample_ids[i], its condition,
        w[i], settings). A class model takes `labels`; a prompt model (`info.conditioning ==
        "text"`) takes `prompts` and optional `negative_prompts` (row i's null branch; "" by
        default). `sampler` is one of cfgengine.samplers' (`eta` None: its default, e.g. 0 for
        DDIM and 1 for Euler ancestral; `sampler_options` its own, e.g. {"order": 3} for UniPC).
        `grid`/`logsnr_range`/`logsnr` choose the λ grid, `guidance` the rule (CFG(),
        ZeroStar(), APG(); default CFG()), `clip` a bound or a DynamicThreshold.

        Image-to-image: `init` [N, *S] (data x) and `strength` s in (0, 1] start the run at grid
        step T − ⌊s·T⌋ (diffusers' convention) from z = α·x + σ·ε, ε keyed (seed, id, 0).
        `callback(step, logsnr, z, x_hat)` is called after each grid step (None: no host sync)."""
        check_conditioning(self.info, labels, prompts, negative_prompts)
        with torch.inference_mode():  # a user's net may still require grad: build no graphs
            call = self._call(steps, sampler, v, eta, grid, logsnr_range, logsnr, guidance, clip,
                              seed, shape, sampler_options)
            call = replace(call, start=_check_strength(strength, init, call.steps))
            extras = Extras(callback, init)
            rows = self._conditions(labels, prompts, negative_prompts, n)
            return self._sample(call, rows, w, sample_ids, batch_size, progress, extras)

    def _conditions(self, labels, prompts, negative_prompts, n):
        """(cond, null, N): class ids (null: the null label), or a prompt model's rows and their
        null branches, encoded once per call; cond None: unconditional (the null branch alone)."""
        if self.info.conditioning == "text":
            return prompt_rows(self.info, prompts, negative_prompts, n, self.device)
        labels, count = self._check_labels(labels, n)
        return labels, None, count

    def _sample(self, call: Call, rows, w, sample_ids, batch_size, progress,
                extras: Extras = None) -> torch.Tensor:
        extras = extras or Extras()
        labels, null, count = rows  # labels: class ids or prompt rows (None: unconditional)
        w = self._check_w(w, count)
        init = extras.check_init(count, call.shape, self.device)
        sample_ids = _check_sample_ids(sample_ids, count, self.device)
        size = _check_batch_size(batch_size, count)
        chunks = [(i, min(i + size, count)) for i in range(0, count, size)]
        plan = self.plan(call)
        if labels is None or not bool((w != 0).any()):  # once, before any loop
            plan = plan.unguided()
        self.model.announce(rows=count, steps=plan.rows)
        bar = _progress_bar(progress, len(chunks) * plan.rows)
        finite = FiniteFlag(plan.rows, self.device)  # shared by the chunks, read once below
        parts = [self._sample_chunk(call, plan, _rows(labels, a, b), w[a:b], sample_ids[a:b],
                                    bar, finite, replace(extras, init=_rows(init, a, b)),
                                    _rows(null, a, b))
                 for a, b in chunks]
        finite.check(self.info.name, self.precision)
        if bar is not None:
            bar.close()
        x_hat = torch.cat(parts)
        self._check_finite(x_hat)
        return x_hat

    def _sample_chunk(self, call: Call, plan: StepPlan, labels, w, sample_ids, bar,
                      finite: FiniteFlag | None = None, extras: Extras = None,
                      null=None) -> torch.Tensor:
        """The loop over the plan's rows for one chunk; no host sync inside. The chunk owns its
        per-row state (the plan names it: x̂_prev, APG momentum), zero before the first step.
        `null`: the rows of the null branch (prompt models), else the null label."""
        extras = extras or Extras()
        batch = sample_ids.shape[0]
        if labels is None:  # unconditional: the null branch alone
            labels = torch.full((batch,), self.info.null_label, device=self.device) \
                if null is None else null
        z = rng.randn_like_rows(call.seed, sample_ids, 0, call.shape)  # z_0 ~ N(0, I)
        if extras.init is not None:  # image-to-image: the forward process at the first λ
            alpha, sigma = alpha_sigma(plan.logsnr[:1].to(self.device, torch.float32))
            z = alpha * extras.init + sigma * z
        if self.backend == "cudagraph" and extras.callback is None:
            x_hat = self._graph(call, plan, batch).sample(z, labels, w, sample_ids, call.seed,
                                                          plan.kinds())
            _advance(bar, plan.rows)
            return x_hat
        table, lam = plan.on(self.device)
        state = RowState.zeros_like(z, extras.state(plan))
        silence = torch.zeros_like(z) if any(plan.quiet) else None
        # CPU: the noise of many steps per Philox call (rng.StepNoise); CUDA draws it in-kernel
        drawn = rng.StepNoise(call.seed, sample_ids, call.shape, plan.rows) \
            if self.device.type == "cpu" else None
        counter = CounterNoise(call.seed, sample_ids)
        finite = finite or FiniteFlag(plan.rows, self.device)
        unguided = torch.zeros_like(w)  # w outside the rule's interval
        for t in range(plan.rows):
            w_t = w if plan.guided[t] else unguided
            eps2 = self._eps(z, lam[t].expand(batch), labels, w_t, plan.doubled[t], null)
            finite.update(eps2, t)  # before the step: its clip would hide ±inf
            noise = counter if drawn is None else silence if plan.quiet[t] else drawn[t]
            z = guided_step(eps2, z, w_t, table, t, rule=call.rule, clip=call.clip, state=state,
                            noise=noise)
            extras.after_row(plan, t, call, z, state)
            _advance(bar, 1)
        return z

    def _eps(self, z, logsnr, labels, w, doubled: bool, null=None) -> torch.Tensor:
        """ε for one step (2B or B rows): the doubled batch where the plan says; a
        guidance-embedded net instead answers ε̃_w in B rows (`w` is already 0 outside the rule's
        interval)."""
        if self.info.guidance_embedded:
            return self.model.eps(z, logsnr, labels, False, w=w)
        return self.model.eps(z, logsnr, labels, doubled, null=null)

    def _graph(self, call: Call, plan: StepPlan, batch: int) -> CudaGraphLoop:
        """The captured loop for this chunk size and plan: one graph per kind of step the plan
        has (plan.kinds(): 2B rows, B rows with w, B rows with w = 0)."""
        kinds = tuple(sorted(set(plan.kinds())))
        key = (batch, kinds, replace(call, seed=0))  # the seed is a device tensor: no re-capture
        if key not in self._graphs:
            self._graphs[key] = CudaGraphLoop(self.model, plan, batch=batch, shape=call.shape,
                                              kinds=kinds, rule=call.rule, clip=call.clip)
        return self._graphs[key]

    def plan(self, call: Call) -> StepPlan:
        """The step plan of a call, built once per (sampler, v, η, grid, rule, start, targets):
        an image-to-image run's plan is built on the grid from its first step on."""
        key = (call.sampler, call.v, call.eta, call.options, call.logsnr, call.rule, call.start,
               call.targets)
        if key not in self._plans:
            targets = None if call.targets is None \
                else torch.tensor(call.targets[call.start:], dtype=torch.float64)
            self._plans[key] = step_plan(torch.tensor(call.logsnr[call.start:],
                                                      dtype=torch.float64),
                                         call.sampler, v=call.v, eta=call.eta,
                                         options=dict(call.options), rule=call.rule,
                                         final_logsnr=self.info.final_logsnr, targets=targets)
        return self._plans[key]

    def _call(self, steps, sampler, v, eta, grid, logsnr_range, logsnr, guidance, clip, seed,
              shape, options=None) -> Call:
        lam = self._grid(steps, grid, logsnr_range, logsnr)
        check_sampler_args(lam.numel(), sampler, v, eta, options)
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) \
                or not 0 <= seed < 2**63:  # numpy integers are integers too
            raise ValueError(f"seed must be an integer in [0, 2^63), got {seed!r}")
        seed = int(seed)
        shape = tuple(shape) if shape is not None else self.info.sample_shape
        if not shape or any(not isinstance(d, int) or d < 1 for d in shape):
            raise ValueError(f"shape must be a tuple of positive integers, got {shape!r}")
        rule = _check_rule(guidance, self.info.guidance_embedded)
        return Call(sampler, float(v), None if eta is None else float(eta), tuple(lam.tolist()),
                    rule, self._check_clip(clip), seed, shape,
                    tuple(sorted((options or {}).items())), targets=self._targets(steps, lam))

    def _grid(self, steps, grid, logsnr_range, logsnr) -> torch.Tensor:
        """The float64 λ grid: `logsnr` verbatim, else the model's own grid for `steps` when
        the caller kept the default grid and range, else `grid` on the range."""
        if grid not in GRIDS:
            raise ValueError(f"grid must be one of {', '.join(GRIDS)}, got {grid!r}")
        if logsnr_range is not None:
            logsnr_range = check_logsnr_range(logsnr_range)
        if logsnr is None and grid == "cosine" and logsnr_range is None \
                and self.info.grid is not None:
            check_sampler_args(steps, "ancestral", 0.0, 0.0)  # steps only
            logsnr = self.info.grid(steps)
        return grid_logsnr(steps, grid=grid, logsnr_range=logsnr_range or self.info.logsnr_range,
                           logsnr=logsnr)

    def _targets(self, steps, lam: torch.Tensor) -> tuple[float, ...] | None:
        """The model's own step targets (ModelInfo.steps_to) when the run is on its own grid."""
        if self.info.steps_to is None or self.info.grid is None or steps != lam.numel() \
                or not torch.equal(lam, self.info.grid(steps).double()):
            return None
        return tuple(self.info.steps_to(steps).double().tolist())

    def _check_clip(self, clip):
        """`clip` resolved: "auto" → the model's bound; None, a positive number or a
        DynamicThreshold."""
        clip = self.info.clip if isinstance(clip, str) and clip == "auto" else clip
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
        classes = self.info.num_classes
        if bool((labels == classes).any()):
            raise ValueError(f"label {classes} is the null label; pass labels=None for "
                             "unconditional samples")
        bad = labels[(labels < 0) | (labels >= classes)]
        if bad.numel():
            raise ValueError(f"labels must be in [0, {classes}), got {bad[0].item()}")
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


@dataclass(frozen=True)
class Extras:
    """What a call may add to the loop: a per-step `callback(step, logsnr, z, x_hat)` and the
    image-to-image start images `init` [N, *S]."""

    callback: object = None
    init: torch.Tensor | None = None

    def check_init(self, count: int, shape: tuple[int, ...], device) -> torch.Tensor | None:
        init = self.init
        if init is None:
            return None
        if not isinstance(init, torch.Tensor) or tuple(init.shape) != (count, *shape) \
                or not init.is_floating_point():
            raise ValueError(f"init must be a float Tensor[{count}, {', '.join(map(str, shape))}] "
                             f"(one image per sample), got {_describe(init)}")
        if not bool(torch.isfinite(init).all()):
            raise ValueError("init must be finite")
        return init.to(device, torch.float32)

    def state(self, plan: StepPlan) -> tuple[str, ...]:
        """The plan's per-row state, plus this step's x̂ when a callback wants to see it."""
        wanted = ("x_hat",) if self.callback is not None else ()
        return tuple(dict.fromkeys(plan.state + wanted))

    def after_row(self, plan: StepPlan, row: int, call: Call, z, state) -> None:
        """Call the callback after the last row of each grid step (two-stage samplers run two)."""
        if self.callback is None:
            return
        steps = plan.steps  # each row's grid step
        if row + 1 < plan.rows and steps[row + 1] == steps[row]:
            return
        step = call.start + steps[row]
        self.callback(step, call.logsnr[step], z, state.x_hat)


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"{value.dtype} of shape {tuple(value.shape)}"
    return type(value).__name__


def _check_strength(strength, init, steps: int) -> int:
    """The grid step an image-to-image run starts at: T − ⌊s·T⌋ for strength s in (0, 1]."""
    if init is None and strength is None:
        return 0
    if init is None or strength is None:
        raise ValueError("image-to-image needs both init (--init: the images) and strength "
                         "(--strength)")
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) \
            or not 0 < strength <= 1:
        raise ValueError(f"strength must be a number in (0, 1], got {strength!r}")
    start = steps - int(strength * steps)
    if steps - start < 2:
        raise ValueError(f"strength {strength} leaves {steps - start} of {steps} steps; "
                         "a run needs at least 2 (raise strength or steps)")
    return start


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


def _check_rule(guidance, embedded: bool = False):
    """The guidance rule: None → CFG(); else one of CFG, ZeroStar, APG (frozen dataclasses that
    validate their own parameters). A guidance-embedded net has no separate branches: plain CFG
    (with an interval, without refresh) only."""
    if guidance is None:
        return CFG()
    if embedded:
        check_embedded_rule(guidance)
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


def sample(model, labels: torch.Tensor | None = None, *,
           device: torch.device | str | None = None, backend: str | None = None,
           precision: str | None = None, **settings) -> torch.Tensor:
    """Guided samples x̂ [N, *S] from a Denoiser or backend (cfgengine.model): a one-shot
    `Sampler(model, device=, backend=, precision=)`; `settings` are `Sampler.sample`'s (prompts
    and negative_prompts for a prompt model, w, steps, sampler, grid, guidance, seed,
    init/strength, callback, …)."""
    engine = Sampler(model, device=device, backend=backend, precision=precision)
    return engine.sample(labels, **settings)
