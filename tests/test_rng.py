"""rng.py (the definition of the counter-based noise) against Triton's own Philox and Box–Muller
run under the interpreter, plus batch independence and distribution checks (docs/design.md §3)."""
from __future__ import annotations

import math
import os

import pytest
import torch
from scipy import stats

from cfgengine import rng

triton = pytest.importorskip("triton", reason="triton is not installed: no reference Philox")
tl = pytest.importorskip("triton.language")
from triton.language.random import pair_uniform_to_normal, uint_to_uniform_float  # noqa: E402

BLOCK = 64
# conftest sets TRITON_INTERPRET=1 without a GPU; with one, the kernel runs compiled on it.
KERNEL_DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"


@triton.jit
def _philox_randn_kernel(out_ptr, seed, k, id_lo, id_hi, numel, BLOCK: tl.constexpr):
    """out[j] = Triton's Philox + Box–Muller at counter (j // 4, k, id_lo, id_hi), key = seed;
    element j takes output j % 4."""
    j = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    quad = (j // 4).to(tl.uint32)
    zero = tl.zeros_like(quad)
    r0, r1, r2, r3 = tl.philox(seed, quad, zero + k, zero + id_lo, zero + id_hi)
    n0, n1 = pair_uniform_to_normal(uint_to_uniform_float(r0), uint_to_uniform_float(r1))
    n2, n3 = pair_uniform_to_normal(uint_to_uniform_float(r2), uint_to_uniform_float(r3))
    lane = j % 4
    value = tl.where(lane == 0, n0, tl.where(lane == 1, n1, tl.where(lane == 2, n2, n3)))
    tl.store(out_ptr + j, value, mask=j < numel)


def triton_randn(seed: int, sample_id: int, k: int, numel: int, block: int = BLOCK):
    out = torch.full((numel,), math.nan, dtype=torch.float32, device=KERNEL_DEVICE)
    grid = (triton.cdiv(numel, block),)
    _philox_randn_kernel[grid](out, seed, k, sample_id & 0xFFFFFFFF, sample_id >> 32, numel,
                               BLOCK=block)
    return out.cpu()


def assert_agree(ours: torch.Tensor, ref: torch.Tensor) -> None:
    """≤ 1e-5 relative (absolute below |x| = 1: values near a zero of cos/sin)."""
    assert ours.shape == ref.shape and ours.dtype == ref.dtype == torch.float32
    assert bool(torch.isfinite(ref).all())
    err = (ours - ref).abs() / ref.abs().clamp(min=1.0)
    assert err.max().item() <= 1e-5, err.max()


@pytest.mark.parametrize("seed", [0, 7, 2**31 + 5, 2**32 + 3, 2**62 + 12345])
@pytest.mark.parametrize("sample_id, k", [(0, 0), (5, 1), (2**32 + 9, 3), (2**40 + 1, 17)])
def test_randn_matches_triton_philox(seed, sample_id, k):
    numel = 45  # not a multiple of 4
    assert_agree(rng.randn(seed, torch.tensor([sample_id]), k, numel)[0],
                 triton_randn(seed, sample_id, k, numel))


def test_randn_matches_triton_philox_in_the_tails():
    """2¹⁷ + 3 draws reach |x| ≈ 4.5, where u1 ≈ 1e-5: the log and the clamp of Box–Muller."""
    numel = 2**17 + 3
    ours = rng.randn(2**33 + 7, torch.tensor([2**32 + 1]), 5, numel)[0]
    ref = triton_randn(2**33 + 7, 2**32 + 1, 5, numel, block=4096)
    assert ref.abs().max().item() > 4.0
    assert_agree(ours, ref)


def test_randn_rows_follow_their_own_keys():
    ids = torch.tensor([3, 2**33 + 1, 0])
    ks = torch.tensor([0, 4, 9])
    batch = rng.randn(11, ids, ks, 10)
    for i in range(3):
        assert_agree(batch[i], triton_randn(11, int(ids[i]), int(ks[i]), 10))


def test_row_noise_does_not_depend_on_batch_companions():
    alone = rng.randn(42, torch.tensor([7]), 3, 33)
    batch = rng.randn(42, torch.tensor([1, 7, 2**35, 0]), 3, 33)
    reordered = rng.randn(42, torch.tensor([2**35, 0, 7]), 3, 33)
    assert torch.equal(batch[1], alone[0]) and torch.equal(reordered[2], alone[0])


def test_randn_is_a_prefix_in_numel():
    long = rng.randn(5, torch.arange(3), 2, 40)
    assert torch.equal(rng.randn(5, torch.arange(3), 2, 13), long[:, :13])


def test_randn_like_rows_shapes_rows():
    x = rng.randn_like_rows(5, torch.arange(2), 1, (3, 5))
    assert x.shape == (2, 3, 5)
    assert torch.equal(x.reshape(2, -1), rng.randn(5, torch.arange(2), 1, 15))


def test_tensor_seed_equals_int_seed():
    ids = torch.arange(3)
    seed = 2**33 + 1
    assert torch.equal(rng.randn(torch.tensor(seed), ids, 1, 9), rng.randn(seed, ids, 1, 9))


def test_different_keys_give_different_noise():
    ids = torch.tensor([0])
    base = rng.randn(1, ids, 0, 16)
    for other in (rng.randn(2, ids, 0, 16), rng.randn(1, ids, 1, 16),
                  rng.randn(1, torch.tensor([1]), 0, 16), rng.randn(1 + 2**32, ids, 0, 16),
                  rng.randn(1, torch.tensor([2**32]), 0, 16)):
        assert not torch.equal(base, other)


# Statistical checks: N = 40 000 draws; every test below makes at most M comparisons and uses a
# two-sided z bound of Φ⁻¹(1 − 1e-6 / (2M)), so a correct generator fails with probability < 1e-6.
N_ROWS, N_COLS = 200, 200
FAIL_PROB = 1e-6


def z_bound(comparisons: int) -> float:
    return float(stats.norm.ppf(1 - FAIL_PROB / (2 * comparisons)))


@pytest.fixture(scope="module")
def draws():
    return rng.randn(2024, torch.arange(N_ROWS) + 2**32 - 100, 3, N_COLS).double()


def test_moments_match_standard_normal(draws):
    x = draws.flatten()
    n, zb = x.numel(), z_bound(4)
    assert abs(x.mean().item()) < zb * math.sqrt(1 / n)
    assert abs(x.var().item() - 1) < zb * math.sqrt(2 / n)
    assert abs((x**3).mean().item()) < zb * math.sqrt(15 / n)
    assert abs((x**4).mean().item() - 3) < zb * math.sqrt(96 / n)


def test_distribution_passes_kolmogorov_smirnov(draws):
    assert stats.kstest(draws.flatten().numpy(), "norm").pvalue > FAIL_PROB


def test_each_of_the_four_philox_lanes_is_standard_normal(draws):
    lanes = draws.reshape(N_ROWS, N_COLS // 4, 4)
    n, zb = N_ROWS * N_COLS // 4, z_bound(8)
    for lane in range(4):
        x = lanes[..., lane].flatten()
        assert abs(x.mean().item()) < zb * math.sqrt(1 / n)
        assert abs(x.var().item() - 1) < zb * math.sqrt(2 / n)


def correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten() - a.mean(), b.flatten() - b.mean()
    return (a @ b / (a.norm() * b.norm())).item()


def test_independent_across_k(draws):
    other = rng.randn(2024, torch.arange(N_ROWS) + 2**32 - 100, 4, N_COLS).double()
    # |ρ| of independent samples ~ N(0, 1/n) approximately
    assert abs(correlation(draws, other)) < z_bound(1) / math.sqrt(draws.numel())


def test_independent_across_sample_ids(draws):
    pairs = [(0, 1), (99, 100), (98, 199), (3, 150)]  # 2^32 is crossed between rows 99 and 100
    bound = z_bound(len(pairs)) / math.sqrt(N_COLS)
    for i, j in pairs:
        assert abs(correlation(draws[i], draws[j])) < bound


def test_independent_across_lanes_and_quads(draws):
    lanes = draws.reshape(N_ROWS, N_COLS // 4, 4)
    n = N_ROWS * N_COLS // 4
    checks = [(lanes[..., 0], lanes[..., 1]), (lanes[..., 1], lanes[..., 2]),
              (lanes[..., 2], lanes[..., 3]), (lanes[:, :-1, 0], lanes[:, 1:, 0])]
    bound = z_bound(len(checks)) / math.sqrt(n - N_ROWS)
    for a, b in checks:
        assert abs(correlation(a, b)) < bound


@pytest.mark.parametrize("seed", [-1, -(2**40), 2**63])
def test_seed_out_of_range_is_rejected(seed):
    with pytest.raises(ValueError, match="seed"):
        rng.randn(seed, torch.arange(2), 0, 4)


# --- the fast generator against a slow reference written from the Philox definition -------------
# The reference below is the generator as first written: Philox4x32-10 word by word, with every
# 32×32-bit product split into 16-bit halves so nothing overflows int64, then the signed-view
# uniform and Box–Muller as separate per-lane ops. The fast rng.py must equal it bit for bit.

def _ref_mul_hi_lo(const: int, x: torch.Tensor):
    c_hi, c_lo = const >> 16, const & 0xFFFF
    lo_part, hi_part = c_lo * x, c_hi * x  # each < 2⁴⁸
    high = (hi_part + (lo_part >> 16)) >> 16
    low = (((hi_part & 0xFFFF) << 16) + lo_part) & rng.MASK32
    return high & rng.MASK32, low


def _ref_philox(c0, c1, c2, c3, k0: int, k1: int):
    for _ in range(10):
        hi_b, lo_b = _ref_mul_hi_lo(rng.PHILOX_ROUND_B, c2)
        hi_a, lo_a = _ref_mul_hi_lo(rng.PHILOX_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + rng.PHILOX_KEY_A) & rng.MASK32, (k1 + rng.PHILOX_KEY_B) & rng.MASK32
    return c0, c1, c2, c3


def _ref_uniform(x: torch.Tensor) -> torch.Tensor:
    signed = torch.where(x >= 2**31, x - 2**32, x)
    folded = torch.where(signed < 0, -signed - 1, signed)
    return folded.to(torch.float32) * torch.tensor(rng.UNIFORM_SCALE, dtype=torch.float32)


def _ref_normals(u1: torch.Tensor, u2: torch.Tensor):
    u1 = torch.clamp(u1, min=1.0e-7)
    theta = 6.283185307179586 * u2
    radius = torch.sqrt(-2.0 * torch.log(u1))
    return radius * torch.cos(theta), radius * torch.sin(theta)


def reference_randn(seed: int, sample_ids: torch.Tensor, k, numel: int) -> torch.Tensor:
    """[B, numel] from the definition: element j of row i is lane j % 4 of Philox at counter
    (j // 4, k_i, id_i low, id_i high) with key (seed low, seed high)."""
    ids = sample_ids.to(torch.int64).reshape(-1, 1)
    kk = torch.as_tensor(k, dtype=torch.int64).reshape(-1, 1)
    quads = -(-numel // 4)
    shape = (ids.shape[0], quads)
    counters = (torch.arange(quads).reshape(1, -1).expand(shape), (kk & rng.MASK32).expand(shape),
                (ids & rng.MASK32).expand(shape), ((ids >> 32) & rng.MASK32).expand(shape))
    r0, r1, r2, r3 = _ref_philox(*counters, seed & rng.MASK32, seed >> 32)
    n0, n1 = _ref_normals(_ref_uniform(r0), _ref_uniform(r1))
    n2, n3 = _ref_normals(_ref_uniform(r2), _ref_uniform(r3))
    return torch.stack((n0, n1, n2, n3), dim=-1).reshape(ids.shape[0], 4 * quads)[:, :numel]


def python_philox(counter: tuple[int, int, int, int], key: tuple[int, int]):
    """Philox4x32-10 on plain Python integers (Salmon et al. 2011, Triton's round order)."""
    (c0, c1, c2, c3), (k0, k1) = counter, key
    for _ in range(10):
        pb, pa = rng.PHILOX_ROUND_B * c2, rng.PHILOX_ROUND_A * c0
        c0, c1, c2, c3 = (pb >> 32) ^ c1 ^ k0, pb & rng.MASK32, (pa >> 32) ^ c3 ^ k1, pa & rng.MASK32
        k0, k1 = (k0 + rng.PHILOX_KEY_A) & rng.MASK32, (k1 + rng.PHILOX_KEY_B) & rng.MASK32
    return c0, c1, c2, c3


def test_philox_words_match_python_integers():
    """Every wrap-around case of the int64 product: words 0, 2³¹ − 1, 2³¹, 2³² − 1 and random."""
    gen = torch.Generator().manual_seed(3)
    words = torch.cat([torch.tensor([0, 2**31 - 1, 2**31, 2**32 - 1]),
                       torch.randint(0, 2**32, (60,), generator=gen)])
    c = [words, words.roll(1), words.roll(2), words.roll(3)]
    for key in ((0, 0), (2**32 - 1, 2**32 - 1), (12345, 2**31 + 7)):
        fast = torch.stack(rng.philox4x32(*c, *key), dim=1).tolist()
        want = [python_philox(tuple(int(x[i]) for x in c), key) for i in range(len(words))]
        assert fast == [list(w) for w in want]


@pytest.mark.parametrize("numel", [1, 3, 45, 769, 4097])
@pytest.mark.parametrize("seed", [0, 2**32 + 3, 2**62 + 12345])
def test_fast_randn_equals_the_reference_bit_for_bit(seed, numel):
    ids = torch.tensor([0, 7, 2**32 - 1, 2**32, 2**40 + 1, 2**62 + 9, 3])
    ks = torch.tensor([0, 1, 2**31 + 5, 2**32 - 1, 17, 256, 1024])
    assert torch.equal(rng.randn(seed, ids, ks, numel), reference_randn(seed, ids, ks, numel))
    assert torch.equal(rng.randn(seed, ids[2:3], 9, numel), reference_randn(seed, ids[2:3], 9, numel))


def test_step_noise_equals_per_step_draws_over_many_steps():
    """The block draw of the sampler's CPU loop gives each step's own key, across block edges."""
    ids, shape, steps = torch.tensor([2**32 + 5, 0, 11]), (3, 5, 7), 300
    noise = rng.StepNoise(2**33 + 1, ids, shape, steps, max_elements=7 * 3 * 105)  # 7-step blocks
    assert noise.block == 7
    for t in (0, 6, 7, 8, 150, 298, 299):
        want = reference_randn(2**33 + 1, ids, t + 1, 105).reshape(3, *shape)
        assert torch.equal(noise[t], want), t
    with pytest.raises(IndexError):
        noise[steps]


def test_randn_steps_stacks_keys():
    ids, ks = torch.tensor([4, 2**35]), torch.tensor([1, 5, 2**32 + 2])
    stacked = rng.randn_steps(8, ids, ks, (2, 3))
    for j, k in enumerate(ks.tolist()):
        assert torch.equal(stacked[j], reference_randn(8, ids, k, 6).reshape(2, 2, 3))
