"""Model families beyond DDPM-parametrized nets: each wraps a net of its own parametrization as a
cfgengine Denoiser (cfgengine.model) on the engine's λ machinery."""
