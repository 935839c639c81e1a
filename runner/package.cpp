#include "package.h"

#include <sys/stat.h>

#include "args.h"
#include "json.h"

namespace cfgengine {
namespace {

constexpr const char* kMetadataKey = "cfgengine";     // export/metadata.py KEY
constexpr const char* kFormat = "cfgengine-export";   // export/metadata.py FORMAT
constexpr int kVersion = 2;                           // export/metadata.py VERSION
constexpr const char* kProgram = "denoiser";          // export/metadata.py PROGRAM: rows in = out
constexpr const char* kDeviceKey = "AOTI_DEVICE_KEY";  // written by AOTInductor itself
constexpr double kLogsnrLimit = 80.0;  // cfgengine/schedule.py LOGSNR_LIMIT: sigmoid(±λ) normal

std::string first_line(const std::string& text) { return text.substr(0, text.find('\n')); }

std::string json_text(const json::Value& value) {  // a number as Python prints an int, else "?"
  if (value.kind != json::Value::kNumber) return "?";
  const auto whole = static_cast<long long>(value.number);
  return whole == value.number ? std::to_string(whole) : std::to_string(value.number);
}

const json::Value& field(const json::Value& meta, const std::string& key, json::Value::Kind kind,
                         const std::string& path) {
  const json::Value* value = meta.find(key);
  if (value == nullptr || value->kind != kind) {
    throw UserError(path + ": cfgengine metadata lacks a valid '" + key + "'");
  }
  return *value;
}

int64_t integer(const json::Value& meta, const std::string& key, const std::string& path) {
  const double x = field(meta, key, json::Value::kNumber, path).number;
  if (x != static_cast<double>(static_cast<int64_t>(x)) || x < 1) {
    throw UserError(path + ": cfgengine metadata '" + key + "' is not a positive integer");
  }
  return static_cast<int64_t>(x);
}

std::vector<int64_t> shape_of(const json::Value& meta, const std::string& path) {
  std::vector<int64_t> shape;
  for (const json::Value& d : field(meta, "sample_shape", json::Value::kArray, path).items) {
    if (d.kind != json::Value::kNumber || d.number < 1 || d.number != static_cast<int64_t>(d.number)) {
      throw UserError(path + ": cfgengine metadata 'sample_shape' is not a list of sizes");
    }
    shape.push_back(static_cast<int64_t>(d.number));
  }
  if (shape.empty()) throw UserError(path + ": cfgengine metadata 'sample_shape' is empty");
  return shape;
}

// Metadata 'guidance_embedded': absent (files exported before it existed) means false.
bool embedded_of(const json::Value& meta, const std::string& path) {
  const json::Value* embedded = meta.find("guidance_embedded");
  if (embedded == nullptr) return false;
  if (embedded->kind != json::Value::kBool) {
    throw UserError(path + ": cfgengine metadata 'guidance_embedded' is not true or false");
  }
  return embedded->boolean;
}

LogsnrRange range_of(const json::Value& meta, const std::string& path) {
  const json::Value* range = meta.find("logsnr_range");
  if (range == nullptr) return {};
  if (range->kind != json::Value::kArray || range->items.size() != 2 ||
      range->items[0].kind != json::Value::kNumber || range->items[1].kind != json::Value::kNumber ||
      !(range->items[0].number < range->items[1].number) ||
      range->items[0].number < -kLogsnrLimit || range->items[1].number > kLogsnrLimit) {
    throw UserError(path + ": cfgengine metadata 'logsnr_range' is not two numbers "
                    "-80 <= lo < hi <= 80");
  }
  return {range->items[0].number, range->items[1].number};
}

std::optional<double> clip_of(const json::Value& meta, const std::string& path) {
  const json::Value* clip = meta.find("clip");
  if (clip == nullptr || clip->kind == json::Value::kNull) return std::nullopt;
  if (clip->kind != json::Value::kNumber || !(clip->number > 0)) {
    throw UserError(path + ": cfgengine metadata 'clip' is not null or a positive number");
  }
  return clip->number;
}

json::Value parse_meta(const std::unordered_map<std::string, std::string>& stored,
                       const std::string& path) {
  const auto it = stored.find(kMetadataKey);
  if (it == stored.end()) {
    throw UserError(path + ": no cfgengine metadata (not exported by cfgengine export)");
  }
  json::Value meta;
  try {
    meta = json::parse(it->second);
  } catch (const std::invalid_argument&) {
    throw UserError(path + ": cfgengine metadata is not valid JSON");
  }
  const json::Value* format = meta.find("format");
  if (format == nullptr || format->kind != json::Value::kString || format->text != kFormat) {
    throw UserError(path + ": metadata is not of format " + std::string(kFormat));
  }
  const json::Value* version = meta.find("version");
  if (version == nullptr || version->kind != json::Value::kNumber || version->number != kVersion) {
    const std::string found = version == nullptr ? "none" : json_text(*version);
    throw UserError(path + ": export format version " + found + ", this runner reads version " +
                    std::to_string(kVersion) + "; re-export the model");
  }
  const json::Value* program = meta.find("program");
  if (program == nullptr || program->kind != json::Value::kString || program->text != kProgram) {
    throw UserError(path + ": the exported program is not the plain denoiser; re-export the model");
  }
  // Metadata 'conditioning': absent (every class export) means class labels.
  const json::Value* conditioning = meta.find("conditioning");
  if (conditioning != nullptr &&
      (conditioning->kind != json::Value::kString || conditioning->text != "class")) {
    throw UserError(path + ": a prompt-conditioned model; cfgengine-run samples class-conditional "
                    "packages only (sample it in Python with encoded prompt rows)");
  }
  return meta;
}

std::unordered_map<std::string, std::string> stored_metadata(const std::string& file,
                                                             const std::string& path) {
  struct stat info {};
  if (stat(file.c_str(), &info) != 0 || !S_ISREG(info.st_mode)) {
    throw UserError(path + ": no such model file");
  }
  try {
    return torch::inductor::AOTIModelPackageLoader::load_metadata_from_package(file, "model");
  } catch (const std::exception& err) {
    throw UserError(path + ": not a loadable AOTInductor package (" + first_line(err.what()) + ")");
  }
}

// The compiled label table (constant "class_embed.weight", as export/metadata.py LABEL_TABLE)
// must have num_classes + 1 rows, else a class id would act as the null label.
void check_label_table(torch::inductor::AOTIModelPackageLoader& model, const ModelInfo& info,
                       const std::string& path) {
  const std::string table = "class_embed.weight";
  for (const auto& [name, tensor] : model.get_runner()->extract_constants_map(false)) {
    const bool is_table = name.size() >= table.size() &&
                          name.compare(name.size() - table.size(), table.size(), table) == 0;
    if (is_table && tensor.dim() >= 1 && tensor.size(0) != info.num_classes + 1) {
      throw UserError(path + ": metadata does not fit the compiled package: num_classes " +
                      std::to_string(info.num_classes) + ", but its label table has " +
                      std::to_string(tensor.size(0)) +
                      " rows (num_classes + 1 null label); re-export the model");
    }
  }
}

}  // namespace

ModelInfo read_model_info(const std::string& file, const std::string& path) {
  const auto stored = stored_metadata(file, path);
  const json::Value meta = parse_meta(stored, path);
  ModelInfo info;
  info.num_classes = integer(meta, "num_classes", path);
  info.sample_shape = shape_of(meta, path);
  info.clip = clip_of(meta, path);
  info.logsnr_range = range_of(meta, path);
  info.min_batch = integer(meta, "min_batch", path);
  info.max_batch = integer(meta, "max_batch", path);
  info.guidance_embedded = embedded_of(meta, path);
  const auto device = stored.find(kDeviceKey);
  info.device = device == stored.end() ? "cpu" : device->second;
  return info;
}

std::unique_ptr<torch::inductor::AOTIModelPackageLoader> load_model(const std::string& file,
                                                                    const ModelInfo& info,
                                                                    const std::string& path) {
  std::unique_ptr<torch::inductor::AOTIModelPackageLoader> model;
  try {
    const c10::DeviceIndex index = info.device == "cuda" ? 0 : -1;
    model = std::make_unique<torch::inductor::AOTIModelPackageLoader>(file, "model", false, 1,
                                                                      index);
  } catch (const std::exception& err) {
    throw UserError(path + ": cannot load the compiled model on " + info.device + " (" +
                    first_line(err.what()) + ")");
  }
  check_label_table(*model, info, path);
  return model;
}

}  // namespace cfgengine
