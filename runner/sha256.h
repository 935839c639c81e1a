// SHA-256 (FIPS 180-4), written from the standard: the runner checks a package against the
// trust file's hashes with no dependency beyond libtorch.
#pragma once

#include <array>
#include <cstdint>
#include <string>

namespace cfgengine {

class Sha256 {
 public:
  Sha256();
  void update(const uint8_t* data, size_t size);
  std::string hex_digest();  // finishes the hash: call once, after the last update

 private:
  void compress(const uint8_t* block);
  std::array<uint32_t, 8> state_;
  std::array<uint8_t, 64> buffer_{};
  size_t buffered_ = 0;
  uint64_t total_bytes_ = 0;
};

}  // namespace cfgengine
