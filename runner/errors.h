// The runner's one error type for caller mistakes.
#pragma once

#include <stdexcept>

namespace cfgengine {

// A mistake of the caller (flags, files, labels, output paths): one line on stderr, exit 2.
struct UserError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

}  // namespace cfgengine
