#include <sys/stat.h>
#include <unistd.h>

#include <cstdio>
#include <fstream>

#include "errors.h"
#include "output.h"

namespace cfgengine {
namespace {

std::string parent_of(const std::string& path) {
  const size_t slash = path.find_last_of('/');
  if (slash == std::string::npos) return ".";
  return slash == 0 ? "/" : path.substr(0, slash);
}

}  // namespace

void check_writable(const std::string& path) {
  struct stat info {};
  if (stat(path.c_str(), &info) == 0 && S_ISDIR(info.st_mode)) {
    throw UserError(path + ": is a directory");
  }
  const std::string folder = parent_of(path);
  if (stat(folder.c_str(), &info) != 0 || !S_ISDIR(info.st_mode)) {
    throw UserError(path + ": folder " + folder + " does not exist");
  }
  if (access(folder.c_str(), W_OK) != 0) {
    throw UserError(path + ": folder " + folder + " is not writable");
  }
}

void write_atomic(const std::string& path, const std::string& bytes) {
  const std::string tmp = path + ".tmp-" + std::to_string(getpid());
  {
    std::ofstream file(tmp, std::ios::binary | std::ios::trunc);
    file.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
    file.flush();
    if (!file) {
      std::remove(tmp.c_str());
      throw UserError(path + ": cannot write");
    }
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    std::remove(tmp.c_str());
    throw UserError(path + ": cannot move the finished file into place");
  }
}

}  // namespace cfgengine
