"""OpenVINO as a PEER of the engine's backends (issue 27): the engine's own loop and step
(cfgengine.Sampler), with the network compiled by OpenVINO from the graph the engine already
caches — the fp32 ONNX graph of backend onnxruntime, or the int8 QDQ graph of precision int8
(OpenVINO runs its QuantizeLinear/DequantizeLinear pairs as int8 kernels); bf16 is the fp32 graph
at OpenVINO's bf16 inference precision, only on a CPU whose OpenVINO reports native BF16.

It is timed beside cfgengine/auto in the isolated sweep (bench/isolated.py, `--peers openvino`),
each in its own processes, so the two runtimes compare on the same loop. It stays a peer, not an
engine backend, while it does not beat ONNX Runtime on the CPU measured (docs/performance.md).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from cfgengine.bench.harness import PEERS, Runner, engine_runner
from cfgengine.bench.workload import Workload
from cfgengine.export.artifact import Backend, require
from cfgengine.threads import intra_op_threads

HINTS = {"fp32": "f32", "int8": "f32", "bf16": "bf16"}  # int8: the QDQ pairs set the int8 parts


def unavailable(precision: str, device: torch.device) -> str | None:
    """Why the OpenVINO peer cannot run `precision` on `device` here, else None."""
    from cfgengine.backends import onnxruntime

    if device.type != "cpu":
        return "the OpenVINO peer runs on the CPU only"
    if precision not in HINTS:
        return f"OpenVINO runs the engine's fp32 and int8 graphs (and bf16), not {precision}"
    try:
        ov = require("openvino", "openvino")
    except ValueError as err:
        return str(err)
    if not onnxruntime.available():
        return "the OpenVINO peer compiles the engine's ONNX graph, which needs the [onnx] extra"
    if precision == "bf16" and "BF16" not in ov.Core().get_property(
            "CPU", "OPTIMIZATION_CAPABILITIES"):
        return "OpenVINO reports no native BF16 on this CPU (it would run fp32 instead)"
    return None


def engine_graph(model: torch.nn.Module, precision: str) -> Path:
    """The ONNX graph the engine itself caches for `model` at `precision` (made now when missing):
    the fp32 graph of backend onnxruntime, or the calibrated int8 graph of precision int8."""
    from cfgengine.backends import onnxruntime
    from cfgengine.backends.quantized import Int8Denoiser
    from cfgengine.model import info
    from cfgengine.sampler import sample

    cpu = torch.device("cpu")
    if precision == "int8":
        return Int8Denoiser(model, cpu, sample).graph()
    key = onnxruntime.cache_key(model, "fp32", tuple(info(model).sample_shape))
    return onnxruntime.session(model, "fp32", cpu, key).path


def compile_graph(graph, precision: str, threads: int | None = None):
    """The OpenVINO CPU compiled model of `graph` (an ONNX file's path, or an openvino.Model):
    latency mode, `threads` inference threads (default: cfgengine's intra-op count), and
    `precision`'s inference precision."""
    ov = require("openvino", "openvino")
    core = ov.Core()
    graph = core.read_model(str(graph)) if isinstance(graph, (str, Path)) else graph
    return core.compile_model(graph, "CPU", {
        "INFERENCE_NUM_THREADS": threads or intra_op_threads(),
        "INFERENCE_PRECISION_HINT": HINTS[precision], "PERFORMANCE_HINT": "LATENCY"})


class OpenVinoDenoiser(Backend):
    """The denoiser contract (rows in, rows out) on an OpenVINO infer request of a cfgengine ONNX
    graph; its ModelInfo says backend openvino at `precision`, so the Sampler runs it as it runs
    an exported file (its own precision, no autocast)."""

    backend_name = "openvino"

    def __init__(self, path: Path, precision: str, threads: int | None = None):
        from cfgengine.export import onnx as onnx_export

        meta = dataclasses.replace(onnx_export.read_metadata(Path(path)), precision=precision)
        super().__init__(meta, path, "cpu")
        try:
            self.request = compile_graph(path, precision, threads).create_infer_request()
        except RuntimeError as err:  # OpenVINO's multi-line C++ report: its last line says why
            why = [line for line in str(err).splitlines() if line.strip()] or ["?"]
            raise ValueError(f"OpenVINO cannot compile the {precision} graph {path.name}: "
                             f"{why[-1].strip()[:160]}") from None

    def run(self, z: torch.Tensor, logsnr: torch.Tensor, labels: torch.Tensor,
            *w: torch.Tensor) -> torch.Tensor:
        out = self.request.infer([t.numpy() for t in (z, logsnr, labels, *w)],
                                 share_inputs=True)  # outputs are copied: the request reuses them
        return torch.from_numpy(out[0])


def peer_runner(name: str, work: Workload) -> Runner | str:
    """The peer `name` sampling `work` (role "peer"), or the reason it cannot run here."""
    if name not in PEERS:
        return f"no peer named {name!r} (one of {', '.join(PEERS)})"
    why = unavailable(work.precision, work.device)
    if why is not None:
        return why
    try:
        denoiser = OpenVinoDenoiser(engine_graph(work.net, work.precision), work.precision,
                                    torch.get_num_threads())
    except ValueError as err:
        return str(err)
    return dataclasses.replace(engine_runner(name, denoiser, work, name), name=name, role="peer")
