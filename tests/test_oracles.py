"""Distribution oracles for the sampler: exact moments (linear-Gaussian) and exact mixtures.

The reference here is written from DESIGN.md §1 independently of cfgengine.schedule/solvers, in
float64 and in the paper's own form (μ and var of Algorithm 2, DDIM's update), so a wrong schedule,
variance interpolation, coefficient or guidance sign in the package makes these tests fail.
"""
import math

import pytest
import torch

import cfgengine
from cfgengine import toy

N_SAMPLES = 20_000
# Two-sided normal quantile for p = 1e-9: with ≈ 500 comparisons per run the family-wise false
# alarm rate is < 1e-6, while every deliberate break we tried moves a statistic by > 20 of these.
Z_CRIT = 6.1
PER_CLASS = 3000
MIXTURE_STEPS = 256


def logsnr_grid_f64(steps: int) -> torch.Tensor:
    """λ_t = −2·log tan(a·u_t + b), u_t = 1 − t/(T−1), λmin = −20, λmax = 20."""
    b = math.atan(math.exp(-10.0))
    a = math.atan(math.exp(10.0)) - b
    u = 1.0 - torch.arange(steps, dtype=torch.float64) / (steps - 1)
    return -2.0 * torch.log(torch.tan(a * u + b))


def alpha_sigma_f64(lam: float) -> tuple[float, float]:
    """α = √sigmoid(λ), σ = √sigmoid(−λ) in float64."""
    return math.sqrt(1 / (1 + math.exp(-lam))), math.sqrt(1 / (1 + math.exp(lam)))


def affine_eps(model, label: int, alpha: float, sigma: float):
    """ε(z) = slope·z + offset per dimension for a single-Gaussian label of the linear model."""
    mean = model.means[model.log_weights[label].isfinite()][0]
    var = model.variances[model.log_weights[label].isfinite()][0]
    denom = alpha**2 * var + sigma**2
    return sigma / denom, -sigma * alpha * mean / denom


def step_affine(lam, lam_next, slope, offset, sampler: str, v: float, eta: float):
    """One step z' = P·z + Q + s·n of Algorithm 2 (v) or DDIM (η), given ε̃ = slope·z + offset."""
    alpha, sigma = alpha_sigma_f64(lam)
    alpha_n, sigma_n = alpha_sigma_f64(lam_next)
    xh_p, xh_q = (1 - sigma * slope) / alpha, -sigma * offset / alpha  # x̂ = xh_p·z + xh_q
    if sampler == "ancestral":
        r = math.exp(lam - lam_next)
        p = r * alpha_n / alpha + (1 - r) * alpha_n * xh_p
        q = (1 - r) * alpha_n * xh_q
        var = ((1 - r) * sigma_n**2) ** (1 - v) * ((1 - r) * sigma**2) ** v
        return p, q, var
    s = eta * (sigma_n / sigma) * math.sqrt(1 - alpha**2 / alpha_n**2)
    keep = math.sqrt(sigma_n**2 - s**2)  # multiplies ε̂ = (z − α·x̂)/σ
    p = alpha_n * xh_p + keep * (1 - alpha * xh_p) / sigma
    q = alpha_n * xh_q - keep * alpha * xh_q / sigma
    return p, q, s**2


def exact_moments(model, label: int, w: float, steps: int, sampler: str, v: float, eta: float):
    """Mean and variance per dimension of the sampler's output, propagated through every step."""
    lams = logsnr_grid_f64(steps)
    mean, var = torch.zeros(model.means.shape[1], dtype=torch.float64), 1.0
    for t in range(steps):
        lam = float(lams[t])
        alpha, sigma = alpha_sigma_f64(lam)
        a_c, b_c = affine_eps(model, label, alpha, sigma)
        a_u, b_u = affine_eps(model, model.num_classes, alpha, sigma)
        slope, offset = (1 + w) * a_c - w * a_u, (1 + w) * b_c - w * b_u
        if t == steps - 1:  # the result is x̂ of the last step
            xh_p, xh_q = (1 - sigma * slope) / alpha, -sigma * offset / alpha
            return xh_p * mean + xh_q, xh_p**2 * var
        p, q, noise_var = step_affine(lam, float(lams[t + 1]), slope, offset, sampler, v, eta)
        mean, var = p * mean + q, p**2 * var + noise_var


@pytest.fixture(scope="module")
def linear_model():
    means = torch.tensor([[0.5, -0.3, 0.1], [-0.4, 0.2, 0.6]])
    stds = torch.tensor([[0.3, 0.5, 0.2], [0.4, 0.25, 0.35]])
    return toy.linear_gaussian(means, stds, torch.tensor([0.05, -0.05, 0.35]),
                               torch.tensor([0.6, 0.55, 0.45]))


SETTINGS = ([("ancestral", v, 0.0) for v in (0.0, 0.3, 1.0)]
            + [("ddim", 0.3, eta) for eta in (0.0, 1.0)])


@pytest.mark.parametrize("steps", [3, 5, 8])
@pytest.mark.parametrize("sampler,v,eta", SETTINGS)
@pytest.mark.parametrize("w", [0.0, 2.0])
def test_linear_gaussian_moments_are_exact(linear_model, steps, sampler, v, eta, w):
    labels = torch.arange(2).repeat_interleave(N_SAMPLES)
    x = cfgengine.sample(linear_model, labels, w=w, steps=steps, sampler=sampler, v=v, eta=eta,
                         seed=steps).double()
    for label in (0, 1):
        xs = x[labels == label]
        mean, var = exact_moments(linear_model, label, w, steps, sampler, v, eta)
        var = torch.as_tensor(var).expand_as(mean)
        mean_err = (xs.mean(0) - mean).abs() / (var / len(xs)).sqrt()
        var_err = (xs.var(0) / var - 1).abs() / math.sqrt(2 / (len(xs) - 1))
        assert mean_err.max() < Z_CRIT, (label, xs.mean(0), mean)
        assert var_err.max() < Z_CRIT, (label, xs.var(0), var)


def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, directions: torch.Tensor) -> float:
    """Mean over directions of the 1-D Wasserstein-1 distance between equal-size samples."""
    pa, pb = (torch.sort(x.double() @ directions.T, dim=0).values for x in (a, b))
    return float((pa - pb).abs().mean())


@pytest.fixture(scope="module")
def ring():
    return cfgengine.load("gmm")


@pytest.fixture(scope="module")
def sw_null(ring):
    """Null distribution of the sliced-Wasserstein statistic: exact vs exact, per class size."""
    gen = torch.Generator().manual_seed(1)
    directions = torch.randn(32, 2, generator=gen, dtype=torch.float64)
    directions = directions / directions.norm(dim=1, keepdim=True)
    labels = torch.zeros(PER_CLASS, dtype=torch.int64)
    stats = [sliced_wasserstein(ring.sample_data(labels, gen), ring.sample_data(labels, gen),
                                directions) for _ in range(40)]
    return directions, max(stats)


@pytest.fixture(scope="module")
def unguided_samples(ring):
    labels = torch.arange(ring.num_classes).repeat_interleave(PER_CLASS)
    ancestral = cfgengine.sample(ring, labels, w=0.0, steps=MIXTURE_STEPS, seed=11)
    ddim = cfgengine.sample(ring, labels, w=0.0, steps=MIXTURE_STEPS, sampler="ddim", seed=12)
    return labels, ancestral, ddim


def test_unguided_samples_match_each_class(ring, unguided_samples, sw_null):
    labels, x, _ = unguided_samples
    directions, null_max = sw_null
    gen = torch.Generator().manual_seed(2)
    for k in range(ring.num_classes):
        xs = x[labels == k].double()
        exact = ring.sample_data(labels[labels == k], gen).double()
        ref = ring.sample_data(torch.full((200_000,), k), gen).double()
        mean_err = (xs.mean(0) - ref.mean(0)).abs() / (ref.var(0) / len(xs)).sqrt()
        assert mean_err.max() < Z_CRIT, (k, xs.mean(0), ref.mean(0))
        cov_err = (torch.cov(xs.T) - torch.cov(ref.T)).abs().max()
        assert cov_err < Z_CRIT * ref.var(0).max() * math.sqrt(2 / len(xs)), (k, cov_err)
        # 1.5× the largest of 40 exact-vs-exact statistics: a false alarm is far rarer than 1/40.
        assert sliced_wasserstein(xs, exact, directions) < 1.5 * null_max


def test_ddim_and_ancestral_agree_without_guidance(ring, unguided_samples, sw_null):
    labels, ancestral, ddim = unguided_samples
    directions, null_max = sw_null
    for k in range(ring.num_classes):
        pick = labels == k
        assert sliced_wasserstein(ancestral[pick], ddim[pick], directions) < 1.5 * null_max


def test_guidance_sharpens_the_true_posterior(ring):
    """Mean true log p(c|x) rises strictly with w (paired, same seed: beyond 4 standard errors);
    true-posterior accuracy does not fall."""
    labels = torch.arange(ring.num_classes).repeat_interleave(600)
    log_post, accuracy = [], []
    for w in (0.0, 0.3, 1.0, 4.0):
        x = cfgengine.sample(ring, labels, w=w, steps=64, seed=5)
        lp = ring.log_posterior(x)
        log_post.append(lp[torch.arange(len(labels)), labels])
        accuracy.append(float((lp.argmax(1) == labels).double().mean()))
    for lower, higher in zip(log_post, log_post[1:]):
        diff = higher - lower
        assert diff.mean() > 4 * diff.std() / math.sqrt(len(diff))
    assert accuracy == sorted(accuracy) and accuracy[-1] > accuracy[0]


# --------------------------------------------------------------------------------------------
# DPM-Solver++(2M) against DDIM (both deterministic, the same probability-flow ODE from the same
# z_0): at T = 32 it is several times closer to the 1024-step answer. Errors are medians over
# samples of ‖x̂ − x̂_ref‖ (relative): a few trajectories near a component boundary, where the ODE
# is stiff, would otherwise decide the figure.

ODE_RANGE = (-10.0, 10.0)  # uniform steps of h = 0.32 at T = 32, as k-diffusion's usual range


@pytest.fixture(scope="module")
def ode_answer():
    """(model, labels, the 1024-step 2M answer x̂) on a guided image mixture, uniform grid."""
    model = toy.image_mixture(num_classes=4, shape=(1, 4, 4), seed=1)
    labels = torch.arange(4).repeat_interleave(25)
    ref = cfgengine.sample(model, labels, w=1.0, steps=1024, sampler="dpmpp_2m", grid="uniform",
                           logsnr_range=ODE_RANGE, seed=4)
    return model, labels, ref.double()


def ode_error(ode_answer, steps: int, sampler: str, grid: str = "uniform") -> float:
    model, labels, ref = ode_answer
    x = cfgengine.sample(model, labels, w=1.0, steps=steps, sampler=sampler, grid=grid,
                         logsnr_range=ODE_RANGE, seed=4).double()
    return float((x - ref).flatten(1).norm(dim=1).median() / ref.flatten(1).norm(dim=1).median())


def test_ddim_converges_to_the_same_answer(ode_answer):
    """First order: 32× the steps gives ≥ 8× less error (measured 16×) toward the 2M answer."""
    assert ode_error(ode_answer, 1024, "ddim") < ode_error(ode_answer, 32, "ddim") / 8


def test_dpmpp_2m_is_several_times_closer_than_ddim_at_32_steps(ode_answer):
    """Measured 8.7× (4.1e-3 against 3.6e-2; 8.0× with another mixture seed)."""
    assert ode_error(ode_answer, 32, "ddim") > 5 * ode_error(ode_answer, 32, "dpmpp_2m")


@pytest.mark.parametrize("grid, factor", [("karras", 3.0), ("cosine", 1.5)])
def test_dpmpp_2m_beats_ddim_on_the_other_grids(ode_answer, grid, factor):
    """Measured 4.4× on karras and 2.1× on cosine, whose last, first-order step is long
    (λ ≈ 5.7 → 10 at T = 32) and shared by both solvers."""
    assert ode_error(ode_answer, 32, "ddim", grid) > factor * ode_error(ode_answer, 32,
                                                                        "dpmpp_2m", grid)
