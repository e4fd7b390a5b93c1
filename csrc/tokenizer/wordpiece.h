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

#include <cstdint>
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
  std::string continuing_subword_prefix = "##";
  int max_input_chars_per_word = 100;
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
};

// One text, one pair of texts, or pre-split words (is_split_into_words).
struct Input {
  std::vector<std::string_view> first;   // one element unless pre-split
  std::vector<std::string_view> second;  // empty: no pair
  bool has_pair = false;
};

// One row of output. offsets are code point indices into the original text (of the word, for
// pre-split input); word_ids and sequence_ids use -1 for "none" (special and padding tokens).
struct Encoding {
  std::vector<int32_t> ids, type_ids, special_tokens_mask, attention_mask;
  std::vector<std::pair<int32_t, int32_t>> offsets;
  std::vector<int32_t> word_ids, sequence_ids;
  size_t size() const { return ids.size(); }
  void Reserve(size_t n);
  void Push(int32_t id, int32_t type, int32_t special, std::pair<int32_t, int32_t> offset, int32_t word,
            int32_t sequence);
  void AppendRange(const Encoding& from, size_t begin, size_t end);
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

  // Full encoding: special tokens, truncation with overflow windows, padding over the batch.
  // rows gets every row (overflow windows follow their sample); sample_of_row maps each row to
  // its input. num_threads <= 0 uses the hardware concurrency; results never depend on it.
  Status EncodeBatch(const std::vector<Input>& inputs, const EncodeOptions& options, int num_threads,
                     std::vector<Encoding>* rows, std::vector<int32_t>* sample_of_row) const;

  // WordPiece decoder: "##" pieces glued, others space-separated, " ." " ," ... cleaned up.
  Status Decode(const std::vector<int64_t>& ids, bool skip_special_tokens, std::string* out) const;

  int32_t TokenToId(std::string_view token) const;  // -1 if absent
  const std::string* IdToToken(int64_t id) const;   // nullptr if out of range
  size_t VocabSize() const;
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
  std::vector<std::pair<std::string, bool>> added_tokens;  // (content, special)
};
Status ParseTokenizerJson(std::string_view json, TokenizerJson* out);
Status ReadTokenizerJson(const std::string& path, TokenizerJson* out);

// The Unicode versions the generated tables hold (see scripts/gen_unicode_tables.py).
std::string UnicodeVersions();

}  // namespace dbf_tok
