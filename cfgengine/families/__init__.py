"""Model families beyond the class-conditional DDPM nets of cfgengine/adapters.py: each wraps a
net of its own parametrization or conditioning as a cfgengine Denoiser (cfgengine.model) on the
engine's λ machinery — flow matching and EDM (flow.py), prompt models (text.py)."""
