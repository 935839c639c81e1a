"""`cfgengine classifier-accuracy`: class accuracy and diversity of a model's samples per w."""
from __future__ import annotations

from cfgengine.cli.args import UserError, add_model_flag, guidance_weights
from cfgengine.cli.budget import plan_batch
from cfgengine.model import info as model_info
from cfgengine.registry import load


def add(sub) -> None:
    p = sub.add_parser("classifier-accuracy", help="class accuracy and diversity of a model's "
                       "samples per w, judged by the dataset's shipped classifier",
                       description="Sample each class at each w and report the share the "
                                   "dataset's shipped classifier assigns to the intended class "
                                   "(with its 95% lower bound) and the samples' diversity.")
    add_model_flag(p)
    p.add_argument("--w", type=guidance_weights(), default=[0.0, 0.3, 1.0, 4.0],
                   help="guidance weights w of the paper, comma list (default: 0,0.3,1,4)")
    p.add_argument("--steps", type=int, default=256, help="sampling steps T (default: 256)")
    p.add_argument("--n", type=int, default=16, help="samples per class (default: 16)")
    p.add_argument("--seed", type=int, default=0, help="noise seed (default: 0)")
    p.set_defaults(run=run)


def run(args) -> int:
    from cfgengine import classifier

    model = load(args.ckpt, trust_code=args.trust_code)
    facts = model_info(model)
    if not facts.dataset:
        raise UserError(f"{args.ckpt}: not a model trained by cfgengine on a known dataset")
    if args.n < 1 or args.steps < 2:
        raise UserError(f"--n must be ≥ 1 and --steps ≥ 2, got {args.n} and {args.steps}")
    rows = args.n * facts.num_classes  # one sampling pass per w, all classes at once
    plan_batch(rows, facts.sample_shape, args.steps, None, n_flag="--n")
    judge = classifier.load_classifier(model.dataset)
    rows = classifier.guidance_report(model, judge, args.w, steps=args.steps, per_class=args.n,
                                      seed=args.seed)
    print(f"{args.ckpt}: {args.n} samples/class x {facts.num_classes} classes, T={args.steps}; "
          f"classifier held-out accuracy {judge.heldout_accuracy:.4f}")
    print("     w  accuracy  95% lower bound  diversity (vs real)")
    for row in rows:
        print(f"{row.w:6g}  {row.accuracy:8.4f}  {row.lower_bound:15.4f}  {row.diversity:9.3f}")
    return 0
