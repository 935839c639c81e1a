"""The one traced program every export format is made from: the plain denoiser ε(z, λ, labels),
rows in = rows out, captured by `torch.export` with a symbolic batch of up to 2·max_batch rows, so
the loaded artifact runs the doubled batch (cond + null, docs/design.md) and, outside the guidance
interval or at w = 0, just B rows. A guidance-distilled net is traced as ε̃_w(z, λ, labels, w):
w is a fourth input of one value per row."""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from cfgengine.export.metadata import ExportMeta, check_exportable, describe
from cfgengine.precision import PRECISIONS

INPUTS = ("z", "logsnr", "labels")
W_INPUT = "w"  # the fourth input of a guidance-embedded net
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
    """The graph's inputs: INPUTS, and w for a guidance-embedded net."""
    return INPUTS + ((W_INPUT,) if meta.guidance_embedded else ())


def example_inputs(meta: ExportMeta, batch: int, device: torch.device | str = "cpu",
                   seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Random (z, logsnr, labels) of `batch` rows in the backend call shape (fp32, fp32, int64),
    and w (fp32, in [0, 4]) for a guidance-embedded net."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn((batch, *meta.sample_shape), generator=gen)
    logsnr = torch.empty(batch).uniform_(-20.0, 20.0, generator=gen)
    labels = torch.randint(0, meta.num_classes, (batch,), generator=gen)
    w = (torch.rand(batch, generator=gen) * 4.0,) if meta.guidance_embedded else ()
    return tuple(t.to(device) for t in (z, logsnr, labels, *w))


def check_batch_range(min_batch: int, max_batch: int) -> None:
    """ValueError unless 1 ≤ min_batch ≤ max_batch and max_batch ≥ the example batch."""
    if not _is_int(max_batch) or max_batch < EXAMPLE_BATCH:
        raise ValueError(f"max batch must be an integer ≥ {EXAMPLE_BATCH}, got {max_batch!r}")
    if not _is_int(min_batch) or not 1 <= min_batch <= max_batch:
        raise ValueError(f"min batch must be an integer in [1, {max_batch}], got {min_batch!r}")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def trace(model: nn.Module, *, precision: str = "fp32", max_batch: int = 64,
          device: torch.device | str = "cpu", source: str | None = None) -> Traced:
    """torch.export of `model` at `precision`, rows symbolic in [1, 2·max_batch] (the doubled
    batch of max_batch guided rows)."""
    check_exportable(model, source)
    check_batch_range(1, max_batch)
    meta = describe(model, precision, max_batch, source)
    net = cast_for_export(model, precision).to(device).eval()
    rows = torch.export.Dim("rows", min=1, max=2 * max_batch)
    args = example_inputs(meta, EXAMPLE_BATCH, device)
    program = torch.export.export(net, args, dynamic_shapes=tuple({0: rows} for _ in args))
    return Traced(program, meta)
