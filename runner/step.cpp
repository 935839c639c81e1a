#include "step.h"

#include <ATen/ATen.h>

#include <numeric>

#include "philox.h"

namespace cfgengine {
namespace {

constexpr double kTwoPi = 6.283185307179586;
constexpr double kMinUniform = 1.0e-7;  // Box-Muller's u1 floor, as triton.language

// Two uniforms -> two standard normals (float32), as rng.box_muller.
std::pair<at::Tensor, at::Tensor> box_muller(const at::Tensor& u1, const at::Tensor& u2) {
  const at::Tensor theta = u2 * kTwoPi;
  const at::Tensor radius = at::sqrt(at::log(at::clamp_min(u1, kMinUniform)) * -2.0);
  return {radius * at::cos(theta), radius * at::sin(theta)};
}

}  // namespace

at::Tensor randn_rows(uint64_t seed, const std::vector<int64_t>& ids, uint64_t k,
                      const std::vector<int64_t>& shape, const at::Device& device) {
  const int64_t numel = std::accumulate(shape.begin(), shape.end(), int64_t{1},
                                        std::multiplies<int64_t>());
  const int64_t rows = static_cast<int64_t>(ids.size()), quads = (numel + 3) / 4;
  std::vector<float> uniforms = philox_uniforms(seed, ids, k, quads);
  const at::Tensor words = at::from_blob(uniforms.data(), {4, rows, quads}, at::kFloat)
                               .to(device, /*non_blocking=*/false, /*copy=*/true);
  const auto [n0, n1] = box_muller(words[0], words[1]);
  const auto [n2, n3] = box_muller(words[2], words[3]);
  return at::stack({n0, n1, n2, n3}, -1).reshape({rows, 4 * quads})
      .narrow(1, 0, numel).reshape(rows_shape(rows, shape));
}

std::vector<int64_t> rows_shape(int64_t rows, const std::vector<int64_t>& shape) {
  std::vector<int64_t> out = {rows};
  out.insert(out.end(), shape.begin(), shape.end());
  return out;
}

at::Tensor table_tensor(const std::vector<Row>& rows, const at::Device& device) {
  std::vector<float> values;
  for (const Row& row : rows) {
    for (const double c : row) values.push_back(static_cast<float>(c));
  }
  const auto count = static_cast<int64_t>(rows.size());
  return at::from_blob(values.data(), {count, kColumns}, at::kFloat).to(device, false, true);
}

StepResult guided_step(const StepArgs& a) {
  const int64_t batch = a.z.size(0);
  std::vector<int64_t> bshape(static_cast<size_t>(a.z.dim()), 1);  // (1, 1, ...) broadcasts
  const at::Tensor coef = a.table->narrow(0, a.t, 1);  // (1, 6), as table_rows
  auto column = [&](Column c) { return coef.select(1, c).reshape(bshape); };
  const at::Tensor eps_c = a.eps2.narrow(0, 0, batch).to(at::kFloat);
  at::Tensor eps = eps_c;
  if (a.eps2.size(0) == 2 * batch) {  // B rows (w = 0): eps~ = eps_c, as guided_step
    std::vector<int64_t> wshape = bshape;
    wshape[0] = batch;  // a float32 w per row, as guided_eps
    const at::Tensor w = at::full({batch}, a.w, a.z.options()).reshape(wshape);
    eps = eps_c + w * (eps_c - a.eps2.narrow(0, batch, batch).to(at::kFloat));
  }
  at::Tensor x_hat = (a.z - column(kSigma) * eps) / column(kAlpha);
  if (a.clip) x_hat = x_hat.clamp(-*a.clip, *a.clip);
  at::Tensor z_next = column(kCz) * a.z + column(kCx) * x_hat;
  if ((*a.row)[kCp] != 0.0) z_next = z_next + column(kCp) * a.x_hat_prev;
  if ((*a.row)[kNoise] != 0.0) z_next = z_next + column(kNoise) * a.noise;
  return {z_next, x_hat};
}

}  // namespace cfgengine
