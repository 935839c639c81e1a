"""`cfgengine train-classifier`: the classifier that judges a dataset's samples."""
from __future__ import annotations

import sys
from pathlib import Path

from cfgengine.atomic import check_distinct, check_writable
from cfgengine.cli.args import add_config_flags, given


def add(sub) -> None:
    from cfgengine.classifier import ClassifierTrainConfig

    p = sub.add_parser("train-classifier", help="train the classifier that judges a dataset's "
                       "samples (default output: cfgengine/assets/classifier-DATA.safetensors)",
                       description="Train the small classifier whose features and labels judge "
                                   "a dataset's samples (eval, classifier-accuracy): "
                                   "cross-entropy with Gaussian input noise of std "
                                   "--input-noise, AdamW with cosine learning-rate decay. Its "
                                   "accuracy is measured on a --holdout share of a finite "
                                   "dataset, or on --heldout-size fresh images of a procedural "
                                   "one. Writes --out, by default "
                                   "cfgengine/assets/classifier-DATA.safetensors.")
    add_config_flags(p, ClassifierTrainConfig)
    p.set_defaults(run=run)


def run(args) -> int:
    from cfgengine import classifier

    config = classifier.ClassifierTrainConfig(**given(args, classifier.ClassifierTrainConfig))
    dataset = classifier.load_dataset(config.data, config.image_size)
    out = config.out or classifier.classifier_path(dataset.info.name)
    check_writable(out, "--out")  # before training, not after
    data = config.data if Path(config.data).is_file() else None
    check_distinct({"--out": out}, {"--data": data})
    net, heldout = classifier.train_classifier(config, progress=sys.stderr.isatty())
    path = classifier.save_classifier(net, dataset, heldout, out)
    print(f"held-out accuracy {heldout:.4f} -> {path}")
    return 0
