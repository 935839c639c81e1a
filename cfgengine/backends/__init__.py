"""Backends: what runs a model's network for the sampler. `onnxruntime` is the ONNX Runtime session
backend (an ONNX graph exported on first use and cached); export formats live in cfgengine.export."""
