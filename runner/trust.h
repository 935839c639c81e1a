// The trust rule of cfgengine/trust.py for cfgengine-run: a package is native code, so it loads
// only when its SHA-256 is in the user's trust file (cfgengine export records every file it
// writes) or with --trust-code. The bytes checked are the bytes loaded: the package is copied
// once into a private (0700) temporary folder, hashed as it is copied, and only the copy is read.
#pragma once

#include <string>

namespace cfgengine {

// A copy of a file in a fresh private temporary folder, removed with this object.
class PrivateCopy {
 public:
  // UserError "SOURCE: no such model file" unless `source` is a regular file.
  explicit PrivateCopy(const std::string& source);
  ~PrivateCopy();
  PrivateCopy(const PrivateCopy&) = delete;
  PrivateCopy& operator=(const PrivateCopy&) = delete;

  const std::string& path() const { return path_; }
  const std::string& sha256() const { return sha256_; }  // of exactly the bytes copied

 private:
  void remove_files() const;
  std::string folder_, path_, sha256_;
};

// $CFGENGINE_TRUST_FILE, else $XDG_CONFIG_HOME/cfgengine/trusted.json, else
// $HOME/.config/cfgengine/trusted.json: a JSON object {sha256: path}.
std::string trust_file();

// UserError (one line) unless `copy` (of the package `name`) may run: trust_code, or its hash is
// in the trust file. A trust file others could write, or a damaged one, is an error too.
void check_trusted(const PrivateCopy& copy, const std::string& name, bool trust_code);

}  // namespace cfgengine
