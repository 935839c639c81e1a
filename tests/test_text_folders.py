"""Prompt models (cfgengine/families/text.py, cfgengine/conditioning.py) against the real
diffusers StableDiffusionPipeline on tiny random-weight folders built by cfgengine.families.tiny (a
CLIP tokenizer from a small byte-level vocabulary it writes): same latents, DDIM η = 0 on the
pipeline's own timesteps, `output_type="latent"`."""
from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

import cfgengine  # noqa: E402
from cfgengine import rng  # noqa: E402
from cfgengine.adapters import logsnr_of_alphas_cumprod  # noqa: E402
from cfgengine.cli import main  # noqa: E402
from cfgengine.families.text import TextDenoiser  # noqa: E402
from cfgengine.families.tiny import build_sd_folder  # noqa: E402

STEPS = 5  # the scheduler's "trailing" timesteps 999, 799, …, 199, then ᾱ = 1
PROMPTS = ["a cat", "dog", "a cat", "two dogs"]
NEGATIVES = ["blurry", "", "dog", "cat"]


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    return build_sd_folder(tmp_path_factory.mktemp("text") / "sd-pipe")


@pytest.fixture(scope="module")
def sd_model(sd_folder):
    return cfgengine.load(sd_folder)


@pytest.fixture(scope="module")
def pipe(sd_folder):
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(sd_folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.double()
    return float((out.double() - ref).norm() / ref.norm())


def pipeline_grid(pipe) -> torch.Tensor:
    """float64 λ of the pipeline scheduler's timesteps at STEPS (what the engine is given)."""
    scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(STEPS)
    return logsnr_of_alphas_cumprod(scheduler.alphas_cumprod)[scheduler.timesteps]


def latents(model, rows: int, seed: int) -> torch.Tensor:
    return rng.randn_like_rows(seed, torch.arange(rows), 0, model.sample_shape)


def pipeline_latents(pipe, prompts, negatives, w: float, z0) -> torch.Tensor:
    with torch.no_grad():
        return pipe(prompt=prompts, negative_prompt=negatives, latents=z0.clone(),
                    num_inference_steps=STEPS, guidance_scale=1 + w, eta=0.0,
                    output_type="latent").images


def engine_latents(model, pipe, prompts, negatives, w, seed: int, **options) -> torch.Tensor:
    return cfgengine.sample(model, prompts=prompts, negative_prompts=negatives, w=w,
                            sampler="ddim", eta=0.0, logsnr=pipeline_grid(pipe), steps=None,
                            seed=seed, **options)


# --- the folder as a model -------------------------------------------------------------------------

def test_folder_is_a_prompt_model(sd_model, pipe):
    facts = sd_model.info
    assert isinstance(sd_model, TextDenoiser)
    assert (facts.conditioning, facts.sample_shape, facts.clip) == ("text", (4, 4, 4), None)
    cond = facts.encode(["a cat", ""])
    ref, _ = pipe.encode_prompt(["a cat", ""], torch.device("cpu"), 1, False)
    assert cond.pooled is None and cond.mask is None  # the pipeline gives the UNet neither
    assert torch.equal(cond.embeddings, ref)


def test_default_grid_is_the_pipelines(sd_model, pipe):
    assert torch.equal(sd_model.info.grid(STEPS), pipeline_grid(pipe))


# --- sampling against StableDiffusionPipeline --------------------------------------------------------

@pytest.mark.parametrize("negatives", [None, NEGATIVES])
def test_prompts_sample_what_the_pipeline_samples(sd_model, pipe, negatives):
    z0 = latents(sd_model, len(PROMPTS), seed=7)
    ref = pipeline_latents(pipe, PROMPTS, negatives, 2.0, z0)
    out = engine_latents(sd_model, pipe, PROMPTS, negatives, 2.0, seed=7)
    assert rel_err(out, ref) < 1e-4, rel_err(out, ref)


@pytest.mark.parametrize("schedule", [
    dict(prediction_type="v_prediction"),
    # Stable Diffusion's own scheduler settings, sampled on the model's default grid
    dict(timestep_spacing="leading", steps_offset=1, set_alpha_to_one=False)])
def test_folder_samples_what_its_pipeline_samples(tmp_path, schedule):
    folder = build_sd_folder(tmp_path / "sd", **schedule)
    model = cfgengine.load(folder)
    own = diffusers.StableDiffusionPipeline.from_pretrained(folder)
    own.set_progress_bar_config(disable=True)
    ref = pipeline_latents(own, PROMPTS[:2], NEGATIVES[:2], 1.5, latents(model, 2, seed=4))
    out = cfgengine.sample(model, prompts=PROMPTS[:2], negative_prompts=NEGATIVES[:2], w=1.5,
                           steps=STEPS, sampler="ddim", eta=0.0, seed=4)
    assert rel_err(out, ref) < 1e-4, rel_err(out, ref)


def test_per_sample_w_equals_separate_pipeline_calls(sd_model, pipe):
    w = torch.tensor([0.0, 1.0, 3.0, 6.5])
    z0 = latents(sd_model, len(PROMPTS), seed=8)
    out = engine_latents(sd_model, pipe, PROMPTS, NEGATIVES, w, seed=8, batch_size=3)
    for i in range(len(PROMPTS)):  # one pipeline call per row: its own prompt, negative and w
        ref = pipeline_latents(pipe, PROMPTS[i:i + 1], NEGATIVES[i:i + 1], float(w[i]),
                               z0[i:i + 1])
        assert rel_err(out[i:i + 1], ref) < 1e-4, (i, rel_err(out[i:i + 1], ref))


def test_one_forward_of_2b_rows_per_guided_step(sd_model, pipe):
    calls = []
    hook = sd_model.net.register_forward_hook(
        lambda module, args, kwargs, out: calls.append(
            (args[0].shape[0], kwargs["encoder_hidden_states"].shape[0])), with_kwargs=True)
    try:
        engine_latents(sd_model, pipe, PROMPTS, NEGATIVES, 1.0, seed=1)
    finally:
        hook.remove()
    assert calls == [(2 * len(PROMPTS), 2 * len(PROMPTS))] * STEPS


def test_decode_is_the_pipelines_vae(sd_model, pipe):
    z0 = latents(sd_model, 2, seed=9)
    with torch.no_grad():
        ref = pipe(prompt=PROMPTS[:2], latents=z0.clone(), num_inference_steps=STEPS,
                   guidance_scale=3.0, eta=0.0, output_type="pt").images  # in [0, 1]
    x = engine_latents(sd_model, pipe, PROMPTS[:2], None, 2.0, seed=9)
    assert rel_err(sd_model.decode(x) / 2 + 0.5, ref) < 1e-4


# --- errors ---------------------------------------------------------------------------------------------

def test_conditioning_mistakes_fail_in_one_line(sd_model):
    gmm = cfgengine.load("gmm")
    cases = [(sd_model, dict(labels=torch.tensor([0])), "conditioned on prompts"),
             (gmm, dict(labels=torch.tensor([0]), prompts=["a"]), "class-conditional"),
             (sd_model, dict(negative_prompts=["x"], n=1), "need prompts"),
             (sd_model, dict(prompts=["a", "b"], negative_prompts=["x"] * 3), "3 entries"),
             (sd_model, dict(prompts=[1]), "list of strings"),
             (sd_model, dict(prompts=[]), "empty")]
    for model, kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            cfgengine.sample(model, steps=2, **kwargs)
    with pytest.raises(ValueError, match="backend cudagraph does not run prompt-conditioned"):
        cfgengine.Sampler(sd_model, backend="cudagraph")  # onnxruntime: tests/backends


def test_unconditional_samples_are_the_empty_prompts(sd_model, pipe):
    z0 = latents(sd_model, 2, seed=3)
    ref = pipeline_latents(pipe, ["", ""], None, 0.0, z0)  # guidance_scale 1: one branch
    out = cfgengine.sample(sd_model, n=2, sampler="ddim", logsnr=pipeline_grid(pipe), steps=None,
                           seed=3)
    assert rel_err(out, ref) < 1e-4, rel_err(out, ref)


# --- the command line ---------------------------------------------------------------------------------

def test_cli_writes_decoded_images_of_the_prompts(sd_folder, sd_model, tmp_path):
    cli_writes_decoded_images(sd_folder, sd_model, tmp_path)


def cli_writes_decoded_images(folder, model, tmp_path) -> None:
    """`cfgengine sample` of a prompt folder writes a figure and the decoded images of each
    panel, prompt and sample, as cfgengine.sample and model.decode make them."""
    png, npz = tmp_path / "s.png", tmp_path / "s.npz"
    args = ["sample", "--ckpt", str(folder), "--sampler", "ddim", "--steps", str(STEPS),
            "--prompt", "a cat", "--prompt", "dog", "--negative-prompt", "blurry", "--n", "2",
            "--w", "0,2", "--out", str(png), "--npz", str(npz)]
    assert main(args) == 0 and png.is_file()
    arr = np.load(npz)["arr_0"]
    assert arr.shape == (8, 8, 8, 3) and arr.dtype == np.uint8
    # rows: panel w = 2, prompt "dog", its second sample (noise key 7)
    x = cfgengine.sample(model, prompts=["dog"], negative_prompts=["blurry"], w=2.0,
                         sampler="ddim", steps=STEPS, sample_ids=torch.tensor([7]))
    image = ((model.decode(x)[0].permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255)
    assert np.abs(arr[7].astype(float) - image.numpy()).max() <= 1


@pytest.mark.parametrize("flags, message", [
    (["--prompt", "a cat", "--classes", "0"], "conditioned on prompts; give --prompt"),
    ([], "give at least one --prompt"),
    (["--prompt", "a", "--prompt", "b", "--prompt", "c", "--negative-prompt", "x",
      "--negative-prompt", "y"], "one per --prompt"),
])
def test_cli_prompt_mistakes_fail_in_one_line(sd_folder, tmp_path, capsys, flags, message):
    out = tmp_path / "s.png"
    assert main(["sample", "--ckpt", str(sd_folder), "--steps", "2", "--out", str(out),
                 *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and not out.exists()


def test_cli_prompt_on_a_class_model_fails_in_one_line(tmp_path, capsys):
    assert main(["sample", "--ckpt", "gmm", "--prompt", "a cat", "--steps", "2",
                 "--out", str(tmp_path / "s.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert "class-conditional model" in err and len(err.splitlines()) == 1


# --- serving ----------------------------------------------------------------------------------------

def test_serving_mixes_prompts_in_one_forward_and_equals_offline(sd_model):
    pytest.importorskip("fastapi")
    from cfgengine.serve.batch import Engine, RunningBatch
    from cfgengine.serve.schema import Limits, SampleRequest, check_request

    bodies = [dict(prompt=PROMPTS[:3], negative_prompt=NEGATIVES[:3], w=[0.0, 2.0, 1.0],
                   steps=3, sampler="ddim", seed=1),
              dict(prompt="two dogs", negative_prompt="cat", w=3.0, steps=3, sampler="ancestral",
                   seed=2)]
    limits = Limits(0, max_rows=64, conditioning="text")
    jobs = [check_request(SampleRequest(**body), limits) for body in bodies]
    calls = []
    hook = sd_model.net.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    batch = RunningBatch(Engine(sd_model))  # driven here, without the scheduler's thread
    try:
        batch.compose([batch.admit(job) for job in jobs])
        finished = {}
        while batch.members:
            finished.update({m.job.seed: batch.rows_of(m).clone() for m in batch.step()})
            batch.compose([m for m in batch.members if not m.done])
    finally:
        hook.remove()
    assert calls == [4 + 3] * 3  # 4 conditional rows + null rows for the 3 with w ≠ 0
    for body in bodies:
        keywords = {k: body[k] for k in ("w", "steps", "sampler", "seed")}
        ref = cfgengine.sample(sd_model, prompts=body["prompt"],
                               negative_prompts=body["negative_prompt"], **keywords)
        np.testing.assert_allclose(finished[body["seed"]].numpy(), ref.numpy(), rtol=1e-5,
                                   atol=1e-5)


def test_serving_answers_prompts_and_refuses_labels(sd_model):
    pytest.importorskip("fastapi")
    httpx = pytest.importorskip("httpx")
    from cfgengine.serve import create_app
    from tests.serve_support import npy

    async def post(bodies):
        transport = httpx.ASGITransport(app=create_app(sd_model))
        async with httpx.AsyncClient(transport=transport, base_url="http://serve") as client:
            return [await client.post("/v1/samples", json=body) for body in bodies]

    good = dict(prompt=["a cat"], w=2.0, steps=2, sampler="ddim", seed=4)
    ok, labels, both = asyncio.run(post([good, dict(labels=[0], steps=2),
                                         dict(prompt=["a", "b"], negative_prompt=["x"] * 3)]))
    assert ok.status_code == 200, ok.text
    ref = cfgengine.sample(sd_model, prompts=["a cat"], w=2.0, steps=2, sampler="ddim", seed=4)
    np.testing.assert_allclose(npy(ok.content), ref.numpy(), atol=1e-5)
    assert labels.status_code == 422 and "send prompt, not labels" in labels.text
    assert both.status_code == 422 and "3 entries" in both.text
