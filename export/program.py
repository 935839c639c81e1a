"""The one traced program every export format is made from: the plain denoiser ε(z, λ, labels),
rows in = rows out, captured by `torch.export` with a symbolic batch of up to 2·max_batch rows, so
the loaded artifact runs the doubled batch (cond + null, docs/design.md) and, outside the guidance
interval or at w = 0, just B rows. A guidance-distilled net is traced as ε̃_w(z, λ, labels, w):
w is the last input, one value per row.

A prompt model (conditioning "text") takes its TextCondition as graph inputs in place of labels:
`encoder_hidden_states` [N, L, D], then `pooled` [N, P] and `mask` [N, L] (int64) where the
model's condition has them; their per-row shapes are fixed by the model (its encoder's output) and
recorded in the metadata (`text_inputs`)."""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from cfgengine.export.metadata import ExportMeta, check_exportable, describe
from cfgengine.model import TextCondition, info
from cfgengine.precision import PRECISIONS

INPUTS = ("z", "logsnr", "labels")
W_INPUT = "w"  # the last input of a guidance-embedded net
# a TextCondition's fields as graph inputs, in its `fields` order (those the condition has)
TEXT_INPUTS = {"encoder_hidden_states": "embeddings", "pooled": "pooled", "mask": "mask"}
MASK_DTYPE = torch.int64  # a tokenizer's attention mask: 0/1 per token
OUTPUT = "eps"
EXAMPLE_BATCH = 2  # > 1, so the exporter cannot specialise the batch dimension to a constant
_NORMS = (nn.GroupNorm, nn.LayerNorm, nn.BatchNorm2d)


@dataclass(frozen=True)
class Traced:
    """An ExportedProgram of the denoiser (rows 1..2·max_batch) with the metadata it will carry."""

    program: torch.export.ExportedProgram
    meta: ExportMeta


class _Float32Norm(nn.Module):
    """Runs a normalisation layer in fp32 inside a half-precision net: its statistics (a sum of
    squares over many elements) overflow or lose precision in fp16."""

    def __init__(self, norm: nn.Module):
        super().__init__()
        self.norm = norm.float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.float()).to(x.dtype)


class BatchFreeUpsample(nn.Module):
    """diffusers' Upsample2D without its branch on the batch size (`.contiguous()` from 64 rows, a
    no-op on values) that torch.export cannot trace over a batch range across 64 rows: the same
    norm, nearest ×2 (or to `output_size`) and conv, on the same weights."""

    def __init__(self, up: nn.Module):
        super().__init__()
        self.up = up

    def forward(self, hidden_states, output_size=None, *args, **kwargs):
        up = self.up
        if up.norm is not None:
            hidden_states = up.norm(hidden_states.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        if up.use_conv_transpose:
            return up.conv(hidden_states)
        if up.interpolate:
            hidden_states = nn.functional.interpolate(
                hidden_states.contiguous(), scale_factor=2.0 if output_size is None else None,
                size=output_size, mode="nearest")
        if not up.use_conv:
            return hidden_states
        return (up.conv if up.name == "conv" else up.Conv2d_0)(hidden_states)


def batch_free(net: nn.Module) -> nn.Module:
    """`net` (in place) with every diffusers Upsample2D wrapped as a BatchFreeUpsample, for export
    over any batch range; other nets are returned as they are."""
    for parent in list(net.modules()):
        for name, child in parent.named_children():
            if type(child).__name__ == "Upsample2D" and type(child).__module__.startswith(
                    "diffusers."):
                setattr(parent, name, BatchFreeUpsample(child))
    return net


def cast_for_export(model: nn.Module, precision: str) -> nn.Module:
    """A copy of `model` with weights in `precision`, normalisation layers kept in fp32."""
    net = batch_free(copy.deepcopy(model).eval().requires_grad_(False))
    if precision == "fp32":
        return net.float()
    net = net.to(PRECISIONS[precision])
    for parent in list(net.modules()):
        for name, child in parent.named_children():
            if isinstance(child, _NORMS):
                setattr(parent, name, _Float32Norm(child))
    return net


def input_names(meta: ExportMeta) -> tuple[str, ...]:
    """The graph's inputs: z, logsnr, the condition's (labels, or a prompt model's text inputs),
    and w for a guidance-embedded net."""
    cond = tuple(name for name, _ in meta.text_inputs) if meta.conditioning == "text" \
        else INPUTS[2:]
    return INPUTS[:2] + cond + ((W_INPUT,) if meta.guidance_embedded else ())


def text_inputs(cond: TextCondition) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """The graph inputs a TextCondition fills, each with its per-row shape."""
    return tuple((name, shape) for name, shape in zip(TEXT_INPUTS, cond.row_shapes())
                 if shape is not None)


def text_tensors(cond: TextCondition) -> tuple[torch.Tensor, ...]:
    """A TextCondition's tensors in graph-input order (see `text_inputs`)."""
    return tuple(getattr(cond, field) for field in TEXT_INPUTS.values()
                 if getattr(cond, field) is not None)


def model_text_inputs(model) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """A prompt model's text inputs, from its encoder's rows of the empty prompt; () for a class
    model; ValueError for a prompt model without an encoder (nothing says its shapes)."""
    facts = info(model)
    if facts.conditioning != "text":
        return ()
    if facts.encode is None:
        raise ValueError(f"{facts.name} is a prompt model without an encoder (info.encode); "
                         "export needs its encoder's output shapes")
    return text_inputs(facts.encode([""]))


def example_inputs(meta: ExportMeta, batch: int, device: torch.device | str = "cpu",
                   seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Random graph inputs of `batch` rows (input_names): z and logsnr (fp32), labels (int64) or a
    prompt model's text inputs (fp32; a mask of int64 0/1), and w (fp32, in [0, 4]) for a
    guidance-embedded net."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn((batch, *meta.sample_shape), generator=gen)
    logsnr = torch.empty(batch).uniform_(-20.0, 20.0, generator=gen)
    if meta.conditioning == "text":
        cond = text_tensors(example_condition(meta, batch, gen))
    else:
        cond = (torch.randint(0, meta.num_classes, (batch,), generator=gen),)
    w = (torch.rand(batch, generator=gen) * 4.0,) if meta.guidance_embedded else ()
    return tuple(t.to(device) for t in (z, logsnr, *cond, *w))


def example_condition(meta: ExportMeta, batch: int,
                      gen: torch.Generator | None = None) -> TextCondition:
    """A random TextCondition of `batch` rows with a prompt model's text inputs (the mask keeps
    the first token of each row); `gen` defaults to a fresh one (the global RNG is the user's)."""
    gen = gen or torch.Generator().manual_seed(0)
    shapes = dict(meta.text_inputs)
    fields = {}
    for name, field in TEXT_INPUTS.items():
        if name in shapes and field == "mask":
            mask = torch.randint(0, 2, (batch, *shapes[name]), generator=gen, dtype=MASK_DTYPE)
            fields[field] = mask.index_fill_(1, torch.tensor([0]), 1)
        elif name in shapes:
            fields[field] = torch.randn((batch, *shapes[name]), generator=gen)
    return TextCondition(**fields)


class TextInputs(nn.Module):
    """A prompt model with its TextCondition's tensors as separate inputs (graphs take tensors):
    (z, logsnr, encoder_hidden_states[, pooled][, mask][, w]) → ε."""

    def __init__(self, net: nn.Module, names: tuple[str, ...]):
        super().__init__()
        self.net, self.fields = net, tuple(TEXT_INPUTS[name] for name in names)

    def forward(self, z: torch.Tensor, logsnr: torch.Tensor, *inputs: torch.Tensor):
        count = len(self.fields)
        cond = TextCondition(**dict(zip(self.fields, inputs[:count])))
        return self.net(z, logsnr, cond, *inputs[count:])


def graph_module(model: nn.Module, meta: ExportMeta, precision: str) -> nn.Module:
    """What is traced: `model` cast for export, taking the graph's inputs (input_names)."""
    net = cast_for_export(model, precision)
    if meta.conditioning != "text":
        return net
    return TextInputs(net, tuple(name for name, _ in meta.text_inputs))


def check_batch_range(min_batch: int, max_batch: int) -> None:
    """ValueError unless 1 ≤ min_batch ≤ max_batch and max_batch ≥ the example batch."""
    if not _is_int(max_batch) or max_batch < EXAMPLE_BATCH:
        raise ValueError(f"max batch must be an integer ≥ {EXAMPLE_BATCH}, got {max_batch!r}")
    if not _is_int(min_batch) or not 1 <= min_batch <= max_batch:
        raise ValueError(f"min batch must be an integer in [1, {max_batch}], got {min_batch!r}")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def trace(model: nn.Module, *, precision: str = "fp32", max_batch: int = 64,
          device: torch.device | str = "cpu", source: str | None = None,
          text_inputs: tuple | None = None) -> Traced:
    """torch.export of `model` at `precision`, rows symbolic in [1, 2·max_batch] (the doubled
    batch of max_batch guided rows); a prompt model with `text_inputs` as inputs (None: those of
    its encoder, model_text_inputs)."""
    check_exportable(model, source)
    check_batch_range(1, max_batch)
    if text_inputs is None:
        text_inputs = model_text_inputs(model)
    meta = describe(model, precision, max_batch, source, text_inputs=text_inputs)
    net = graph_module(model, meta, precision).to(device).eval()
    rows = torch.export.Dim("rows", min=1, max=2 * max_batch)
    args = example_inputs(meta, EXAMPLE_BATCH, device)
    dims = tuple({0: rows} for _ in args)
    if isinstance(net, TextInputs):  # after logsnr, its inputs are one tuple (*inputs)
        dims = (*dims[:2], dims[2:])
    program = torch.export.export(net, args, dynamic_shapes=dims)
    return Traced(program, meta)
