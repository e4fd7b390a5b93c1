// Fuzz target of the WordPiece core: arbitrary bytes as text (valid or not), as a text pair, as
// token ids to decode, and as a tokenizer.json, under every option the first bytes pick. Checks
// the invariants a caller relies on (ids in range, offsets inside the text and ordered, padding
// and truncation lengths) besides what AddressSanitizer / UBSan catch.
//
// With clang: libFuzzer (coverage-guided). With gcc: fuzz_driver.cc supplies main().
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "wordpiece.h"

using namespace dbf_tok;

namespace {

#define FUZZ_CHECK(cond)                                                  \
  do {                                                                    \
    if (!(cond)) {                                                        \
      std::fprintf(stderr, "fuzz invariant failed: %s (%s:%d)\n", #cond, __FILE__, __LINE__); \
      std::abort();                                                       \
    }                                                                     \
  } while (0)

const std::vector<std::string> kVocab = {
    "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "##a", "b", "##b", "ab", "##ab", "é", "##é", "中", "!",
    ",", "i", "##̇", "ς", "σ", "##σ", "\xF0\x9F\x98\x80", "the", "##s", "x", "##x"};

const Tokenizer& Get(int variant) {
  static std::unique_ptr<Tokenizer> toks[8];
  if (!toks[variant]) {
    TokenizerOptions o;
    o.do_lower_case = variant & 1;
    o.strip_accents = (variant & 2) ? 1 : -1;
    o.tokenize_chinese_chars = !(variant & 4);
    if (variant == 7) o.never_split = {"ab!", "[X]"};
    if (variant == 6) o.do_basic_tokenize = false;
    if (variant == 3 || variant == 7) {  // added tokens: new ids, vocab ids, raw and normalized, strips
      auto added = [](const char* content, int32_t id, bool normalized, bool lstrip, bool rstrip) {
        AddedToken t;
        t.content = content;
        t.id = id;
        t.normalized = normalized;
        t.lstrip = lstrip;
        t.rstrip = rstrip;
        return t;
      };
      o.added_tokens = {added("<x>", 26, true, false, false), added("ab", 9, true, true, false),
                        added("\xCE\xA3!", 27, false, true, true), added("\xE4\xB8\xAD" "b", 28, true, false, true),
                        added("a a", 30, true, true, true), added("[X]", 31, false, false, false)};
      o.added_tokens[0].single_word = o.added_tokens.back().single_word = true;
    }
    if (!Tokenizer::Create(kVocab, o, &toks[variant]).ok) std::abort();
  }
  return *toks[variant];
}

size_t CodePoints(const std::string& s) {
  size_t n = 0;
  for (unsigned char c : s) n += (c & 0xC0) != 0x80;
  return n;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 4) return 0;
  const uint8_t flags = data[0], lim = data[1], strd = data[2], split = data[3];
  std::string text(reinterpret_cast<const char*>(data + 4), size - 4);
  const Tokenizer& tok = Get(flags & 7);

  Encoding e;
  Status s = tok.EncodeText(text, 0, &e);
  if (s.ok) {
    size_t n = CodePoints(text);
    for (size_t i = 0; i < e.size(); ++i) {
      FUZZ_CHECK(e.ids[i] >= 0 && static_cast<size_t>(e.ids[i]) < tok.NumIds());
      FUZZ_CHECK(e.offsets[i].first >= 0 && e.offsets[i].first < e.offsets[i].second);
      FUZZ_CHECK(static_cast<size_t>(e.offsets[i].second) <= n);
      if (i) FUZZ_CHECK(e.offsets[i].first >= e.offsets[i - 1].first);
    }
    std::vector<int64_t> ids(e.ids.begin(), e.ids.end());
    std::string decoded;
    FUZZ_CHECK(tok.Decode(ids, flags & 8, &decoded).ok);
  }

  // the same bytes as a pair, batched, with truncation / overflow / padding from the header
  size_t cut = text.empty() ? 0 : split % (text.size() + 1);
  std::vector<Input> inputs(2);
  inputs[0].first = {std::string_view(text).substr(0, cut)};
  inputs[0].second = {std::string_view(text).substr(cut)};
  inputs[0].has_pair = flags & 16;
  inputs[1].first = {std::string_view(text).substr(cut), std::string_view(text).substr(0, cut)};  // pre-split
  inputs[1].pre_split = true;
  EncodeOptions o;
  o.truncation = static_cast<Truncation>((flags >> 5) & 3);
  o.max_length = lim % 40;
  o.stride = strd % 8;
  o.return_overflowing = flags & 128;
  o.padding = static_cast<Padding>(lim >> 6 < 3 ? lim >> 6 : 0);
  o.pad_to_multiple_of = (strd >> 4) % 5;
  o.padding_side = (strd & 8) ? Side::kLeft : Side::kRight;
  o.truncation_side = (split & 1) ? Side::kLeft : Side::kRight;
  o.add_special_tokens = !(split & 2);
  // a pair's overflow windows multiply: the cap bounds the rows (and the memory) of one call
  o.max_rows = 1 << 16;
  EncodedBatch batch;
  s = tok.Encode(inputs, o, 1 + (split >> 7), &batch);
  if (!s.ok && s.message.find("max_rows") != std::string::npos) FUZZ_CHECK(o.return_overflowing);
  if (s.ok) {
    size_t n_rows = batch.num_rows();
    FUZZ_CHECK(n_rows >= 2 && n_rows <= o.max_rows);
    size_t total = 0;
    // HF pads to the longest main row (the first row of each input); longer overflow windows stay
    size_t longest = 0;
    for (size_t k = 0; k < n_rows; ++k) {
      total += batch.Length(k);
      if (k) FUZZ_CHECK(batch.InputOfRow(k) >= batch.InputOfRow(k - 1));
      if (k == 0 || batch.InputOfRow(k) != batch.InputOfRow(k - 1)) longest = std::max(longest, batch.Length(k));
    }
    FUZZ_CHECK(total == batch.TotalTokens());
    // every row materialised where that stays cheap, and once more through EncodeBatch
    std::vector<Encoding> rows;
    std::vector<int32_t> sample;
    if (n_rows <= 4096) {
      FUZZ_CHECK(tok.EncodeBatch(inputs, o, 1, &rows, &sample).ok && rows.size() == n_rows);
    }
    for (size_t k = 0; k < rows.size(); ++k) {
      const Encoding& r = rows[k];
      FUZZ_CHECK(sample[k] == batch.InputOfRow(k) && r.size() == batch.Length(k));
      FUZZ_CHECK(r.type_ids.size() == r.size() && r.attention_mask.size() == r.size() && r.offsets.size() == r.size() &&
                 r.word_ids.size() == r.size() && r.sequence_ids.size() == r.size() &&
                 r.special_tokens_mask.size() == r.size());
      // truncated rows fit max_length, except where a sequence is cut to 0 tokens: then HF's one
      // overflow window of it is the whole sequence (max_length at most the special tokens + 1)
      size_t specials = !o.add_special_tokens ? 0 : inputs[sample[k]].has_pair ? 3 : 2;
      if (o.truncation != Truncation::kNone && o.padding == Padding::kNone &&
          static_cast<size_t>(o.max_length) > specials + 1 && r.size() > static_cast<size_t>(o.max_length)) {
        std::fprintf(stderr, "row %zu of sample %d has %zu tokens > max_length %d (truncation %d, stride %d, pair %d)\n",
                     k, sample[k], r.size(), o.max_length, static_cast<int>(o.truncation), o.stride,
                     static_cast<int>(inputs[sample[k]].has_pair));
        FUZZ_CHECK(false);
      }
      bool main_row = k == 0 || sample[k] != sample[k - 1];
      if (o.padding == Padding::kLongest && !o.pad_to_multiple_of)
        FUZZ_CHECK(r.size() == longest || (!main_row && r.size() > longest));
      for (size_t t = 0; t < r.size(); ++t) {
        FUZZ_CHECK(r.ids[t] >= 0 && static_cast<size_t>(r.ids[t]) < tok.NumIds());
        FUZZ_CHECK(r.special_tokens_mask[t] == (r.sequence_ids[t] < 0 ? 1 : 0));
        FUZZ_CHECK(r.attention_mask[t] == 0 || r.attention_mask[t] == 1);
      }
    }
  }

  // the bytes as a tokenizer.json, and as little-endian token ids
  TokenizerJson j;
  (void)ParseTokenizerJson(text, &j);
  std::vector<int64_t> ids;
  for (size_t i = 0; i + 1 < text.size(); i += 2) ids.push_back(static_cast<uint8_t>(text[i]) % 30);
  std::string decoded;
  (void)tok.Decode(ids, flags & 8, &decoded);
  return 0;
}
