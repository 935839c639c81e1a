"""cfgengine: fast sampling for classifier-free guided diffusion models (Ho & Salimans 2022)."""
from cfgengine.checkpoint import load
from cfgengine.guidance import GuidedDenoiser, guided_eps

__all__ = ["load", "GuidedDenoiser", "guided_eps"]
