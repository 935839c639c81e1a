"""Fused sampling-step kernels (Triton) and their torch references."""
from cfgengine.kernels.guided_step import guided_step

__all__ = ["guided_step"]
