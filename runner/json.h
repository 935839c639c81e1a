// A minimal JSON reader for the export metadata (cfgengine/export/metadata.py writes it with
// json.dumps): objects, arrays, strings, numbers, true/false/null. No dependency.
#pragma once

#include <map>
#include <memory>
#include <string>
#include <vector>

namespace cfgengine::json {

struct Value {
  enum Kind { kNull, kBool, kNumber, kString, kArray, kObject } kind = kNull;
  bool boolean = false;
  double number = 0.0;
  std::string text;
  std::vector<Value> items;
  std::map<std::string, Value> fields;

  const Value* find(const std::string& key) const;  // nullptr when absent or not an object
};

// Parses `text`; std::invalid_argument on malformed input or trailing characters.
Value parse(const std::string& text);

}  // namespace cfgengine::json
