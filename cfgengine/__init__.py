"""cfgengine: fast sampling for classifier-free guided diffusion models (Ho & Salimans 2022)."""
from cfgengine.registry import load
from cfgengine.guidance import APG, CFG, DynamicThreshold, GuidedDenoiser, ZeroStar, guided_eps
from cfgengine.sampler import Sampler, sample

__all__ = ["load", "sample", "Sampler", "GuidedDenoiser", "guided_eps", "CFG", "ZeroStar", "APG",
           "DynamicThreshold"]
