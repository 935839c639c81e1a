// Counter-based noise keys: Philox4x32-10 with the round structure of triton.language (and of
// cfgengine/rng.py, the definition), and its uint32 -> float32 uniform conversion.
#pragma once

#include <array>
#include <cstdint>
#include <vector>

namespace cfgengine {

using Quad = std::array<uint32_t, 4>;

// Philox4x32 (Salmon et al. 2011) on counter c with key (k0, k1): `rounds` rounds, key bumped
// by the Weyl constants after each.
Quad philox4x32(Quad c, uint32_t k0, uint32_t k1, int rounds = 10);

// uint32 -> float32 in [0, 1): the signed view folded to [0, 2^31) times 4.6566127342e-10f.
float uint_to_uniform(uint32_t x);

// The uniforms behind `randn(seed, ids, k, numel)`: for each id and each quad q < ceil(numel/4),
// the four words of philox4x32((q, k, id_lo, id_hi), seed_lo, seed_hi) as uniforms, stored
// word-major: out[((w * ids.size()) + i) * quads + q] for word w, so each word is one
// [ids, quads] plane as rng.py holds it.
std::vector<float> philox_uniforms(uint64_t seed, const std::vector<int64_t>& ids, uint64_t k,
                                   int64_t quads);

}  // namespace cfgengine
