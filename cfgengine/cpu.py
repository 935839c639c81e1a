"""What this x86 CPU computes natively, from /proc/cpuinfo: which network precisions pay here.

bf16 pays only with native bf16 dot products (AVX-512 BF16 or AMX); elsewhere every runtime
converts to fp32 and back, slower than fp32 itself. int8 pays with u8×s8 dot products (AVX2's
VPMADDUBSW everywhere; VNNI fuses them without int16 saturation).
"""
from __future__ import annotations

import functools
import sys
from pathlib import Path

BF16_FLAGS = ("avx512_bf16", "amx_bf16")
INT8_FLAGS = ("avx512_vnni", "avx_vnni", "avx2")


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The first processor's flags; empty where /proc/cpuinfo is missing (not Linux, not x86)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def has_flag(name: str) -> bool:
    return name in cpu_flags()


def unsupported(precision: str) -> str | None:
    """One line saying why `precision` cannot run fast on this CPU, else None."""
    flags = cpu_flags()
    if not flags:
        return None  # unknown CPU: let the runtime decide
    if precision == "bf16" and not flags.intersection(BF16_FLAGS):
        return ("this CPU has no native bf16 (no AVX-512 BF16 / AMX in /proc/cpuinfo): bf16 would "
                "run emulated, slower than fp32; use --precision fp32 or int8")
    if precision == "int8" and not flags.intersection(INT8_FLAGS):
        return "this CPU has no AVX2/VNNI int8 dot products; use --precision fp32"
    return None


def check_precision(precision: str) -> None:
    """ValueError where this CPU cannot run `precision` at all (int8); one warning line where it
    runs only emulated (bf16 without native bf16 dot products, slower than fp32)."""
    why = unsupported(precision)
    if why is not None and precision == "int8":
        raise ValueError(why)
    if why is not None:
        print(f"cfgengine: warning: {why}", file=sys.stderr)
