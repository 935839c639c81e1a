"""ONNX export of the denoiser (rows in = rows out) and its ONNX Runtime backend.

The graph is made by the dynamo exporter (`torch.onnx.export(program, dynamo=True)`) from the
program `cfgengine.export.program.trace` captures, so the batch dimension stays symbolic; fp16 keeps
normalisations in fp32. bf16 is refused: ONNX Runtime has no bf16 kernels for Conv on CPU or CUDA.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from cfgengine.export import metadata
from cfgengine.export.artifact import Backend, require
from cfgengine.export.program import OUTPUT, Traced, input_names, trace
from cfgengine.atomic import atomic_path
from cfgengine.threads import intra_op_threads

OPSET = 18
SUPPORTED_PRECISIONS = ("fp32", "fp16")
LOADABLE_PRECISIONS = (*SUPPORTED_PRECISIONS, "int8")  # int8: made from fp32 by export/quantize
_NUMPY = {torch.float32: np.float32, torch.int64: np.int64}


def export(model: torch.nn.Module, path: str | Path, *, precision: str = "fp32",
           max_batch: int = 64, opset: int = OPSET, source: str | None = None) -> Path:
    """Write `model` as an ONNX file at `path` (atomically); returns the path. (int8 is this
    fp32 graph statically quantized: cfgengine.export.export dispatches it to export/quantize.py.)"""
    metadata.export_dtype(precision, SUPPORTED_PRECISIONS, "ONNX")
    return export_program(trace(model, precision=precision, max_batch=max_batch, source=source),
                          path, opset=opset)


def export_program(traced: Traced, path: str | Path, *, opset: int = OPSET) -> Path:
    """Write an already traced program as ONNX with our metadata, after the full checker."""
    metadata.export_dtype(traced.meta.precision, SUPPORTED_PRECISIONS, "ONNX")
    proto = to_proto(traced, opset)
    path = Path(path)
    with atomic_path(path, ".onnx") as tmp:
        require("onnx", "onnx").save_model(proto, tmp)
    return path


def to_proto(traced: Traced, opset: int = OPSET):
    """The checked onnx.ModelProto of a traced program, metadata attached."""
    onnx = require("onnx", "onnx")
    require("onnxscript", "onnx")  # the dynamo exporter's dependency: fail with the extra's name
    program = torch.onnx.export(traced.program, dynamo=True, opset_version=opset,
                                input_names=list(input_names(traced.meta)),
                                output_names=[OUTPUT], verbose=False)
    return with_metadata(program.model_proto, traced.meta)


def with_metadata(proto, meta: metadata.ExportMeta):
    """`proto` carrying our metadata and its digest over the graph, after the full checker and
    the symbolic-batch check (every ONNX file cfgengine writes goes through here)."""
    onnx = require("onnx", "onnx")
    meta_json = meta.to_json()
    for key, value in ((metadata.KEY, meta_json), (metadata.DIGEST_KEY, metadata.digest(
            meta_json, proto.graph.SerializeToString()))):
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(proto, full_check=True)
    check_symbolic_batch(proto)
    return proto


def check_symbolic_batch(proto) -> None:
    """ValueError unless every input's and the output's first dimension is symbolic (a name)."""
    for value in list(proto.graph.input) + list(proto.graph.output):
        first = value.type.tensor_type.shape.dim[0]
        if not first.dim_param or first.HasField("dim_value"):
            raise ValueError(f"ONNX export froze the batch dimension of {value.name!r} to "
                             f"{first.dim_value}")


def load(path: str | Path, *, device: torch.device | str = "cpu",
         threads: int | None = None) -> "OnnxBackend":
    """An ONNX Runtime backend for a cfgengine ONNX file: CPU EP, or CUDA EP for a CUDA device."""
    path = Path(path)
    meta = read_metadata(path)
    device = torch.device(device)
    if meta.precision not in LOADABLE_PRECISIONS:
        raise ValueError(f"{path}: precision {meta.precision} has no ONNX Runtime kernels")
    return OnnxBackend(meta, path, device, _session(path, meta, device, threads))


def read_metadata(path: Path) -> metadata.ExportMeta:
    """The cfgengine metadata of an ONNX file; ValueError naming the path if it is not one."""
    onnx = require("onnx", "onnx")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such model file")
    try:
        proto = onnx.load_model(str(path), load_external_data=False)
    except Exception as err:  # protobuf's DecodeError and onnx's own errors: all mean "not ONNX"
        raise ValueError(f"{path}: not a readable ONNX model ({type(err).__name__})") from err
    props = {p.key: p.value for p in proto.metadata_props}
    meta = metadata.parse(props.get(metadata.KEY), path)
    check_graph(proto, props, meta, path)
    return meta


def check_graph(proto, props: dict, meta: metadata.ExportMeta, path: Path) -> None:
    """ValueError (one line) unless the metadata describes this graph: its digest matches, the
    inputs and output are ours with the recorded sample shape, the weights are of the recorded
    precision and the label table has num_classes + 1 rows."""
    onnx = require("onnx", "onnx")
    if props.get(metadata.DIGEST_KEY) != metadata.digest(props[metadata.KEY],
                                                         proto.graph.SerializeToString()):
        raise ValueError(f"{path}: cfgengine metadata does not match this graph (edited, or "
                         "copied from another export); re-export the model")
    names = [v.name for v in proto.graph.input], [v.name for v in proto.graph.output]
    if names != (list(input_names(meta)), [OUTPUT]):
        raise ValueError(f"{path}: graph inputs/outputs {names} are not cfgengine's")
    dims = [d.dim_value or d.dim_param for d in proto.graph.input[0].type.tensor_type.shape.dim]
    if tuple(dims[1:]) != meta.sample_shape:
        raise ValueError(f"{path}: graph takes samples of shape {tuple(dims[1:])}, metadata "
                         f"says {meta.sample_shape}")
    half = any(t.data_type == onnx.TensorProto.FLOAT16 for t in proto.graph.initializer)
    if half != (meta.precision == "fp16"):
        raise ValueError(f"{path}: metadata precision {meta.precision} but the graph's weights "
                         f"are {'fp16' if half else 'fp32'}")
    table = [t.dims[0] for t in proto.graph.initializer if t.name.endswith(metadata.LABEL_TABLE)]
    metadata.check_label_table(table[0] if table else None, meta, path)


def _session(path: Path, meta: metadata.ExportMeta, device: torch.device, threads: int | None):
    ort = require("onnxruntime", "onnx")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL  # one chain of convs: no inter-op
    options.intra_op_num_threads = threads or intra_op_threads()  # affinity, overrides
    options.inter_op_num_threads = 1
    # idle workers sleep instead of spinning: on a shared CPU spinning threads take the cores
    # the other processes (and our own torch step) need
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    provider = _provider(ort, device)
    # CPU EP after CUDA: ORT places the few nodes CUDA lacks kernels for (shape arithmetic) there
    cpu = "CPUExecutionProvider"
    providers = [provider] if provider == cpu else [provider, cpu]
    try:
        session = ort.InferenceSession(str(path), options, providers=providers)
    except Exception as err:  # onnxruntime raises its own Fail / NotImplemented types
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"{path}: ONNX Runtime cannot run this {meta.precision} model on "
                         f"{device.type}: {first}") from err
    _check_provider(session, provider, path)
    return session


def _provider(ort, device: torch.device):
    """The execution provider for `device`: CPU EP, or CUDA EP on the same stream as torch."""
    if device.type == "cpu":
        return "CPUExecutionProvider"
    if device.type != "cuda":
        raise ValueError(f"ONNX Runtime backend runs on cpu or cuda, not {device.type}")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise ValueError("device cuda needs onnxruntime-gpu (pip install 'cfgengine[gpu]'); this "
                         f"onnxruntime offers {', '.join(ort.get_available_providers())}")
    index = device.index if device.index is not None else torch.cuda.current_device()
    stream = torch.cuda.current_stream(index).cuda_stream  # ORT work ordered after torch's
    return ("CUDAExecutionProvider", {"device_id": index, "user_compute_stream": str(stream)})


def _check_provider(session, provider, path: Path) -> None:
    """ORT silently falls back to CPU when the CUDA EP fails to initialise: refuse that."""
    wanted = provider if isinstance(provider, str) else provider[0]
    active = session.get_providers()
    if not active or active[0] != wanted:
        raise ValueError(f"{path}: asked for {wanted} but ONNX Runtime activated {active}")


class OnnxBackend(Backend):
    """The backend contract on an ONNX Runtime session; torch tensors in and out."""

    backend_name = "onnx"

    def __init__(self, meta: metadata.ExportMeta, path: Path, device: torch.device, session):
        super().__init__(meta, path, device)
        self.session = session
        self.providers = session.get_providers()

    def run(self, z: torch.Tensor, logsnr: torch.Tensor, *inputs: torch.Tensor) -> torch.Tensor:
        inputs = dict(zip(input_names(self.meta), (z, logsnr, *inputs)))
        if self.device.type == "cuda":
            return self._run_bound(inputs, z.shape[0])
        feeds = {name: t.numpy() for name, t in inputs.items()}  # zero-copy views of CPU tensors
        (eps,) = self.session.run([OUTPUT], feeds)
        return torch.from_numpy(eps)

    def _run_bound(self, inputs: dict[str, torch.Tensor], rows: int) -> torch.Tensor:
        """CUDA: bind torch's device buffers directly (IOBinding), no host round trip."""
        binding = self.session.io_binding()
        index = self.device.index or 0
        for name, t in inputs.items():
            binding.bind_input(name, "cuda", index, _NUMPY[t.dtype], tuple(t.shape), t.data_ptr())
        eps = torch.empty((rows, *self.sample_shape), device=self.device)  # (rows, *S)
        binding.bind_output(OUTPUT, "cuda", index, np.float32, tuple(eps.shape), eps.data_ptr())
        self.session.run_with_iobinding(binding)
        return eps
