// A BERT WordPiece tokenizer core in plain C++17: no Python, no torch. It reproduces
// HuggingFace's Rust tokenizer (`tokenizers`' BertNormalizer + BertPreTokenizer + WordPiece +
// BERT template post-processing, as BertTokenizerFast configures it): the same ids, tokens and
// character offsets, truncation, padding and overflow windows.
//
// Errors are returned as a Status, never thrown: a binding turns them into exceptions.
//
//   std::unique_ptr<Tokenizer> tok;
//   Status s = Tokenizer::Create(vocab, TokenizerOptions{}, &tok);
//   std::vector<Encoding> rows; std::vector<int> sample;
//   s = tok->EncodeBatch(inputs, EncodeOptions{}, /*num_threads=*/0, &rows, &sample);
#pragma once

#include <algorithm>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace dbf_tok {

struct Status {
  bool ok = true;
  std::string message;
  static Status Ok() { return {}; }
  static Status Error(std::string msg) { return {false, std::move(msg)}; }
};

// A token added on top of the vocab, as HuggingFace's AddedToken: matched whole before WordPiece,
// either in the raw text (normalized=false, as special tokens are) or in the normalized
// (cleaned, lower-cased, accent-stripped) text, leftmost then longest, one token each.
struct AddedToken {
  std::string content;
  int32_t id = -1;          // a vocab id, or any id >= the vocab size for a new token
  bool special = false;     // skipped by Decode(skip_special_tokens)
  bool normalized = true;   // matched in the normalized text (its content normalized alike)
  bool lstrip = false;      // the match takes the white space (Unicode White_Space) on its left
  bool rstrip = false;      // ... and on its right
  bool single_word = false; // matched only where no word character (regex \w) touches it
};

struct TokenizerOptions {
  bool do_lower_case = true;
  int strip_accents = -1;  // -1: follow do_lower_case (as BERT does), 0: never, 1: always
  bool tokenize_chinese_chars = true;
  bool do_basic_tokenize = true;  // false: only split on white space, no clean-up/casing
  std::vector<std::string> never_split;  // white-space delimited words kept as they are
  std::string unk_token = "[UNK]";
  std::string sep_token = "[SEP]";
  std::string pad_token = "[PAD]";
  std::string cls_token = "[CLS]";
  std::string mask_token = "[MASK]";
  // Further tokens matched whole in raw text before normalization (like special tokens).
  std::vector<std::string> extra_special_tokens;
  // Added tokens, in HF's order of precedence among equal matches (special ones first). An entry
  // whose content is one of the special tokens above replaces it (its flags win).
  std::vector<AddedToken> added_tokens;
  std::string continuing_subword_prefix = "##";
  int max_input_chars_per_word = 100;
  // false: the special tokens (named, extra, and special added tokens) are not matched in the
  // text, which is tokenized as plain text (HF's split_special_tokens / encode_special_tokens)
  bool match_special_tokens = true;
};

enum class Truncation { kNone, kLongestFirst, kOnlyFirst, kOnlySecond };
enum class Padding { kNone, kLongest, kMaxLength };
enum class Side { kRight, kLeft };

struct EncodeOptions {
  bool add_special_tokens = true;
  Truncation truncation = Truncation::kNone;
  int max_length = -1;  // required by truncation and by Padding::kMaxLength
  int stride = 0;
  Side truncation_side = Side::kRight;
  bool return_overflowing = false;
  Padding padding = Padding::kNone;
  int pad_to_multiple_of = 0;
  Side padding_side = Side::kRight;
  int pad_token_type_id = 0;
  // The most rows one call may produce (0: no limit). A pair's overflow windows combine as a
  // cross product (HF's order), so two long texts at a small max_length give quadratically many
  // rows; past this cap the call fails before any row is built.
  size_t max_rows = 0;
};

// One text, one pair of texts, or pre-split words (is_split_into_words).
struct Input {
  std::vector<std::string_view> first;   // one element unless pre-split
  std::vector<std::string_view> second;  // empty: no pair
  bool has_pair = false;
  bool pre_split = false;  // each element is a word: its tokens all take its word id
};

// The tokens of one sequence, without special tokens: ids, code point offsets into the text (of
// the word, for pre-split input) and word ids. Type, sequence id, attention and special-token
// masks follow from which sequence it is, so they are not stored.
struct Pieces {
  std::vector<int32_t> ids;
  std::vector<std::pair<int32_t, int32_t>> offsets;
  std::vector<int32_t> word_ids;
  // (index, text) of the few tokens shown otherwise than their id's text, sorted by index: an
  // lstrip / rstrip added token with the white space it took, as HF shows it (its text slice,
  // normalized for a normalized token). Empty unless such a match took white space.
  std::vector<std::pair<uint32_t, std::string>> shown;
  size_t size() const { return ids.size(); }
  void Push(int32_t id, std::pair<int32_t, int32_t> offset, int32_t word) {
    ids.push_back(id);
    offsets.push_back(offset);
    word_ids.push_back(word);
  }
  // The last token pushed is shown as text.
  void ShowLast(std::string text) { shown.emplace_back(static_cast<uint32_t>(ids.size() - 1), std::move(text)); }
  // Token k's text, if it is shown otherwise than its id's; nullptr if not.
  const std::string* Shown(size_t k) const {
    if (shown.empty()) return nullptr;
    auto it = std::lower_bound(shown.begin(), shown.end(), k,
                               [](const std::pair<uint32_t, std::string>& e, size_t v) { return e.first < v; });
    return it != shown.end() && it->first == k ? &it->second : nullptr;
  }
  void Resize(size_t n) {
    ids.resize(n);
    offsets.resize(n);
    word_ids.resize(n);
    while (!shown.empty() && shown.back().first >= n) shown.pop_back();
  }
};

// One row of output, every field materialised. offsets are code point indices into the original
// text (of the word, for pre-split input); word_ids and sequence_ids use -1 for "none" (special
// and padding tokens).
struct Encoding {
  std::vector<int32_t> ids, type_ids, special_tokens_mask, attention_mask;
  std::vector<std::pair<int32_t, int32_t>> offsets;
  std::vector<int32_t> word_ids, sequence_ids;
  size_t size() const { return ids.size(); }
  void Reserve(size_t n);
  void Push(int32_t id, int32_t type, int32_t special, std::pair<int32_t, int32_t> offset, int32_t word,
            int32_t sequence);
};

// The result of encoding a batch, kept compact: each input's Pieces once, and each row as the
// window [begin, end) of the first (and second) sequence it shows. A row holds only its five
// indices until it is written out, so the cross product of a pair's overflow windows costs
// 20 bytes a row here, not a copy of its tokens.
class EncodedBatch {
 public:
  struct Row {
    uint32_t input;                  // index of the input it comes from
    uint32_t a_begin, a_end;         // window of the first sequence
    uint32_t b_begin = 0, b_end = 0;  // window of the second (pairs only)
  };

  size_t num_rows() const { return rows_.size(); }
  size_t num_inputs() const { return inputs_.size(); }
  int32_t InputOfRow(size_t r) const { return static_cast<int32_t>(rows_[r].input); }
  bool HasPair(size_t r) const { return inputs_[rows_[r].input].has_pair; }
  // Tokens of row r before and after padding.
  size_t UnpaddedLength(size_t r) const {
    const Row& row = rows_[r];
    return (row.a_end - row.a_begin) + (row.b_end - row.b_begin) +
           (add_special_ ? (inputs_[row.input].has_pair ? 3 : 2) : 0);
  }
  size_t Length(size_t r) const { return std::max(UnpaddedLength(r), pad_to_); }
  size_t TotalTokens() const;

  // Writes row r, token by token in order, into a sink with three methods:
  //   Special(id, type)                    [CLS] or [SEP]
  //   Piece(pieces, sequence, begin, end)  tokens [begin, end) of sequence 0 or 1
  //   Pad(n, pad_id, pad_type)             n padding tokens
  // Each field writer (ids, masks, offsets, ...) is one such sink, so a writer reads only the
  // arrays it needs.
  template <typename Sink>
  void Emit(size_t r, Sink* sink) const {
    const Row& row = rows_[r];
    const auto& in = inputs_[row.input];
    size_t len = UnpaddedLength(r);
    size_t pad = pad_to_ > len ? pad_to_ - len : 0;
    if (pad && padding_side_ == Side::kLeft) sink->Pad(pad, pad_id_, pad_type_);
    if (add_special_) sink->Special(cls_id_, 0);
    sink->Piece(in.seq[0], 0, row.a_begin, row.a_end);
    if (add_special_) sink->Special(sep_id_, 0);
    if (in.has_pair) {
      sink->Piece(in.seq[1], 1, row.b_begin, row.b_end);
      if (add_special_) sink->Special(sep_id_, 1);
    }
    if (pad && padding_side_ == Side::kRight) sink->Pad(pad, pad_id_, pad_type_);
  }

  // Row r with every field (for tests, and per-row views such as word ids).
  Encoding MaterializeRow(size_t r) const;

 private:
  friend class Tokenizer;
  struct EncodedInput {
    Pieces seq[2];
    bool has_pair = false;
  };
  std::vector<EncodedInput> inputs_;
  std::vector<Row> rows_;
  bool add_special_ = true;
  int32_t cls_id_ = 0, sep_id_ = 0, pad_id_ = 0, pad_type_ = 0;
  size_t pad_to_ = 0;  // rows shorter than this are padded to it
  Side padding_side_ = Side::kRight;
};

class Tokenizer {
 public:
  // vocab[i] is the token of id i. Fails on an empty vocab, a duplicate token, or a special
  // token (unk/sep/pad/cls/mask) that the vocab lacks.
  static Status Create(std::vector<std::string> vocab, TokenizerOptions options, std::unique_ptr<Tokenizer>* out);
  ~Tokenizer();

  // Tokens and ids of one text, no special tokens added (HF's `tokenize` / `encode` without
  // special tokens). word_offset shifts word ids; the text is checked to be valid UTF-8.
  Status EncodeText(std::string_view text, int32_t word_offset, Encoding* out) const;
  // The same as Pieces (ids, offsets, word ids only), appended to out.
  Status EncodePieces(std::string_view text, Pieces* out) const;

  // Full encoding: special tokens, truncation with overflow windows, padding over the batch.
  // Rows follow their input (overflow windows after the first). num_threads <= 0 uses the
  // hardware concurrency; results never depend on it.
  Status Encode(const std::vector<Input>& inputs, const EncodeOptions& options, int num_threads,
                EncodedBatch* out) const;

  // The same with every row materialised: rows[i] and the input it comes from, sample_of_row[i].
  Status EncodeBatch(const std::vector<Input>& inputs, const EncodeOptions& options, int num_threads,
                     std::vector<Encoding>* rows, std::vector<int32_t>* sample_of_row) const;

  // WordPiece decoder: "##" pieces glued, others space-separated, " ." " ," ... cleaned up.
  Status Decode(const std::vector<int64_t>& ids, bool skip_special_tokens, std::string* out) const;

  // Added tokens first (by content), then the vocab.
  int32_t TokenToId(std::string_view token) const;  // -1 if absent
  // An added token's text (normalized if it is matched normalized, as HF shows it), else the
  // vocab's; nullptr if no token has this id.
  const std::string* IdToToken(int64_t id) const;
  // Token k of pieces as HF shows it in tokens(): the text it was matched with (an lstrip /
  // rstrip token's white space included), else IdToToken.
  const std::string* PieceToken(const Pieces& pieces, size_t k) const {
    const std::string* shown = pieces.Shown(k);
    return shown ? shown : IdToToken(pieces.ids[k]);
  }
  size_t VocabSize() const;                          // the vocab alone, without added tokens
  size_t NumIds() const;                             // one past the largest id (added tokens too)
  const std::vector<std::string>& Vocab() const;     // the vocab's tokens by id
  const std::vector<int32_t>& SpecialIds() const;    // ids of the special tokens, sorted
  int32_t cls_id() const;
  int32_t sep_id() const;
  int32_t pad_id() const;
  int32_t unk_id() const;
  int32_t NumSpecialTokensToAdd(bool pair) const { return pair ? 3 : 2; }

  struct Impl;

 private:
  explicit Tokenizer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// Threads for a job: num_threads (<= 0: the hardware concurrency), at most max_useful, at least 1.
int WorkerCount(int num_threads, size_t max_useful);
// Runs worker() on `threads` threads, the calling thread among them, and waits for all.
void RunWorkers(int threads, const std::function<void()>& worker);

// vocab.txt: one token per line, id = line number; "\r\n" line ends are accepted.
Status ReadVocabFile(const std::string& path, std::vector<std::string>* vocab);

// The WordPiece model and BertNormalizer settings of a tokenizer.json.
struct TokenizerJson {
  std::vector<std::string> vocab;  // by id
  std::string unk_token = "[UNK]";
  std::string continuing_subword_prefix = "##";
  int max_input_chars_per_word = 100;
  bool has_normalizer = false;
  bool lowercase = true;
  int strip_accents = -1;
  bool handle_chinese_chars = true;
  std::vector<AddedToken> added_tokens;  // with their ids and flags, as listed
};
Status ParseTokenizerJson(std::string_view json, TokenizerJson* out);
Status ReadTokenizerJson(const std::string& path, TokenizerJson* out);

// The Unicode versions the generated tables hold (see scripts/gen_unicode_tables.py).
std::string UnicodeVersions();

}  // namespace dbf_tok
