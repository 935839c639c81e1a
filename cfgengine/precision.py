"""Network precisions: the names the CLI, the backends and the exporters accept, and the dtype each
runs the network in. A leaf module (imports only torch) so every layer can import it."""
from __future__ import annotations

import torch

PRECISIONS: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16,
                                      "fp16": torch.float16, "int8": torch.int8}
# network precision name → dtype; int8 runs only as a quantized graph (export/quantize.py)


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The dtype autocast runs the network in at `precision`; None for fp32 and int8 (no
    autocast: int8 runs a quantized graph that takes and returns fp32)."""
    return None if precision in ("fp32", "int8") else PRECISIONS[precision]
