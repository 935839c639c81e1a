#include "json.h"

#include <cstdlib>
#include <stdexcept>

namespace cfgengine::json {
namespace {

class Reader {
 public:
  explicit Reader(const std::string& text) : text_(text) {}

  Value document() {
    Value value = any();
    skip_space();
    if (pos_ != text_.size()) fail("trailing characters");
    return value;
  }

 private:
  const std::string& text_;
  size_t pos_ = 0;

  [[noreturn]] void fail(const char* what) const {
    throw std::invalid_argument(std::string("bad JSON: ") + what + " at offset " +
                                std::to_string(pos_));
  }
  void skip_space() {
    while (pos_ < text_.size() && std::string(" \t\r\n").find(text_[pos_]) != std::string::npos) {
      ++pos_;
    }
  }
  char peek() {
    skip_space();
    if (pos_ >= text_.size()) fail("unexpected end");
    return text_[pos_];
  }
  void expect(char c) {
    if (peek() != c) fail("unexpected character");
    ++pos_;
  }
  bool take_word(const char* word) {
    const std::string w(word);
    if (text_.compare(pos_, w.size(), w) != 0) return false;
    pos_ += w.size();
    return true;
  }

  Value any() {
    const char c = peek();
    if (c == '{') return object();
    if (c == '[') return array();
    Value value;
    if (c == '"') {
      value.kind = Value::kString;
      value.text = string();
    } else if (take_word("null")) {
      value.kind = Value::kNull;
    } else if (take_word("true")) {
      value.kind = Value::kBool;
      value.boolean = true;
    } else if (take_word("false")) {
      value.kind = Value::kBool;
    } else {
      value.kind = Value::kNumber;
      value.number = number();
    }
    return value;
  }

  double number() {
    const char* start = text_.c_str() + pos_;
    char* end = nullptr;
    const double x = std::strtod(start, &end);
    if (end == start) fail("expected a value");
    pos_ += static_cast<size_t>(end - start);
    return x;
  }

  std::string string() {
    expect('"');
    std::string out;
    while (pos_ < text_.size() && text_[pos_] != '"') {
      char c = text_[pos_++];
      if (c == '\\') c = escaped();
      out += c;
    }
    if (pos_ >= text_.size()) fail("unterminated string");
    ++pos_;
    return out;
  }

  // One escape after the backslash; \uXXXX outside ASCII becomes '?': no field we read needs it.
  char escaped() {
    if (pos_ >= text_.size()) fail("unterminated escape");
    const char c = text_[pos_++];
    switch (c) {
      case 'n': return '\n';
      case 't': return '\t';
      case 'r': return '\r';
      case 'b': return '\b';
      case 'f': return '\f';
      case 'u': {
        if (pos_ + 4 > text_.size()) fail("short \\u escape");
        const long code = std::strtol(text_.substr(pos_, 4).c_str(), nullptr, 16);
        pos_ += 4;
        return code < 128 ? static_cast<char>(code) : '?';
      }
      default: return c;  // \" \\ \/
    }
  }

  Value array() {
    Value value;
    value.kind = Value::kArray;
    expect('[');
    if (peek() == ']') return ++pos_, value;
    do {
      value.items.push_back(any());
    } while (peek() == ',' && ++pos_);
    expect(']');
    return value;
  }

  Value object() {
    Value value;
    value.kind = Value::kObject;
    expect('{');
    if (peek() == '}') return ++pos_, value;
    do {
      std::string key = (peek(), string());
      expect(':');
      value.fields[key] = any();
    } while (peek() == ',' && ++pos_);
    expect('}');
    return value;
  }
};

}  // namespace

const Value* Value::find(const std::string& key) const {
  if (kind != kObject) return nullptr;
  const auto it = fields.find(key);
  return it == fields.end() ? nullptr : &it->second;
}

Value parse(const std::string& text) { return Reader(text).document(); }

}  // namespace cfgengine::json
