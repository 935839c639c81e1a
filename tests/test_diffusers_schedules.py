"""Each diffusers folder's own schedule as its pipeline runs it (cfgengine/adapters.py,
TimestepSchedule), against the real schedulers' loops on the same latents, unclipped: DDIMScheduler
(spacing leading / trailing / linspace, steps_offset, set_alpha_to_one) at a T that divides the
1000 training steps and one that does not, in the "pipeline" schedule (DDIM's own t → t − ⌊N/T⌋
pairs) and the default "consistent" one (each state stepped to the next timestep, as
DPMSolverMultistepScheduler at order 1 — which is DDIM — steps between its own list entries)."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

import cfgengine  # noqa: E402
from cfgengine import rng  # noqa: E402
from tests.test_adapters import rel_err, tiny_dit, tiny_unet  # noqa: E402

SEED = 4
SPACINGS = [("trailing", 0, True), ("linspace", 0, False), ("leading", 1, False)]


@pytest.fixture(scope="module")
def base_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("schedules")
    scheduler = diffusers.DDIMScheduler(clip_sample=False)
    diffusers.DDPMPipeline(unet=tiny_unet(), scheduler=scheduler).save_pretrained(root / "unet")
    diffusers.DiTPipeline(transformer=tiny_dit(), vae=None, scheduler=scheduler) \
        .save_pretrained(root / "dit")
    return root


def folder_with(base, tmp_path, which, spacing, offset, one):
    """A copy of the `which` folder whose scheduler says spacing / steps_offset / set_alpha_to_one."""
    folder = tmp_path / which
    shutil.copytree(base / which, folder)
    path = folder / "scheduler" / "scheduler_config.json"
    config = json.loads(path.read_text())
    config.update(timestep_spacing=spacing, steps_offset=offset, set_alpha_to_one=one)
    path.write_text(json.dumps(config))
    return folder


def reference_loop(scheduler, net, z, labels, w, null, steps, **step_args):
    """A diffusers scheduler's loop with ε = ε_u + (1 + w)(ε_c − ε_u), unclipped."""
    scheduler.set_timesteps(steps)
    channels = z.shape[1]
    scale = (1 + w).reshape(-1, 1, 1, 1)
    for t in scheduler.timesteps:
        with torch.no_grad():
            out = net(torch.cat([z, z]), t.expand(2 * len(z)),
                      class_labels=torch.cat([labels, torch.full_like(labels, null)])).sample
        eps_c, eps_u = out[:, :channels].chunk(2)
        z = scheduler.step(eps_u + scale * (eps_c - eps_u), t, z, **step_args).prev_sample
    return z


def run(folder, schedule, steps):
    model = cfgengine.load(folder, schedule=schedule)
    labels = torch.arange(4) % model.num_classes
    w = torch.tensor([0.0, 1.0, 2.0, 4.0])
    z0 = rng.randn_like_rows(SEED, torch.arange(4), 0, model.sample_shape)
    out = cfgengine.sample(model, labels, w=w, steps=steps, sampler="ddim", seed=SEED,
                           backend="torch")
    return model, (labels, w, z0), out


def ddim_loop(folder, model, inputs, steps):
    scheduler = diffusers.DDIMScheduler.from_pretrained(folder / "scheduler")
    return reference_loop(scheduler, model.net, inputs[2], inputs[0], inputs[1],
                          model.num_classes, steps, eta=0.0)


@pytest.mark.parametrize("which", ["unet", "dit"])
@pytest.mark.parametrize("steps", [10, 6])  # 1000/10 whole, 1000/6 not
@pytest.mark.parametrize("spacing, offset, one", SPACINGS)
def test_pipeline_schedule_is_diffusers_ddim(base_folders, tmp_path, which, steps, spacing,
                                             offset, one):
    folder = folder_with(base_folders, tmp_path, which, spacing, offset, one)
    model, inputs, out = run(folder, "pipeline", steps)
    ref = ddim_loop(folder, model, inputs, steps)
    assert rel_err(out, ref) < 1e-4, rel_err(out, ref)


@pytest.mark.parametrize("which", ["unet", "dit"])
@pytest.mark.parametrize("spacing, offset, one", SPACINGS)
def test_consistent_schedule_is_ddim_where_its_pairs_are_consistent(base_folders, tmp_path,
                                                                    which, spacing, offset, one):
    """T | N with trailing spacing, and leading spacing at any T: DDIM steps between its own
    timesteps, so the default schedule is the pipeline's too."""
    folder = folder_with(base_folders, tmp_path, which, spacing, offset, one)
    for steps in ((10,) if spacing != "leading" else (10, 6)):
        model, inputs, out = run(folder, "consistent", steps)
        ref = ddim_loop(folder, model, inputs, steps)
        if spacing == "linspace":  # linspace rounds 999·i/(T−1): never DDIM's own pairs
            assert rel_err(out, ref) > 1e-3
        else:
            assert rel_err(out, ref) < 1e-4, (steps, rel_err(out, ref))


@pytest.mark.parametrize("which", ["unet", "dit"])
def test_consistent_schedule_where_ddim_is_not(base_folders, tmp_path, which):
    """trailing, T ∤ N: diffusers' DDIM steps 999 → 833 but evaluates the next step at 832; the
    consistent grid differs from it, and is DDIM between its own timesteps (DPM-Solver++ at order
    1 on the same timesteps, ending at x̂)."""
    steps = 6
    folder = folder_with(base_folders, tmp_path, which, "trailing", 0, True)
    model, inputs, out = run(folder, "consistent", steps)
    assert rel_err(out, ddim_loop(folder, model, inputs, steps)) > 1e-3  # the quirk is real
    solver = diffusers.DPMSolverMultistepScheduler.from_pretrained(
        folder / "scheduler", solver_order=1, algorithm_type="dpmsolver++",
        final_sigmas_type="zero", timestep_spacing="trailing")
    ref = reference_loop(solver, model.net, inputs[2], inputs[0], inputs[1], model.num_classes,
                         steps)
    assert rel_err(out, ref) < 1e-4, rel_err(out, ref)


def test_final_target_and_bad_schedules(base_folders, tmp_path):
    folder = folder_with(base_folders, tmp_path, "unet", "leading", 0, False)
    model = cfgengine.load(folder)
    assert model.info.final_logsnr == pytest.approx(float(model._logsnr_table64[0]))
    with pytest.raises(ValueError, match="schedule must be one of"):
        cfgengine.load(folder, schedule="exact")
    bad = folder_with(base_folders, tmp_path / "b", "unet", "karras", 0, True)
    with pytest.raises(ValueError, match="timestep_spacing must be one of"):
        cfgengine.load(bad)


def test_unet_export_samples_past_64_rows(base_folders, tmp_path):
    """diffusers' Upsample2D branches on batch ≥ 64; the export covers the whole batch range."""
    pytest.importorskip("onnxruntime")
    from cfgengine.cli import main

    out = tmp_path / "unet.onnx"
    assert main(["export", str(base_folders / "unet"), "--format", "onnx", "--max-batch", "40",
                 "-o", str(out)]) == 0
    model, backend = cfgengine.load(base_folders / "unet"), cfgengine.load(out)
    labels = torch.arange(36) % model.num_classes  # the doubled batch: 72 rows
    settings = dict(w=torch.linspace(0, 3, 36), sampler="ddim", logsnr=model.logsnr_grid(3),
                    steps=None, seed=2)
    ref = cfgengine.sample(model, labels, backend="torch", **settings)
    assert rel_err(cfgengine.sample(backend, labels, **settings), ref) < 1e-3
