// distilbert_fast._tokenizer: a thin pybind11 adapter over the C++ WordPiece core
// (csrc/tokenizer/). It converts Python strings to UTF-8 views, releases the GIL while the core
// encodes and while it writes int64 buffers, and turns a bad Status into ValueError. No torch
// here: tensors are made in Python from the buffers this module fills.
//
// Three ways in:
//   encode_text(text)       the common call, one str with the tokenizer's defaults: returns the
//                           BatchEncoding itself, built here (no per-call Python code)
//   encode_batch(...)       everything HF's __call__ takes; returns (outputs dict, BatchResult)
//   encode_packed(...)      the engine's entry: ids of every row back to back, cu_seqlens, no
//                           padding, optionally written into the caller's (pinned) buffers
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <memory>
#include <string>
#include <tuple>
#include <vector>

#include "wordpiece.h"

namespace py = pybind11;
using dbf_tok::EncodedBatch;
using dbf_tok::Encoding;
using dbf_tok::Pieces;
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

// -- per-token fields as sinks of EncodedBatch::Emit ----------------------------------------------

enum class Field { kIds, kTypeIds, kAttentionMask, kSpecialTokensMask, kWordIds, kSequenceIds };

// The value of field F for each kind of token; Out is called once per token with it.
template <Field F, typename Out>
struct FieldSink {
  Out out;
  void Special(int32_t id, int32_t type) {
    out(F == Field::kIds ? id : F == Field::kTypeIds ? type : F == Field::kAttentionMask ? 1
        : F == Field::kSpecialTokensMask ? 1 : -1);
  }
  void Piece(const Pieces& p, int32_t seq, size_t begin, size_t end) {
    for (size_t k = begin; k < end; ++k)
      out(F == Field::kIds ? p.ids[k] : F == Field::kTypeIds ? seq : F == Field::kAttentionMask ? 1
          : F == Field::kSpecialTokensMask ? 0 : F == Field::kWordIds ? p.word_ids[k] : seq);
  }
  void Pad(size_t n, int32_t pad_id, int32_t pad_type) {
    int32_t v = F == Field::kIds ? pad_id : F == Field::kTypeIds ? pad_type : F == Field::kAttentionMask ? 0
                : F == Field::kSpecialTokensMask ? 1 : -1;
    for (size_t k = 0; k < n; ++k) out(v);
  }
};

// Offsets as (start, end) pairs; special and padding tokens get (0, 0).
template <typename Out>
struct OffsetSink {
  Out out;
  void Special(int32_t, int32_t) { out(0, 0); }
  void Piece(const Pieces& p, int32_t, size_t begin, size_t end) {
    for (size_t k = begin; k < end; ++k) out(p.offsets[k].first, p.offsets[k].second);
  }
  void Pad(size_t n, int32_t, int32_t) {
    for (size_t k = 0; k < n; ++k) out(0, 0);
  }
};

template <Field F, typename Out>
void EmitField(const EncodedBatch& b, size_t r, Out out) {
  FieldSink<F, Out> sink{out};
  b.Emit(r, &sink);
}

// Calls fn(row, writer) where writer(int64) stores one value: dispatch from a runtime field to
// its compiled sink.
template <typename MakeOut>
void EmitFieldAs(Field f, const EncodedBatch& b, size_t r, MakeOut make_out) {
  switch (f) {
    case Field::kIds: return EmitField<Field::kIds>(b, r, make_out());
    case Field::kTypeIds: return EmitField<Field::kTypeIds>(b, r, make_out());
    case Field::kAttentionMask: return EmitField<Field::kAttentionMask>(b, r, make_out());
    case Field::kSpecialTokensMask: return EmitField<Field::kSpecialTokensMask>(b, r, make_out());
    case Field::kWordIds: return EmitField<Field::kWordIds>(b, r, make_out());
    case Field::kSequenceIds: return EmitField<Field::kSequenceIds>(b, r, make_out());
  }
}

bool IsOptionalField(Field f) { return f == Field::kWordIds || f == Field::kSequenceIds; }

// A Python int, or None for -1 in the fields where -1 means "none".
PyObject* IntOrNone(int64_t v, bool optional) {
  if (optional && v < 0) {
    Py_INCREF(Py_None);
    return Py_None;
  }
  return PyLong_FromLongLong(v);
}

// Row r's field as a list of int (None for "none" in word / sequence ids).
PyObject* FieldList(const EncodedBatch& b, size_t r, Field f) {
  PyObject* list = PyList_New(static_cast<Py_ssize_t>(b.Length(r)));
  if (!list) throw py::error_already_set();
  Py_ssize_t k = 0;
  bool optional = IsOptionalField(f);
  EmitFieldAs(f, b, r, [&] { return [list, &k, optional](int64_t v) { PyList_SET_ITEM(list, k++, IntOrNone(v, optional)); }; });
  return list;
}

PyObject* OffsetList(const EncodedBatch& b, size_t r) {
  PyObject* list = PyList_New(static_cast<Py_ssize_t>(b.Length(r)));
  if (!list) throw py::error_already_set();
  Py_ssize_t k = 0;
  auto out = [list, &k](int64_t a, int64_t e) {
    PyObject* t = PyTuple_New(2);
    PyTuple_SET_ITEM(t, 0, PyLong_FromLongLong(a));
    PyTuple_SET_ITEM(t, 1, PyLong_FromLongLong(e));
    PyList_SET_ITEM(list, k++, t);
  };
  OffsetSink<decltype(out)> sink{out};
  b.Emit(r, &sink);
  return list;
}

py::object Steal(PyObject* obj) {
  if (!obj) throw py::error_already_set();
  return py::reinterpret_steal<py::object>(obj);
}

// The rows' start token (rows laid back to back), plus the total at the end.
std::vector<size_t> RowStarts(const EncodedBatch& b) {
  std::vector<size_t> starts(b.num_rows() + 1, 0);
  for (size_t r = 0; r < b.num_rows(); ++r) starts[r + 1] = starts[r] + b.Length(r);
  return starts;
}

// Calls write_row(r) for every row, in chunks of rows on the core's threads (as many as the
// batch's tokens warrant), GIL released by the caller.
template <typename F>
void ForEachRow(const EncodedBatch& b, const std::vector<size_t>& starts, int num_threads, F write_row) {
  size_t n = b.num_rows();
  int threads = dbf_tok::WorkerCount(num_threads, std::max<size_t>(1, starts[n] / 262144));
  std::atomic<size_t> next{0};
  const size_t chunk = 256;
  dbf_tok::RunWorkers(threads, [&] {
    for (size_t lo; (lo = next.fetch_add(chunk)) < n;)
      for (size_t r = lo; r < std::min(n, lo + chunk); ++r) write_row(r);
  });
}

// Writes a field of every row into out (one value per token), rows at starts[r].
template <typename T>
void WriteRows(const EncodedBatch& b, const std::vector<size_t>& starts, Field f, T* out, int num_threads) {
  ForEachRow(b, starts, num_threads, [&](size_t r) {
    T* p = out + starts[r];
    EmitFieldAs(f, b, r, [&p] { return [&p](int64_t v) { *p++ = static_cast<T>(v); }; });
  });
}

// Writes every row's (start, end) character offsets into out (two values per token).
void WriteOffsets(const EncodedBatch& b, const std::vector<size_t>& starts, int64_t* out, int num_threads) {
  ForEachRow(b, starts, num_threads, [&](size_t r) {
    int64_t* p = out + 2 * starts[r];
    auto write = [&p](int64_t a, int64_t e) { *p++ = a, *p++ = e; };
    OffsetSink<decltype(write)> sink{write};
    b.Emit(r, &sink);
  });
}

// A new bytearray of n bytes (uninitialised), and its data pointer.
py::object NewBytes(size_t n, char** data) {
  py::object buf = Steal(PyByteArray_FromStringAndSize(nullptr, static_cast<Py_ssize_t>(n)));
  *data = PyByteArray_AS_STRING(buf.ptr());
  return buf;
}

// The rows of one batch call, kept for per-row views (word_ids, char_to_token, ...) on demand.
struct BatchResult {
  EncodedBatch batch;
  std::shared_ptr<const dbf_tok::Tokenizer> tok;  // for the rows' tokens
  py::list RowTokens(size_t i) const {
    CheckRow(i);
    py::list out(batch.Length(i));
    size_t k = 0;
    auto put = [&](const std::string& token) { PyList_SET_ITEM(out.ptr(), k++, py::str(token).release().ptr()); };
    struct Sink {
      const dbf_tok::Tokenizer& tok;
      decltype(put)& out;
      void Special(int32_t id, int32_t) { out(*tok.IdToToken(id)); }
      void Piece(const Pieces& p, int32_t, size_t begin, size_t end) {
        for (size_t k = begin; k < end; ++k) out(*tok.PieceToken(p, k));
      }
      void Pad(size_t n, int32_t pad_id, int32_t) {
        for (size_t k = 0; k < n; ++k) out(*tok.IdToToken(pad_id));
      }
    } sink{*tok, put};
    batch.Emit(i, &sink);
    return out;
  }
  py::list RowField(size_t i, Field f) const {
    CheckRow(i);
    return py::reinterpret_steal<py::list>(FieldList(batch, i, f));
  }
  py::list RowOffsets(size_t i) const {
    CheckRow(i);
    return py::reinterpret_steal<py::list>(OffsetList(batch, i));
  }
  void CheckRow(size_t i) const {
    if (i >= batch.num_rows())
      throw py::index_error("batch_index must be in [0, " + std::to_string(batch.num_rows()) + "), got " +
                            std::to_string(i));
  }
};

const char kUnequalLengths[] =
    "cannot make a tensor of sequences of different lengths: use padding=True (or 'max_length') and/or "
    "truncation=True";

// A writable, C-contiguous 1-D buffer of `itemsize`-byte integers, at least `need` long.
py::buffer_info OutBuffer(py::handle obj, const char* name, size_t itemsize, size_t need, const char* dtype) {
  py::buffer_info info = py::reinterpret_borrow<py::buffer>(obj).request(true);
  char kind = info.format.empty() ? '?' : info.format.back();
  bool integer = std::strchr("bhilqBHILQ", kind) != nullptr;
  if (info.ndim != 1 || static_cast<size_t>(info.itemsize) != itemsize || !integer ||
      (info.shape[0] > 1 && static_cast<size_t>(info.strides[0]) != itemsize))
    throw py::value_error(std::string(name) + " must be a contiguous 1-D " + dtype + " CPU tensor or array");
  if (static_cast<size_t>(info.shape[0]) < need)
    throw py::value_error(std::string(name) + " holds " + std::to_string(info.shape[0]) + " values but this batch needs " +
                          std::to_string(need));
  return info;
}

// An added token as Python passes it: (content, id, special, normalized, lstrip, rstrip, single_word).
using AddedTokenTuple = std::tuple<std::string, int32_t, bool, bool, bool, bool, bool>;

class PyTokenizer {
 public:
  PyTokenizer(std::vector<std::string> vocab, bool do_lower_case, py::object strip_accents, bool tokenize_chinese_chars,
              bool do_basic_tokenize, std::vector<std::string> never_split, std::string unk_token,
              std::string sep_token, std::string pad_token, std::string cls_token, std::string mask_token,
              std::vector<std::string> extra_special_tokens, std::string continuing_subword_prefix,
              int max_input_chars_per_word, const std::vector<AddedTokenTuple>& added_tokens,
              bool match_special_tokens) {
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
    o.match_special_tokens = match_special_tokens;
    for (const auto& [content, id, special, normalized, lstrip, rstrip, single_word] : added_tokens)
      o.added_tokens.push_back(dbf_tok::AddedToken{content, id, special, normalized, lstrip, rstrip, single_word});
    std::unique_ptr<dbf_tok::Tokenizer> tok;
    Check(dbf_tok::Tokenizer::Create(std::move(vocab), std::move(o), &tok));
    tok_ = std::move(tok);
  }

  // The class encode_text instantiates (distilbert_fast.tokenization.BatchEncoding, a dict
  // subclass whose per-row state defaults to class attributes), and the tokenizer object it
  // records as the source of a lazily re-encoded row view.
  void SetBatchEncodingClass(py::object cls) {
    if (!PyType_Check(cls.ptr()) || !PyType_IsSubtype(reinterpret_cast<PyTypeObject*>(cls.ptr()), &PyDict_Type))
      throw py::type_error("batch_encoding_class must be a dict subclass");
    batch_encoding_class_ = cls;
  }

  // One str with the defaults of __call__ (special tokens, no truncation, no padding, lists):
  // a BatchEncoding {"input_ids": [...], "attention_mask": [...]} whose per-row views re-encode
  // `text` on first use (attribute _source = (owner, text)). The common call, kept short.
  py::object EncodeText(py::handle text, py::handle owner) {
    std::string_view t = Utf8(text.ptr(), "text");
    Pieces pieces;
    Status st;
    if (t.size() > 4096) {  // long texts give other threads the GIL meanwhile
      py::gil_scoped_release release;
      st = tok_->EncodePieces(t, &pieces);
    } else {
      st = tok_->EncodePieces(t, &pieces);
    }
    Check(st);
    size_t n = pieces.size() + 2;
    PyObject* ids = PyList_New(static_cast<Py_ssize_t>(n));
    PyObject* mask = PyList_New(static_cast<Py_ssize_t>(n));
    if (!ids || !mask) {
      Py_XDECREF(ids);
      Py_XDECREF(mask);
      throw py::error_already_set();
    }
    PyList_SET_ITEM(ids, 0, PyLong_FromLong(tok_->cls_id()));
    for (size_t k = 0; k < pieces.size(); ++k) PyList_SET_ITEM(ids, k + 1, PyLong_FromLong(pieces.ids[k]));
    PyList_SET_ITEM(ids, n - 1, PyLong_FromLong(tok_->sep_id()));
    PyObject* one = PyLong_FromLong(1);
    for (size_t k = 0; k < n; ++k) {
      Py_INCREF(one);
      PyList_SET_ITEM(mask, k, one);
    }
    Py_DECREF(one);
    py::object input_ids = Steal(ids), attention_mask = Steal(mask);
    py::object enc = NewBatchEncoding();
    if (PyDict_SetItem(enc.ptr(), key_input_ids_.ptr(), input_ids.ptr()) ||
        PyDict_SetItem(enc.ptr(), key_attention_mask_.ptr(), attention_mask.ptr()))
      throw py::error_already_set();
    py::object source = Steal(PyTuple_Pack(2, owner.ptr(), text.ptr()));
    if (PyObject_SetAttr(enc.ptr(), key_source_.ptr(), source.ptr())) throw py::error_already_set();
    return enc;
  }

  // (BatchEncoding, rows): the outputs as a BatchEncoding whose _rows is the BatchResult, and
  // the number of rows. first/second: list of str, or list of list of str (pre-split).
  py::tuple EncodeBatch(py::list first, py::object second, bool is_split_into_words, bool add_special_tokens,
                        const std::string& truncation, int max_length, int stride, const std::string& truncation_side,
                        bool return_overflowing_tokens, const std::string& padding, int pad_to_multiple_of,
                        const std::string& padding_side, int pad_token_type_id, int num_threads, size_t max_rows,
                        bool as_buffer, bool token_type_ids, bool attention_mask, bool special_tokens_mask,
                        bool offsets, bool length) {
    dbf_tok::EncodeOptions o = Options(add_special_tokens, truncation, max_length, stride, truncation_side,
                                       return_overflowing_tokens, max_rows);
    o.padding = ParsePadding(padding);
    o.pad_to_multiple_of = pad_to_multiple_of;
    o.padding_side = ParseSide(padding_side, "padding_side");
    o.pad_token_type_id = pad_token_type_id;

    auto result = std::make_shared<BatchResult>();
    result->tok = tok_;
    RunEncode(first, second, is_split_into_words, o, num_threads, &result->batch);
    const EncodedBatch& b = result->batch;
    size_t n = b.num_rows();
    py::object enc = NewBatchEncoding();
    py::dict out = py::reinterpret_borrow<py::dict>(enc);
    struct Wanted {
      const char* key;
      Field field;
      bool on;
    };
    const Wanted fields[] = {{"input_ids", Field::kIds, true},
                             {"token_type_ids", Field::kTypeIds, token_type_ids},
                             {"attention_mask", Field::kAttentionMask, attention_mask},
                             {"special_tokens_mask", Field::kSpecialTokensMask, special_tokens_mask}};
    if (as_buffer) {
      size_t width = n ? b.Length(0) : 0;
      for (size_t r = 0; r < n; ++r)
        if (b.Length(r) != width) throw py::value_error(kUnequalLengths);
      std::vector<size_t> starts(n + 1);
      for (size_t r = 0; r <= n; ++r) starts[r] = r * width;
      for (const Wanted& w : fields) {
        if (!w.on) continue;
        char* data;
        out[w.key] = NewBytes(n * width * 8, &data);
        py::gil_scoped_release release;
        WriteRows(b, starts, w.field, reinterpret_cast<int64_t*>(data), num_threads);
      }
      if (offsets) {
        char* data;
        out["offset_mapping"] = NewBytes(n * width * 16, &data);
        py::gil_scoped_release release;
        WriteOffsets(b, starts, reinterpret_cast<int64_t*>(data), num_threads);
      }
    } else {
      for (const Wanted& w : fields) {
        if (!w.on) continue;
        py::list rows(n);
        for (size_t r = 0; r < n; ++r) PyList_SET_ITEM(rows.ptr(), r, FieldList(b, r, w.field));
        out[w.key] = rows;
      }
      if (offsets) {
        py::list rows(n);
        for (size_t r = 0; r < n; ++r) PyList_SET_ITEM(rows.ptr(), r, OffsetList(b, r));
        out["offset_mapping"] = rows;
      }
    }
    if (length) {
      py::list lens(n);
      for (size_t r = 0; r < n; ++r) PyList_SET_ITEM(lens.ptr(), r, PyLong_FromSize_t(b.Length(r)));
      out["length"] = lens;
    }
    if (return_overflowing_tokens) {
      py::list sample(n);
      for (size_t r = 0; r < n; ++r) PyList_SET_ITEM(sample.ptr(), r, PyLong_FromLong(b.InputOfRow(r)));
      out["overflow_to_sample_mapping"] = sample;
    }
    if (PyObject_SetAttr(enc.ptr(), key_rows_.ptr(), py::cast(result).ptr())) throw py::error_already_set();
    return py::make_tuple(enc, n);
  }

  // Rows back to back with no padding: a dict of bytearrays (or None where the caller's buffer was
  // written): input_ids (int64, total), cu_seqlens (int32, rows + 1), overflow_to_sample_mapping
  // (int64, rows), and on request offset_mapping (int64, total x 2), word_ids (int64, -1 for none),
  // sequence_ids (int8, -1 for none); plus total, rows and max_seqlen as ints.
  py::dict EncodePacked(py::list first, py::object second, bool is_split_into_words, bool add_special_tokens,
                        const std::string& truncation, int max_length, int stride, const std::string& truncation_side,
                        bool return_overflowing_tokens, int num_threads, size_t max_rows, bool offsets, bool word_ids,
                        bool sequence_ids, py::object ids_out, py::object cu_seqlens_out) {
    dbf_tok::EncodeOptions o = Options(add_special_tokens, truncation, max_length, stride, truncation_side,
                                       return_overflowing_tokens, max_rows);
    EncodedBatch b;
    RunEncode(first, second, is_split_into_words, o, num_threads, &b);
    size_t n = b.num_rows();
    std::vector<size_t> starts = RowStarts(b);
    size_t total = starts[n], max_seqlen = 0;
    for (size_t r = 0; r < n; ++r) max_seqlen = std::max(max_seqlen, starts[r + 1] - starts[r]);
    if (total > static_cast<size_t>(INT32_MAX))
      throw py::value_error("this batch has " + std::to_string(total) +
                            " tokens: cu_seqlens is int32, so a packed batch holds at most 2^31 - 1");

    py::dict out;
    int64_t* ids;
    int32_t* cu;
    int64_t* sample;
    int64_t* offs = nullptr;
    int64_t* words = nullptr;
    int8_t* seqs = nullptr;
    py::buffer_info ids_info, cu_info;  // keep the caller's buffers exported while writing
    char* data;
    if (ids_out.is_none()) {
      out["input_ids"] = NewBytes(total * 8, &data);
      ids = reinterpret_cast<int64_t*>(data);
    } else {
      ids_info = OutBuffer(ids_out, "ids_out", 8, total, "int64");
      ids = static_cast<int64_t*>(ids_info.ptr);
      out["input_ids"] = py::none();
    }
    if (cu_seqlens_out.is_none()) {
      out["cu_seqlens"] = NewBytes((n + 1) * 4, &data);
      cu = reinterpret_cast<int32_t*>(data);
    } else {
      cu_info = OutBuffer(cu_seqlens_out, "cu_seqlens_out", 4, n + 1, "int32");
      cu = static_cast<int32_t*>(cu_info.ptr);
      out["cu_seqlens"] = py::none();
    }
    out["overflow_to_sample_mapping"] = NewBytes(n * 8, &data);
    sample = reinterpret_cast<int64_t*>(data);
    if (offsets) {
      out["offset_mapping"] = NewBytes(total * 16, &data);
      offs = reinterpret_cast<int64_t*>(data);
    }
    if (word_ids) {
      out["word_ids"] = NewBytes(total * 8, &data);
      words = reinterpret_cast<int64_t*>(data);
    }
    if (sequence_ids) {
      out["sequence_ids"] = NewBytes(total, &data);
      seqs = reinterpret_cast<int8_t*>(data);
    }
    {
      py::gil_scoped_release release;
      for (size_t r = 0; r <= n; ++r) cu[r] = static_cast<int32_t>(starts[r]);
      for (size_t r = 0; r < n; ++r) sample[r] = b.InputOfRow(r);
      WriteRows(b, starts, Field::kIds, ids, num_threads);
      if (offs) WriteOffsets(b, starts, offs, num_threads);
      if (words) WriteRows(b, starts, Field::kWordIds, words, num_threads);
      if (seqs) WriteRows(b, starts, Field::kSequenceIds, seqs, num_threads);
    }
    out["total"] = py::int_(total);
    out["rows"] = py::int_(n);
    out["max_seqlen"] = py::int_(max_seqlen);
    return out;
  }

  std::vector<std::string> Tokenize(py::handle text) {
    std::string_view t = Utf8(text.ptr(), "text");
    Pieces pieces;
    Status st;
    {
      py::gil_scoped_release release;
      st = tok_->EncodePieces(t, &pieces);
    }
    Check(st);
    std::vector<std::string> out;
    out.reserve(pieces.size());
    for (size_t k = 0; k < pieces.size(); ++k) out.push_back(*tok_->PieceToken(pieces, k));
    return out;
  }

  py::str Decode(const std::vector<int64_t>& ids, bool skip_special_tokens) {
    std::string out;
    Check(tok_->Decode(ids, skip_special_tokens, &out));
    return py::str(out);
  }

  py::object TokenToId(const std::string& token) const {
    int32_t id = tok_->TokenToId(token);
    return id < 0 ? py::none() : py::object(py::int_(id));
  }
  py::object IdToToken(int64_t id) const {
    const std::string* t = tok_->IdToToken(id);
    return t ? py::object(py::str(*t)) : py::none();
  }
  const std::vector<std::string>& Vocab() const { return tok_->Vocab(); }
  size_t VocabSize() const { return tok_->VocabSize(); }
  size_t NumIds() const { return tok_->NumIds(); }
  std::vector<int32_t> SpecialIds() const { return tok_->SpecialIds(); }

 private:
  // An empty BatchEncoding, made without running its __init__ (its per-row state defaults to
  // class attributes); a plain dict before set_batch_encoding_class.
  py::object NewBatchEncoding() const {
    if (!batch_encoding_class_) return py::dict();
    auto* cls = reinterpret_cast<PyTypeObject*>(batch_encoding_class_.ptr());
    return Steal(cls->tp_new(cls, empty_tuple_.ptr(), nullptr));
  }

  dbf_tok::EncodeOptions Options(bool add_special_tokens, const std::string& truncation, int max_length, int stride,
                                 const std::string& truncation_side, bool return_overflowing_tokens,
                                 size_t max_rows) const {
    dbf_tok::EncodeOptions o;
    o.add_special_tokens = add_special_tokens;
    o.truncation = ParseTruncation(truncation);
    o.max_length = max_length;
    o.stride = stride;
    o.truncation_side = ParseSide(truncation_side, "truncation_side");
    o.return_overflowing = return_overflowing_tokens;
    o.max_rows = max_rows;
    return o;
  }

  // Converts the texts to UTF-8 views (GIL held), then encodes with the GIL released.
  void RunEncode(py::list first, py::object second, bool is_split_into_words, const dbf_tok::EncodeOptions& o,
                 int num_threads, EncodedBatch* out) const {
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
    keep_alive.reserve(inputs.size() * (has_pair ? 2 : 1));
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
      inputs[i].pre_split = is_split_into_words;
      fill(first[i], &inputs[i].first, "text");
      if (has_pair && !second_list[i].is_none()) {  // None: this item has no pair (HF's mixed batches)
        inputs[i].has_pair = true;
        fill(second_list[i], &inputs[i].second, "text_pair");
      }
    }
    Status st;
    {
      py::gil_scoped_release release;
      st = tok_->Encode(inputs, o, num_threads, out);
    }
    Check(st);
  }

  std::shared_ptr<const dbf_tok::Tokenizer> tok_;
  py::object batch_encoding_class_;
  py::tuple empty_tuple_ = py::tuple(0);
  py::str key_input_ids_ = py::str("input_ids"), key_attention_mask_ = py::str("attention_mask"),
          key_source_ = py::str("_source"), key_rows_ = py::str("_rows");
};

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
  py::list added;
  for (const dbf_tok::AddedToken& t : j.added_tokens) {
    py::dict a;
    a["id"] = t.id;
    a["content"] = t.content;
    a["single_word"] = t.single_word;
    a["lstrip"] = t.lstrip;
    a["rstrip"] = t.rstrip;
    a["normalized"] = t.normalized;
    a["special"] = t.special;
    added.append(a);
  }
  d["added_tokens"] = added;
  return d;
}

}  // namespace

PYBIND11_MODULE(_tokenizer, m) {
  m.doc() = "C++ BERT WordPiece tokenizer core (see distilbert_fast.tokenization)";
  py::class_<BatchResult, std::shared_ptr<BatchResult>>(m, "BatchResult")
      .def("ids", [](const BatchResult& r, size_t i) { return r.RowField(i, Field::kIds); })
      .def("type_ids", [](const BatchResult& r, size_t i) { return r.RowField(i, Field::kTypeIds); })
      .def("attention_mask", [](const BatchResult& r, size_t i) { return r.RowField(i, Field::kAttentionMask); })
      .def("special_tokens_mask", [](const BatchResult& r, size_t i) { return r.RowField(i, Field::kSpecialTokensMask); })
      .def("word_ids", [](const BatchResult& r, size_t i) { return r.RowField(i, Field::kWordIds); })
      .def("sequence_ids", [](const BatchResult& r, size_t i) { return r.RowField(i, Field::kSequenceIds); })
      .def("offsets", &BatchResult::RowOffsets)
      .def("tokens", &BatchResult::RowTokens)
      .def("n_sequences", [](const BatchResult& r, size_t i) { r.CheckRow(i); return r.batch.HasPair(i) ? 2 : 1; })
      .def("__len__", [](const BatchResult& r) { return r.batch.num_rows(); });
  py::class_<PyTokenizer>(m, "Tokenizer")
      .def(py::init<std::vector<std::string>, bool, py::object, bool, bool, std::vector<std::string>, std::string,
                    std::string, std::string, std::string, std::string, std::vector<std::string>, std::string, int,
                    const std::vector<AddedTokenTuple>&, bool>(),
           py::arg("vocab"), py::arg("do_lower_case"), py::arg("strip_accents"), py::arg("tokenize_chinese_chars"),
           py::arg("do_basic_tokenize"), py::arg("never_split"), py::arg("unk_token"), py::arg("sep_token"),
           py::arg("pad_token"), py::arg("cls_token"), py::arg("mask_token"), py::arg("extra_special_tokens"),
           py::arg("continuing_subword_prefix"), py::arg("max_input_chars_per_word"), py::arg("added_tokens"),
           py::arg("match_special_tokens") = true)
      .def("set_batch_encoding_class", &PyTokenizer::SetBatchEncodingClass, "The class encode_text returns")
      .def("encode_text", &PyTokenizer::EncodeText, "One str with __call__'s defaults, as a BatchEncoding")
      .def("encode_batch", &PyTokenizer::EncodeBatch, "Encodes a batch; returns (outputs dict, BatchResult)")
      .def("encode_packed", &PyTokenizer::EncodePacked, "Encodes a batch into rows back to back (no padding)")
      .def("tokenize", &PyTokenizer::Tokenize, "Tokens of one text, no special tokens")
      .def("decode", &PyTokenizer::Decode, "Text of token ids (WordPiece decoder)")
      .def("token_to_id", &PyTokenizer::TokenToId, "Id of a token, or None")
      .def("id_to_token", &PyTokenizer::IdToToken, "Token of an id, or None")
      .def("vocab", &PyTokenizer::Vocab, "Tokens by id")
      .def("vocab_size", &PyTokenizer::VocabSize, "Number of tokens of the vocab (added tokens left out)")
      .def("num_ids", &PyTokenizer::NumIds, "One past the largest id, added tokens included")
      .def("special_ids", &PyTokenizer::SpecialIds, "Ids of the special tokens");
  m.def("read_vocab_file", &ReadVocab, "Tokens of a vocab.txt, by id");
  m.def("read_tokenizer_json", &ReadJson, "WordPiece model and normalizer settings of a tokenizer.json");
  m.def("unicode_versions", &dbf_tok::UnicodeVersions, "Unicode versions of the generated tables");
}
