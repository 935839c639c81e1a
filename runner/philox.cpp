#include "philox.h"

#include <cstddef>

namespace cfgengine {
namespace {

constexpr uint32_t kKeyA = 0x9E3779B9u;    // golden ratio, key bump of word 0
constexpr uint32_t kKeyB = 0xBB67AE85u;    // sqrt(3) - 1, key bump of word 1
constexpr uint32_t kRoundA = 0xD2511F53u;  // multiplier of counter word 0
constexpr uint32_t kRoundB = 0xCD9E8D57u;  // multiplier of counter word 2
constexpr float kUniformScale = 4.6566127342e-10f;  // largest s with (2^31 - 1)*s < 1 in float32

}  // namespace

Quad philox4x32(Quad c, uint32_t k0, uint32_t k1, int rounds) {
  for (int r = 0; r < rounds; ++r) {
    const uint64_t prod_b = uint64_t{kRoundB} * c[2];
    const uint64_t prod_a = uint64_t{kRoundA} * c[0];
    const auto hi_b = static_cast<uint32_t>(prod_b >> 32), lo_b = static_cast<uint32_t>(prod_b);
    const auto hi_a = static_cast<uint32_t>(prod_a >> 32), lo_a = static_cast<uint32_t>(prod_a);
    c = {hi_b ^ c[1] ^ k0, lo_b, hi_a ^ c[3] ^ k1, lo_a};
    k0 += kKeyA;  // uint32 arithmetic wraps mod 2^32, as the definition's & MASK32
    k1 += kKeyB;
  }
  return c;
}

float uint_to_uniform(uint32_t x) {
  const auto signed_view = static_cast<int32_t>(x);
  // -x - 1 maps [-2^31, -1] onto [0, 2^31 - 1] without overflow
  const int32_t folded = signed_view < 0 ? -(signed_view + 1) : signed_view;
  return static_cast<float>(folded) * kUniformScale;
}

std::vector<float> philox_uniforms(uint64_t seed, const std::vector<int64_t>& ids, uint64_t k,
                                   int64_t quads) {
  const auto k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  const int64_t rows = static_cast<int64_t>(ids.size()), plane = rows * quads;
  std::vector<float> out(static_cast<size_t>(4 * plane));
  for (int64_t i = 0; i < rows; ++i) {
    const auto id = static_cast<uint64_t>(ids[i]);
    for (int64_t q = 0; q < quads; ++q) {
      const Quad counter = {static_cast<uint32_t>(q), static_cast<uint32_t>(k),
                            static_cast<uint32_t>(id), static_cast<uint32_t>(id >> 32)};
      const Quad words = philox4x32(counter, k0, k1);
      for (int w = 0; w < 4; ++w) out[w * plane + i * quads + q] = uint_to_uniform(words[w]);
    }
  }
  return out;
}

}  // namespace cfgengine
