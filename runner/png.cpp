#include <array>

#include "output.h"

namespace cfgengine {
namespace {

constexpr size_t kStoredBlock = 65535;  // largest deflate stored block

uint32_t crc32(const std::string& bytes) {  // ISO 3309 / PNG's CRC, reflected 0xEDB88320
  static const std::array<uint32_t, 256> table = [] {
    std::array<uint32_t, 256> t{};
    for (uint32_t n = 0; n < 256; ++n) {
      uint32_t c = n;
      for (int k = 0; k < 8; ++k) c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
      t[n] = c;
    }
    return t;
  }();
  uint32_t c = 0xFFFFFFFFu;
  for (const unsigned char b : bytes) c = table[(c ^ b) & 0xFF] ^ (c >> 8);
  return c ^ 0xFFFFFFFFu;
}

uint32_t adler32(const std::string& bytes) {  // RFC 1950 checksum of the uncompressed data
  uint32_t a = 1, b = 0;
  for (const unsigned char x : bytes) {
    a = (a + x) % 65521;
    b = (b + a) % 65521;
  }
  return (b << 16) | a;
}

void put_be32(std::string& out, uint32_t x) {
  for (int shift = 24; shift >= 0; shift -= 8) out += static_cast<char>((x >> shift) & 0xFF);
}

// RFC 1950 zlib stream of RFC 1951 stored blocks (BTYPE 00): header, blocks, Adler-32.
std::string zlib_stored(const std::string& raw) {
  std::string out("\x78\x01", 2);  // deflate, 32K window, no dictionary; 0x7801 % 31 == 0
  size_t pos = 0;
  do {
    const size_t len = std::min(kStoredBlock, raw.size() - pos);
    const bool final = pos + len == raw.size();
    out += static_cast<char>(final ? 1 : 0);
    out += static_cast<char>(len & 0xFF);
    out += static_cast<char>(len >> 8);
    out += static_cast<char>(~len & 0xFF);
    out += static_cast<char>((~len >> 8) & 0xFF);
    out.append(raw, pos, len);
    pos += len;
  } while (pos < raw.size());
  put_be32(out, adler32(raw));
  return out;
}

void put_chunk(std::string& out, const char* type, const std::string& data) {
  put_be32(out, static_cast<uint32_t>(data.size()));
  const std::string body = std::string(type, 4) + data;
  out += body;
  put_be32(out, crc32(body));
}

}  // namespace

std::string png_bytes(const std::vector<uint8_t>& pixels, int width, int height, int channels) {
  std::string header;
  put_be32(header, static_cast<uint32_t>(width));
  put_be32(header, static_cast<uint32_t>(height));
  header += static_cast<char>(8);                      // bit depth
  header += static_cast<char>(channels == 3 ? 2 : 0);  // colour type: RGB or gray
  header.append(3, '\0');                              // deflate, adaptive filter, no interlace
  const size_t stride = static_cast<size_t>(width) * channels;
  std::string raw;
  raw.reserve((stride + 1) * height);
  for (int y = 0; y < height; ++y) {
    raw += '\0';  // filter type None for every scanline
    raw.append(reinterpret_cast<const char*>(pixels.data()) + y * stride, stride);
  }
  std::string out("\x89PNG\r\n\x1a\n", 8);
  put_chunk(out, "IHDR", header);
  put_chunk(out, "IDAT", zlib_stored(raw));
  put_chunk(out, "IEND", "");
  return out;
}

}  // namespace cfgengine
