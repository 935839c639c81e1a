"""Memory estimates made before anything is allocated, so a request that cannot fit is one line
and exit code 2 (not an allocator traceback or the OOM killer), and an unbounded batch is cut
into chunks that fit."""
from __future__ import annotations

import math
import os

import torch

from cfgengine.cli.args import UserError

FLOAT_BYTES = 4
# Bytes of working memory per sample element during one guided step: z, noise, x̂, eps2 (2B
# rows) and the network's activations at 2B rows (a small UNet keeps ~tens of feature maps of
# the sample's size alive at once). An estimate: it sizes chunks, it is not a measurement.
WORK_PER_ELEMENT = 64 * FLOAT_BYTES
TABLE_BYTES_PER_STEP = 6 * FLOAT_BYTES + 8  # one coefficient-table row + one float64 λ


def available_bytes(device: torch.device | str | None) -> int:
    """Free memory where sampling runs: the CUDA device's free memory, else MemAvailable."""
    device = torch.device(device or "cpu")
    if device.type == "cuda" and torch.cuda.is_available():
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


def plan_batch(rows: int, sample_shape: tuple[int, ...], steps: int, batch: int | None,
               device=None, n_flag: str = "--n", outputs_per_element: int = 3 * FLOAT_BYTES,
               available: int | None = None) -> int:
    """Rows per forward that fit next to the `rows` outputs (each held `outputs_per_element`
    bytes per element: on the device, on the host, encoded); UserError in one line when even the
    outputs, the step table or the asked `--batch` cannot fit."""
    free = available_bytes(device) if available is None else available
    elements = math.prod(sample_shape)
    outputs = rows * elements * outputs_per_element
    table = steps * TABLE_BYTES_PER_STEP
    if outputs + table > free:
        if table > outputs:
            what, flag = f"{steps} steps need a {_gib(table)} coefficient table", "--steps"
        else:
            what, flag = f"{rows} samples of shape {tuple(sample_shape)} need {_gib(outputs)}", n_flag
        raise UserError(f"{what}, only {_gib(free)} is free: lower {flag}")
    fits = max(1, (free - outputs - table) // (elements * WORK_PER_ELEMENT))
    if batch is not None:
        if batch > fits:
            raise UserError(f"--batch {batch} needs about {_gib(batch * elements * WORK_PER_ELEMENT)}"
                            f" of working memory, {_gib(free - outputs - table)} is free: use "
                            f"--batch {fits} or less")
        return batch
    return int(min(rows, fits))
