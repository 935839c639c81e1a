"""How close a guidance-distilled student is to its teacher, in one run (CPU, one thread is fine):

1. ε: on held-out examples of the forward process (fresh x, ε, λ from the training distribution,
   conditional labels) the student's ε_η(z, λ, c, w) against the teacher's guided
   ε̃_w = (1+w)·ε_T(z, c) − w·ε_T(z, ∅): relative MSE, and MSE over that of the w-blind start.
2. Samples: the teacher's guided samples at w and the student's at the same w from the same seeds
   (ancestral, the sampler's default, with the student's w held fixed and its own guidance off),
   judged by the dataset's shipped classifier: class accuracy, diversity relative to real data,
   and the mean squared difference between the paired samples.

    OMP_NUM_THREADS=1 python scripts/distill_check.py --student default-distilled --teacher default \
        --out bench/results/distill-check-default.json
"""
from __future__ import annotations

import argparse
import json
import time

import torch
from torch import nn

from cfgengine import load
from cfgengine.atomic import write_atomic
from cfgengine.classifier import judge, load_classifier, within_class_distance
from cfgengine.data import load_dataset
from cfgengine.distill import guidance_error
from cfgengine.sampler import sample


class StudentAt(nn.Module):
    """The student as a plain Denoiser at one fixed w (sampled with the sampler's guidance off)."""

    def __init__(self, student, w: float):
        super().__init__()
        self.student, self.w = student, w
        self.num_classes, self.sample_shape = student.num_classes, student.sample_shape
        self.clip, self.dataset = student.clip, student.dataset

    def forward(self, z, logsnr, labels):
        return self.student(z, logsnr, labels, torch.full(labels.shape, self.w))


def sample_rows(student, teacher, ws, per_class: int, steps: int, seed: int) -> list[dict]:
    labels = torch.arange(teacher.num_classes).repeat_interleave(per_class)
    classifier = load_classifier(teacher.dataset)
    real = load_dataset(teacher.dataset, teacher.sample_shape[-1]).examples(
        labels, torch.Generator().manual_seed(seed))
    real_distance = within_class_distance(classifier.features(real), labels)
    rows = []
    for w in ws:
        x_t = sample(teacher, labels, w=w, steps=steps, seed=seed)
        x_s = sample(StudentAt(student, w), labels, w=0.0, steps=steps, seed=seed)
        t_row, s_row = (judge(classifier, x, labels, w, real_distance) for x in (x_t, x_s))
        rows.append({"w": w, "paired_mse": float((x_t - x_s).square().mean()),
                     "teacher": {"accuracy": t_row.accuracy, "diversity": t_row.diversity},
                     "student": {"accuracy": s_row.accuracy, "diversity": s_row.diversity}})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--student", default="default-distilled")
    parser.add_argument("--teacher", default="default")
    parser.add_argument("--w", default="0,0.3,1,2,4")
    parser.add_argument("--n", type=int, default=1024, help="held-out examples for the ε table")
    parser.add_argument("--per-class", type=int, default=8, help="samples per class per w")
    parser.add_argument("--steps", type=int, default=32, help="sampling steps")
    parser.add_argument("--out", default=None, help="also write the result as JSON here")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    student, teacher = load(args.student), load(args.teacher)
    ws = [float(w) for w in args.w.split(",")]
    start = time.perf_counter()
    eps_rows = guidance_error(student, teacher, load_dataset(teacher.dataset,
                                                             teacher.sample_shape[-1]), ws, args.n)
    print("w      rel.MSE   MSE/w-blind")
    for row in eps_rows:
        blind = "—" if row["vs_blind"] is None else f"{row['vs_blind']:.3f}"
        print(f"{row['w']:<6g} {row['relative']:.5f}   {blind}")
    samples = sample_rows(student, teacher, [w for w in ws if w > 0], args.per_class, args.steps,
                          seed=0)
    print("w      paired MSE   accuracy T / S   diversity T / S")
    for r in samples:
        print(f"{r['w']:<6g} {r['paired_mse']:.4f}       {r['teacher']['accuracy']:.3f} / "
              f"{r['student']['accuracy']:.3f}    {r['teacher']['diversity']:.3f} / "
              f"{r['student']['diversity']:.3f}")
    result = {"student": args.student, "teacher": args.teacher, "eps": eps_rows,
              "samples": samples, "per_class": args.per_class, "steps": args.steps,
              "seconds": time.perf_counter() - start}
    if args.out:
        write_atomic(lambda tmp: open(tmp, "w").write(json.dumps(result, indent=1)), args.out)


if __name__ == "__main__":
    main()
