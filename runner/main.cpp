// cfgengine-run: samples a cfgengine AOTInductor package with no Python at run time
// (docs/design.md, "The C++ runner"): the same lambda grid, table, Philox noise keys, step and
// loop as cfgengine.sample with plain CFG guidance.
#include <ATen/ATen.h>
#include <c10/core/InferenceMode.h>

#include <unistd.h>

#include <algorithm>
#include <climits>
#include <fstream>
#include <iostream>
#include <map>
#include <new>

#include "args.h"
#include "output.h"
#include "package.h"
#include "step.h"
#include "trust.h"

namespace cfgengine {
namespace {

struct Run {
  const Options& options;
  const ModelInfo& info;
  torch::inductor::AOTIModelPackageLoader& model;
  at::Device device;
  std::vector<double> logsnr;  // float64 grid; the net sees it rounded to float32
  std::vector<Row> rows;       // float64 table, to know which terms are zero
  at::Tensor table;            // float32 [T, 6] on the device
};

// eps2 [2B, *S] (conditional rows, then null rows) from ONE run of the net on the doubled
// batch; at w = 0 just eps_c [B, *S] from B rows, as the Python sampler's unguided path. A
// guidance-distilled net answers eps~_w itself from B rows given w per row (the step then takes
// it as eps_c).
at::Tensor eps_of(const Run& run, const at::Tensor& z, const at::Tensor& logsnr,
                  const at::Tensor& labels) {
  if (run.info.guidance_embedded) {
    const at::Tensor w = at::full({z.size(0)}, static_cast<float>(run.options.w), logsnr.options());
    return run.model.run({z, logsnr, labels, w})[0];
  }
  if (run.options.w == 0.0) return run.model.run({z, logsnr, labels})[0];
  const at::Tensor null = at::full_like(labels, run.info.num_classes);
  return run.model.run({at::cat({z, z}), at::cat({logsnr, logsnr}), at::cat({labels, null})})[0];
}

// The T-step loop for samples ids (a chunk of at most max_batch rows); returns x_hat [B, *S].
at::Tensor sample_chunk(const Run& run, const std::vector<int64_t>& ids,
                        const std::vector<int64_t>& labels) {
  const auto batch = static_cast<int64_t>(ids.size());
  const at::Tensor label_tensor = at::tensor(labels, at::kLong).to(run.device);
  at::Tensor z = randn_rows(run.options.seed, ids, 0, run.info.sample_shape, run.device);
  at::Tensor x_hat_prev;
  for (int64_t t = 0; t < static_cast<int64_t>(run.rows.size()); ++t) {
    const auto lam = static_cast<float>(run.logsnr[t]);
    const at::Tensor logsnr = at::full({batch}, lam, z.options());
    StepArgs step{eps_of(run, z, logsnr, label_tensor), z, run.options.w, &run.table,
                  &run.rows[t], t, run.info.clip, x_hat_prev, {}};
    if (run.rows[t][kNoise] != 0.0) {  // noise key k = t + 1
      step.noise = randn_rows(run.options.seed, ids, static_cast<uint64_t>(t + 1),
                              run.info.sample_shape, run.device);
    }
    StepResult next = guided_step(step);
    z = next.z_next;
    x_hat_prev = next.x_hat;
  }
  return z;  // the last row is (alpha, sigma, 0, 1, 0, 0): z' = x_hat
}

// All samples in chunks of max_batch rows (a sample depends only on its id, not on chunking).
at::Tensor sample_all(const Run& run) {
  const auto& labels = run.options.labels;
  const auto count = static_cast<int64_t>(labels.size());
  std::vector<at::Tensor> parts;
  for (int64_t start = 0; start < count; start += run.info.max_batch) {
    const int64_t stop = std::min(count, start + run.info.max_batch);
    std::vector<int64_t> ids(static_cast<size_t>(stop - start));
    for (int64_t i = start; i < stop; ++i) ids[i - start] = i;
    parts.push_back(sample_chunk(run, ids, {labels.begin() + start, labels.begin() + stop}));
  }
  return at::cat(parts).to(at::kCPU).contiguous();
}

int64_t available_bytes() {  // MemAvailable, as cfgengine/cli/budget.py
  std::ifstream meminfo("/proc/meminfo");
  std::string key;
  int64_t kib = 0;
  while (meminfo >> key >> kib) {
    if (key == "MemAvailable:") return kib * 1024;
    meminfo.ignore(64, '\n');
  }
  return static_cast<int64_t>(sysconf(_SC_AVPHYS_PAGES)) * sysconf(_SC_PAGESIZE);
}

// UserError unless `rows` samples of `numel` floats fit in free memory about three times over
// (the samples, their copy as values, the encoded file): never a bad_alloc or a size overflow.
void check_memory(int64_t rows, int64_t numel, const std::string& flag) {
  int64_t bytes = 0;
  const int64_t free = available_bytes();
  if (__builtin_mul_overflow(rows, numel, &bytes) || __builtin_mul_overflow(bytes, 12, &bytes) ||
      bytes > free) {
    throw UserError(std::to_string(rows) + " rows of " + std::to_string(numel) +
                    " floats need more than the " + std::to_string(free >> 20) +
                    " MiB of free memory: lower " + flag);
  }
}

void check_request(const Options& o, const ModelInfo& info) {
  for (const int64_t label : o.labels) {
    if (label >= info.num_classes) {
      throw UserError("label " + std::to_string(label) + " is out of range [0, " +
                      std::to_string(info.num_classes) + ") for " + o.model);
    }
  }
  if (!o.device.empty() && o.device != info.device) {
    throw UserError(o.model + ": compiled for " + info.device + ", cannot run on " + o.device +
                    "; re-export with --device " + o.device);
  }
  if (info.device == "cuda" && !at::hasCUDA()) {
    throw UserError(o.model + ": compiled for cuda, but this libtorch has no CUDA");
  }
  const auto& s = info.sample_shape;
  if (!o.png.empty() && !(s.size() == 3 && (s[0] == 1 || s[0] == 3))) {
    throw UserError("--png needs image samples [1 or 3, H, W]; this model's are not");
  }
  check_writable(o.out);
  if (!o.png.empty()) check_writable(o.png);
  check_distinct({{"MODEL", o.model}, {"--out", o.out}, {"--png", o.png}});
  int64_t numel = 1;
  for (const int64_t d : s) {
    if (__builtin_mul_overflow(numel, d, &numel)) numel = INT64_MAX;
  }
  check_memory(static_cast<int64_t>(o.labels.size()), numel, "--labels");
}

std::vector<float> values_of(const at::Tensor& x) {
  const float* data = x.data_ptr<float>();
  return {data, data + x.numel()};
}

// One row per distinct label (ascending), its samples left to right in id order; 1-pixel white
// gutters; [-1, 1] -> 0..255 as cfgengine/figures.py.
std::string grid_png(const at::Tensor& x, const std::vector<int64_t>& labels) {
  const int64_t c = x.size(1), h = x.size(2), w = x.size(3);
  std::map<int64_t, std::vector<int64_t>> rows;
  for (size_t i = 0; i < labels.size(); ++i) rows[labels[i]].push_back(static_cast<int64_t>(i));
  size_t cols = 0;
  for (const auto& row : rows) cols = std::max(cols, row.second.size());
  const int64_t width = static_cast<int64_t>(cols) * (w + 1) + 1;
  const int64_t height = static_cast<int64_t>(rows.size()) * (h + 1) + 1;
  const at::Tensor bytes = ((x.clamp(-1, 1) + 1) * 127.5).round().to(at::kByte)
                               .permute({0, 2, 3, 1}).contiguous();  // NHWC
  const uint8_t* pixels = bytes.data_ptr<uint8_t>();
  std::vector<uint8_t> canvas(static_cast<size_t>(width * height * c), 255);
  int64_t r = 0;
  for (const auto& row : rows) {
    for (size_t k = 0; k < row.second.size(); ++k) {
      const uint8_t* image = pixels + row.second[k] * h * w * c;
      for (int64_t y = 0; y < h; ++y) {
        const int64_t top = (1 + r * (h + 1) + y) * width, left = 1 + static_cast<int64_t>(k) * (w + 1);
        std::copy(image + y * w * c, image + (y + 1) * w * c, canvas.begin() + (top + left) * c);
      }
    }
    ++r;
  }
  return png_bytes(canvas, static_cast<int>(width), static_cast<int>(height), static_cast<int>(c));
}

void run_sampling(const Options& o) {
  const PrivateCopy copy(o.model);  // the bytes hashed are the only bytes read and loaded
  const ModelInfo info = read_model_info(copy.path(), o.model);  // data only: nothing runs
  check_request(o, info);
  check_trusted(copy, o.model, o.trust_code);
  const auto model = load_model(copy.path(), info, o.model);
  const at::Device device(info.device == "cuda" ? at::kCUDA : at::kCPU);
  std::vector<double> logsnr = logsnr_grid(o.steps, o.grid, info.logsnr_range);
  std::vector<Row> rows = coefficient_table(logsnr, o.spec);
  const Run run{o, info, *model, device, logsnr, rows, table_tensor(rows, device)};
  const at::Tensor x_hat = sample_all(run);
  if (!at::isfinite(x_hat).all().item<bool>()) {
    throw std::runtime_error("sampling produced NaN/inf");
  }
  const auto count = static_cast<int64_t>(o.labels.size());
  write_atomic(o.out, npy_bytes(values_of(x_hat), rows_shape(count, info.sample_shape)));
  if (!o.png.empty()) write_atomic(o.png, grid_png(x_hat, o.labels));
}

void run_noise_dump(const Options& o) {
  check_writable(o.out);
  check_memory(static_cast<int64_t>(o.ids.size()), o.dump_noise, "--dump-noise or --ids");
  const std::vector<int64_t> shape = {o.dump_noise};
  const at::Tensor noise = randn_rows(o.seed, o.ids, static_cast<uint64_t>(o.k), shape, at::kCPU);
  const auto rows = static_cast<int64_t>(o.ids.size());
  write_atomic(o.out, npy_bytes(values_of(noise.contiguous()), {rows, o.dump_noise}));
}

int run_main(int argc, char** argv) {
  const Options options = parse_args(argc, argv);
  if (options.help) {
    std::cout << kUsage;
    return 0;
  }
  c10::InferenceMode no_autograd;
  if (options.dump_noise > 0) {
    run_noise_dump(options);
  } else {
    run_sampling(options);
  }
  return 0;
}

}  // namespace
}  // namespace cfgengine

int main(int argc, char** argv) {
  const auto first_line = [](const std::string& text) { return text.substr(0, text.find('\n')); };
  try {
    return cfgengine::run_main(argc, argv);
  } catch (const cfgengine::UserError& err) {
    std::cerr << "cfgengine-run: error: " << first_line(err.what()) << "\n";
    return 2;
  } catch (const std::bad_alloc&) {  // a request too large for this machine, past the estimate
    std::cerr << "cfgengine-run: error: not enough memory for this request; ask for fewer "
                 "samples\n";
    return 2;
  } catch (const c10::Error& err) {  // a bug or a broken model: say so in one line
    std::cerr << "cfgengine-run: internal error: " << first_line(err.what_without_backtrace())
              << "\n";
    return 1;
  } catch (const std::exception& err) {
    std::cerr << "cfgengine-run: internal error: " << first_line(err.what()) << "\n";
    return 1;
  }
}
