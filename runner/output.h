// The runner's output files: .npy (float32, C order) and an 8-bit PNG image grid, each written
// to a temporary file next to the target and renamed into place, so a failed run leaves nothing
// half-written.
#pragma once

#include <cstdint>
#include <string>
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

// Fails early (UserError) when `path` cannot be created: a missing folder or a folder.
void check_writable(const std::string& path);

}  // namespace cfgengine
