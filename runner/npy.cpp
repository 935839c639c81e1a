#include <cstring>

#include "output.h"

namespace cfgengine {

std::string npy_bytes(const std::vector<float>& data, const std::vector<int64_t>& shape) {
  std::string dims;  // Python's tuple repr: "(3,)" for one dimension, "(2, 3)" for more
  for (size_t i = 0; i < shape.size(); ++i) dims += (i ? ", " : "") + std::to_string(shape[i]);
  if (shape.size() == 1) dims += ",";
  std::string header = "{'descr': '<f4', 'fortran_order': False, 'shape': (" + dims + "), }";
  const size_t preamble = 10;  // magic (6) + version (2) + header length (2)
  header.append(63 - (preamble + header.size()) % 64, ' ');  // pad so the data is 64-aligned
  header += '\n';
  std::string out("\x93NUMPY\x01\x00", 8);
  out += static_cast<char>(header.size() & 0xFF);
  out += static_cast<char>(header.size() >> 8);
  out += header;
  const size_t offset = out.size();
  out.resize(offset + data.size() * sizeof(float));
  std::memcpy(&out[offset], data.data(), data.size() * sizeof(float));  // x86/ARM: little-endian
  return out;
}

}  // namespace cfgengine
