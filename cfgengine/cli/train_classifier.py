"""`cfgengine train-classifier`: the classifier that judges a dataset's samples."""
from __future__ import annotations

import sys

from cfgengine.cli.args import add_config_flags, given


def add(sub) -> None:
    from cfgengine.classifier import ClassifierTrainConfig

    p = sub.add_parser("train-classifier", help="train the classifier that judges a dataset's "
                       "samples (default output: cfgengine/assets/classifier-DATA.safetensors)")
    add_config_flags(p, ClassifierTrainConfig)
    p.set_defaults(run=run)


def run(args) -> int:
    from cfgengine import classifier

    config = classifier.ClassifierTrainConfig(**given(args, classifier.ClassifierTrainConfig))
    net, heldout = classifier.train_classifier(config, progress=sys.stderr.isatty())
    dataset = classifier.load_dataset(config.data, config.image_size)
    path = classifier.save_classifier(net, dataset, heldout,
                                      config.out or classifier.classifier_path(dataset.info.name))
    print(f"held-out accuracy {heldout:.4f} -> {path}")
    return 0
