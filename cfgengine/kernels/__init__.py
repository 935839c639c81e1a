"""Fused sampling-step kernels (Triton) and their torch references."""
from cfgengine.kernels.fused_step import guided_step

__all__ = ["guided_step"]
