"""Studies: one command each, apart from what `cfgengine bench` runs.

    python -m cfgengine.bench.studies.fid_w full      # FID/IS against w and p_uncond
    python -m cfgengine.bench.studies.nfe all         # quality per network evaluation
    python -m cfgengine.bench.studies.fewer shapes    # quality per second: CFG, refresh, student
    python -m cfgengine.bench.studies.scaling --nproc 2 --rounds 3   # torchrun scaling
"""
