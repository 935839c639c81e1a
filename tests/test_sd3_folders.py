"""SD3 folders (cfgengine/families/sd3.py) against the real diffusers StableDiffusion3Pipeline on
tiny random-weight folders built by cfgengine.families.tiny (CLIP-L/G with projections and
tokenizers from a small byte-level vocabulary; no T5, or a tiny one): same latents, the
pipeline's FlowMatchEuler loop against `sampler="ddim"` (η = 0) on the model's own grid,
`output_type="latent"`. The pipeline's guidance_scale is 1 + w."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

import cfgengine  # noqa: E402
from cfgengine import rng  # noqa: E402
from cfgengine.families import tiny  # noqa: E402
from cfgengine.families.sd3 import SD3Denoiser  # noqa: E402
from tests.test_text_folders import cli_writes_decoded_images  # noqa: E402

STEPS = 5
PROMPTS = ["a cat", "dog", "a cat", "two dogs"]
NEGATIVES = ["blurry", "", "dog", "cat"]


@pytest.fixture(scope="module")
def sd3_folder(tmp_path_factory):
    return tiny.build_sd3_folder(tmp_path_factory.mktemp("sd3") / "sd3-pipe")


@pytest.fixture(scope="module")
def sd3_model(sd3_folder):
    return cfgengine.load(sd3_folder)


def load_pipeline(folder, t5: bool = False):
    absent = {} if t5 else dict(text_encoder_3=None, tokenizer_3=None)  # as diffusers documents
    pipe = diffusers.StableDiffusion3Pipeline.from_pretrained(folder, **absent)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pipe(sd3_folder):
    return load_pipeline(sd3_folder)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.double()
    return float((out.double() - ref).norm() / ref.norm())


def latents(model, rows: int, seed: int) -> torch.Tensor:
    return rng.randn_like_rows(seed, torch.arange(rows), 0, model.sample_shape)


def pipeline_rows(pipe, prompts) -> tuple[torch.Tensor, torch.Tensor]:
    """(embeddings, pooled) of encode_prompt, without gradients as the pipeline's call runs it
    (torch's attention may take another kernel when gradients are on)."""
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt(prompts, None, None, torch.device("cpu"),
                                                  do_classifier_free_guidance=False)
    return embeds, pooled


def pipeline_latents(pipe, prompts, negatives, w: float, z0, **options) -> torch.Tensor:
    with torch.no_grad():
        return pipe(prompt=prompts, negative_prompt=negatives, latents=z0.clone(),
                    num_inference_steps=STEPS, guidance_scale=1 + w,
                    output_type=options.pop("output_type", "latent"), **options).images


def engine_latents(model, prompts, negatives, w, seed: int, **options) -> torch.Tensor:
    return cfgengine.sample(model, prompts=prompts, negative_prompts=negatives, w=w,
                            sampler="ddim", eta=0.0, steps=STEPS, seed=seed, **options)


# --- the folder as a model ------------------------------------------------------------------------

def test_folder_is_a_flow_model_conditioned_on_prompts(sd3_model, pipe):
    facts = sd3_model.info
    assert isinstance(sd3_model, SD3Denoiser)
    assert (facts.name, facts.conditioning, facts.sample_shape, facts.clip) == \
        ("SD3Transformer2DModel", "text", (4, 4, 4), None)
    cond = facts.encode(["a cat", ""])
    embeds, pooled = pipeline_rows(pipe, ["a cat", ""])
    assert cond.mask is None  # the pipeline gives the transformer none
    assert cond.embeddings.shape == (2, tiny.MAX_LENGTH + 256, 48)  # CLIP rows + T5's zeros
    assert torch.equal(cond.embeddings, embeds) and torch.equal(cond.pooled, pooled)


@pytest.mark.parametrize("settings", [{}, dict(use_dynamic_shifting=True)])
def test_default_grid_is_the_schedulers_sigmas(sd3_model, pipe, settings):
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_config(
        {**pipe.scheduler.config, **settings})
    model = SD3Denoiser(sd3_model.net.transformer, sd3_model.encoder, shift=scheduler.shift,
                        num_train_timesteps=1000, dynamic_shift=bool(settings))
    scheduler.set_timesteps(STEPS, mu=np.log(scheduler.shift) if settings else None)
    grid = model.info.grid(STEPS)
    assert grid[0] == -np.inf  # the first step sits at t = 1: α = 0
    np.testing.assert_allclose(torch.sigmoid(-grid / 2), scheduler.sigmas[:-1], rtol=1e-6)


# --- sampling against StableDiffusion3Pipeline ----------------------------------------------------

@pytest.mark.parametrize("negatives", [None, NEGATIVES])
def test_prompts_sample_what_the_pipeline_samples(sd3_model, pipe, negatives):
    ref = pipeline_latents(pipe, PROMPTS, negatives, 2.0, latents(sd3_model, 4, seed=7))
    out = engine_latents(sd3_model, PROMPTS, negatives, 2.0, seed=7)
    assert rel_err(out, ref) < 1e-4, rel_err(out, ref)


def test_per_sample_w_equals_separate_pipeline_calls(sd3_model, pipe):
    w = torch.tensor([0.0, 1.0, 3.0, 6.5])
    z0 = latents(sd3_model, len(PROMPTS), seed=8)
    out = engine_latents(sd3_model, PROMPTS, NEGATIVES, w, seed=8, batch_size=3)
    for i in range(len(PROMPTS)):  # one pipeline call per row: its own prompt, negative and w
        ref = pipeline_latents(pipe, PROMPTS[i:i + 1], NEGATIVES[i:i + 1], float(w[i]),
                               z0[i:i + 1])
        assert rel_err(out[i:i + 1], ref) < 1e-4, (i, rel_err(out[i:i + 1], ref))


@pytest.mark.parametrize("settings", [
    dict(shift=1.0),
    # the shift the pipeline computes for the latent size (calculate_shift's μ): e^μ or μ
    dict(use_dynamic_shifting=True),
    dict(use_dynamic_shifting=True, time_shift_type="linear", base_shift=0.8, max_shift=1.5)])
def test_each_schedulers_shift_samples_what_its_pipeline_samples(tmp_path, settings):
    folder = tiny.build_sd3_folder(tmp_path / "sd3", **settings)
    model, own = cfgengine.load(folder), load_pipeline(folder)
    ref = pipeline_latents(own, PROMPTS[:2], NEGATIVES[:2], 1.5, latents(model, 2, seed=4))
    out = engine_latents(model, PROMPTS[:2], NEGATIVES[:2], 1.5, seed=4)
    assert rel_err(out, ref) < 1e-4, rel_err(out, ref)


def test_a_folder_with_t5_samples_what_its_pipeline_samples(tmp_path):
    try:
        folder = tiny.build_sd3_folder(tmp_path / "sd3-t5", t5=True)
    except ValueError as err:  # transformers < 5 builds no T5 tokenizer from word pieces
        pytest.skip(str(err))
    model, own = cfgengine.load(folder), load_pipeline(folder, t5=True)
    embeds, pooled = pipeline_rows(own, PROMPTS)
    cond = model.info.encode(PROMPTS)
    assert torch.equal(cond.embeddings, embeds) and torch.equal(cond.pooled, pooled)
    assert cond.embeddings[:, tiny.MAX_LENGTH:].abs().sum() > 0  # T5's rows, not zeros
    ref = pipeline_latents(own, PROMPTS, NEGATIVES, 2.0, latents(model, 4, seed=5))
    out = engine_latents(model, PROMPTS, NEGATIVES, 2.0, seed=5)
    assert rel_err(out, ref) < 1e-4, rel_err(out, ref)


def test_unconditional_samples_are_the_empty_prompts(sd3_model, pipe):
    ref = pipeline_latents(pipe, ["", ""], None, 0.0, latents(sd3_model, 2, seed=3))
    out = cfgengine.sample(sd3_model, n=2, sampler="ddim", steps=STEPS, seed=3)
    assert rel_err(out, ref) < 1e-4, rel_err(out, ref)


def test_one_forward_of_2b_rows_per_guided_step(sd3_model):
    calls = []
    hook = sd3_model.net.transformer.register_forward_hook(
        lambda module, args, kwargs, out: calls.append(
            (kwargs["hidden_states"].shape[0], kwargs["encoder_hidden_states"].shape[0],
             kwargs["pooled_projections"].shape[0])), with_kwargs=True)
    try:
        engine_latents(sd3_model, PROMPTS, NEGATIVES, 1.0, seed=1)
    finally:
        hook.remove()
    assert calls == [(2 * len(PROMPTS),) * 3] * STEPS


def test_decode_is_the_pipelines_vae_with_scaling_and_shift(sd3_model, pipe):
    decoder = sd3_model.info.decode
    assert (decoder.scaling_factor, decoder.shift_factor) == (0.5, 0.1)
    ref = pipeline_latents(pipe, PROMPTS[:2], None, 2.0, latents(sd3_model, 2, seed=9),
                           output_type="pt")  # in [0, 1]
    x = engine_latents(sd3_model, PROMPTS[:2], None, 2.0, seed=9)
    assert rel_err(sd3_model.decode(x) / 2 + 0.5, ref) < 1e-4


# --- the command line -----------------------------------------------------------------------------

def test_cli_writes_decoded_images_of_the_prompts(sd3_folder, sd3_model, tmp_path):
    cli_writes_decoded_images(sd3_folder, sd3_model, tmp_path)


def test_tiny_command_writes_a_folder_once(tmp_path, capsys):
    assert tiny.main(["sd3", str(tmp_path / "f")]) == 0
    assert isinstance(cfgengine.load(tmp_path / "f"), SD3Denoiser)
    assert tiny.main(["sd3", str(tmp_path / "f")]) == 2
    err = capsys.readouterr().err.strip()
    assert "exists" in err and len(err.splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]  # no half-written folder beside


# --- folders cfgengine cannot read: one line ------------------------------------------------------

def edited(folder, tmp_path, path: str, **fields):
    """A copy of `folder` with `fields` set in its JSON file `path` (None: the field removed)."""
    copy = tmp_path / "edited"
    shutil.copytree(folder, copy)
    data = json.loads((copy / path).read_text())
    data.update(fields)
    (copy / path).write_text(json.dumps({k: v for k, v in data.items() if v is not None}))
    return copy


@pytest.mark.parametrize("path, fields, message", [
    ("scheduler/scheduler_config.json", dict(use_karras_sigmas=True), "use_karras_sigmas is set"),
    ("scheduler/scheduler_config.json", dict(shift=-1.0), "shift must be a number"),
    ("model_index.json", dict(scheduler=["diffusers", "DDIMScheduler"]),
     "scheduler is a DDIMScheduler"),
    ("model_index.json", dict(text_encoder_2=[None, None]), "names no text_encoder_2"),
    ("model_index.json", dict(text_encoder_3=["transformers", "T5EncoderModel"]),
     "names no tokenizer_3"),
    ("transformer/config.json", dict(joint_attention_dim=10**6), "joint_attention_dim"),
    ("transformer/config.json", dict(joint_attention_dim=40), "weights do not match"),
])
def test_unreadable_folders_fail_in_one_line(sd3_folder, tmp_path, path, fields, message):
    folder = edited(sd3_folder, tmp_path, path, **fields)
    with pytest.raises(ValueError, match=message) as err:
        cfgengine.load(folder)
    assert str(folder) in str(err.value) and len(str(err.value).splitlines()) == 1
