"""The peers the engine is measured against, run on the same net, device, precision and Workload.

  baseline1  two forwards per step (conditional, then null, B rows each) and the step as separate
             tensor ops with per-step coefficient gathers — the `forward_with_cond_scale` /
             `p_sample` pattern of lucidrains' denoising-diffusion-pytorch
  baseline2  the diffusers pipeline loop driven by the real `diffusers` library: per step
             `torch.cat([z] * 2)`, one doubled forward, the CFG mix as separate ops, then
             `DDPMScheduler.step` (ancestral) or `DDIMScheduler.step` (ddim)
  baseline3  baseline2 with the network wrapped in torch.compile, as diffusers' docs advise

The schedulers run our T-step grid (see `diffusers_scheduler`) and the net is called with our λ, so
every runner takes the same T steps; with DDIM η = 0 their outputs agree to float rounding.
"""
from __future__ import annotations

import torch

from cfgengine.bench.workload import Workload, schedule
from cfgengine.model import info as model_info
from cfgengine.schedule import logsnr_grid

SCHEDULERS = {"ancestral": "ddpm", "ddim": "ddim"}


def diffusers_scheduler(kind: str, steps: int):
    """DDPMScheduler ("ddpm") or DDIMScheduler ("ddim") on our grid: one training timestep per
    sampling step, training index T−1−t holding our step t, so ᾱ[T−1−t] = α_t² = sigmoid(λ_t).
    alphas_cumprod is set from the grid itself in float64: diffusers' float32 cumprod of betas
    rounds ᾱ at λmax = 20 (1 − 2·10⁻⁹) to exactly 1, and its DDIM step then divides 0 by 0."""
    import diffusers  # the [bench] extra; only these baselines need it

    alphas_cumprod = torch.sigmoid(logsnr_grid(steps).flip(0))  # float64, least noisy first
    previous = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
    betas = (1.0 - alphas_cumprod / previous).numpy()
    cls = diffusers.DDPMScheduler if kind == "ddpm" else diffusers.DDIMScheduler
    scheduler = cls(num_train_timesteps=steps, trained_betas=betas, clip_sample=True,
                    clip_sample_range=1.0)
    scheduler.alphas_cumprod = alphas_cumprod
    scheduler.set_timesteps(steps)
    return scheduler


class TwoForwardLoop:
    """Baseline 1: ε̃ = ε_u + (1 + w)·(ε_c − ε_u) from two B-row forwards per step, then
    x̂ = clip((z − σ·ε̃)/α), z' = c_z·z + c_x·x̂ + s·n as separate ops on gathered coefficients."""

    def __init__(self, work: Workload):
        self.work = work

    def __call__(self, steps: int, sampler: str) -> torch.Tensor:
        work = self.work
        table, logsnr = schedule(steps, sampler).on(work.device)
        gen = torch.Generator(work.device).manual_seed(work.seed)
        z = work.z0()
        for t in range(steps):
            z = self._step(z, t, table, logsnr, gen if t < steps - 1 else None)
        return z

    def _step(self, z, t: int, table, logsnr, gen) -> torch.Tensor:
        work = self.work
        t_batch = torch.full((work.batch,), t, device=work.device)  # per step, as p_sample does
        logsnr_t = logsnr[t_batch]
        with work.autocast():
            eps_cond = work.net(z, logsnr_t, work.labels)  # (B, *S)
            eps_null = work.net(z, logsnr_t, work.null)  # (B, *S)
        eps = eps_null + (eps_cond - eps_null) * (1.0 + work.w)
        alpha, sigma, c_z, c_x, s = (_extract(table[:, k], t_batch, z) for k in range(5))
        x_hat = _clip((z - sigma * eps) / alpha, model_info(work.net).clip)
        noise = 0.0 if gen is None else torch.randn(z.shape, generator=gen, device=z.device)
        return c_z * z + c_x * x_hat + s * noise


def _extract(column: torch.Tensor, t_batch: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """column[t] per row, shaped to broadcast over a sample (the `extract` of DDPM codebases)."""
    return column.gather(0, t_batch).reshape(-1, *(1,) * (like.dim() - 1))


def _clip(x: torch.Tensor, bound: float | None) -> torch.Tensor:
    return x if bound is None else x.clamp(-bound, bound)


class DiffusersLoop:
    """Baselines 2 and 3: a diffusers pipeline's denoising loop around the real scheduler's step.
    The doubled batch is (null, conditional) as pipelines order it; guidance_scale = 1 + w."""

    def __init__(self, work: Workload, compiled: bool = False):
        self.work = work
        self.net = torch.compile(work.net) if compiled else work.net
        self.labels2 = torch.cat([work.null, work.labels])  # (2B,)
        self._schedulers: dict[tuple[int, str], object] = {}

    def __call__(self, steps: int, sampler: str) -> torch.Tensor:
        work, scheduler = self.work, self._scheduler(steps, sampler)
        _, logsnr = schedule(steps, sampler).on(work.device)
        latents, extra = work.z0(), self._step_kwargs(sampler)
        for i, t in enumerate(scheduler.timesteps):
            latent_model_input = torch.cat([latents] * 2)  # (2B, *S)
            noise_pred = self.forward(latent_model_input, logsnr[i])
            noise_pred_uncond, noise_pred_cond = noise_pred.chunk(2)
            noise_pred = noise_pred_uncond + (1.0 + work.w) * (noise_pred_cond - noise_pred_uncond)
            latents = scheduler.step(noise_pred, t, latents, **extra).prev_sample
        return latents

    def forward(self, z2: torch.Tensor, logsnr: torch.Tensor) -> torch.Tensor:
        """One doubled forward on (2B, *S) rows at one λ — also this baseline's forward floor."""
        with self.work.autocast():
            return self.net(z2, logsnr.expand(z2.shape[0]), self.labels2)

    def _step_kwargs(self, sampler: str) -> dict:
        if sampler == "ddim":  # ε re-derived from the clipped x̂, as our DDIM step does
            return dict(eta=0.0, use_clipped_model_output=True)
        return dict(generator=torch.Generator(self.work.device).manual_seed(self.work.seed))

    def _scheduler(self, steps: int, sampler: str):
        key = (steps, sampler)
        if key not in self._schedulers:  # a pipeline builds its scheduler once, outside the loop
            self._schedulers[key] = diffusers_scheduler(SCHEDULERS[sampler], steps)
        return self._schedulers[key]
