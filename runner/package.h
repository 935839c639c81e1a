// The AOTInductor package made by `cfgengine export --format aoti`: its cfgengine metadata
// (export/metadata.py's JSON, stored under the package metadata key "cfgengine", format
// version 2) and its model, the plain denoiser eps(z, lambda, labels) for 1..2 max_batch rows,
// or a guidance-distilled one, eps~_w(z, lambda, labels, w) with w per row.
#pragma once

#include <torch/csrc/inductor/aoti_package/model_package_loader.h>

#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "table.h"

namespace cfgengine {

struct ModelInfo {
  int64_t num_classes = 0;            // label num_classes is the null label
  std::vector<int64_t> sample_shape;  // S of z [B, *S]
  std::optional<double> clip;         // x_hat clamp, none for unbounded data
  LogsnrRange logsnr_range;           // metadata logsnr_range, else (-20, 20)
  int64_t min_batch = 1;
  int64_t max_batch = 1;              // guided rows per run: the net takes up to 2 max_batch
  bool guidance_embedded = false;     // metadata guidance_embedded: the net takes w, B rows
  std::string device;                 // "cpu" or "cuda": what the package was compiled for
};

// Reads and checks the metadata of the package `file` without loading the model; UserError,
// naming `path` (what the user gave), when it is missing, not an AOTInductor package, or not
// one cfgengine exported (format/version).
ModelInfo read_model_info(const std::string& file, const std::string& path);

// Loads the compiled model of `file` for info.device ("cpu" or "cuda"); UserError naming `path`
// when it cannot be loaded or its label table does not have info.num_classes + 1 rows.
std::unique_ptr<torch::inductor::AOTIModelPackageLoader> load_model(const std::string& file,
                                                                    const ModelInfo& info,
                                                                    const std::string& path);

}  // namespace cfgengine
