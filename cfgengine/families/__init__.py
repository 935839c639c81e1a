"""Model families beyond the class-conditional diffusers nets of cfgengine/adapters.py: prompt
models (text.py) and flow-matching / EDM parametrizations (flow.py), all on the same λ machinery."""
