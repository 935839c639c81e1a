#include "table.h"

#include <cmath>
#include <stdexcept>

namespace cfgengine {

const char* const kSamplerNames = "ancestral|ddim|dpmpp_2m";
const char* const kGridNames = "cosine|cosine-authors|uniform|karras";

namespace {

constexpr double kKarrasRho = 7.0;  // Karras et al. 2022, eq. 5

double sigmoid(double x) { return 1.0 / (1.0 + std::exp(-x)); }
double alpha_of(double logsnr) { return std::sqrt(sigmoid(logsnr)); }
double sigma_of(double logsnr) { return std::sqrt(sigmoid(-logsnr)); }

// The paper's cosine schedule lambda(u) = -2 log tan(a u + b) on (lo, hi): lambda(0) = hi.
double cosine_logsnr(double u, LogsnrRange range) {
  const double b = std::atan(std::exp(-range.hi / 2));
  const double a = std::atan(std::exp(-range.lo / 2)) - b;
  return -2.0 * std::log(std::tan(a * u + b));
}

// Karras spacing in sigma/alpha = e^(-lambda/2): ramp 0 -> lo, ramp 1 -> hi.
double karras_logsnr(double ramp, LogsnrRange range) {
  const double root_max = std::exp(-range.lo / (2 * kKarrasRho));
  const double root_min = std::exp(-range.hi / (2 * kKarrasRho));
  return -2.0 * kKarrasRho * std::log(root_max + ramp * (root_min - root_max));
}

double grid_point(int t, int steps, const std::string& grid, LogsnrRange range) {
  const double last = steps - 1;
  if (grid == "cosine") return cosine_logsnr(1.0 - t / last, range);
  if (grid == "cosine-authors") return cosine_logsnr(1.0 - t / static_cast<double>(steps), range);
  if (grid == "uniform") return range.lo + (range.hi - range.lo) * t / last;
  return karras_logsnr(t / last, range);
}

// Algorithm 2: c_z = r alpha'/alpha, c_x = (1 - r) alpha',
// s^2 = ((1 - r) sigma'^2)^(1 - v) ((1 - r) sigma^2)^v, r = e^(lambda - lambda').
void ancestral_step(double lam, double lam_next, double v, Row& row) {
  const double one_minus_r = -std::expm1(lam - lam_next);
  const double sigma = sigma_of(lam), sigma_next = sigma_of(lam_next);
  row[kCz] = std::exp(lam - lam_next) * alpha_of(lam_next) / alpha_of(lam);
  row[kCx] = one_minus_r * alpha_of(lam_next);
  const double var = std::pow(one_minus_r * sigma_next * sigma_next, 1 - v) *
                     std::pow(one_minus_r * sigma * sigma, v);
  row[kNoise] = std::sqrt(var);
}

// DDIM: s = eta (sigma'/sigma) sqrt(1 - alpha^2/alpha'^2), c_z = sqrt(sigma'^2 - s^2)/sigma,
// c_x = alpha' - alpha c_z.
void ddim_step(double lam, double lam_next, double eta, Row& row) {
  const double alpha = alpha_of(lam), sigma = sigma_of(lam);
  const double alpha_next = alpha_of(lam_next), sigma_next = sigma_of(lam_next);
  const double s = eta * (sigma_next / sigma) * std::sqrt(1 - alpha * alpha / (alpha_next * alpha_next));
  row[kCz] = std::sqrt(sigma_next * sigma_next - s * s) / sigma;
  row[kCx] = alpha_next - alpha * row[kCz];
  row[kNoise] = s;
}

// DPM-Solver++(2M) step t of T: h = (lambda' - lambda)/2, gain = alpha'(1 - e^(-h)),
// c_x = gain (1 + 1/(2r)), c_p = -gain/(2r), r = h_{t-1}/h_t; first order (1/(2r) = 0) on the
// first step and on the step into the last grid point.
void dpmpp_2m_step(const std::vector<double>& logsnr, size_t t, Row& row) {
  const double h = (logsnr[t + 1] - logsnr[t]) / 2;
  const double gain = alpha_of(logsnr[t + 1]) * -std::expm1(-h);
  const bool second_order = t > 0 && t + 2 < logsnr.size();
  const double half_inv_r = second_order ? h / (2 * ((logsnr[t] - logsnr[t - 1]) / 2)) : 0.0;
  row[kCz] = sigma_of(logsnr[t + 1]) / sigma_of(logsnr[t]);
  row[kCx] = gain * (1 + half_inv_r);
  row[kNoise] = 0.0;
  row[kCp] = 0.0 - gain * half_inv_r;
}

}  // namespace

bool is_sampler(const std::string& name) {
  return name == "ancestral" || name == "ddim" || name == "dpmpp_2m";
}

bool is_grid(const std::string& name) {
  return name == "cosine" || name == "cosine-authors" || name == "uniform" || name == "karras";
}

std::vector<double> logsnr_grid(int steps, const std::string& grid, LogsnrRange range) {
  if (steps < 2) throw std::invalid_argument("steps must be an integer >= 2");
  if (!is_grid(grid)) throw std::invalid_argument("grid must be one of " + std::string(kGridNames));
  std::vector<double> logsnr(static_cast<size_t>(steps));
  for (int t = 0; t < steps; ++t) logsnr[t] = grid_point(t, steps, grid, range);
  return logsnr;
}

std::vector<Row> coefficient_table(const std::vector<double>& logsnr, const SamplerSpec& spec) {
  std::vector<Row> table(logsnr.size());
  for (size_t t = 0; t < logsnr.size(); ++t) {
    Row& row = table[t];
    row = {alpha_of(logsnr[t]), sigma_of(logsnr[t]), 0.0, 1.0, 0.0, 0.0};  // last row: z' = x_hat
    if (t + 1 == logsnr.size()) break;
    if (spec.sampler == "ancestral") {
      ancestral_step(logsnr[t], logsnr[t + 1], spec.v, row);
    } else if (spec.sampler == "ddim") {
      ddim_step(logsnr[t], logsnr[t + 1], spec.eta, row);
    } else {
      dpmpp_2m_step(logsnr, t, row);
    }
  }
  return table;
}

}  // namespace cfgengine
