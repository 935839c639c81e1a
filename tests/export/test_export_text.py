"""Exports of a prompt model (a tiny StableDiffusionPipeline folder's UNet2DConditionModel, as
cfgengine/families/text.py loads it): the TextCondition's tensors are graph inputs, the metadata
records them, and the loaded ONNX and AOTInductor files match the eager model call for call (a
doubled batch of prompts and negative prompts across diffusers' 64-row upsampler branch) and
sample for sample with per-row w, given rows the source model encoded."""
from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

import cfgengine  # noqa: E402
from cfgengine import export  # noqa: E402
from cfgengine.cli import main  # noqa: E402
from cfgengine.export import metadata  # noqa: E402
from cfgengine.export.program import input_names, trace  # noqa: E402
from cfgengine.guidance import doubled_batch  # noqa: E402
from cfgengine.model import ModelInfo, TextCondition  # noqa: E402
from tests.test_text_folders import NEGATIVES, PROMPTS  # noqa: E402
from tests.test_text_folders import sd_folder, sd_model  # noqa: E402, F401  (module fixtures)

MAX_BATCH = 40  # 80 rows: the doubled batch crosses the 64 rows where diffusers' upsampler branches
W = torch.tensor([0.0, 1.0, 3.0, 6.5])
STEPS = 5


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref.double()).norm() / ref.double().norm())


@pytest.fixture(scope="module")
def traced(sd_model):
    return trace(sd_model, max_batch=MAX_BATCH, source="tiny-sd")


@pytest.fixture(scope="module")
def onnx_model(traced, tmp_path_factory):
    pytest.importorskip("onnxruntime")
    from cfgengine.export import onnx as onnx_export

    return export.load(onnx_export.export_program(traced, tmp_path_factory.mktemp("o") / "sd.onnx"))


def doubled_prompt_batch(model, rows: int):
    """The doubled batch of a guided step: `rows` prompts then their negative prompts, each row
    its own λ."""
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(rows)]
    negatives = [NEGATIVES[i % len(NEGATIVES)] for i in range(rows)]
    gen = torch.Generator().manual_seed(rows)
    z = torch.randn((rows, *model.info.sample_shape), generator=gen)
    logsnr = torch.empty(rows).uniform_(-5.0, 7.0, generator=gen)
    return doubled_batch(z, logsnr, model.info.encode(prompts), model.info.encode(negatives))


def sample_both(exported, model, **options):
    """(exported, eager) samples of PROMPTS / NEGATIVES with per-row W on the model's own grid;
    the export is given the rows the model's encoder made."""
    grid = dict(logsnr=model.info.grid(STEPS), steps=None, sampler="ddim", eta=0.0, seed=2)
    rows = dict(prompts=model.info.encode(PROMPTS), negative_prompts=model.info.encode(NEGATIVES))
    out = cfgengine.sample(exported, w=W, **rows, **grid, **options)
    ref = cfgengine.sample(model, prompts=PROMPTS, negative_prompts=NEGATIVES, w=W, **grid,
                           backend="torch")
    return out, ref


# --- the traced program and its metadata --------------------------------------------------------

def test_traced_program_takes_the_encoders_rows(traced):
    meta = traced.meta
    assert (meta.conditioning, meta.num_classes) == ("text", 0)
    # the folder's CLIP: 12 tokens of 16 features; the SD pipeline gives the UNet no pooled / mask
    assert meta.text_inputs == (("encoder_hidden_states", (12, 16)),)
    assert input_names(meta) == ("z", "logsnr", "encoder_hidden_states")
    stored = json.loads(meta.to_json())
    assert stored["conditioning"] == "text"
    assert stored["text_inputs"] == {"encoder_hidden_states": [12, 16]}
    assert metadata.parse(meta.to_json(), "sd.onnx") == meta


def test_class_metadata_is_written_as_before(tiny_unet):
    stored = json.loads(metadata.describe(tiny_unet, "fp32", 4, None).to_json())
    assert not set(metadata.TEXT_FIELDS) & set(stored)  # older readers read class exports


@pytest.mark.parametrize("edit, message", [
    (dict(text_inputs={"encoder_hidden_states": [12]}), "has shape \\[12\\], not 2 sizes"),
    (dict(text_inputs={"prompts": [12, 16]}), "text_inputs is not a map"),
    (dict(text_inputs={"encoder_hidden_states": [12, 16], "mask": [11]}), "one entry per token"),
    (dict(text_inputs={}), "needs num_classes 0 and encoder_hidden_states"),
    (dict(num_classes=3), "needs num_classes 0"),
    (dict(conditioning="audio"), "neither class nor text"),
])
def test_edited_text_metadata_is_refused(traced, edit, message):
    stored = dict(json.loads(traced.meta.to_json()), **edit)
    with pytest.raises(ValueError, match=f"sd.onnx: metadata .*{message}"):
        metadata.parse(json.dumps(stored), "sd.onnx")


# --- ONNX --------------------------------------------------------------------------------------

def test_onnx_file_is_a_prompt_model_without_an_encoder(onnx_model):
    facts = onnx_model.info
    assert (facts.conditioning, facts.encode, facts.backend) == ("text", None, "onnx")


@pytest.mark.parametrize("rows", [1, 34])
def test_onnx_matches_eager_on_the_doubled_batch(onnx_model, sd_model, rows):
    z, logsnr, cond = doubled_prompt_batch(sd_model, rows)  # 2 and 68 rows
    with torch.no_grad():
        ref = sd_model(z, logsnr, cond)
    assert rel_err(onnx_model(z, logsnr, cond), ref) < 1e-4


def test_onnx_samples_what_the_model_samples_with_per_row_w(onnx_model, sd_model):
    out, ref = sample_both(onnx_model, sd_model)
    assert rel_err(out, ref) < 1e-4, rel_err(out, ref)


def test_exported_prompt_model_mistakes_fail_in_one_line(onnx_model, sd_model):
    rows = sd_model.info.encode(PROMPTS[:2])
    short = TextCondition(rows.embeddings[:, :8])
    cases = [(dict(prompts=PROMPTS[:2]), "has no prompt encoder"),
             (dict(prompts=rows), "has no prompt encoder"),  # the null rows need one too
             (dict(n=2), "has no prompt encoder"),
             (dict(prompts=rows, negative_prompts=rows[:1]), "do not match the prompt rows"),
             (dict(prompts=rows, negative_prompts=["x", "y"]), "negative_prompts as encoded"),
             (dict(prompts=short, negative_prompts=short),  # the doubled batch: 4 rows
              "TextCondition of encoder_hidden_states \\[4, 12, 16\\]; got .* \\[4, 8, 16\\]"),
             (dict(labels=torch.tensor([0])), "conditioned on prompts")]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            cfgengine.sample(onnx_model, steps=2, w=1.0, **kwargs)
    with pytest.raises(ValueError, match="class-conditional model: pass labels, not prompt rows"):
        cfgengine.sample(cfgengine.load("gmm"), prompts=rows, steps=2)


def test_serving_an_exported_prompt_model_is_refused_in_one_line(onnx_model):
    pytest.importorskip("fastapi")
    from cfgengine.serve.batch import Engine

    with pytest.raises(ValueError, match="without a prompt encoder .*serve its source folder"):
        Engine(onnx_model)


def test_int8_export_refuses_a_prompt_model_in_one_line(sd_folder, tmp_path, capsys):
    out = tmp_path / "sd.onnx"
    assert main(["export", str(sd_folder), "--format", "onnx", "--precision", "int8", "-o",
                 str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "precision int8 does not take prompt-conditioned models" in err
    assert len(err.splitlines()) == 1 and not out.exists()


# --- pooled embeddings and masks (SD3-style conditions) -----------------------------------------

class PooledTextNet(torch.nn.Module):
    """A tiny prompt model whose forward reads all three fields: the masked mean of the token
    embeddings and the pooled embedding shift z before a conv. Its encoder gives 6 tokens of 8
    features, a pooled vector of 5 and a mask covering len(prompt) + 1 tokens."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.tokens, self.pooled = torch.nn.Linear(8, 3), torch.nn.Linear(5, 3)
        self.conv = torch.nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, z, logsnr, cond):
        mask = cond.mask.to(z.dtype)[..., None]
        mean = (cond.embeddings * mask).sum(1) / mask.sum(1)
        shift = self.tokens(mean) + self.pooled(cond.pooled)
        return self.conv(z + shift[:, :, None, None]) * torch.sigmoid(logsnr)[:, None, None, None]

    def encode(self, prompts: list[str]) -> TextCondition:
        rows = [torch.Generator().manual_seed(sum(map(ord, p))) for p in prompts]
        lengths = torch.tensor([min(len(p) + 1, 6) for p in prompts])
        return TextCondition(torch.stack([torch.randn(6, 8, generator=g) for g in rows]),
                             torch.stack([torch.randn(5, generator=g) for g in rows]),
                             (torch.arange(6) < lengths[:, None]).long())

    @property
    def info(self) -> ModelInfo:
        return ModelInfo(name="PooledTextNet", num_classes=0, sample_shape=(3, 4, 4),
                         conditioning="text", encode=self.encode)


@pytest.mark.usefixtures("private_onnx_cache")  # the session backend's graphs: never ~/.cache
def test_pooled_and_mask_are_graph_inputs_of_onnx_and_the_session_backend(tmp_path):
    pytest.importorskip("onnxruntime")
    net = PooledTextNet().eval()
    traced = trace(net, max_batch=4, source="pooled")
    assert traced.meta.text_inputs == (("encoder_hidden_states", (6, 8)), ("pooled", (5,)),
                                       ("mask", (6,)))
    assert input_names(traced.meta) == ("z", "logsnr", "encoder_hidden_states", "pooled", "mask")
    from cfgengine.export import onnx as onnx_export

    exported = export.load(onnx_export.export_program(traced, tmp_path / "pooled.onnx"))
    grid = dict(w=W, steps=4, sampler="ddim", seed=3)
    rows = dict(prompts=net.encode(PROMPTS), negative_prompts=net.encode(NEGATIVES))
    with torch.no_grad():
        ref = cfgengine.sample(net, prompts=PROMPTS, negative_prompts=NEGATIVES, **grid,
                               backend="torch")
    assert rel_err(cfgengine.sample(exported, **rows, **grid), ref) < 1e-4
    engine = cfgengine.Sampler(net, backend="onnxruntime")
    out = engine.sample(prompts=PROMPTS, negative_prompts=NEGATIVES, **grid)
    assert engine.model.runtime == "onnxruntime" and rel_err(out, ref) < 1e-4


# --- AOTInductor (one test: compiling is slow) -------------------------------------------------

def test_aoti_package_matches_eager_and_samples_what_the_model_samples(traced, sd_model,
                                                                       tmp_path):
    from cfgengine.export import aoti

    package = export.load(aoti.export_program(traced, tmp_path / "sd.pt2"))
    assert (package.info.conditioning, package.info.encode) == ("text", None)
    z, logsnr, cond = doubled_prompt_batch(sd_model, 34)  # 68 rows
    with torch.no_grad():
        assert rel_err(package(z, logsnr, cond), sd_model(z, logsnr, cond)) < 1e-4
    out, ref = sample_both(package, sd_model)
    assert rel_err(out, ref) < 1e-4, rel_err(out, ref)
