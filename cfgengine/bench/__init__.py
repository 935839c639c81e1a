"""cfgengine.bench: what `cfgengine bench` runs — harness, baselines, workload, timing, report —
with three scripts, step.py (the fused step against its alternatives), serve.py (a load generator
for `cfgengine serve`) and gpu_check.py (the GPU sweep), and the studies in bench/studies/. The
modules live in the top-level bench/ folder; this file is the package's __init__
(cfgengine/__init__.py says why)."""
