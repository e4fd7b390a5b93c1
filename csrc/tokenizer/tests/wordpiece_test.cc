// Table-driven unit tests of the C++ WordPiece core: each named case checks tokens, ids and
// offsets together. Run by ctest (make test-cpp) and by `make test`.
#include <cstdio>
#include <fstream>
#include <string>
#include <vector>

#include "wordpiece.h"

using namespace dbf_tok;

namespace {

int failures = 0;

#define EXPECT(cond, ...)                           \
  do {                                              \
    if (!(cond)) {                                  \
      ++failures;                                   \
      std::printf("FAIL %s:%d: ", __FILE__, __LINE__); \
      std::printf(__VA_ARGS__);                     \
      std::printf("\n");                            \
    }                                               \
  } while (0)

const std::vector<std::string> kVocab = {
    "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "un", "##aff", "##able", "hello", "world",  // 0-9
    ",", "!", "'", "s", "cafe", "naive", "istanbul", "ο", "##δ", "##ο",                         // 10-19
    "##σ", "##ς", "中", "文", "a", "##b", "ab", "x", "##x", "e",                                // 20-29
    "##ll", "he", "é", "i", "̇", "##̇", "mask", "[", "]", "hi",                                 // 30-39
};

std::unique_ptr<Tokenizer> Make(TokenizerOptions o = {}) {
  std::unique_ptr<Tokenizer> t;
  Status s = Tokenizer::Create(kVocab, o, &t);
  EXPECT(s.ok, "Create failed: %s", s.message.c_str());
  return t;
}

struct Case {
  const char* name;
  const char* text;
  std::vector<std::string> tokens;
  std::vector<std::pair<int, int>> offsets;  // code point offsets into text
};

std::string Join(const std::vector<std::string>& v) {
  std::string out;
  for (const auto& s : v) out += (out.empty() ? "" : " ") + s;
  return out;
}

void RunCases(const char* table, const Tokenizer& tok, const std::vector<Case>& cases) {
  for (const Case& c : cases) {
    Encoding e;
    Status s = tok.EncodeText(c.text, 0, &e);
    EXPECT(s.ok, "[%s] %s: status %s", table, c.name, s.message.c_str());
    std::vector<std::string> tokens;
    for (int32_t id : e.ids) tokens.push_back(*tok.IdToToken(id));
    EXPECT(tokens == c.tokens, "[%s] %s: tokens [%s], expected [%s]", table, c.name, Join(tokens).c_str(),
           Join(c.tokens).c_str());
    std::vector<int32_t> ids;
    for (const auto& t : c.tokens) ids.push_back(tok.TokenToId(t));
    EXPECT(e.ids == ids, "[%s] %s: ids differ from the tokens' ids", table, c.name);
    std::vector<std::pair<int, int>> offsets(e.offsets.begin(), e.offsets.end());
    EXPECT(offsets == c.offsets, "[%s] %s: offsets differ", table, c.name);
    for (size_t i = 0; i < offsets.size() && i < c.offsets.size(); ++i)
      if (offsets[i] != c.offsets[i])
        std::printf("    token %zu: (%d, %d), expected (%d, %d)\n", i, offsets[i].first, offsets[i].second,
                    c.offsets[i].first, c.offsets[i].second);
  }
}

void TestUncased() {
  auto tok = Make();
  RunCases("uncased", *tok, {
      {"1: greedy longest match with ##", "unaffable", {"un", "##aff", "##able"}, {{0, 2}, {2, 5}, {5, 9}}},
      {"2: punctuation split", "hello, world!", {"hello", ",", "world", "!"}, {{0, 5}, {5, 6}, {7, 12}, {12, 13}}},
      {"3: lower-case", "HeLLo WORLD", {"hello", "world"}, {{0, 5}, {6, 11}}},
      {"4: accent stripped, offsets kept", "Café naïve", {"cafe", "naive"}, {{0, 4}, {5, 10}}},
      {"5: a dropped trailing mark is outside the token", "cafe\u0301", {"cafe"}, {{0, 4}}},
      {"6: dotted capital I lower-cases after stripping", "İstanbul", {"istanbul"}, {{0, 8}}},
      {"7: final sigma is not special (Rust lower-casing)", "ΟΔΟΣ", {"ο", "##δ", "##ο", "##σ"},
       {{0, 1}, {1, 2}, {2, 3}, {3, 4}}},
      {"8: CJK characters are words of their own", "中文ab", {"中", "文", "ab"}, {{0, 1}, {1, 2}, {2, 4}}},
      {"9: unknown word becomes one [UNK]", "hello zzz", {"hello", "[UNK]"}, {{0, 5}, {6, 9}}},
      {"10: zero-width and control characters removed, offsets span them", "a\u200bb\x01", {"ab"}, {{0, 3}}},
      {"11: special tokens kept whole in raw text", "hi[MASK]hi [mask]", {"hi", "[MASK]", "hi", "[", "mask", "]"},
       {{0, 2}, {2, 8}, {8, 10}, {11, 12}, {12, 16}, {16, 17}}},
      {"12: no-break and ideographic spaces separate words", "a\u00a0x\u3000e", {"a", "x", "e"},
       {{0, 1}, {2, 3}, {4, 5}}},
      {"13: empty text", "", {}, {}},
      {"14: white space only", " \t\n\u2003 ", {}, {}},
      {"15: 100 characters is a word, 101 is [UNK]",
       "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx",
       {"[UNK]"}, {{0, 102}}},
      {"16: 4-byte characters count as one offset", "\U0001F600 hi", {"[UNK]", "hi"}, {{0, 1}, {2, 4}}},
      {"17: U+FFFD and NUL dropped", "\xEF\xBF\xBDhi", {"hi"}, {{1, 3}}},
  });
  // a word of exactly 100 characters is tokenized, not [UNK]
  std::string hundred = "a";
  for (int i = 0; i < 99; ++i) hundred += "x";
  Encoding e;
  EXPECT(tok->EncodeText(hundred, 0, &e).ok && e.size() == 100 && e.ids[0] == tok->TokenToId("a") &&
             e.offsets.back() == std::make_pair(99, 100),
         "a 100-character word is split into 100 pieces");
}

void TestVariants() {
  TokenizerOptions cased;
  cased.do_lower_case = false;
  RunCases("cased", *Make(cased), {
      {"1: case kept", "Hello hello", {"[UNK]", "hello"}, {{0, 5}, {6, 11}}},
      {"2: accents kept", "é e\u0301", {"é", "[UNK]"}, {{0, 1}, {2, 4}}},
  });
  TokenizerOptions lower_only;
  lower_only.strip_accents = 0;
  RunCases("lower, no strip", *Make(lower_only), {
      {"1: accents kept, lower-cased", "É", {"é"}, {{0, 1}}},
      {"2: U+0130 lower-cases to i + U+0307, both aligned to it", "İ", {"i", "##̇"}, {{0, 1}, {0, 1}}},
  });
  TokenizerOptions no_cjk;
  no_cjk.tokenize_chinese_chars = false;
  RunCases("no CJK split", *Make(no_cjk), {{"1: CJK run is one word, unknown as a whole", "中文", {"[UNK]"}, {{0, 2}}}});
  TokenizerOptions never;
  never.never_split = {"HeLLo!", "ab"};
  RunCases("never_split", *Make(never), {
      {"1: never_split chunk is one token or [UNK]", "HeLLo! hello! ab", {"[UNK]", "hello", "!", "ab"},
       {{0, 6}, {7, 12}, {12, 13}, {14, 16}}},
  });
}

void TestErrors() {
  std::unique_ptr<Tokenizer> t;
  EXPECT(!Tokenizer::Create({}, {}, &t).ok, "empty vocab is refused");
  auto dup = kVocab;
  dup.push_back("hello");
  Status s = Tokenizer::Create(dup, {}, &t);
  EXPECT(!s.ok && s.message.find("twice") != std::string::npos, "duplicate token is refused: %s", s.message.c_str());
  auto no_unk = kVocab;
  no_unk[1] = "[NOT_UNK]";
  s = Tokenizer::Create(no_unk, {}, &t);
  EXPECT(!s.ok && s.message.find("unk_token") != std::string::npos, "vocab without [UNK]: %s", s.message.c_str());
  auto tok = Make();
  Encoding e;
  for (const char* bad : {"\xff", "a\xc3", "\xed\xa0\x80", "\xc0\xaf", "\xf4\x90\x80\x80"}) {
    s = tok->EncodeText(bad, 0, &e);
    EXPECT(!s.ok && s.message.find("UTF-8") != std::string::npos, "invalid UTF-8 is refused");
  }
  std::string out;
  EXPECT(!tok->Decode({999}, false, &out).ok, "out-of-range id in decode is refused");
  TokenizerJson j;
  EXPECT(!ParseTokenizerJson("{\"model\": {\"vocab\": {\"a\": 0, \"b\": 0}}}", &j).ok, "duplicate json id refused");
  EXPECT(!ParseTokenizerJson("{\"model\": ", &j).ok, "truncated json refused");
  EXPECT(!ParseTokenizerJson("[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[", &j).ok,
         "deep json refused");
  s = ParseTokenizerJson("{\"model\": {\"type\": \"WordPiece\", \"vocab\": {\"[UNK]\": 1, \"\\u00e9\\ud83d\\ude00\": 0}}}", &j);
  EXPECT(s.ok && j.vocab.size() == 2 && j.vocab[0] == "\xc3\xa9\xf0\x9f\x98\x80" && j.vocab[1] == "[UNK]",
         "json escapes decode: %s", s.message.c_str());
  std::vector<std::string> v;
  EXPECT(!ReadVocabFile("/nonexistent/vocab.txt", &v).ok, "missing vocab file refused");
}

std::vector<std::string> Tokens(const Tokenizer& tok, const Encoding& e) {
  std::vector<std::string> out;
  for (int32_t id : e.ids) out.push_back(*tok.IdToToken(id));
  return out;
}

void TestBatch() {
  auto tok = Make();
  std::vector<Input> inputs(2);
  inputs[0].first = {"hello world hello world"};
  inputs[0].second = {"hi hi"};
  inputs[0].has_pair = true;
  inputs[1].first = {"hi"};
  inputs[1].second = {"ab"};
  inputs[1].has_pair = true;
  EncodeOptions o;
  o.truncation = Truncation::kLongestFirst;
  o.max_length = 7;
  o.stride = 1;
  o.return_overflowing = true;
  o.padding = Padding::kLongest;
  std::vector<Encoding> rows;
  std::vector<int32_t> sample;
  Status s = tok->EncodeBatch(inputs, o, 2, &rows, &sample);
  EXPECT(s.ok, "batch: %s", s.message.c_str());
  // 4 tokens for the pair: the longer (4) is cut to 2 with stride 1 -> windows 0-2, 1-3, 2-4
  std::vector<std::vector<std::string>> expected = {
      {"[CLS]", "hello", "world", "[SEP]", "hi", "hi", "[SEP]"},
      {"[CLS]", "world", "hello", "[SEP]", "hi", "hi", "[SEP]"},
      {"[CLS]", "hello", "world", "[SEP]", "hi", "hi", "[SEP]"},
      {"[CLS]", "hi", "[SEP]", "ab", "[SEP]", "[PAD]", "[PAD]"},
  };
  EXPECT(rows.size() == expected.size(), "batch: %zu rows", rows.size());
  for (size_t i = 0; i < rows.size() && i < expected.size(); ++i)
    EXPECT(Tokens(*tok, rows[i]) == expected[i], "batch row %zu: [%s]", i, Join(Tokens(*tok, rows[i])).c_str());
  EXPECT((sample == std::vector<int32_t>{0, 0, 0, 1}), "overflow_to_sample_mapping");
  EXPECT((rows[3].attention_mask == std::vector<int32_t>{1, 1, 1, 1, 1, 0, 0}), "attention mask of padded row");
  EXPECT((rows[3].type_ids == std::vector<int32_t>{0, 0, 0, 1, 1, 0, 0}), "type ids of padded row");
  EXPECT((rows[0].word_ids == std::vector<int32_t>{-1, 0, 1, -1, 0, 1, -1}), "word ids");

  // the same on one thread
  std::vector<Encoding> rows1;
  std::vector<int32_t> sample1;
  EXPECT(tok->EncodeBatch(inputs, o, 1, &rows1, &sample1).ok, "batch on one thread");
  for (size_t i = 0; i < rows.size() && i < rows1.size(); ++i) EXPECT(rows[i].ids == rows1[i].ids, "thread-independent");

  o.stride = 2;  // not below the 2 tokens kept
  s = tok->EncodeBatch(inputs, o, 1, &rows, &sample);
  EXPECT(!s.ok && s.message.find("stride") != std::string::npos, "stride too large: %s", s.message.c_str());
  o.stride = 0;
  o.max_length = 2;  // fewer than the 3 special tokens of a pair
  s = tok->EncodeBatch(inputs, o, 1, &rows, &sample);
  EXPECT(!s.ok && s.message.find("special tokens") != std::string::npos, "max_length too small: %s", s.message.c_str());

  // left padding to a multiple of 4, left truncation
  EncodeOptions left;
  left.padding = Padding::kLongest;
  left.padding_side = Side::kLeft;
  left.pad_to_multiple_of = 4;
  left.truncation = Truncation::kLongestFirst;
  left.truncation_side = Side::kLeft;
  left.max_length = 4;
  std::vector<Input> one(1);
  one[0].first = {"hello world hi ab"};
  EXPECT(tok->EncodeBatch(one, left, 1, &rows, &sample).ok, "left options");
  EXPECT((Tokens(*tok, rows[0]) == std::vector<std::string>{"[CLS]", "hi", "ab", "[SEP]"}), "left truncation: [%s]",
         Join(Tokens(*tok, rows[0])).c_str());
  one[0].first = {"hi"};
  EXPECT(tok->EncodeBatch(one, left, 1, &rows, &sample).ok, "left padding");
  EXPECT((Tokens(*tok, rows[0]) == std::vector<std::string>{"[PAD]", "[CLS]", "hi", "[SEP]"}), "left padding: [%s]",
         Join(Tokens(*tok, rows[0])).c_str());
}

void TestCompactOverflowRows() {
  // Test: a pair's overflow windows cross (HF's order) without copying tokens into every row, and
  // the cap on rows fails the call before building them.
  auto tok = Make();
  std::string first(300, '!'), second(400, '!');  // every '!' is a token of its own
  std::vector<Input> inputs(1);
  inputs[0].first = {first};
  inputs[0].second = {second};
  inputs[0].has_pair = true;
  EncodeOptions o;
  o.truncation = Truncation::kLongestFirst;
  o.max_length = 5;  // 3 special tokens + 1 token of each text per row
  o.return_overflowing = true;
  EncodedBatch batch;
  Status s = tok->Encode(inputs, o, 2, &batch);
  EXPECT(s.ok, "cross product: %s", s.message.c_str());
  EXPECT(batch.num_rows() == 300u * 400u, "300 x 400 windows: %zu rows", batch.num_rows());
  EXPECT(batch.TotalTokens() == 300u * 400u * 5u, "5 tokens a row: %zu", batch.TotalTokens());
  // HF's order: (a0,b0), then (a1,b0..b399), ..., then (a0,b1..b399); offsets show the window
  Encoding row1 = batch.MaterializeRow(1), last = batch.MaterializeRow(batch.num_rows() - 1);
  EXPECT((row1.offsets == std::vector<std::pair<int32_t, int32_t>>{{0, 0}, {1, 2}, {0, 0}, {0, 1}, {0, 0}}),
         "row 1 is (a1, b0)");
  EXPECT(last.offsets[1] == std::make_pair(0, 1) && last.offsets[3] == std::make_pair(399, 400),
         "last row is (a0, b399)");
  EXPECT((row1.sequence_ids == std::vector<int32_t>{-1, 0, -1, 1, -1}), "sequence ids of a row");
  o.max_rows = 100000;
  s = tok->Encode(inputs, o, 2, &batch);
  EXPECT(!s.ok && s.message.find("max_rows=100000") != std::string::npos &&
             s.message.find("300 windows of the text x 400") != std::string::npos,
         "the cap names itself and the cross product: %s", s.message.c_str());
  o.return_overflowing = false;  // one row per input: far below the cap
  EXPECT(tok->Encode(inputs, o, 1, &batch).ok && batch.num_rows() == 1, "no overflow, one row");
}

void TestDecode() {
  auto tok = Make();
  std::string out;
  std::vector<int64_t> ids = {2, 8, 10, 9, 11, 3, 5, 6, 7};  // [CLS] hello , world ! [SEP] un ##aff ##able
  EXPECT(tok->Decode(ids, false, &out).ok && out == "[CLS] hello, world! [SEP] unaffable", "decode: '%s'", out.c_str());
  EXPECT(tok->Decode(ids, true, &out).ok && out == "hello, world! unaffable", "decode skipping specials: '%s'",
         out.c_str());
  EXPECT(tok->Decode({6, 24}, false, &out).ok && out == "##aff a", "leading ## kept: '%s'", out.c_str());
}

AddedToken Added(std::string content, int32_t id, bool normalized, bool special = false, bool lstrip = false,
                 bool rstrip = false) {
  AddedToken t;
  t.content = std::move(content);
  t.id = id;
  t.normalized = normalized;
  t.special = special;
  t.lstrip = lstrip;
  t.rstrip = rstrip;
  return t;
}

void TestAddedTokens() {
  TokenizerOptions o;
  o.added_tokens = {Added("[RAW]", 42, false, true, true), Added("<new>", 40, true), Added("Big", 41, true),
                    Added("hello", 8, true), Added("<new>x", 43, true, false, false, true)};
  auto tok = Make(o);
  RunCases("added", *tok, {
      {"1: normalized token matched in the lower-cased text", "a <NEW> x", {"a", "<new>", "x"},
       {{0, 1}, {2, 7}, {8, 9}}},
      {"2: inside a word, accent stripped", "x<néw>a", {"x", "<new>", "a"}, {{0, 1}, {1, 6}, {6, 7}}},
      {"3: raw token needs its exact text; lstrip takes the space", "[raw] [RAW]", {"[", "[UNK]", "]", "[RAW]"},
       {{0, 1}, {1, 4}, {4, 5}, {5, 11}}},
      {"4: an added vocab token splits words", "hellohello", {"hello", "hello"}, {{0, 5}, {5, 10}}},
      {"5: longest match first, rstrip takes the spaces", "<new>x  a<new>", {"<new>x", "a", "<new>"},
       {{0, 8}, {8, 9}, {9, 14}}},
      {"6: special tokens still whole", "[MASK]<new>", {"[MASK]", "<new>"}, {{0, 6}, {6, 11}}},
      {"7: no added token: unchanged", "unaffable, world!", {"un", "##aff", "##able", ",", "world", "!"},
       {{0, 2}, {2, 5}, {5, 9}, {9, 10}, {11, 16}, {16, 17}}},
  });
  Encoding e;
  EXPECT(tok->EncodeText("BIG big", 0, &e).ok && e.ids == std::vector<int32_t>({41, 41}) &&
             *tok->IdToToken(41) == "big" && tok->TokenToId("Big") == 41 && tok->TokenToId("big") == -1,
         "a normalized token's content is normalized too, and shown so");
  EXPECT(tok->VocabSize() == kVocab.size() && tok->NumIds() == 44, "NumIds %zu", tok->NumIds());
  std::string out;
  EXPECT(tok->Decode({2, 40, 42, 8, 3}, true, &out).ok && out == "<new> hello", "decode skipping specials: '%s'",
         out.c_str());
  EXPECT(!tok->Decode({44}, false, &out).ok, "id past the added tokens is refused");

  // match_special_tokens = false (HF's split_special_tokens): the special tokens are plain text
  TokenizerOptions split = o;
  split.match_special_tokens = false;
  RunCases("split_special_tokens", *Make(split), {
      {"1: named and added special tokens split, other added tokens still matched", "[MASK]<new> [RAW]",
       {"[", "mask", "]", "<new>", "[", "[UNK]", "]"},
       {{0, 1}, {1, 5}, {5, 6}, {6, 11}, {12, 13}, {13, 16}, {16, 17}}},
  });

  // the next match is looked for where the last one ended, not after the white space rstrip
  // took: here the CJK token's padding space, which "<new>x" also took (HF's overlapping splits)
  TokenizerOptions cjk = o;
  cjk.added_tokens.push_back(Added("中", 22, true));
  auto with_cjk = Make(cjk);
  Encoding overlap;
  EXPECT((with_cjk->EncodeText("<new>x中", 0, &overlap).ok && overlap.ids == std::vector<int32_t>({43, 22}) &&
          overlap.offsets == std::vector<std::pair<int32_t, int32_t>>({{0, 7}, {6, 7}}) &&
          *with_cjk->IdToToken(22) == " 中 "),
         "rstrip, then a match in the white space it took");

  // single_word: matched only where no word character touches it, in the raw or normalized text
  TokenizerOptions single;
  single.added_tokens = {Added("x", 27, true), Added("[RAW]", 42, false)};
  single.added_tokens[0].single_word = single.added_tokens[1].single_word = true;
  RunCases("single_word", *Make(single), {
      {"1: alone, next to punctuation, not inside words", "X,x ax xa x_ [RAW]a [RAW]!",
       {"x", ",", "x", "a", "##x", "[UNK]", "x", "[UNK]", "[", "[UNK]", "]", "a", "[RAW]", "!"},
       {{0, 1}, {1, 2}, {2, 3}, {4, 5}, {5, 6}, {7, 9}, {10, 11}, {11, 12}, {13, 14}, {14, 17}, {17, 18}, {18, 19},
        {20, 25}, {25, 26}}},
  });

  std::unique_ptr<Tokenizer> t;
  TokenizerOptions bad;
  bad.added_tokens = {Added("\u0301", 40, true)};
  EXPECT(!Tokenizer::Create(kVocab, bad, &t).ok, "a token empty once normalized is refused");
  bad.added_tokens = {Added("<a>", 40, true), Added("<b>", 40, true)};
  EXPECT(!Tokenizer::Create(kVocab, bad, &t).ok, "two tokens with one id are refused");
  bad.added_tokens = {Added("<a>", 40, true), Added("<a>", 41, true)};
  EXPECT(!Tokenizer::Create(kVocab, bad, &t).ok, "one token with two ids is refused");
}

void TestOnePreSplitWord() {
  auto tok = Make();
  std::vector<Input> inputs(1);
  inputs[0].first = {"hello,world"};
  inputs[0].pre_split = true;
  std::vector<Encoding> rows;
  std::vector<int32_t> sample;
  EXPECT(tok->EncodeBatch(inputs, {}, 1, &rows, &sample).ok &&
             rows[0].word_ids == std::vector<int32_t>({-1, 0, 0, 0, -1}),
         "one pre-split word: all its tokens are word 0");
}

}  // namespace

int main() {
  TestUncased();
  TestVariants();
  TestErrors();
  TestBatch();
  TestCompactOverflowRows();
  TestDecode();
  TestAddedTokens();
  TestOnePreSplitWord();
  if (failures) {
    std::printf("%d check(s) failed\n", failures);
    return 1;
  }
  std::printf("all wordpiece checks passed\n");
  return 0;
}
