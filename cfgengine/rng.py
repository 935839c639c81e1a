"""Counter-based Gaussian noise (docs/design.md §3): Philox4x32-10 + Box–Muller, as triton.language does it.

A draw is keyed by (seed, sample id, k) and the element index, never by batch layout, so sample i
gets the same noise at any batch size, chunking or backend. k = 0 is the initial z_0; k = t + 1 is
the noise added at the end of step t. This torch implementation is the definition; the Triton step
kernel reproduces it in-kernel (`tl.philox` + the same Box–Muller).

uint32 arithmetic is emulated in int64 tensors; products are split into 16-bit halves so nothing
overflows int64.
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


def _mul_hi_lo(const: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) 32-bit words of const·x for a uint32 constant and a uint32 tensor (in int64)."""
    c_hi, c_lo = const >> 16, const & 0xFFFF
    lo_part = c_lo * x  # < 2⁴⁸
    hi_part = c_hi * x  # < 2⁴⁸
    high = (hi_part + (lo_part >> 16)) >> 16
    low = (((hi_part & 0xFFFF) << 16) + lo_part) & MASK32
    return high & MASK32, low


def philox4x32(c0, c1, c2, c3, k0: int, k1: int, rounds: int = PHILOX_ROUNDS):
    """Philox4x32 with Triton's round structure; counters are int64 tensors holding uint32."""
    for _ in range(rounds):
        hi_b, lo_b = _mul_hi_lo(PHILOX_ROUND_B, c2)
        hi_a, lo_a = _mul_hi_lo(PHILOX_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + PHILOX_KEY_A) & MASK32
        k1 = (k1 + PHILOX_KEY_B) & MASK32
    return c0, c1, c2, c3


def uint_to_uniform(x: torch.Tensor) -> torch.Tensor:
    """uint32 (in int64) → float32 in [0, 1), via the signed view as triton.language does."""
    signed = torch.where(x >= 2**31, x - 2**32, x)
    folded = torch.where(signed < 0, -signed - 1, signed)
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
    c0 = q.expand(shape)
    c1 = (kk & MASK32).expand(shape)
    c2 = (ids & MASK32).expand(shape)
    c3 = ((ids >> 32) & MASK32).expand(shape)
    r0, r1, r2, r3 = philox4x32(c0, c1, c2, c3, k0, k1)
    n0, n1 = box_muller(uint_to_uniform(r0), uint_to_uniform(r1))
    n2, n3 = box_muller(uint_to_uniform(r2), uint_to_uniform(r3))
    return torch.stack((n0, n1, n2, n3), dim=-1).reshape(ids.shape[0], 4 * quads)[:, :numel]


def randn_like_rows(seed: int | torch.Tensor, sample_ids: torch.Tensor, k: int | torch.Tensor,
                    shape: tuple[int, ...]) -> torch.Tensor:
    """`randn` shaped [B, *shape] (one row per sample id)."""
    numel = math.prod(shape)
    return randn(seed, sample_ids, k, numel).reshape(sample_ids.shape[0], *shape)
