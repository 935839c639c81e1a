"""`cfgengine eval`: FID / IS / precision / recall / accuracy per (model, T, w)."""
from __future__ import annotations

import os
from pathlib import Path

from cfgengine import distributed
from cfgengine.cli.args import UserError, add_trust_flag, comma_list, guidance_weights


def add(sub) -> None:
    from cfgengine.evaluate import PAPER_W

    p = sub.add_parser("eval", help="FID / IS / precision / recall / accuracy of samples per "
                       "(model, T, w), in the dataset classifier's feature space",
                       description="Score models per (model, steps T, w) cell: one sampling pass "
                                   "per (model, T) covers every w. Writes results.json, "
                                   "results.md and plots to --out-dir, each figure with a 95% "
                                   "bootstrap interval. See docs/studies.md.")
    p.add_argument("--ckpt", action="append", required=True,
                   help="model file (repeat for several models, e.g. one per p_uncond)")
    p.add_argument("--w", type=guidance_weights(), default=list(PAPER_W),
                   help="guidance weights w of the paper (diffusers' guidance_scale = 1 + w), "
                        "comma list; one sampling pass covers them all (default: %(default)s)")
    p.add_argument("--steps", type=comma_list(int, "--steps"), default=[64],
                   help="sampling steps T, comma list (default: 64)")
    p.add_argument("--per-cell", "--n", dest="n", type=int, default=1000,
                   help="class-balanced samples per cell (--n is an old spelling that torchrun's "
                        "own parser rejects as ambiguous)")
    p.add_argument("--seed", type=int, default=0, help="noise seed (default: 0)")
    p.add_argument("--out-dir", default="eval", help="results folder (its parent must exist)")
    p.add_argument("--features", default=None,
                   help="feature network: a classifier .safetensors, a torch.export .pt2 "
                        "(read as data), or TorchScript such as Inception (code: needs "
                        "--trust-code); no downloads (default: the dataset's shipped classifier)")
    p.add_argument("--k", type=int, default=3, help="k of the k-NN precision/recall manifolds")
    p.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples per interval")
    p.add_argument("--batch", type=int, default=2000, help="rows per sampling forward")
    p.add_argument("--cache-dir", default=None, help="reference statistics cache "
                   "(default: ~/.cache/cfgengine)")
    add_trust_flag(p, "--ckpt or --features")
    p.add_argument("--no-samples", dest="save_samples", action="store_false",
                   help="score without writing the sample shards (under torchrun the images are "
                        "then not gathered either: only features travel)")
    p.set_defaults(run=run)


@distributed.command  # under torchrun: each rank samples and embeds its shard, rank 0 scores
def run(args) -> int:
    from cfgengine.evaluate import EvalConfig, run_eval

    config = EvalConfig(tuple(args.ckpt), tuple(args.w), tuple(args.steps), args.n, args.seed,
                        args.out_dir, args.features, args.k, args.bootstrap, args.batch,
                        cache_dir=args.cache_dir, trust_code=args.trust_code,
                        save_samples=args.save_samples)
    out = Path(args.out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out-dir: {out} is a file")
    if distributed.is_main() and not out.resolve().parent.is_dir():
        raise UserError(f"--out-dir: parent folder of {out} does not exist")
    writable = out if out.is_dir() else out.resolve().parent
    if distributed.is_main() and not os.access(writable, os.W_OK | os.X_OK):
        raise UserError(f"--out-dir: {writable} is not writable")
    run_eval(config, log=print if distributed.is_main() else lambda *_: None)
    if distributed.is_main():  # models and features are checked before anything is written
        print(f"results -> {out / 'results.json'}, {out / 'results.md'}")
    return 0
