// Command-line flags of cfgengine-run (docs/design.md, "The C++ runner").
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "errors.h"
#include "table.h"

namespace cfgengine {

struct Options {
  std::string model;                 // the .pt2 package
  std::vector<int64_t> labels;       // one sample per label, sample ids 0..N-1
  double w = 0.3;                    // the paper's guidance weight (diffusers' scale is 1 + w)
  int steps = 256;
  SamplerSpec spec;
  std::string grid = "cosine";
  uint64_t seed = 0;
  std::string out;                   // x.npy
  std::string png;                   // optional image grid
  std::string device;                // "" = the package's own device
  int64_t dump_noise = 0;            // debug: write randn(seed, ids, k, dump_noise) instead
  std::vector<int64_t> ids;
  int64_t k = 0;
  bool help = false;
  bool trust_code = false;           // load a package that is not in the trust file
};

// Parses argv; UserError naming the first bad flag or value.
Options parse_args(int argc, char** argv);

extern const char* const kUsage;

}  // namespace cfgengine
