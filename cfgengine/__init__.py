"""cfgengine: fast sampling for classifier-free guided diffusion models (Ho & Salimans 2022).

Where the code lives: the package is cfgengine/, plus three top-level folders that pyproject.toml
installs into it — kernels/ as cfgengine.kernels (the fused sampling step), export/ as
cfgengine.export (export formats) and bench/ as cfgengine.bench (what `cfgengine bench` runs;
bench/studies/ holds the studies). Those folders hold modules only: their package __init__.py files
are cfgengine/kernels/, cfgengine/export/ and cfgengine/bench/, so that nothing run from the
repository root shadows a third-party module of the same name (Hugging Face's `kernels`).
"""
from cfgengine.registry import load
from cfgengine.adapters import from_diffusers
from cfgengine.guidance import APG, CFG, DynamicThreshold, GuidedDenoiser, ZeroStar, guided_eps
from cfgengine.sampler import Sampler, sample

__all__ = ["load", "from_diffusers", "sample", "Sampler", "GuidedDenoiser", "guided_eps", "CFG",
           "ZeroStar", "APG", "DynamicThreshold"]
