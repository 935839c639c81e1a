#include "args.h"

#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <functional>
#include <map>

namespace cfgengine {

const char* const kUsage =
    "usage: cfgengine-run MODEL.pt2 --labels 0,3,5 [--w 0.3] [--steps 256]\n"
    "         [--sampler ancestral|ddim|dpmpp_2m] [--v 0.3] [--eta 0]\n"
    "         [--grid cosine|cosine-authors|uniform|karras] [--seed 0] --out x.npy\n"
    "         [--png grid.png] [--device cpu|cuda] [--trust-code]\n"
    "       (a package not written by `cfgengine export` on this machine, i.e. not in the\n"
    "       trust file, loads only with --trust-code: it is native code)\n"
    "       cfgengine-run --dump-noise NUMEL --ids 0,1 --k 0 [--seed 0] --out noise.npy\n";

namespace {

int64_t to_int(const std::string& flag, const std::string& text) {
  char* end = nullptr;
  errno = 0;
  const long long x = std::strtoll(text.c_str(), &end, 10);
  if (text.empty() || *end != '\0' || errno == ERANGE) {
    throw UserError(flag + " must be an integer, got '" + text + "'");
  }
  return x;
}

double to_number(const std::string& flag, const std::string& text) {
  char* end = nullptr;
  const double x = std::strtod(text.c_str(), &end);
  if (text.empty() || *end != '\0' || !std::isfinite(x)) {
    throw UserError(flag + " must be a finite number, got '" + text + "'");
  }
  return x;
}

double unit_interval(const std::string& flag, const std::string& text) {
  const double x = to_number(flag, text);
  if (x < 0 || x > 1) throw UserError(flag + " must be a number in [0, 1], got " + text);
  return x;
}

int64_t non_negative(const std::string& flag, const std::string& text) {
  const int64_t x = to_int(flag, text);
  if (x < 0) throw UserError(flag + " must be >= 0, got " + text);
  return x;
}

std::vector<int64_t> int_list(const std::string& flag, const std::string& text) {
  std::vector<int64_t> out;
  size_t start = 0;
  while (start <= text.size()) {
    const size_t comma = std::min(text.find(',', start), text.size());
    out.push_back(non_negative(flag, text.substr(start, comma - start)));
    start = comma + 1;
  }
  return out;
}

std::string choice(const std::string& flag, const std::string& text, bool ok, const char* names) {
  if (!ok) throw UserError(flag + " must be one of " + names + ", got '" + text + "'");
  return text;
}

using Setter = std::function<void(Options&, const std::string&)>;

const std::map<std::string, Setter>& setters() {
  static const std::map<std::string, Setter> table = {
      {"--labels", [](Options& o, const std::string& s) { o.labels = int_list("--labels", s); }},
      {"--w", [](Options& o, const std::string& s) { o.w = to_number("--w", s); }},
      {"--steps", [](Options& o, const std::string& s) {
         const int64_t t = to_int("--steps", s);
         if (t < 2 || t > 100000) throw UserError("--steps must be an integer in [2, 100000]");
         o.steps = static_cast<int>(t);
       }},
      {"--sampler", [](Options& o, const std::string& s) {
         o.spec.sampler = choice("--sampler", s, is_sampler(s), kSamplerNames);
       }},
      {"--v", [](Options& o, const std::string& s) { o.spec.v = unit_interval("--v", s); }},
      {"--eta", [](Options& o, const std::string& s) { o.spec.eta = unit_interval("--eta", s); }},
      {"--grid", [](Options& o, const std::string& s) {
         o.grid = choice("--grid", s, is_grid(s), kGridNames);
       }},
      {"--seed", [](Options& o, const std::string& s) {
         o.seed = static_cast<uint64_t>(non_negative("--seed", s));  // int64: < 2^63
       }},
      {"--out", [](Options& o, const std::string& s) { o.out = s; }},
      {"--png", [](Options& o, const std::string& s) { o.png = s; }},
      {"--device", [](Options& o, const std::string& s) {
         o.device = choice("--device", s, s == "cpu" || s == "cuda", "cpu|cuda");
       }},
      {"--dump-noise", [](Options& o, const std::string& s) {
         o.dump_noise = non_negative("--dump-noise", s);
         if (o.dump_noise < 1) throw UserError("--dump-noise must be >= 1");
       }},
      {"--ids", [](Options& o, const std::string& s) { o.ids = int_list("--ids", s); }},
      {"--k", [](Options& o, const std::string& s) { o.k = non_negative("--k", s); }},
  };
  return table;
}

void check_complete(const Options& o) {
  if (o.help) return;
  if (o.out.empty()) throw UserError("--out x.npy is required");
  if (o.dump_noise > 0) {
    if (o.ids.empty()) throw UserError("--dump-noise needs --ids");
    return;
  }
  if (o.model.empty()) throw UserError("the model package MODEL.pt2 is required");
  if (o.labels.empty()) throw UserError("--labels is required (e.g. --labels 0,3,5)");
}

}  // namespace

Options parse_args(int argc, char** argv) {
  Options options;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "-h" || arg == "--help") {
      options.help = true;
    } else if (arg == "--trust-code") {
      options.trust_code = true;
    } else if (setters().count(arg)) {
      if (i + 1 >= argc) throw UserError(arg + " needs a value");
      setters().at(arg)(options, argv[++i]);
    } else if (arg.rfind("-", 0) == 0) {
      throw UserError("unknown flag " + arg + " (see --help)");
    } else if (options.model.empty()) {
      options.model = arg;
    } else {
      throw UserError("one model package expected, got a second: " + arg);
    }
  }
  check_complete(options);
  return options;
}

}  // namespace cfgengine
