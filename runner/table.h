// The lambda grids and coefficient tables of cfgengine/schedule.py and cfgengine/tables.py
// (docs/design.md: grids, Algorithm 2, DDIM, DPM-Solver++(2M)), computed in double precision and
// rounded once to float32, row by row (alpha, sigma, c_z, c_x, s, c_p).
#pragma once

#include <array>
#include <string>
#include <vector>

namespace cfgengine {

constexpr int kColumns = 6;
enum Column { kAlpha, kSigma, kCz, kCx, kNoise, kCp };
using Row = std::array<double, kColumns>;

struct LogsnrRange {
  double lo = -20.0;
  double hi = 20.0;
};

struct SamplerSpec {
  std::string sampler = "ancestral";  // ancestral | ddim | dpmpp_2m
  double v = 0.3;                     // ancestral variance interpolation
  double eta = 0.0;                   // DDIM noise scale
};

// The increasing grid lambda_0 < ... < lambda_{T-1} of `grid` (cosine, cosine-authors, uniform,
// karras) on `range`; std::invalid_argument for an unknown grid or steps < 2.
std::vector<double> logsnr_grid(int steps, const std::string& grid, LogsnrRange range);

// The table [T] of rows (alpha, sigma, c_z, c_x, s, c_p) of `spec` on `logsnr` (float64); the
// last row is (alpha, sigma, 0, 1, 0, 0) so that z' = x_hat.
std::vector<Row> coefficient_table(const std::vector<double>& logsnr, const SamplerSpec& spec);

bool is_sampler(const std::string& name);
bool is_grid(const std::string& name);
extern const char* const kSamplerNames;  // "ancestral|ddim|dpmpp_2m", for messages
extern const char* const kGridNames;

}  // namespace cfgengine
