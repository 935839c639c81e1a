"""The ONNX Runtime session backend on a prompt model (a tiny StableDiffusionPipeline folder,
cfgengine/families/text.py): the doubled batch's TextCondition goes in as the graph's text inputs,
samples equal eager torch, and the cache key covers the conditioning path (the model's settings
and the text inputs' shapes)."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("diffusers")
pytest.importorskip("transformers")

import cfgengine  # noqa: E402
from cfgengine.backends import onnxruntime as ort_backend  # noqa: E402
from cfgengine.model import TextCondition  # noqa: E402
from cfgengine.provenance import weights_sha256  # noqa: E402
from cfgengine.families.tiny import build_sd_folder as build_folder  # noqa: E402
from tests.test_text_folders import NEGATIVES, PROMPTS  # noqa: E402

pytestmark = pytest.mark.usefixtures("private_onnx_cache")  # never the user's ~/.cache

ROWS = 34  # 68 rows in the doubled batch: across diffusers' 64-row upsampler branch
STEPS = 3


def rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x.double() - ref.double()).norm() / ref.double().norm())


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("text-ort")
    return build_folder(root / "eps"), build_folder(root / "v", prediction_type="v_prediction")


@pytest.fixture(scope="module")
def sd_model(folders):
    return cfgengine.load(folders[0])


def test_prompt_model_samples_on_onnxruntime_as_eager(sd_model):
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(ROWS)]
    negatives = [NEGATIVES[i % len(NEGATIVES)] for i in range(ROWS)]
    w = torch.linspace(0.0, 4.0, ROWS)
    settings = dict(prompts=prompts, negative_prompts=negatives, w=w, steps=STEPS,
                    sampler="ddim", seed=5)
    engine = cfgengine.Sampler(sd_model, backend="onnxruntime")
    x = engine.sample(**settings)
    assert engine.model.runtime == "onnxruntime"
    assert engine.model.net.text_inputs == (("encoder_hidden_states", (12, 16)),)
    ref = cfgengine.sample(sd_model, backend="torch", **settings)
    assert rel(x, ref) < 1e-4, rel(x, ref)


def test_auto_on_cpu_picks_onnxruntime_for_prompts(sd_model):
    engine = cfgengine.Sampler(sd_model, device="cpu")
    assert engine.backend == "onnxruntime"
    x = engine.sample(prompts=PROMPTS[:2], steps=2, seed=1)  # 4 row-steps: not worth an export
    assert engine.model.runtime == "torch"
    assert torch.equal(x, cfgengine.sample(sd_model, prompts=PROMPTS[:2], steps=2, seed=1,
                                           backend="torch"))
    for refused in (dict(backend="cudagraph"), dict(precision="int8")):
        with pytest.raises(ValueError, match="does not run prompt-conditioned models"):
            cfgengine.Sampler(sd_model, **refused)


def test_cache_key_covers_the_text_inputs(sd_model):
    shape = sd_model.info.sample_shape
    text = (("encoder_hidden_states", (12, 16)),)
    keys = {ort_backend.cache_key(sd_model, "fp32", shape, spec) for spec in [
        text, (("encoder_hidden_states", (8, 16)),), (*text, ("pooled", (16,))),
        (*text, ("mask", (12,)))]}
    assert len(keys) == 4
    # a session denoiser keys its graph by the shapes its calls' conditions have
    net = ort_backend.OnnxRuntimeDenoiser(sd_model, "fp32", torch.device("cpu"), auto=True)
    z, logsnr = torch.zeros((2, *shape)), torch.zeros(2)
    seen = []
    for tokens in (12, 8, 12):
        net(z, logsnr, TextCondition(torch.zeros(2, tokens, 16)))  # under auto: eager
        seen.append(net.key())
    assert seen[0] == seen[2] != seen[1]
    assert seen[0] == ort_backend.cache_key(sd_model, "fp32", shape, text)


def test_cache_key_covers_the_models_settings(folders, sd_model):
    v_model = cfgengine.load(folders[1])  # the same weights, another prediction type
    assert weights_sha256(v_model) == weights_sha256(sd_model)
    text = (("encoder_hidden_states", (12, 16)),)
    shape = sd_model.info.sample_shape
    assert ort_backend.cache_key(v_model, "fp32", shape, text) != \
        ort_backend.cache_key(sd_model, "fp32", shape, text)
