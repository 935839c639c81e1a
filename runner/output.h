// The runner's output files: .npy (float32, C order) and an 8-bit PNG image grid, each written
// to a temporary file next to the target and renamed into place, so a failed run leaves nothing
// half-written.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace cfgengine {

// NumPy .npy v1.0 of little-endian float32 `data` with `shape`.
std::string npy_bytes(const std::vector<float>& data, const std::vector<int64_t>& shape);

// PNG of an 8-bit image, `channels` 1 (gray) or 3 (RGB), rows top to bottom, pixels interleaved;
// deflate in stored (uncompressed) blocks, so no zlib is needed.
std::string png_bytes(const std::vector<uint8_t>& pixels, int width, int height, int channels);

// Writes `bytes` to `path` atomically (temporary file in the same folder, then rename);
// UserError naming the path when it cannot.
void write_atomic(const std::string& path, const std::string& bytes);

// Fails early (UserError) when `path` cannot be created: a missing folder, a folder, or
// something that exists and is not a regular file (a FIFO, a device).
void check_writable(const std::string& path);

// UserError unless no two of `files` ({flag, path}; empty paths skipped) are one file, compared
// by identity (device and inode; the resolved path for files not yet written), not by name.
void check_distinct(const std::vector<std::pair<std::string, std::string>>& files);

// The folder part of `path` ("." for a bare name).
std::string parent_of(const std::string& path);

}  // namespace cfgengine
