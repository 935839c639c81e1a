#include "trust.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <fstream>
#include <sstream>
#include <vector>

#include "errors.h"
#include "json.h"
#include "output.h"
#include "sha256.h"

namespace cfgengine {
namespace {

bool write_all(int fd, const uint8_t* data, size_t size) {
  while (size > 0) {
    const ssize_t n = write(fd, data, size);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return false;
    data += n;
    size -= static_cast<size_t>(n);
  }
  return true;
}

// Copies `in` to `out`, returning the SHA-256 of the bytes copied; "" on a read or write error.
std::string copy_hashing(int in, int out) {
  Sha256 hash;
  std::vector<uint8_t> block(1 << 20);
  while (true) {
    const ssize_t n = read(in, block.data(), block.size());
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return "";
    if (n == 0) return hash.hex_digest();
    hash.update(block.data(), static_cast<size_t>(n));
    if (!write_all(out, block.data(), static_cast<size_t>(n))) return "";
  }
}

// UserError unless only this user (or root) could have written the trust file and its folder.
void check_not_shared(const std::string& path) {
  const std::string folder = parent_of(path);
  for (const auto& [where, what] : {std::pair{path, "trust file"}, {folder, "trust file's folder"}}) {
    struct stat info {};
    if (stat(where.c_str(), &info) != 0) continue;
    if (info.st_uid != getuid() && info.st_uid != 0) {
      throw UserError(path + ": refusing the " + what + ": " + where + " belongs to another user");
    }
    const bool sticky_folder = S_ISDIR(info.st_mode) && (info.st_mode & S_ISVTX);
    if ((info.st_mode & S_IWOTH) && !sticky_folder) {
      throw UserError(path + ": refusing the " + what + ": everyone may write " + where +
                      " (chmod o-w " + where + ")");
    }
  }
}

// The trust file's JSON object (empty when there is no file); UserError when it is damaged.
json::Value read_trust_file(const std::string& path) {
  check_not_shared(path);
  std::ifstream file(path, std::ios::binary);
  json::Value stored;
  stored.kind = json::Value::kObject;
  if (!file) return stored;  // no trust file yet: nothing is trusted
  std::stringstream text;
  text << file.rdbuf();
  try {
    stored = json::parse(text.str());
  } catch (const std::invalid_argument& err) {
    throw UserError(path + ": damaged trust file, not valid JSON (" + err.what() +
                    "); fix or delete it (it is never overwritten)");
  }
  if (stored.kind != json::Value::kObject) {
    throw UserError(path + ": damaged trust file: not a JSON object {sha256: path}");
  }
  return stored;
}

}  // namespace

PrivateCopy::PrivateCopy(const std::string& source) {
  const int in = open(source.c_str(), O_RDONLY | O_NONBLOCK | O_CLOEXEC);  // a FIFO never blocks
  struct stat info {};
  if (in < 0 || fstat(in, &info) != 0 || !S_ISREG(info.st_mode)) {
    if (in >= 0) close(in);
    throw UserError(source + ": no such model file");
  }
  const char* tmp = std::getenv("TMPDIR");
  std::string pattern = std::string(tmp != nullptr && *tmp ? tmp : "/tmp") + "/cfgengine-run-XXXXXX";
  if (mkdtemp(pattern.data()) == nullptr) {  // mode 0700, a fresh name
    close(in);
    throw UserError("cannot create a private temporary folder " + pattern);
  }
  folder_ = pattern;
  path_ = folder_ + "/model.pt2";
  const int out = open(path_.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
  sha256_ = out < 0 ? "" : copy_hashing(in, out);
  close(in);
  if (out < 0 || close(out) != 0 || sha256_.empty()) {
    remove_files();
    throw UserError(source + ": cannot copy the package into " + folder_);
  }
}

PrivateCopy::~PrivateCopy() { remove_files(); }

void PrivateCopy::remove_files() const {
  unlink(path_.c_str());
  rmdir(folder_.c_str());
}

std::string trust_file() {
  const char* set = std::getenv("CFGENGINE_TRUST_FILE");
  if (set != nullptr && *set) return set;
  const char* config = std::getenv("XDG_CONFIG_HOME");
  if (config != nullptr && *config) return std::string(config) + "/cfgengine/trusted.json";
  const char* home = std::getenv("HOME");
  if (home == nullptr || !*home) {
    throw UserError("HOME is not set: cannot find the trust file (set CFGENGINE_TRUST_FILE)");
  }
  return std::string(home) + "/.config/cfgengine/trusted.json";
}

void check_trusted(const PrivateCopy& copy, const std::string& name, bool trust_code) {
  if (trust_code) return;
  const std::string path = trust_file();
  if (read_trust_file(path).find(copy.sha256()) != nullptr) return;
  throw UserError(name + ": refusing to load: an AOTInductor package (.pt2) is code that runs "
                  "when loaded, and this file was not written by `cfgengine export` on this "
                  "machine (trust file " + path + "); if you trust its source, pass --trust-code");
}

}  // namespace cfgengine
