"""The guided sampling step, fused: `guided_step` with its per-row state (`RowState`) and noise
key (`CounterNoise`). Layers: contract → reference → triton_step → launch → step (kernels/step.py
says what each holds)."""
from cfgengine.kernels.contract import CounterNoise, RowState
from cfgengine.kernels.step import guided_step

__all__ = ["CounterNoise", "RowState", "guided_step"]
