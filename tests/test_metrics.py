"""metrics.py against closed forms: Fréchet distance of Gaussians, the score of known prediction
sets, k-NN precision/recall of distributions with known overlap, batch invariance, the bootstrap
and the reference-statistics cache."""
from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import torch

from cfgengine import metrics
from cfgengine.classifier import load_classifier
from cfgengine.data import load_dataset


def random_psd(gen: np.random.Generator, dim: int, rank: int | None = None) -> np.ndarray:
    a = gen.standard_normal((dim, rank or dim))
    return a @ a.T / dim


def test_fd_of_a_set_with_itself_is_zero():
    gen = np.random.default_rng(0)
    g = metrics.gaussian_fit(gen.standard_normal((300, 37)) @ gen.standard_normal((37, 37)))
    assert metrics.frechet_distance(g, g) < 1e-8 * np.trace(g.sigma)


@pytest.mark.parametrize("rank", [None, 5])  # full rank, and singular as with N < F samples
def test_fd_with_equal_covariances_is_squared_mean_distance(rank):
    gen = np.random.default_rng(1)
    sigma = random_psd(gen, 23, rank)
    mu1, mu2 = gen.standard_normal(23), gen.standard_normal(23)
    fd = metrics.frechet_distance(metrics.Gaussian(mu1, sigma, 2), metrics.Gaussian(mu2, sigma, 2))
    assert fd == pytest.approx(float(((mu1 - mu2) ** 2).sum()), rel=1e-6, abs=1e-6)


def test_trace_sqrt_product_matches_scipy_sqrtm():
    gen = np.random.default_rng(2)
    s1, s2 = random_psd(gen, 19), random_psd(gen, 19)
    reference = np.trace(scipy.linalg.sqrtm(s1 @ s2)).real
    assert metrics.trace_sqrt_product(s1, s2) == pytest.approx(reference, rel=1e-8)


@pytest.mark.parametrize("k", [3, 7, 10])
def test_score_of_confident_predictions_spread_over_k_classes_is_k(k):
    probs = np.eye(k)[np.arange(11 * k) % k]
    assert metrics.inception_score(probs) == pytest.approx(k, rel=1e-12)


def test_score_of_uniform_predictions_is_one():
    assert metrics.inception_score(np.full((50, 9), 1 / 9)) == pytest.approx(1.0, abs=1e-12)


def test_accuracy_counts_argmax_hits():
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
    assert metrics.class_accuracy(probs, np.array([0, 1, 1])) == pytest.approx(2 / 3)


@pytest.fixture(scope="module")
def digits_features():
    """Features and softmax of 60 real digits by the shipped classifier, in batches of 1 and 60."""
    x = load_dataset("digits").x[:60]
    extractor = metrics.classifier_extractor(load_classifier("digits"))
    return metrics.extract(extractor, x, batch=1), metrics.extract(extractor, x, batch=60)


def test_metrics_do_not_depend_on_the_batch_size(digits_features):
    (f1, p1), (f60, p60) = digits_features
    ref = metrics.gaussian_fit(f60[::-1].copy() + 0.1)
    assert metrics.frechet_distance(metrics.gaussian_fit(f1), ref) == pytest.approx(
        metrics.frechet_distance(metrics.gaussian_fit(f60), ref), abs=1e-5)
    assert metrics.inception_score(p1) == pytest.approx(metrics.inception_score(p60), abs=1e-5)
    pr1 = metrics.precision_recall(f1[:30], f1[30:])
    assert pr1 == pytest.approx(metrics.precision_recall(f60[:30], f60[30:]), abs=1e-5)


N_PR = 600
# 4 standard errors of a proportion (≤ 0.5/√n) each side: several checks below, none may flake
SLACK = 4 * 0.5 / math.sqrt(N_PR)


def gaussian_points(seed: int, n: int = N_PR, shift: float = 0.0, dim: int = 4) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, dim)) + shift


def test_identical_distributions_give_precision_and_recall_near_one():
    precision, recall = metrics.precision_recall(gaussian_points(3), gaussian_points(4))
    assert precision > 0.85 and recall > 0.85


def test_disjoint_distributions_give_zero_precision_and_recall():
    assert metrics.precision_recall(gaussian_points(5), gaussian_points(6, shift=100.0)) == (0, 0)


def test_half_disjoint_fakes_halve_precision_but_keep_recall():
    """Half the fakes drawn from the real distribution, half far away: precision is the in-manifold
    share p of same-distribution fakes (measured above as > 0.85) times 1/2; recall stays high
    because the fake half that overlaps still covers the real set."""
    real = gaussian_points(7)
    same = gaussian_points(8, N_PR // 2)
    fake = np.concatenate([same, gaussian_points(9, N_PR // 2, shift=100.0)])
    p_same, _ = metrics.precision_recall(real, same)
    precision, recall = metrics.precision_recall(real, fake)
    assert precision == pytest.approx(p_same / 2, abs=SLACK)
    assert recall > 0.75


def test_knn_radius_is_distance_to_kth_other_point():
    points = np.array([[0.0], [1.0], [3.0], [6.0]])
    assert metrics.knn_radii(points, k=2).tolist() == [3.0, 2.0, 3.0, 5.0]


def test_bootstrap_interval_brackets_the_mean_of_a_proportion():
    hits = (np.random.default_rng(10).random(2000) < 0.3).astype(float)
    iv = metrics.bootstrap(lambda i: hits[i].mean(), len(hits), rounds=300)
    half_width = 1.96 * math.sqrt(0.3 * 0.7 / len(hits))
    assert iv.low < iv.value < iv.high
    assert iv.high - iv.low == pytest.approx(2 * half_width, rel=0.25)


def test_compare_calls_overlapping_intervals_inconclusive():
    a, b, c = metrics.Interval(1, 0.5, 1.5), metrics.Interval(1.4, 1.2, 1.6), metrics.Interval(3, 2, 4)
    assert metrics.compare(a, b) == "inconclusive"
    assert metrics.compare(a, c) == "lower" and metrics.compare(c, a) == "higher"


def test_reference_statistics_are_cached_and_invalidated_on_key_mismatch(tmp_path):
    calls = []

    def extractor(x):
        calls.append(len(x))
        return x.flatten(1)[:, :6], None

    first = metrics.reference("digits", extractor, "net-a", tmp_path)
    again = metrics.reference("digits", extractor, "net-a", tmp_path)
    assert len(calls) == 2 and np.array_equal(first.features, again.features)  # 1797 = 1000 + 797
    metrics.reference("digits", extractor, "net-b", tmp_path)  # another network: recomputed
    assert len(calls) == 4
    np.testing.assert_allclose(first.gaussian.mu, first.features.mean(0))


class MeanPerChannel(torch.nn.Module):
    def forward(self, x):
        return x.mean(dim=(2, 3)), x.mean(dim=(2, 3))[:, :2]  # (features, logits)


def test_user_feature_network_sees_three_channels_in_0_255(tmp_path):
    """A user's own feature network (e.g. Inception weights) through `--features`. (TorchScript
    only: exporting a .pt2 program here would cost ~8 s of the suite for a two-line branch.)"""
    from cfgengine.evaluate import load_extractor

    path = tmp_path / "net.pt"
    with pytest.warns(DeprecationWarning):
        torch.jit.script(MeanPerChannel()).save(str(path))
    with pytest.raises(ValueError, match="--trust-code"):  # TorchScript is code (issue 14)
        load_extractor(str(path), "digits")
    extractor, key = load_extractor(str(path), "digits", trust_code=True)
    features, probs = extractor(torch.full((2, 1, 8, 8), 1.0))  # white grey images
    assert features.shape == (2, 3) and torch.allclose(features, torch.tensor(255.0))
    assert torch.allclose(probs, torch.tensor(0.5, dtype=torch.float64))
    assert key == metrics.file_digest(path)


def test_stratified_bootstrap_keeps_the_count_of_each_stratum():
    strata = np.arange(90) % 3
    iv = metrics.bootstrap(lambda i: float((strata[i] == 0).sum()), 90, strata=strata, rounds=20)
    assert (iv.value, iv.low, iv.high) == (30.0, 30.0, 30.0)
