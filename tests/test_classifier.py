"""The judge classifiers: the Clopper–Pearson lower bound, the diversity figure, and the shipped
classifier files."""
import math

import pytest
import torch
from scipy import stats

from cfgengine import classifier


@pytest.mark.parametrize("k, n", [(1, 10), (7, 10), (95, 100), (100, 100), (3, 1000)])
def test_lower_bound_matches_scipy_beta_quantile(k, n):
    exact = stats.beta.ppf(0.05, k, n - k + 1)  # Clopper–Pearson one-sided 95% lower bound
    assert math.isclose(classifier.binomial_lower_bound(k, n), exact, rel_tol=1e-6, abs_tol=1e-9)


def test_lower_bound_of_no_successes_is_zero():
    assert classifier.binomial_lower_bound(0, 50) == 0.0


def test_within_class_distance_is_the_mean_pairwise_distance_per_class():
    features = torch.tensor([[0.0, 0.0], [3.0, 4.0], [10.0, 0.0], [10.0, 2.0], [10.0, 4.0]])
    labels = torch.tensor([0, 0, 1, 1, 1])
    # class 0: one pair at distance 5; class 1: pairs at 2, 2, 4 → mean 8/3
    assert math.isclose(classifier.within_class_distance(features, labels), (5 + 8 / 3) / 2)


@pytest.mark.parametrize("name", ["shapes", "digits"])
def test_shipped_classifiers_load_in_eval_mode(name):
    net = classifier.load_classifier(name)
    assert not net.training and net.dataset == name and 0.9 < net.heldout_accuracy <= 1.0
