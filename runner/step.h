// The sampler step and its noise in ATen ops, written after kernels/fused_step.py's
// `guided_step_reference` and cfgengine/rng.py so that a CPU run matches Python's op for op.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <vector>

#include "table.h"

namespace cfgengine {

// {rows, *shape}: the shape of a batch of samples.
std::vector<int64_t> rows_shape(int64_t rows, const std::vector<int64_t>& shape);

// Standard normals float32 [B, *shape] on `device`: row i keyed by (seed, ids[i], k), element j
// from Philox word j % 4 of quad j / 4, Box-Muller on word pairs (0, 1) and (2, 3), as rng.py.
at::Tensor randn_rows(uint64_t seed, const std::vector<int64_t>& ids, uint64_t k,
                      const std::vector<int64_t>& shape, const at::Device& device);

// The table float32 [T, 6] on `device`, each float64 coefficient rounded once.
at::Tensor table_tensor(const std::vector<Row>& rows, const at::Device& device);

struct StepResult {
  at::Tensor z_next;  // z' = c_z z + c_x x_hat + c_p x_hat_prev + s n
  at::Tensor x_hat;   // clip((z - sigma eps~)/alpha), the next step's x_hat_prev
};

struct StepArgs {
  at::Tensor eps2;                 // [2B, *S]: conditional rows, then null rows; [B] at w = 0
  at::Tensor z;                    // [B, *S] float32
  double w = 0.0;                  // plain CFG weight (eq. 6); 0 = the conditional model
  const at::Tensor* table = nullptr;
  const Row* row = nullptr;        // table row t in float64, to skip terms whose coefficient is 0
  int64_t t = 0;
  std::optional<double> clip;      // clamp x_hat to [-clip, clip]
  at::Tensor x_hat_prev;           // read where c_p != 0 (DPM-Solver++(2M))
  at::Tensor noise;                // read where s != 0
};

// One step: eps~ = eps_c + w (eps_c - eps_u), x_hat, z'.
StepResult guided_step(const StepArgs& args);

}  // namespace cfgengine
