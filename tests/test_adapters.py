"""Diffusers models through cfgengine (cfgengine/adapters.py), against the real peers: the raw
diffusers nets, DDIMScheduler's own timesteps and step(), np.interp, the VAE, ONNX Runtime."""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")

import cfgengine  # noqa: E402
from cfgengine import rng  # noqa: E402
from cfgengine.adapters import DiffusersDenoiser, from_diffusers  # noqa: E402
from cfgengine.cli import main  # noqa: E402
from cfgengine.families.tiny import tiny_vae  # noqa: E402  (8×8 RGB ↔ 4×4×4 latents)

STEPS = 10  # divides num_train_timesteps: diffusers' DDIM then steps between its own timesteps
CLASSES = 4


def tiny_unet(num_class_embeds: int | None = CLASSES + 1, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return diffusers.UNet2DModel(
        sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
        block_out_channels=(8, 16), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=4, attention_head_dim=8,
        num_class_embeds=num_class_embeds).eval()


def tiny_dit() -> torch.nn.Module:
    """A 4×4×4-latent DiT with learned sigma (8 output channels) and 3 classes + the null one."""
    torch.manual_seed(1)
    return diffusers.DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=1,
        sample_size=4, patch_size=2, num_embeds_ada_norm=3, norm_num_groups=4).eval()


@pytest.fixture(scope="session")
def unet_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("diffusers") / "unet-pipe"
    scheduler = diffusers.DDIMScheduler(num_train_timesteps=1000, clip_sample=True,
                                        clip_sample_range=1.0, timestep_spacing="trailing")
    diffusers.DDPMPipeline(unet=tiny_unet(), scheduler=scheduler).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def dit_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("diffusers") / "dit-pipe"
    scheduler = diffusers.DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear",
                                        beta_start=0.00085, beta_end=0.012, clip_sample=False,
                                        timestep_spacing="trailing")
    diffusers.DiTPipeline(transformer=tiny_dit(), vae=tiny_vae(),
                          scheduler=scheduler).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def unet_model(unet_folder):
    return cfgengine.load(unet_folder)


@pytest.fixture(scope="session")
def dit_model(dit_folder):
    return cfgengine.load(dit_folder)


def trailing_scheduler(folder):
    scheduler = diffusers.DDIMScheduler.from_pretrained(folder / "scheduler",
                                                        timestep_spacing="trailing")
    scheduler.set_timesteps(STEPS)
    return scheduler


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.double()
    return float((out.double() - ref).norm() / ref.norm())


# --- the adapter itself ---------------------------------------------------------------------------

def test_folder_attributes(unet_model, dit_model):
    assert isinstance(unet_model, DiffusersDenoiser)
    assert (unet_model.num_classes, unet_model.sample_shape, unet_model.clip) == (CLASSES, (3, 8, 8),
                                                                                 1.0)
    assert (dit_model.num_classes, dit_model.sample_shape, dit_model.clip) == (3, (4, 4, 4), None)


def test_logsnr_range_and_grid_are_the_schedulers(unet_folder, unet_model):
    scheduler = trailing_scheduler(unet_folder)
    abar = scheduler.alphas_cumprod.double()
    logsnr = torch.log(abar / (1 - abar))
    assert unet_model.logsnr_range == pytest.approx((float(logsnr[-1]), float(logsnr[0])))
    grid = unet_model.logsnr_grid(STEPS)
    assert grid.dtype == torch.float64 and bool((grid[1:] > grid[:-1]).all())
    torch.testing.assert_close(grid, logsnr[scheduler.timesteps], rtol=1e-12, atol=1e-12)
    odd = trailing_scheduler(unet_folder)
    odd.set_timesteps(7)  # 1000/7 is not whole: the spacing must still be diffusers' own
    torch.testing.assert_close(unet_model.logsnr_grid(7), logsnr[odd.timesteps])


def test_timestep_map_interpolates_in_logsnr(unet_folder, unet_model):
    abar = trailing_scheduler(unet_folder).alphas_cumprod.double()
    table = torch.log(abar / (1 - abar)).float()
    trained = torch.tensor([0, 1, 17, 500, 998, 999])
    t = unet_model.timestep_map(table[trained])
    assert torch.equal(t, trained.float())  # a trained λ gives exactly its timestep
    lam = torch.linspace(-12.0, 11.0, 301)  # past both ends: clamped to timesteps 999 and 0
    ref = np.interp(lam.double().numpy(), table.double().numpy()[::-1], np.arange(1000.0)[::-1])
    torch.testing.assert_close(unet_model.timestep_map(lam).double(), torch.from_numpy(ref),
                               rtol=0, atol=2e-3)
    halved = copy.deepcopy(unet_model.timestep_map).half()  # as a fp16 export casts the net
    assert torch.equal(halved.logsnr_table, unet_model.timestep_map.logsnr_table)


def test_eps_is_the_raw_nets_output(unet_folder, unet_model, dit_folder, dit_model):
    for folder, model, net in ((unet_folder, unet_model, unet_model.net),
                               (dit_folder, dit_model, dit_model.net)):
        abar = trailing_scheduler(folder).alphas_cumprod.double()
        timesteps = torch.tensor([999, 400, 3, 0])
        logsnr = torch.log(abar / (1 - abar))[timesteps].float()
        z = torch.randn(4, *model.sample_shape, generator=torch.Generator().manual_seed(3))
        labels = torch.tensor([0, 1, 2, model.num_classes])  # the last row: the null label
        with torch.no_grad():
            ref = net(z, timesteps, class_labels=labels).sample[:, : model.sample_shape[0]]
            out = model(z, logsnr, labels)
        assert ref.std() > 0.1 and rel_err(out, ref) < 1e-6  # dit: the first C of 2C channels


def test_null_label_override(unet_model):
    net = unet_model.net
    adapter = from_diffusers(net, diffusers.DDIMScheduler(), null_label=0)
    assert adapter.num_classes == CLASSES
    z = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(4))
    lam = torch.tensor([1.0, 1.0])
    t = adapter.timestep_map(lam)
    with torch.no_grad():
        out = adapter(z, lam, torch.tensor([0, CLASSES]))  # class 0 → embedding 1, null → 0
        ref = net(z, t, class_labels=torch.tensor([1, 0])).sample
    assert rel_err(out, ref) < 1e-6
    with pytest.raises(ValueError, match="null_label must be an embedding index"):
        from_diffusers(net, diffusers.DDIMScheduler(), null_label=CLASSES + 1)


class _ConvertedUNet(diffusers.UNet2DModel):
    """The same weights predicting x = (z − σ·ε)/α or v = α·ε − σ·x at integer timesteps."""

    def convert(self, prediction_type: str, alphas_cumprod: torch.Tensor):
        self.prediction_type, self.abar = prediction_type, alphas_cumprod
        return self

    def forward(self, sample, timestep, class_labels=None, return_dict=True):
        eps = super().forward(sample, timestep, class_labels).sample
        abar = self.abar[timestep.round().long()].reshape(-1, 1, 1, 1)
        alpha, sigma = abar.sqrt(), (1 - abar).sqrt()
        x = (sample - sigma * eps) / alpha
        return (alpha * eps - sigma * x if self.prediction_type == "v_prediction" else x,)


@pytest.mark.parametrize("prediction_type", ["v_prediction", "sample"])
def test_v_and_x0_predictions_give_the_same_eps(unet_model, prediction_type):
    scheduler = diffusers.DDIMScheduler(prediction_type=prediction_type)
    net = _ConvertedUNet.from_config(unet_model.net.config)
    net.load_state_dict(unet_model.net.state_dict())
    converted = from_diffusers(net.convert(prediction_type, scheduler.alphas_cumprod), scheduler)
    assert converted.prediction_type == prediction_type
    logsnr = unet_model.logsnr_grid(STEPS).float()  # trained timesteps: integer t for the wrapper
    z = torch.randn(STEPS, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    labels = torch.arange(STEPS) % (CLASSES + 1)
    with torch.no_grad():
        ref, out = unet_model(z, logsnr, labels), converted(z, logsnr, labels)
    assert rel_err(out, ref) < 1e-5


def test_latent_decode_is_the_vaes(dit_folder, dit_model):
    vae = diffusers.AutoencoderKL.from_pretrained(dit_folder / "vae")
    x = torch.randn(3, 4, 4, 4, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        ref = vae.decode(x / vae.config.scaling_factor).sample.clamp(-1, 1)
    images = dit_model.decode(x)
    assert images.shape == (3, 3, 8, 8) and rel_err(images, ref) < 1e-6


# --- sampling against diffusers' DDIMScheduler ------------------------------------------------------

def diffusers_ddim(folder, net, z, labels, w, null: int) -> torch.Tensor:
    """The reference loop: diffusers' DDIM (η = 0, trailing) with ε = ε_u + (1 + w)(ε_c − ε_u)."""
    scheduler = trailing_scheduler(folder)
    channels = z.shape[1]
    scale = (1 + w).reshape(-1, 1, 1, 1)
    null_labels = torch.full_like(labels, null)
    for t in scheduler.timesteps:
        with torch.no_grad():
            out = net(torch.cat([z, z]), t.expand(2 * len(z)),
                      class_labels=torch.cat([labels, null_labels])).sample
        eps_c, eps_u = out[:, :channels].chunk(2)  # learned variance: the first C channels
        eps = eps_u + scale * (eps_c - eps_u)
        z = scheduler.step(eps, t, z, eta=0.0, use_clipped_model_output=True).prev_sample
    return z


@pytest.mark.parametrize("which", ["unet", "dit"])
def test_sampling_equals_diffusers_ddim(request, which):
    folder = request.getfixturevalue(f"{which}_folder")
    model = request.getfixturevalue(f"{which}_model")
    labels = torch.arange(6) % model.num_classes
    w = torch.tensor([0.0, 0.5, 1.0, 2.0, 3.0, 4.0])
    seed = 11
    z0 = rng.randn_like_rows(seed, torch.arange(6), 0, model.sample_shape)
    ref = diffusers_ddim(folder, model.net, z0, labels, w, null=model.num_classes)
    out = cfgengine.sample(model, labels, w=w, steps=STEPS, sampler="ddim", eta=0.0, seed=seed)
    assert rel_err(out, ref) < 1e-4, rel_err(out, ref)
    if which == "unet":
        assert float(out.abs().max()) <= 1.0  # clipped, as the scheduler config says


# --- exports ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("which, fmt", [("unet", "onnx"), ("dit", "aoti")])  # compiling costs
def test_exports_sample_like_torch(request, tmp_path, which, fmt):
    if fmt == "onnx":
        pytest.importorskip("onnxruntime")
    folder = request.getfixturevalue(f"{which}_folder")
    model = request.getfixturevalue(f"{which}_model")
    out = tmp_path / f"{which}.{'onnx' if fmt == 'onnx' else 'pt2'}"
    assert main(["export", str(folder), "--format", fmt, "--max-batch", "8", "-o", str(out)]) == 0
    backend = cfgengine.load(out)
    labels = torch.arange(5) % model.num_classes
    settings = dict(w=torch.linspace(0, 3, 5), sampler="ddim", logsnr=model.logsnr_grid(STEPS),
                    steps=None, seed=3)
    ref = cfgengine.sample(model, labels, **settings)
    assert rel_err(cfgengine.sample(backend, labels, **settings), ref) < 1e-3


# --- the command line ---------------------------------------------------------------------------------

def test_cli_writes_decoded_images_for_a_latent_model(dit_folder, tmp_path, capsys):
    png, npz = tmp_path / "s.png", tmp_path / "s.npz"
    assert main(["sample", "--ckpt", str(dit_folder), "--steps", "4", "--sampler", "ddim",
                 "--n", "1", "--out", str(png), "--npz", str(npz)]) == 0
    arr = np.load(npz)["arr_0"]
    assert arr.shape == (3, 8, 8, 3) and arr.dtype == np.uint8 and png.is_file()


def _rewrite(folder, tmp_path, name: str, edit) -> str:
    """A copy of pipeline `folder` with `edit` applied to the copy and its model_index.json."""
    import shutil

    copy = tmp_path / name
    shutil.copytree(folder, copy)
    index = json.loads((copy / "model_index.json").read_text())
    edit(copy, index)
    (copy / "model_index.json").write_text(json.dumps(index))
    return str(copy)


def _no_scheduler(copy, index):
    import shutil

    shutil.rmtree(copy / "scheduler")


def _unknown_class(copy, index):
    index["unet"] = ["diffusers", "UNet2DConditionModel"]


def test_bad_folders_fail_in_one_line(unet_folder, tmp_path, capsys):
    plain = tmp_path / "plain"
    diffusers.DDPMPipeline(unet=tiny_unet(num_class_embeds=None),
                           scheduler=diffusers.DDPMScheduler()).save_pretrained(plain)
    (tmp_path / "empty").mkdir()
    cases = [(str(plain), "no class embedding table"),
             (_rewrite(unet_folder, tmp_path, "nosched", _no_scheduler), "no scheduler"),
             (_rewrite(unet_folder, tmp_path, "cond", _unknown_class), "UNet2DConditionModel"),
             (str(tmp_path / "empty"), "no model_index.json")]
    for folder, message in cases:
        for argv in (["sample", "--ckpt", folder, "--out", str(tmp_path / "x.png")],
                     ["export", folder, "--format", "onnx", "-o", str(tmp_path / "x.onnx")]):
            assert main(argv) == 2
            err = capsys.readouterr().err
            assert err.startswith("cfgengine: error: ") and err.count("\n") == 1, err
            assert message in err, err
    assert not (tmp_path / "x.png").exists() and not (tmp_path / "x.onnx").exists()


def test_model_without_a_schedule_is_refused(unet_model):
    with pytest.raises(ValueError, match="no alphas_cumprod"):
        from_diffusers(unet_model.net, object())
    with pytest.raises(ValueError, match="not a class-conditional UNet2DModel"):
        from_diffusers(torch.nn.Linear(2, 2), diffusers.DDIMScheduler())


# ---------------------------------------------------------------------------------------------
# Folders whose config or weights are wrong (issue 24, items 8 and 22): one line naming the file


def _drop_class_table(copy, index):
    from safetensors.torch import load_file, save_file

    path = copy / "unet" / "diffusion_pytorch_model.safetensors"
    weights = load_file(path)
    weights.pop("class_embedding.weight")
    save_file(weights, path)


def _edit(component: str, file: str, **fields):
    def edit(copy, index):
        path = copy / component / file
        path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))
    return edit


BAD_FOLDERS = {  # name: (edit, what the one line must name)
    "missing-key": (_drop_class_table, ["diffusion_pytorch_model.safetensors",
                                        "class_embedding.weight"]),
    "wide": (_edit("unet", "config.json", block_out_channels=[40000, 40000]),
             ["config.json", "block_out_channels"]),
    "timesteps": (_edit("scheduler", "scheduler_config.json", num_train_timesteps=300000000),
                  ["scheduler_config.json", "num_train_timesteps"]),
    "beta-text": (_edit("scheduler", "scheduler_config.json", beta_start="x"),
                  ["scheduler_config.json", "beta_start"]),
    "betas-length": (_edit("scheduler", "scheduler_config.json", trained_betas=[0.1, 0.2]),
                     ["scheduler_config.json", "trained_betas"]),
    "size-text": (_edit("unet", "config.json", sample_size="big"),
                  ["config.json", "sample_size"]),
    "disagree": (_edit("unet", "config.json", block_out_channels=[16, 32]),
                 ["unet", "weights do not match the config"]),
    "bad-groups": (_edit("unet", "config.json", norm_num_groups=3), ["unet-pipe"]),
}


@pytest.mark.parametrize("name", sorted(BAD_FOLDERS))
def test_wrong_configs_and_weights_fail_in_one_line_naming_the_file(unet_folder, tmp_path,
                                                                    capsys, name):
    edit, names = BAD_FOLDERS[name]
    folder = _rewrite(unet_folder, tmp_path, "unet-pipe", edit)
    assert main(["sample", "--ckpt", folder, "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cfgengine: error: ") and err.count("\n") == 1, err
    assert all(part in err for part in names), err
    assert not (tmp_path / "x.png").exists()
