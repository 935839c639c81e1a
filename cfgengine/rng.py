"""Counter-based Gaussian noise (docs/design.md §1): Philox4x32-10 + Box–Muller, as triton.language
does it.

A draw is keyed by (seed, sample id, k) and the element index, never by batch layout, so sample i
gets the same noise at any batch size, chunking or backend. k = 0 is the initial z_0; k = t + 1 is
the noise added at the end of step t. This torch implementation is the definition; the Triton step
kernel reproduces it in-kernel (`tl.philox` + the same Box–Muller).

uint32 words live in int64 tensors. A product of two uint32 words needs 64 bits: int64
multiplication wraps modulo 2⁶⁴ (two's complement), so its bits are exactly the unsigned product's —
the high word is (p >> 32) & mask, the low word p & mask. The four counter words travel as two
stacked pairs, (c0, c2) — the words that are multiplied — and (c1, c3), so one Philox round is
seven tensor ops over every row, quad and pair at once. On CPU the whole draw is then bound by
memory traffic rather than by per-op dispatch; `StepNoise` amortises the rest by drawing the noise
of many steps in one call.
"""
from __future__ import annotations

import math

import torch

MASK32 = 0xFFFFFFFF
PHILOX_KEY_A = 0x9E3779B9
PHILOX_KEY_B = 0xBB67AE85
PHILOX_ROUND_A = 0xD2511F53
PHILOX_ROUND_B = 0xCD9E8D57
PHILOX_ROUNDS = 10
UNIFORM_SCALE = 4.6566127342e-10  # largest s with (2³¹ − 1)·s < 1 in float32, as Triton uses
TWO_PI = 6.283185307179586
STEP_NOISE_ELEMENTS = 2**16  # normals per StepNoise draw: its int64 state (2 × 2¹⁴ words a
# tensor) stays in L2; measured best of 2¹⁴…2²⁰ on a 2-core CPU (0.03 ms/step at B = 1, 16×16×3)


def _round_keys(k0, k1, rounds: int, device) -> torch.Tensor:
    """int64 [rounds, 2, 1]: the key (k0, k1) of every round, k_r = k + r·(A, B) mod 2³²."""
    r = torch.arange(rounds, dtype=torch.int64, device=device).reshape(-1, 1, 1)
    bump = torch.tensor([[PHILOX_KEY_A], [PHILOX_KEY_B]], dtype=torch.int64, device=device)
    key = torch.stack([torch.as_tensor(k0, device=device), torch.as_tensor(k1, device=device)])
    return (key.to(torch.int64).reshape(2, 1) + r * bump) & MASK32


def philox_pairs(even: torch.Tensor, odd: torch.Tensor, k0, k1, rounds: int = PHILOX_ROUNDS):
    """Philox4x32 (Triton's round structure) on pairs: even = (c0, c2), odd = (c1, c3), each an
    int64 [2, …] tensor holding uint32 words; returns the output pairs (r0, r2), (r1, r3).

    One round: (c0, c1, c2, c3) ← (hi(B·c2) ^ c1 ^ k0, lo(B·c2), hi(A·c0) ^ c3 ^ k1, lo(A·c0)).
    """
    shape = (2,) + (1,) * (even.dim() - 1)
    mult = torch.tensor([PHILOX_ROUND_B, PHILOX_ROUND_A], dtype=torch.int64,
                        device=even.device).reshape(shape)  # pairs with (c2, c0)
    keys = _round_keys(k0, k1, rounds, even.device).reshape(rounds, *shape)
    for r in range(rounds):
        prod = even.flip(0) * mult  # (B·c2, A·c0), wrapping mod 2⁶⁴
        even = ((prod >> 32) ^ odd ^ keys[r]) & MASK32  # (hi_b ^ c1 ^ k0, hi_a ^ c3 ^ k1)
        odd = prod & MASK32  # (lo_b, lo_a) = the new (c1, c3)
    return even, odd


def philox4x32(c0, c1, c2, c3, k0, k1, rounds: int = PHILOX_ROUNDS):
    """Philox4x32 on four same-shaped int64 counter tensors holding uint32 (see `philox_pairs`)."""
    even, odd = philox_pairs(torch.stack([c0, c2]), torch.stack([c1, c3]), k0, k1, rounds)
    return even[0], odd[0], even[1], odd[1]


def uint_to_uniform(x: torch.Tensor) -> torch.Tensor:
    """uint32 (in int64) → float32 in [0, 1), via the signed view as triton.language does: a word
    x ≥ 2³¹ is the negative s = x − 2³², folded to −s − 1 = x ^ mask."""
    folded = x ^ ((x >> 31) * MASK32)
    return folded.to(torch.float32) * torch.tensor(UNIFORM_SCALE, dtype=torch.float32)


def box_muller(u1: torch.Tensor, u2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two uniforms → two standard normals (float32), clamping u1 ≥ 1e-7 as Triton does."""
    u1 = torch.clamp(u1, min=1.0e-7)
    theta = TWO_PI * u2
    radius = torch.sqrt(-2.0 * torch.log(u1))
    return radius * torch.cos(theta), radius * torch.sin(theta)


def split_seed(seed: int | torch.Tensor):
    """64-bit seed → Philox key (low word, high word); a 0-d tensor seed stays on its device."""
    if isinstance(seed, torch.Tensor):
        seed = seed.to(torch.int64)
    elif not 0 <= seed < 2**63:
        raise ValueError(f"seed must be in [0, 2^63), got {seed}")
    return seed & MASK32, (seed >> 32) & MASK32


def randn(seed: int | torch.Tensor, sample_ids: torch.Tensor, k: int | torch.Tensor, numel: int) -> torch.Tensor:
    """Standard normals float32 [B, numel]: row i keyed by (seed, sample_ids[i], k or k[i]).

    Element j of a row comes from Philox output j % 4 at counter (j // 4, k, id_lo, id_hi).
    """
    k0, k1 = split_seed(seed)
    ids = sample_ids.to(torch.int64).reshape(-1, 1)  # (B, 1)
    kk = torch.as_tensor(k, dtype=torch.int64, device=ids.device).reshape(-1, 1)  # (1|B, 1)
    quads = math.ceil(numel / 4)
    q = torch.arange(quads, dtype=torch.int64, device=ids.device).reshape(1, -1)  # (1, Q)
    shape = (ids.shape[0], quads)
    even = torch.stack([q.expand(shape), (ids & MASK32).expand(shape)])  # (2, B, Q): (c0, c2)
    odd = torch.stack([(kk & MASK32).expand(shape), ((ids >> 32) & MASK32).expand(shape)])
    even, odd = philox_pairs(even, odd, k0, k1)  # (r0, r2), (r1, r3)
    cos, sin = box_muller(uint_to_uniform(even), uint_to_uniform(odd))  # (n0, n2), (n1, n3)
    quad = torch.stack((cos, sin), dim=-1).permute(1, 2, 0, 3)  # (B, Q, pair, cos|sin)
    return quad.reshape(ids.shape[0], 4 * quads)[:, :numel]


def randn_like_rows(seed: int | torch.Tensor, sample_ids: torch.Tensor, k: int | torch.Tensor,
                    shape: tuple[int, ...]) -> torch.Tensor:
    """`randn` shaped [B, *shape] (one row per sample id)."""
    numel = math.prod(shape)
    return randn(seed, sample_ids, k, numel).reshape(sample_ids.shape[0], *shape)


def randn_steps(seed: int | torch.Tensor, sample_ids: torch.Tensor, ks: torch.Tensor,
                shape: tuple[int, ...]) -> torch.Tensor:
    """[K, B, *shape]: the noise of rows `sample_ids` at every key k in `ks`, in one draw —
    entry [j] equals `randn_like_rows(seed, sample_ids, ks[j], shape)`."""
    batch = sample_ids.shape[0]
    ids = sample_ids.reshape(1, -1).expand(ks.shape[0], batch).reshape(-1)  # (K·B,)
    k = ks.to(torch.int64).reshape(-1, 1).expand(ks.shape[0], batch).reshape(-1)
    return randn_like_rows(seed, ids, k.to(ids.device), shape).reshape(ks.shape[0], batch, *shape)


class StepNoise:
    """The noise a loop adds at the end of each step t (key k = t + 1), drawn for a block of
    steps at a time so the generator's fixed per-call cost is paid once per block, not per step.
    `noise[t]` is randn_like_rows(seed, sample_ids, t + 1, shape), bit for bit."""

    def __init__(self, seed: int | torch.Tensor, sample_ids: torch.Tensor, shape: tuple[int, ...],
                 steps: int, max_elements: int = STEP_NOISE_ELEMENTS):
        self.seed, self.sample_ids, self.shape, self.steps = seed, sample_ids, tuple(shape), steps
        per_step = max(1, sample_ids.shape[0] * math.prod(self.shape))
        self.block = max(1, min(steps, max_elements // per_step))
        self._start, self._noise = -1, None

    def __getitem__(self, t: int) -> torch.Tensor:
        """[B, *shape] noise of step t (0 ≤ t < steps)."""
        if not 0 <= t < self.steps:
            raise IndexError(f"step {t} outside [0, {self.steps})")
        start = t - t % self.block
        if start != self._start:
            stop = min(start + self.block, self.steps)
            ks = torch.arange(start + 1, stop + 1, device=self.sample_ids.device)
            self._noise = randn_steps(self.seed, self.sample_ids, ks, self.shape)
            self._start = start
        return self._noise[t - start]
