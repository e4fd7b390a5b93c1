// Reading vocab.txt and the WordPiece model of a tokenizer.json (a small JSON parser: the core
// takes no third-party dependency).
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <sstream>

#include "unicode.h"
#include "wordpiece.h"

namespace dbf_tok {
namespace {

Status ReadFile(const std::string& path, std::string* out) {
  std::ifstream f(path, std::ios::binary);
  if (!f) return Status::Error("cannot open '" + path + "'");
  std::ostringstream ss;
  ss << f.rdbuf();
  *out = ss.str();
  return Status::Ok();
}

struct JValue {
  enum Kind { kNull, kBool, kNumber, kString, kArray, kObject } kind = kNull;
  bool b = false;
  double num = 0;
  std::string str;
  std::vector<JValue> arr;
  std::vector<std::pair<std::string, JValue>> obj;
  const JValue* Get(const std::string& key) const {
    for (const auto& kv : obj)
      if (kv.first == key) return &kv.second;
    return nullptr;
  }
};

class JsonParser {
 public:
  explicit JsonParser(std::string_view s) : s_(s) {}
  Status Parse(JValue* out) {
    Status st = Value(out, 0);
    if (!st.ok) return st;
    Skip();
    if (pos_ != s_.size()) return Fail("trailing characters");
    return st;
  }

 private:
  Status Fail(const std::string& what) {
    return Status::Error("malformed tokenizer.json: " + what + " at byte " + std::to_string(pos_));
  }
  void Skip() {
    while (pos_ < s_.size() && (s_[pos_] == ' ' || s_[pos_] == '\n' || s_[pos_] == '\r' || s_[pos_] == '\t')) ++pos_;
  }
  bool Eat(char c) {
    Skip();
    if (pos_ < s_.size() && s_[pos_] == c) {
      ++pos_;
      return true;
    }
    return false;
  }
  Status Hex4(uint32_t* v) {
    if (pos_ + 4 > s_.size()) return Fail("truncated \\u escape");
    *v = 0;
    for (int i = 0; i < 4; ++i) {
      char c = s_[pos_++];
      int d = c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 : c >= 'A' && c <= 'F' ? c - 'A' + 10 : -1;
      if (d < 0) return Fail("bad \\u escape");
      *v = *v * 16 + d;
    }
    return Status::Ok();
  }
  Status String(std::string* out) {
    if (!Eat('"')) return Fail("expected a string");
    out->clear();
    while (true) {
      if (pos_ >= s_.size()) return Fail("unterminated string");
      char c = s_[pos_++];
      if (c == '"') return Status::Ok();
      if (static_cast<unsigned char>(c) < 0x20) return Fail("control character in string");
      if (c != '\\') {
        out->push_back(c);
        continue;
      }
      if (pos_ >= s_.size()) return Fail("unterminated escape");
      char e = s_[pos_++];
      switch (e) {
        case '"': out->push_back('"'); break;
        case '\\': out->push_back('\\'); break;
        case '/': out->push_back('/'); break;
        case 'b': out->push_back('\b'); break;
        case 'f': out->push_back('\f'); break;
        case 'n': out->push_back('\n'); break;
        case 'r': out->push_back('\r'); break;
        case 't': out->push_back('\t'); break;
        case 'u': {
          uint32_t v = 0;
          Status st = Hex4(&v);
          if (!st.ok) return st;
          if (v >= 0xD800 && v <= 0xDBFF) {  // a surrogate pair
            uint32_t lo = 0;
            if (pos_ + 2 > s_.size() || s_[pos_] != '\\' || s_[pos_ + 1] != 'u') return Fail("lone surrogate escape");
            pos_ += 2;
            st = Hex4(&lo);
            if (!st.ok) return st;
            if (lo < 0xDC00 || lo > 0xDFFF) return Fail("lone surrogate escape");
            v = 0x10000 + ((v - 0xD800) << 10) + (lo - 0xDC00);
          } else if (v >= 0xDC00 && v <= 0xDFFF) {
            return Fail("lone surrogate escape");
          }
          unicode::AppendUtf8(v, out);
          break;
        }
        default: return Fail("bad escape");
      }
    }
  }
  Status Value(JValue* v, int depth) {
    if (depth > 64) return Fail("nesting deeper than 64");
    Skip();
    if (pos_ >= s_.size()) return Fail("unexpected end");
    char c = s_[pos_];
    if (c == '{') {
      ++pos_;
      v->kind = JValue::kObject;
      if (Eat('}')) return Status::Ok();
      do {
        std::string key;
        Status st = String(&key);
        if (!st.ok) return st;
        if (!Eat(':')) return Fail("expected ':'");
        v->obj.emplace_back(std::move(key), JValue{});
        st = Value(&v->obj.back().second, depth + 1);
        if (!st.ok) return st;
      } while (Eat(','));
      return Eat('}') ? Status::Ok() : Fail("expected '}'");
    }
    if (c == '[') {
      ++pos_;
      v->kind = JValue::kArray;
      if (Eat(']')) return Status::Ok();
      do {
        v->arr.emplace_back();
        Status st = Value(&v->arr.back(), depth + 1);
        if (!st.ok) return st;
      } while (Eat(','));
      return Eat(']') ? Status::Ok() : Fail("expected ']'");
    }
    if (c == '"') {
      v->kind = JValue::kString;
      return String(&v->str);
    }
    for (const char* word : {"true", "false", "null"}) {
      size_t n = std::strlen(word);
      if (s_.compare(pos_, n, word) == 0) {
        pos_ += n;
        v->kind = word[0] == 'n' ? JValue::kNull : JValue::kBool;
        v->b = word[0] == 't';
        return Status::Ok();
      }
    }
    size_t start = pos_;
    while (pos_ < s_.size() && std::strchr("+-0123456789.eE", s_[pos_])) ++pos_;
    if (start == pos_) return Fail("unexpected character");
    std::string num(s_.substr(start, pos_ - start));
    char* end = nullptr;
    v->num = std::strtod(num.c_str(), &end);
    if (end != num.c_str() + num.size()) return Fail("bad number");
    v->kind = JValue::kNumber;
    return Status::Ok();
  }
  std::string_view s_;
  size_t pos_ = 0;
};

}  // namespace

Status ReadVocabFile(const std::string& path, std::vector<std::string>* vocab) {
  std::string data;
  Status st = ReadFile(path, &data);
  if (!st.ok) return st;
  vocab->clear();
  size_t start = 0;
  while (start < data.size()) {
    size_t end = data.find('\n', start);
    if (end == std::string::npos) end = data.size();
    size_t stop = end;
    if (stop > start && data[stop - 1] == '\r') --stop;  // CRLF line ends
    vocab->emplace_back(data.substr(start, stop - start));
    size_t check = 0;
    char32_t cp;
    while (check < vocab->back().size())
      if (!unicode::DecodeUtf8(vocab->back(), &check, &cp))
        return Status::Error("vocab file '" + path + "' line " + std::to_string(vocab->size()) + " is not valid UTF-8");
    start = end + 1;
  }
  if (vocab->empty()) return Status::Error("vocab file '" + path + "' is empty: expected one token per line");
  return Status::Ok();
}

Status ParseTokenizerJson(std::string_view json, TokenizerJson* out) {
  JValue root;
  Status st = JsonParser(json).Parse(&root);
  if (!st.ok) return st;
  const JValue* model = root.Get("model");
  if (!model || model->kind != JValue::kObject) return Status::Error("tokenizer.json has no \"model\" object");
  const JValue* type = model->Get("type");
  if (type && (type->kind != JValue::kString || type->str != "WordPiece"))
    return Status::Error("tokenizer.json model type is '" + (type->kind == JValue::kString ? type->str : "?") +
                         "': expected 'WordPiece'");
  const JValue* vocab = model->Get("vocab");
  if (!vocab || vocab->kind != JValue::kObject || vocab->obj.empty())
    return Status::Error("tokenizer.json model has no \"vocab\" object of token -> id");
  size_t n = vocab->obj.size();
  out->vocab.assign(n, std::string());
  std::vector<bool> filled(n, false);
  for (const auto& [token, id] : vocab->obj) {
    if (id.kind != JValue::kNumber || id.num < 0 || id.num >= n || id.num != static_cast<double>(static_cast<size_t>(id.num)))
      return Status::Error("tokenizer.json vocab id of '" + token + "' is not an integer in [0, " + std::to_string(n) +
                           "): ids must be 0..size-1");
    size_t i = static_cast<size_t>(id.num);
    if (filled[i]) return Status::Error("tokenizer.json vocab has id " + std::to_string(i) + " twice");
    filled[i] = true;
    out->vocab[i] = token;
  }
  auto str = [](const JValue* v, std::string* dst) {
    if (v && v->kind == JValue::kString) *dst = v->str;
  };
  str(model->Get("unk_token"), &out->unk_token);
  str(model->Get("continuing_subword_prefix"), &out->continuing_subword_prefix);
  if (const JValue* m = model->Get("max_input_chars_per_word"); m && m->kind == JValue::kNumber)
    out->max_input_chars_per_word = static_cast<int>(m->num);
  if (const JValue* norm = root.Get("normalizer"); norm && norm->kind == JValue::kObject) {
    const JValue* t = norm->Get("type");
    if (t && t->kind == JValue::kString && t->str == "BertNormalizer") {
      out->has_normalizer = true;
      if (const JValue* v = norm->Get("lowercase"); v && v->kind == JValue::kBool) out->lowercase = v->b;
      if (const JValue* v = norm->Get("handle_chinese_chars"); v && v->kind == JValue::kBool)
        out->handle_chinese_chars = v->b;
      if (const JValue* v = norm->Get("strip_accents"); v && v->kind == JValue::kBool) out->strip_accents = v->b;
    }
  }
  if (const JValue* added = root.Get("added_tokens"); added && added->kind == JValue::kArray)
    for (const JValue& a : added->arr) {
      const JValue* content = a.Get("content");
      const JValue* id = a.Get("id");
      if (!content || content->kind != JValue::kString || !id || id->kind != JValue::kNumber || id->num < 0 ||
          id->num > INT32_MAX || id->num != static_cast<double>(static_cast<int32_t>(id->num)))
        return Status::Error("tokenizer.json added_tokens: each entry needs a string \"content\" and an integer "
                             "\"id\" >= 0");
      AddedToken t;
      t.content = content->str;
      t.id = static_cast<int32_t>(id->num);
      auto flag = [&](const char* name, bool* dst) {
        if (const JValue* v = a.Get(name); v && v->kind == JValue::kBool) *dst = v->b;
      };
      flag("special", &t.special);
      t.normalized = !t.special;  // HF's default when the field is missing
      flag("normalized", &t.normalized);
      flag("lstrip", &t.lstrip);
      flag("rstrip", &t.rstrip);
      flag("single_word", &t.single_word);
      out->added_tokens.push_back(std::move(t));
    }
  return Status::Ok();
}

Status ReadTokenizerJson(const std::string& path, TokenizerJson* out) {
  std::string data;
  Status st = ReadFile(path, &data);
  if (!st.ok) return st;
  return ParseTokenizerJson(data, out);
}

}  // namespace dbf_tok
