"""cfgengine: fast sampling for classifier-free guided diffusion models (Ho & Salimans 2022)."""
