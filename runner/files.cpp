#include <sys/stat.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <fstream>

#include "errors.h"
#include "output.h"

namespace cfgengine {
namespace {

// What names one file: its device and inode when it exists, else its resolved folder + name.
std::string identity(const std::string& path) {
  struct stat info {};
  if (stat(path.c_str(), &info) == 0) {
    return std::to_string(info.st_dev) + ":" + std::to_string(info.st_ino);
  }
  char* folder = realpath(parent_of(path).c_str(), nullptr);
  if (folder == nullptr) return path;
  const std::string resolved = std::string(folder) + "/" + path.substr(path.find_last_of('/') + 1);
  std::free(folder);
  return resolved;
}

}  // namespace

std::string parent_of(const std::string& path) {
  const size_t slash = path.find_last_of('/');
  if (slash == std::string::npos) return ".";
  return slash == 0 ? "/" : path.substr(0, slash);
}

void check_distinct(const std::vector<std::pair<std::string, std::string>>& files) {
  for (size_t i = 1; i < files.size(); ++i) {
    for (size_t j = 0; j < i; ++j) {
      if (!files[i].second.empty() && !files[j].second.empty() &&
          identity(files[i].second) == identity(files[j].second)) {
        throw UserError(files[i].first + " " + files[i].second + " is the same file as " +
                        files[j].first + " " + files[j].second +
                        "; an output must not overwrite an input or another output");
      }
    }
  }
}

void check_writable(const std::string& path) {
  struct stat info {};
  if (stat(path.c_str(), &info) == 0 && S_ISDIR(info.st_mode)) {
    throw UserError(path + ": is a directory");
  }
  if (stat(path.c_str(), &info) == 0 && !S_ISREG(info.st_mode)) {
    throw UserError(path + ": is not a regular file (a device or a pipe); cfgengine-run writes "
                    "outputs as whole files only");
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
