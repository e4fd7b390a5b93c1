// distilbert_fast._tokenizer: a thin pybind11 adapter over the C++ WordPiece core
// (csrc/tokenizer/). It converts Python strings to UTF-8 views, releases the GIL while the core
// encodes, and turns a bad Status into ValueError. No torch here: tensors are made in Python from
// the int64 buffers this module returns.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "wordpiece.h"

namespace py = pybind11;
using dbf_tok::Encoding;
using dbf_tok::Status;

namespace {

void Check(const Status& s) {
  if (!s.ok) throw py::value_error(s.message);
}

// UTF-8 view of a Python str, valid while the str lives. Lone surrogates cannot be encoded.
std::string_view Utf8(PyObject* obj, const char* what) {
  if (!PyUnicode_Check(obj))
    throw py::type_error(std::string(what) + " must be str, got " + Py_TYPE(obj)->tp_name);
  Py_ssize_t size = 0;
  const char* data = PyUnicode_AsUTF8AndSize(obj, &size);
  if (!data) {
    PyErr_Clear();
    throw py::value_error(std::string(what) +
                          " is not valid Unicode: it holds a lone surrogate code point (U+D800..U+DFFF), "
                          "which has no UTF-8 form");
  }
  return std::string_view(data, static_cast<size_t>(size));
}

dbf_tok::Truncation ParseTruncation(const std::string& s) {
  if (s == "none" || s == "do_not_truncate") return dbf_tok::Truncation::kNone;
  if (s == "longest_first") return dbf_tok::Truncation::kLongestFirst;
  if (s == "only_first") return dbf_tok::Truncation::kOnlyFirst;
  if (s == "only_second") return dbf_tok::Truncation::kOnlySecond;
  throw py::value_error("truncation must be one of 'longest_first', 'only_first', 'only_second', 'do_not_truncate', got '" + s + "'");
}

dbf_tok::Padding ParsePadding(const std::string& s) {
  if (s == "none" || s == "do_not_pad") return dbf_tok::Padding::kNone;
  if (s == "longest") return dbf_tok::Padding::kLongest;
  if (s == "max_length") return dbf_tok::Padding::kMaxLength;
  throw py::value_error("padding must be one of 'longest', 'max_length', 'do_not_pad', got '" + s + "'");
}

dbf_tok::Side ParseSide(const std::string& s, const char* what) {
  if (s == "right") return dbf_tok::Side::kRight;
  if (s == "left") return dbf_tok::Side::kLeft;
  throw py::value_error(std::string(what) + " must be 'right' or 'left', got '" + s + "'");
}

// The rows of one batch call, kept for word_ids / sequence_ids / tokens on demand.
struct BatchResult {
  std::vector<Encoding> rows;
  std::vector<int32_t> sample_of_row;
};

py::object Optional(int32_t v) { return v < 0 ? py::none() : py::object(py::int_(v)); }

// A field of every row as a list of lists of int, or (equal lengths) one int64 bytearray.
template <typename Get>
py::object Field(const std::vector<Encoding>& rows, bool as_buffer, Get get) {
  if (as_buffer) {
    size_t len = rows.empty() ? 0 : get(rows[0]).size();
    for (const auto& r : rows)
      if (get(r).size() != len)
        throw py::value_error(
            "cannot make a tensor of sequences of different lengths: use padding=True (or 'max_length') "
            "and/or truncation=True");
    PyObject* buf = PyByteArray_FromStringAndSize(nullptr, static_cast<Py_ssize_t>(rows.size() * len * 8));
    if (!buf) throw py::error_already_set();
    auto* out = reinterpret_cast<int64_t*>(PyByteArray_AS_STRING(buf));
    for (const auto& r : rows)
      for (auto v : get(r)) *out++ = v;
    return py::reinterpret_steal<py::object>(buf);
  }
  PyObject* outer = PyList_New(static_cast<Py_ssize_t>(rows.size()));
  for (size_t i = 0; i < rows.size(); ++i) {
    const auto& v = get(rows[i]);
    PyObject* inner = PyList_New(static_cast<Py_ssize_t>(v.size()));
    for (size_t k = 0; k < v.size(); ++k) PyList_SET_ITEM(inner, k, PyLong_FromLong(v[k]));
    PyList_SET_ITEM(outer, i, inner);
  }
  return py::reinterpret_steal<py::object>(outer);
}

py::object Offsets(const std::vector<Encoding>& rows, bool as_buffer) {
  if (as_buffer) {
    size_t len = rows.empty() ? 0 : rows[0].size();
    for (const auto& r : rows)
      if (r.size() != len)
        throw py::value_error(
            "cannot make a tensor of sequences of different lengths: use padding=True (or 'max_length') "
            "and/or truncation=True");
    PyObject* buf = PyByteArray_FromStringAndSize(nullptr, static_cast<Py_ssize_t>(rows.size() * len * 16));
    if (!buf) throw py::error_already_set();
    auto* out = reinterpret_cast<int64_t*>(PyByteArray_AS_STRING(buf));
    for (const auto& r : rows)
      for (auto [a, b] : r.offsets) *out++ = a, *out++ = b;
    return py::reinterpret_steal<py::object>(buf);
  }
  PyObject* outer = PyList_New(static_cast<Py_ssize_t>(rows.size()));
  for (size_t i = 0; i < rows.size(); ++i) {
    const auto& v = rows[i].offsets;
    PyObject* inner = PyList_New(static_cast<Py_ssize_t>(v.size()));
    for (size_t k = 0; k < v.size(); ++k)
      PyList_SET_ITEM(inner, k, Py_BuildValue("(ii)", v[k].first, v[k].second));
    PyList_SET_ITEM(outer, i, inner);
  }
  return py::reinterpret_steal<py::object>(outer);
}

class PyTokenizer {
 public:
  PyTokenizer(std::vector<std::string> vocab, bool do_lower_case, py::object strip_accents, bool tokenize_chinese_chars,
              bool do_basic_tokenize, std::vector<std::string> never_split, std::string unk_token,
              std::string sep_token, std::string pad_token, std::string cls_token, std::string mask_token,
              std::vector<std::string> extra_special_tokens, std::string continuing_subword_prefix,
              int max_input_chars_per_word) {
    dbf_tok::TokenizerOptions o;
    o.do_lower_case = do_lower_case;
    o.strip_accents = strip_accents.is_none() ? -1 : (strip_accents.cast<bool>() ? 1 : 0);
    o.tokenize_chinese_chars = tokenize_chinese_chars;
    o.do_basic_tokenize = do_basic_tokenize;
    o.never_split = std::move(never_split);
    o.unk_token = std::move(unk_token);
    o.sep_token = std::move(sep_token);
    o.pad_token = std::move(pad_token);
    o.cls_token = std::move(cls_token);
    o.mask_token = std::move(mask_token);
    o.extra_special_tokens = std::move(extra_special_tokens);
    o.continuing_subword_prefix = std::move(continuing_subword_prefix);
    o.max_input_chars_per_word = max_input_chars_per_word;
    Check(dbf_tok::Tokenizer::Create(std::move(vocab), std::move(o), &tok_));
  }

  // (outputs dict, BatchResult). first/second: list of str, or list of list of str (pre-split).
  py::tuple EncodeBatch(py::list first, py::object second, bool is_split_into_words, bool add_special_tokens,
                        const std::string& truncation, int max_length, int stride, const std::string& truncation_side,
                        bool return_overflowing_tokens, const std::string& padding, int pad_to_multiple_of,
                        const std::string& padding_side, int pad_token_type_id, int num_threads, bool as_buffer,
                        bool token_type_ids, bool attention_mask, bool special_tokens_mask, bool offsets,
                        bool length) {
    dbf_tok::EncodeOptions o;
    o.add_special_tokens = add_special_tokens;
    o.truncation = ParseTruncation(truncation);
    o.max_length = max_length;
    o.stride = stride;
    o.truncation_side = ParseSide(truncation_side, "truncation_side");
    o.return_overflowing = return_overflowing_tokens;
    o.padding = ParsePadding(padding);
    o.pad_to_multiple_of = pad_to_multiple_of;
    o.padding_side = ParseSide(padding_side, "padding_side");
    o.pad_token_type_id = pad_token_type_id;

    bool has_pair = !second.is_none();
    py::list second_list;
    if (has_pair) {
      second_list = second.cast<py::list>();
      if (second_list.size() != first.size())
        throw py::value_error("text_pair has " + std::to_string(second_list.size()) + " items but text has " +
                              std::to_string(first.size()) + ": expected one pair per text");
    }
    std::vector<dbf_tok::Input> inputs(first.size());
    // the views point into the strings' UTF-8 buffers: hold a reference to each string while the
    // GIL is released, in case another thread empties the lists meanwhile
    std::vector<py::object> keep_alive;
    auto fill = [&](py::handle item, std::vector<std::string_view>* parts, const char* what) {
      if (is_split_into_words) {
        if (!PyList_Check(item.ptr()) && !PyTuple_Check(item.ptr()))
          throw py::type_error(std::string(what) + " must be a list of words (str) with is_split_into_words=True");
        for (py::handle w : item) {
          parts->push_back(Utf8(w.ptr(), what));
          keep_alive.push_back(py::reinterpret_borrow<py::object>(w));
        }
      } else {
        parts->push_back(Utf8(item.ptr(), what));
        keep_alive.push_back(py::reinterpret_borrow<py::object>(item));
      }
    };
    for (size_t i = 0; i < inputs.size(); ++i) {
      fill(first[i], &inputs[i].first, "text");
      if (has_pair) {
        inputs[i].has_pair = true;
        fill(second_list[i], &inputs[i].second, "text_pair");
      }
    }
    auto result = std::make_shared<BatchResult>();
    Status st;
    {
      py::gil_scoped_release release;
      st = tok_->EncodeBatch(inputs, o, num_threads, &result->rows, &result->sample_of_row);
    }
    Check(st);
    const auto& rows = result->rows;
    py::dict out;
    out["input_ids"] = Field(rows, as_buffer, [](const Encoding& e) -> const auto& { return e.ids; });
    if (token_type_ids)
      out["token_type_ids"] = Field(rows, as_buffer, [](const Encoding& e) -> const auto& { return e.type_ids; });
    if (attention_mask)
      out["attention_mask"] = Field(rows, as_buffer, [](const Encoding& e) -> const auto& { return e.attention_mask; });
    if (special_tokens_mask)
      out["special_tokens_mask"] =
          Field(rows, as_buffer, [](const Encoding& e) -> const auto& { return e.special_tokens_mask; });
    if (offsets) out["offset_mapping"] = Offsets(rows, as_buffer);
    if (length) {
      py::list lens;
      for (const auto& r : rows) lens.append(static_cast<int64_t>(r.size()));
      out["length"] = lens;
    }
    if (return_overflowing_tokens) out["overflow_to_sample_mapping"] = py::cast(result->sample_of_row);
    out["__rows__"] = py::int_(rows.size());
    return py::make_tuple(out, result);
  }

  std::vector<std::string> Tokenize(py::handle text) {
    std::string_view t = Utf8(text.ptr(), "text");
    Encoding e;
    Status st;
    {
      py::gil_scoped_release release;
      st = tok_->EncodeText(t, 0, &e);
    }
    Check(st);
    std::vector<std::string> out;
    out.reserve(e.size());
    for (int32_t id : e.ids) out.push_back(*tok_->IdToToken(id));
    return out;
  }

  py::str Decode(const std::vector<int64_t>& ids, bool skip_special_tokens) {
    std::string out;
    Check(tok_->Decode(ids, skip_special_tokens, &out));
    return py::str(out);
  }

  py::object TokenToId(const std::string& token) const {
    int32_t id = tok_->TokenToId(token);
    return Optional(id);
  }
  py::object IdToToken(int64_t id) const {
    const std::string* t = tok_->IdToToken(id);
    return t ? py::object(py::str(*t)) : py::none();
  }
  std::vector<std::string> Vocab() const {
    std::vector<std::string> v;
    for (size_t i = 0; i < tok_->VocabSize(); ++i) v.push_back(*tok_->IdToToken(i));
    return v;
  }
  size_t VocabSize() const { return tok_->VocabSize(); }
  std::vector<int32_t> SpecialIds() const { return tok_->SpecialIds(); }

 private:
  std::unique_ptr<dbf_tok::Tokenizer> tok_;
};

py::list OptionalList(const std::vector<int32_t>& v) {
  py::list out;
  for (int32_t x : v) out.append(Optional(x));
  return out;
}

std::vector<std::string> ReadVocab(const std::string& path) {
  std::vector<std::string> vocab;
  Check(dbf_tok::ReadVocabFile(path, &vocab));
  return vocab;
}

py::dict ReadJson(const std::string& path) {
  dbf_tok::TokenizerJson j;
  Check(dbf_tok::ReadTokenizerJson(path, &j));
  py::dict d;
  d["vocab"] = j.vocab;
  d["unk_token"] = j.unk_token;
  d["continuing_subword_prefix"] = j.continuing_subword_prefix;
  d["max_input_chars_per_word"] = j.max_input_chars_per_word;
  if (j.has_normalizer) {
    d["lowercase"] = j.lowercase;
    d["strip_accents"] = j.strip_accents < 0 ? py::object(py::none()) : py::object(py::bool_(j.strip_accents == 1));
    d["handle_chinese_chars"] = j.handle_chinese_chars;
  }
  d["added_tokens"] = j.added_tokens;
  return d;
}

}  // namespace

PYBIND11_MODULE(_tokenizer, m) {
  m.doc() = "C++ BERT WordPiece tokenizer core (see distilbert_fast.tokenization)";
  py::class_<BatchResult, std::shared_ptr<BatchResult>>(m, "BatchResult")
      .def("word_ids", [](const BatchResult& r, size_t i) { return OptionalList(r.rows.at(i).word_ids); })
      .def("sequence_ids", [](const BatchResult& r, size_t i) { return OptionalList(r.rows.at(i).sequence_ids); })
      .def("ids", [](const BatchResult& r, size_t i) { return r.rows.at(i).ids; })
      .def("__len__", [](const BatchResult& r) { return r.rows.size(); });
  py::class_<PyTokenizer>(m, "Tokenizer")
      .def(py::init<std::vector<std::string>, bool, py::object, bool, bool, std::vector<std::string>, std::string,
                    std::string, std::string, std::string, std::string, std::vector<std::string>, std::string, int>(),
           py::arg("vocab"), py::arg("do_lower_case"), py::arg("strip_accents"), py::arg("tokenize_chinese_chars"),
           py::arg("do_basic_tokenize"), py::arg("never_split"), py::arg("unk_token"), py::arg("sep_token"),
           py::arg("pad_token"), py::arg("cls_token"), py::arg("mask_token"), py::arg("extra_special_tokens"),
           py::arg("continuing_subword_prefix"), py::arg("max_input_chars_per_word"))
      .def("encode_batch", &PyTokenizer::EncodeBatch, "Encodes a batch; returns (outputs dict, BatchResult)")
      .def("tokenize", &PyTokenizer::Tokenize, "Tokens of one text, no special tokens")
      .def("decode", &PyTokenizer::Decode, "Text of token ids (WordPiece decoder)")
      .def("token_to_id", &PyTokenizer::TokenToId, "Id of a token, or None")
      .def("id_to_token", &PyTokenizer::IdToToken, "Token of an id, or None")
      .def("vocab", &PyTokenizer::Vocab, "Tokens by id")
      .def("vocab_size", &PyTokenizer::VocabSize, "Number of tokens")
      .def("special_ids", &PyTokenizer::SpecialIds, "Ids of the special tokens");
  m.def("read_vocab_file", &ReadVocab, "Tokens of a vocab.txt, by id");
  m.def("read_tokenizer_json", &ReadJson, "WordPiece model and normalizer settings of a tokenizer.json");
  m.def("unicode_versions", &dbf_tok::UnicodeVersions, "Unicode versions of the generated tables");
}
