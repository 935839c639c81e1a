"""The embedded default model (shapes, 16×16) judged by the shipped shapes classifier at T = 32:
guided samples show the requested class, unguided ones keep the data's diversity."""
import pytest
import torch

import cfgengine
from cfgengine.checkpoint import ASSETS
from cfgengine.classifier import (accuracy, binomial_lower_bound, judge, load_classifier,
                                  within_class_distance)
from cfgengine.data import load_dataset

PER_CLASS = 8


@pytest.fixture(scope="module")
def setting():
    """(model, classifier, labels, real within-class feature distance)."""
    model, classifier = cfgengine.load("default"), load_classifier("shapes")
    labels = torch.arange(model.num_classes).repeat_interleave(PER_CLASS)
    real = load_dataset("shapes", 16).examples(labels, torch.Generator().manual_seed(5))
    return model, classifier, labels, within_class_distance(classifier.features(real), labels)


def test_assets_are_small():
    assert (ASSETS / "default.safetensors").stat().st_size < 5e6


def test_classifier_is_accurate_on_fresh_real_data():
    """2000 fresh shapes (a seed neither training nor the stored held-out set used)."""
    x, y = load_dataset("shapes", 16).batch(2000, torch.Generator().manual_seed(99))
    correct = round(accuracy(load_classifier("shapes"), x, y) * len(y))
    assert binomial_lower_bound(correct, len(y)) >= 0.95


def test_guided_samples_show_the_requested_class(setting):
    """w = 1: the 95% Clopper–Pearson lower bound on class accuracy is at least 80%."""
    model, classifier, labels, real_distance = setting
    x = cfgengine.sample(model, labels, w=1.0, steps=32, seed=0)
    row = judge(classifier, x, labels, 1.0, real_distance)
    assert row.lower_bound >= 0.8, row


def test_unguided_samples_stay_diverse(setting):
    """w = 0: mean within-class feature distance at least half that of real data."""
    model, classifier, labels, real_distance = setting
    x = cfgengine.sample(model, labels, w=0.0, steps=32, seed=1)
    assert judge(classifier, x, labels, 0.0, real_distance).diversity >= 0.5


def test_binomial_lower_bound_against_scipy():
    stats = pytest.importorskip("scipy.stats")
    for k, n in [(0, 10), (1, 10), (57, 64), (64, 64), (500, 1000)]:
        expected = 0.0 if k == 0 else stats.beta.ppf(0.05, k, n - k + 1)
        assert abs(binomial_lower_bound(k, n) - expected) < 1e-9
