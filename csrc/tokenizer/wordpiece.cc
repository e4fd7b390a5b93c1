// BERT WordPiece tokenization matching HuggingFace's Rust tokenizer; see wordpiece.h.
#include "wordpiece.h"

#include <algorithm>
#include <atomic>
#include <cstring>
#include <functional>
#include <thread>
#include <unordered_map>
#include <unordered_set>

#include "unicode.h"

namespace dbf_tok {
namespace {

using unicode::CharRecord;

// Open-addressing hash map from byte strings (kept in one pool) to ids: the WordPiece inner loop
// looks up many short substrings, so it avoids std::string allocations and node-based buckets.
class PieceMap {
 public:
  void Build(const std::vector<std::pair<std::string, int32_t>>& entries) {
    size_t cap = 16;
    while (cap < entries.size() * 2 + 1) cap <<= 1;
    slots_.assign(cap, Slot{});
    mask_ = cap - 1;
    for (const auto& [key, id] : entries) {
      max_len_ = std::max(max_len_, key.size());
      size_t i = Hash(key) & mask_;
      while (slots_[i].id >= 0) i = (i + 1) & mask_;
      slots_[i] = Slot{static_cast<uint32_t>(pool_.size()), static_cast<uint32_t>(key.size()), id};
      pool_.append(key);
    }
  }
  int32_t Find(std::string_view key) const {
    if (slots_.empty()) return -1;
    size_t i = Hash(key) & mask_;
    while (true) {
      const Slot& s = slots_[i];
      if (s.id < 0) return -1;
      if (s.len == key.size() && std::memcmp(pool_.data() + s.at, key.data(), key.size()) == 0) return s.id;
      i = (i + 1) & mask_;
    }
  }
  size_t max_len() const { return max_len_; }

 private:
  struct Slot {
    uint32_t at = 0, len = 0;
    int32_t id = -1;
  };
  static size_t Hash(std::string_view s) {  // FNV-1a, then a final mix for the low bits
    uint64_t h = 1469598103934665603ull;
    for (unsigned char c : s) h = (h ^ c) * 1099511628211ull;
    h ^= h >> 29;
    return static_cast<size_t>(h * 0xbf58476d1ce4e5b9ull >> 17);
  }
  std::vector<Slot> slots_;
  std::string pool_;
  size_t mask_ = 0, max_len_ = 0;
};

// A word after normalization: its UTF-8 bytes, and for each character the byte where it starts
// and the index of the original character it came from.
struct Word {
  std::string bytes;
  std::vector<uint32_t> char_at;  // byte offset of each character, plus a final bytes.size()
  std::vector<int32_t> origin;    // original character index of each character
  void Clear() {
    bytes.clear();
    char_at.clear();
    origin.clear();
  }
  bool Empty() const { return origin.empty(); }
  void Add(char32_t cp, int32_t orig) {
    char_at.push_back(static_cast<uint32_t>(bytes.size()));
    origin.push_back(orig);
    unicode::AppendUtf8(cp, &bytes);
  }
};

// Patterns found leftmost, then longest (HF's Aho-Corasick with MatchKind::LeftmostLongest): a
// trie of symbols, bytes of the raw text or code points of the normalized text. Of two equal
// patterns the first inserted keeps its place, as the first of HF's pattern list wins.
template <typename Sym>
class Trie {
 public:
  template <typename Seq>
  void Insert(const Seq& pattern, int32_t value) {
    if (nodes_.empty()) nodes_.emplace_back();
    int32_t node = 0;
    for (Sym c : pattern) {
      auto& children = nodes_[node].children;
      auto it = std::lower_bound(children.begin(), children.end(), std::make_pair(c, int32_t{-1}));
      if (it != children.end() && it->first == c) {
        node = it->second;
      } else {
        int32_t next = static_cast<int32_t>(nodes_.size());
        children.insert(it, {c, next});
        nodes_.emplace_back();
        node = next;
      }
    }
    if (nodes_[node].value < 0) nodes_[node].value = value;
    Sym first = *std::begin(pattern);
    if (static_cast<uint32_t>(first) < 256) first_[static_cast<uint32_t>(first)] = true;
    else high_first_ = true;
  }
  bool empty() const { return nodes_.empty(); }
  // The longest pattern that text (n symbols, at(k) the k-th) starts with: its value and length
  // in symbols, or value -1.
  template <typename At>
  std::pair<int32_t, size_t> Longest(size_t n, At at) const {
    Sym c = at(0);
    if (static_cast<uint32_t>(c) < 256 ? !first_[static_cast<uint32_t>(c)] : !high_first_) return {-1, 0};
    int32_t node = 0, value = -1;
    size_t len = 0;
    for (size_t k = 0; k < n; ++k) {
      const auto& children = nodes_[node].children;
      Sym s = at(k);
      auto it = std::lower_bound(children.begin(), children.end(), std::make_pair(s, int32_t{-1}));
      if (it == children.end() || it->first != s) break;
      node = it->second;
      if (nodes_[node].value >= 0) value = nodes_[node].value, len = k + 1;
    }
    return {value, len};
  }

 private:
  struct Node {
    std::vector<std::pair<Sym, int32_t>> children;  // sorted by symbol
    int32_t value = -1;
  };
  std::vector<Node> nodes_;
  bool first_[256] = {};
  bool high_first_ = false;
};

// Unicode White_Space, what the regex \s of HF's lstrip / rstrip takes.
bool IsRegexSpace(char32_t c) {
  return (c >= 0x09 && c <= 0x0D) || c == 0x20 || c == 0x85 || c == 0xA0 || c == 0x1680 ||
         (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 || c == 0x202F || c == 0x205F || c == 0x3000;
}

}  // namespace

struct Tokenizer::Impl {
  TokenizerOptions opt;
  bool strip = false;  // accent stripping (NFD, drop Mn)
  std::vector<std::string> vocab;
  PieceMap initial, continuation;  // continuation keys are without the "##" prefix
  std::unordered_set<std::string> never_split;
  // Special and added tokens: what a match gives, the tries that find them in the raw and in the
  // normalized text (values index `matches`), their ids by content, and the texts of the ids
  // they define or show differently from the vocab (sorted by id).
  struct Match {
    int32_t id;
    bool lstrip, rstrip, single_word;
  };
  std::vector<Match> matches;
  Trie<unsigned char> raw_trie;
  Trie<char32_t> normalized_trie;
  std::unordered_map<std::string, int32_t> added_ids;
  std::vector<std::pair<int32_t, std::string>> id_texts;
  size_t num_ids = 0;
  std::vector<int32_t> special_ids;   // sorted
  int32_t unk = -1, cls = -1, sep = -1, pad = -1;

  struct Pending {
    char32_t cp;
    int32_t orig;
    bool consumes;  // first character of its decomposition
  };
  struct NormChar {  // a character of the normalized text
    char32_t cp;
    int32_t orig;   // the original character it comes from
    uint8_t flags;  // its unicode flags
  };
  struct Scratch {
    Word word;
    std::vector<Pending> pending;
    std::vector<int32_t> consumed;
    std::vector<NormChar> normalized;  // a segment's normalized text, when added tokens are matched in it
  };

  // Appends the pieces of one word to out.
  void WordPiece(const Word& w, int32_t word_id, Pieces* out) const {
    size_t n = w.origin.size();
    auto whole_word_unk = [&] { out->Push(unk, {w.origin.front(), w.origin.back() + 1}, word_id); };
    if (n > static_cast<size_t>(opt.max_input_chars_per_word)) return whole_word_unk();
    size_t first = out->size();
    size_t start = 0;
    while (start < n) {
      const PieceMap& map = start == 0 ? initial : continuation;
      uint32_t begin_byte = w.char_at[start];
      size_t end = n;
      // skip ends whose piece is longer than any vocab entry
      while (end > start && w.char_at[end] - begin_byte > map.max_len()) --end;
      int32_t id = -1;
      for (; end > start; --end) {
        id = map.Find(std::string_view(w.bytes).substr(begin_byte, w.char_at[end] - begin_byte));
        if (id >= 0) break;
      }
      if (id < 0) {
        // no piece matches here: the whole word becomes [UNK]
        out->Resize(first);
        return whole_word_unk();
      }
      out->Push(id, {w.origin[start], w.origin[end - 1] + 1}, word_id);
      start = end;
    }
  }

  // HF's BertNormalizer over text, whose first character has index first_char: clean-up and CJK
  // spacing per character, NFD (with canonical reordering of marks) and Mn removal,
  // lower-casing. Calls emit(cp, flags, orig) for each normalized character (flags: its unicode
  // flags; orig: the original character it comes from); with kNeverSplit, a never_split chunk
  // calls whole(begin, end, id) in its place instead.
  template <bool kNeverSplit, typename Emit, typename Whole>
  Status Normalize(std::string_view text, int32_t first_char, Scratch* scratch, Emit&& emit, Whole&& whole) const {
    auto& pending = scratch->pending;  // NFD output awaiting canonical reordering
    auto& consumed = scratch->consumed;
    int32_t last_consumed = first_char;
    pending.clear();
    // last stage: lower-case
    auto lower = [&](char32_t cp, int32_t orig) {
      const CharRecord& rec = unicode::Lookup(cp);
      if (!opt.do_lower_case || !(rec.flags & unicode::kHasLower)) return emit(cp, rec.flags, orig);
      const char32_t* lowered = unicode::kPool + rec.lower_at;
      for (size_t m = 0; m < rec.lower_len; ++m) emit(lowered[m], unicode::Lookup(lowered[m]).flags, orig);
    };
    // NFD reorders each run of marks by combining class. Alignment as HF's NormalizedString
    // computes it: the first character of each decomposition "consumes" the next source
    // character in order, the other characters take the alignment of the last consumed one.
    auto flush_pending = [&] {
      size_t n = pending.size();
      if (n == 0) return;
      consumed.clear();
      for (const Pending& p : pending)
        if (p.consumes) consumed.push_back(p.orig);
      for (size_t i = 0; i < n;) {
        if (unicode::Lookup(pending[i].cp).ccc == 0) {
          ++i;
          continue;
        }
        size_t j = i;
        while (j < n && unicode::Lookup(pending[j].cp).ccc != 0) ++j;
        if (j - i > 1)
          std::stable_sort(pending.begin() + i, pending.begin() + j, [](const Pending& a, const Pending& b) {
            return unicode::Lookup(a.cp).ccc < unicode::Lookup(b.cp).ccc;
          });
        i = j;
      }
      size_t next = 0;
      for (const Pending& p : pending) {
        int32_t orig = p.consumes ? (last_consumed = consumed[next++]) : last_consumed;
        if (!(unicode::Lookup(p.cp).flags & unicode::kMn)) lower(p.cp, orig);
      }
      pending.clear();
    };
    // middle stage: accent stripping (NFD, drop Mn), or straight to lower-casing
    auto strip_stage = [&](char32_t cp, int32_t orig, const CharRecord& rec) {
      if (!strip) return lower(cp, orig);
      const char32_t* d = &cp;
      size_t n = 1;
      if (rec.flags & unicode::kHasNfd) {
        d = unicode::kPool + rec.nfd_at;
        n = rec.nfd_len;
      }
      if (unicode::Lookup(d[0]).ccc == 0) flush_pending();  // a starter ends the run of marks
      if (n == 1 && pending.empty() && rec.ccc == 0) {  // the common case: nothing to reorder
        const CharRecord& r = d == &cp ? rec : unicode::Lookup(d[0]);  // a singleton decomposition
        if (r.ccc == 0) {
          last_consumed = orig;
          if (!(r.flags & unicode::kMn)) lower(d[0], orig);
          return;
        }
      }
      for (size_t k = 0; k < n; ++k) pending.push_back(Pending{d[k], orig, k == 0});
    };

    size_t pos = 0;
    int32_t ci = first_char;
    bool at_chunk_start = true;
    while (pos < text.size()) {
      if (kNeverSplit && at_chunk_start && !never_split.empty()) {
        // a never_split entry is kept as it is when it is a whole white-space delimited chunk
        size_t stop = pos;
        while (stop < text.size()) {
          size_t next = stop;
          char32_t c = 0;
          if (!unicode::DecodeUtf8(text, &next, &c) || (unicode::Lookup(c).flags & unicode::kSpace)) break;
          stop = next;
        }
        if (stop > pos && never_split.count(std::string(text.substr(pos, stop - pos)))) {
          // as HF's Python tokenizer: the chunk is one token, its vocab id or [UNK] (no WordPiece)
          flush_pending();
          int32_t begin = ci;
          for (size_t p = pos; p < stop; ++p) ci += (static_cast<unsigned char>(text[p]) & 0xC0) != 0x80;
          int32_t id = initial.Find(text.substr(pos, stop - pos));
          whole(begin, ci, id >= 0 ? id : unk);
          pos = stop;
          at_chunk_start = false;
          continue;
        }
      }
      char32_t cp;
      if (!unicode::DecodeUtf8(text, &pos, &cp))
        return Status::Error("invalid UTF-8 at byte " + std::to_string(pos));
      int32_t orig = ci++;
      const CharRecord& rec = unicode::Lookup(cp);
      at_chunk_start = (rec.flags & unicode::kSpace) != 0;
      if (!opt.do_basic_tokenize) {  // no normalization at all
        emit(cp, rec.flags, orig);
        continue;
      }
      // first stage: clean-up, CJK spacing
      if (rec.flags & unicode::kRemove) continue;
      if (rec.flags & unicode::kSpace) {
        strip_stage(' ', orig, unicode::Lookup(' '));
      } else if (opt.tokenize_chinese_chars && unicode::IsChineseChar(cp)) {
        const CharRecord& space = unicode::Lookup(' ');
        strip_stage(' ', orig, space);
        strip_stage(cp, orig, rec);
        strip_stage(' ', orig, space);
      } else {
        strip_stage(cp, orig, rec);
      }
    }
    flush_pending();
    return Status::Ok();
  }

  // Normalizes and pre-tokenizes text (no raw-matched token inside), whose first character has
  // index first_char; each finished word goes through WordPiece. With kMatchNormalized, added
  // tokens are first found in the normalized text, and only the text between them is
  // pre-tokenized (HF's AddedVocabulary::extract_and_normalize).
  template <bool kMatchNormalized>
  Status EncodeSegment(std::string_view text, int32_t first_char, int32_t* word_id, Pieces* out,
                       Scratch* scratch) const {
    Word* word = &scratch->word;
    word->Clear();
    auto flush_word = [&] {
      if (!word->Empty()) {
        word->char_at.push_back(static_cast<uint32_t>(word->bytes.size()));
        WordPiece(*word, (*word_id)++, out);
        word->Clear();
      }
    };
    // the pre-tokenizer: white space ends a word, punctuation is a word of its own (with
    // do_basic_tokenize=false: white space only)
    auto pre_tokenize = [&](char32_t cp, uint8_t flags, int32_t orig) {
      if (flags & unicode::kSpace) {
        flush_word();
      } else if ((flags & unicode::kPunct) && opt.do_basic_tokenize) {
        flush_word();
        word->Add(cp, orig);
        flush_word();
      } else {
        word->Add(cp, orig);
      }
    };
    if constexpr (!kMatchNormalized) {
      auto whole = [&](int32_t begin, int32_t end, int32_t id) {
        flush_word();
        out->Push(id, {begin, end}, (*word_id)++);
      };
      Status st = Normalize<true>(text, first_char, scratch, pre_tokenize, whole);
      if (!st.ok) return st;
      flush_word();
      return Status::Ok();
    } else {
      auto& norm = scratch->normalized;
      norm.clear();
      auto pre_tokenize_range = [&](size_t begin, size_t end) {
        for (size_t k = begin; k < end; ++k) pre_tokenize(norm[k].cp, norm[k].flags, norm[k].orig);
        flush_word();  // a word never runs on past an added token
      };
      auto match = [&] {
        size_t n = norm.size(), done = 0;  // done: where the last match ended
        for (size_t i = 0; i < n;) {
          auto [m, len] = normalized_trie.Longest(n - i, [&](size_t k) { return norm[i + k].cp; });
          if (m < 0) {
            ++i;
            continue;
          }
          const Match& hit = matches[m];
          if (hit.single_word && ((i > 0 && unicode::IsWordChar(norm[i - 1].cp)) ||
                                  (i + len < n && unicode::IsWordChar(norm[i + len].cp)))) {
            i += len;  // inside a word: no match (HF's search goes on after it)
            continue;
          }
          size_t start = i, stop = i + len;
          if (hit.lstrip) {  // HF: the white space before it, but not before the previous match's end
            while (start > 0 && IsRegexSpace(norm[start - 1].cp)) --start;
            start = std::max(start, done);
            if (start >= stop) start = i;  // (HF fails on such a split)
          }
          if (hit.rstrip)
            while (stop < n && IsRegexSpace(norm[stop].cp)) ++stop;
          if (done < start) pre_tokenize_range(done, start);
          out->Push(hit.id, {norm[start].orig, norm[stop - 1].orig + 1}, (*word_id)++);
          if (start < i || stop > i + len) {  // shown with the (normalized) white space it took
            std::string shown;
            for (size_t k = start; k < stop; ++k) unicode::AppendUtf8(norm[k].cp, &shown);
            out->ShowLast(std::move(shown));
          }
          // as HF's Aho-Corasick search, the next match is looked for from the end of this one,
          // not of the white space rstrip took: it may start inside that white space
          i += len;
          done = stop;
        }
        if (done < n) pre_tokenize_range(done, n);
        norm.clear();
      };
      auto emit = [&](char32_t cp, uint8_t flags, int32_t orig) { norm.push_back(NormChar{cp, orig, flags}); };
      auto whole = [&](int32_t begin, int32_t end, int32_t id) {
        match();
        out->Push(id, {begin, end}, (*word_id)++);
      };
      Status st = Normalize<true>(text, first_char, scratch, emit, whole);
      if (!st.ok) return st;
      match();
      return Status::Ok();
    }
  }

  Status Encode(std::string_view text, int32_t word_offset, Pieces* out, Scratch* scratch) const {
    return normalized_trie.empty() ? EncodeRaw<false>(text, word_offset, out, scratch)
                                   : EncodeRaw<true>(text, word_offset, out, scratch);
  }

  // Splits out the tokens matched in the raw text (special tokens, added tokens with
  // normalized=false: leftmost then longest), and encodes the text between them.
  template <bool kMatchNormalized>
  Status EncodeRaw(std::string_view text, int32_t word_offset, Pieces* out, Scratch* scratch) const {
    int32_t word_id = word_offset;
    size_t seg_start = 0, pos = 0;
    int32_t seg_char = 0, ci = 0;
    const auto* bytes = reinterpret_cast<const unsigned char*>(text.data());
    while (pos < text.size()) {
      auto [m, len] = raw_trie.Longest(text.size() - pos, [&](size_t k) { return bytes[pos + k]; });
      if (m >= 0 && matches[m].single_word && InsideWord(text, pos, pos + len)) {
        ci += CountChars(text.substr(pos, len));  // no match (HF's search goes on after it)
        pos += len;
        continue;
      }
      if (m >= 0) {
        const Match& hit = matches[m];
        size_t start = pos, stop = pos + len;
        int32_t start_char = ci, end_char = ci + CountChars(text.substr(pos, len)), stop_char = end_char;
        if (hit.lstrip && start < seg_start) {  // it starts in the white space the last match took
          if (seg_start < stop) start = seg_start, start_char = seg_char;  // HF's start (HF fails otherwise)
        } else if (hit.lstrip) {  // the white space before it, but not before the previous match's end
          while (start > seg_start) {
            size_t prev = start - 1;
            while (prev > seg_start && (bytes[prev] & 0xC0) == 0x80) --prev;
            size_t at = prev;
            char32_t c;
            if (!unicode::DecodeUtf8(text, &at, &c) || at != start || !IsRegexSpace(c)) break;
            start = prev;
            --start_char;
          }
        }
        if (hit.rstrip) {
          for (size_t at = stop; at < text.size();) {
            char32_t c;
            if (!unicode::DecodeUtf8(text, &at, &c) || !IsRegexSpace(c)) break;
            stop = at;
            ++stop_char;
          }
        }
        if (start > seg_start) {
          Status st = EncodeSegment<kMatchNormalized>(text.substr(seg_start, start - seg_start), seg_char, &word_id,
                                                      out, scratch);
          if (!st.ok) return st;
        }
        out->Push(hit.id, {start_char, stop_char}, word_id++);
        if (start < pos || stop > pos + len)  // shown with the white space it took, as in the text
          out->ShowLast(std::string(text.substr(start, stop - start)));
        // as HF's Aho-Corasick search, the next match is looked for from the end of this one, not
        // of the white space rstrip took (a match starting in it overlaps this token, as in HF)
        pos += len;
        ci = end_char;
        seg_start = std::max(seg_start, stop);
        seg_char = std::max(seg_char, stop_char);
        continue;
      }
      // advance one character (validity is checked by EncodeSegment)
      size_t next = pos + 1;
      while (next < text.size() && (bytes[next] & 0xC0) == 0x80) ++next;
      pos = next;
      ++ci;
    }
    return EncodeSegment<kMatchNormalized>(text.substr(seg_start), seg_char, &word_id, out, scratch);
  }

  // Whether a word character (regex \w) touches text[begin, end) on its left or right.
  static bool InsideWord(std::string_view text, size_t begin, size_t end) {
    char32_t c;
    if (begin > 0) {
      size_t prev = begin - 1;
      while (prev > 0 && (static_cast<unsigned char>(text[prev]) & 0xC0) == 0x80) --prev;
      if (unicode::DecodeUtf8(text, &prev, &c) && unicode::IsWordChar(c)) return true;
    }
    return end < text.size() && unicode::DecodeUtf8(text, &end, &c) && unicode::IsWordChar(c);
  }

  static int32_t CountChars(std::string_view s) {
    int32_t n = 0;
    for (unsigned char c : s) n += (c & 0xC0) != 0x80;
    return n;
  }

  // The normalized text of an added token, as HF normalizes a normalized=true token's content.
  std::u32string NormalizedContent(std::string_view content, Scratch* scratch) const {
    std::u32string out;
    auto emit = [&](char32_t cp, uint8_t, int32_t) { out.push_back(cp); };
    auto none = [](int32_t, int32_t, int32_t) {};
    Normalize<false>(content, 0, scratch, emit, none);
    return out;
  }

  int32_t TokenToId(std::string_view token) const {
    if (!added_ids.empty()) {
      auto it = added_ids.find(std::string(token));
      if (it != added_ids.end()) return it->second;
    }
    return initial.Find(token);
  }
};

void Encoding::Reserve(size_t n) {
  ids.reserve(n);
  type_ids.reserve(n);
  special_tokens_mask.reserve(n);
  attention_mask.reserve(n);
  offsets.reserve(n);
  word_ids.reserve(n);
  sequence_ids.reserve(n);
}

void Encoding::Push(int32_t id, int32_t type, int32_t special, std::pair<int32_t, int32_t> offset, int32_t word,
                    int32_t sequence) {
  ids.push_back(id);
  type_ids.push_back(type);
  special_tokens_mask.push_back(special);
  attention_mask.push_back(1);
  offsets.push_back(offset);
  word_ids.push_back(word);
  sequence_ids.push_back(sequence);
}

Tokenizer::Tokenizer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Tokenizer::~Tokenizer() = default;

Status Tokenizer::Create(std::vector<std::string> vocab, TokenizerOptions options, std::unique_ptr<Tokenizer>* out) {
  if (vocab.empty()) return Status::Error("vocab is empty: expected one token per id");
  if (vocab.size() > static_cast<size_t>(INT32_MAX)) return Status::Error("vocab has more than 2^31 tokens");
  if (options.max_input_chars_per_word < 1)
    return Status::Error("max_input_chars_per_word must be >= 1, got " + std::to_string(options.max_input_chars_per_word));
  if (options.continuing_subword_prefix.empty()) return Status::Error("continuing_subword_prefix must not be empty");
  auto impl = std::make_unique<Impl>();
  std::vector<std::pair<std::string, int32_t>> initial, continuation;
  std::unordered_set<std::string_view> seen;
  seen.reserve(vocab.size() * 2);
  const std::string& prefix = options.continuing_subword_prefix;
  for (size_t i = 0; i < vocab.size(); ++i) {
    const std::string& tok = vocab[i];
    size_t check = 0;
    char32_t cp;
    while (check < tok.size())
      if (!unicode::DecodeUtf8(tok, &check, &cp))
        return Status::Error("vocab token " + std::to_string(i) + " is not valid UTF-8");
    if (!seen.insert(tok).second)
      return Status::Error("vocab has the token '" + tok + "' twice (the second time at id " + std::to_string(i) +
                           "): each token must appear once");
    initial.emplace_back(tok, static_cast<int32_t>(i));
    if (tok.size() > prefix.size() && tok.compare(0, prefix.size(), prefix) == 0)
      continuation.emplace_back(tok.substr(prefix.size()), static_cast<int32_t>(i));
  }
  impl->initial.Build(initial);
  impl->continuation.Build(continuation);
  impl->strip = options.strip_accents < 0 ? options.do_lower_case : options.strip_accents != 0;
  impl->never_split.insert(options.never_split.begin(), options.never_split.end());
  impl->vocab = std::move(vocab);
  impl->opt = std::move(options);
  const TokenizerOptions& o = impl->opt;
  Impl::Scratch scratch;

  // Every token matched whole: the added tokens, and before them each special token that no
  // added token redefines (special, matched in the raw text).
  std::vector<AddedToken> tokens;
  std::unordered_set<std::string_view> added_contents;
  for (const AddedToken& t : o.added_tokens) added_contents.insert(t.content);
  std::vector<std::string> specials = {o.pad_token, o.unk_token, o.cls_token, o.sep_token, o.mask_token};
  specials.insert(specials.end(), o.extra_special_tokens.begin(), o.extra_special_tokens.end());
  const char* names[] = {"pad_token", "unk_token", "cls_token", "sep_token", "mask_token"};
  for (size_t k = 0; k < specials.size(); ++k) {
    const std::string& s = specials[k];
    std::string name = k < 5 ? names[k] : "extra special token";
    if (s.empty()) return Status::Error(name + " must not be empty");
    if (added_contents.count(s) || !o.match_special_tokens) continue;
    int32_t id = impl->initial.Find(s);
    if (id < 0)
      return Status::Error(name + " '" + s + "' is not in the vocab: the vocab (or the added tokens) must contain it");
    AddedToken t;
    t.content = s;
    t.id = id;
    t.special = true;
    t.normalized = false;
    tokens.push_back(std::move(t));
  }
  for (const AddedToken& t : o.added_tokens)
    if (o.match_special_tokens || !t.special) tokens.push_back(t);

  impl->num_ids = impl->vocab.size();
  std::unordered_map<int32_t, const std::string*> content_of_id;
  for (const AddedToken& t : tokens) {
    const std::string what = "added token '" + t.content + "'";
    if (t.content.empty()) return Status::Error("an added token's content must not be empty");
    size_t check = 0;
    char32_t cp;
    while (check < t.content.size())
      if (!unicode::DecodeUtf8(t.content, &check, &cp)) return Status::Error(what + " is not valid UTF-8");
    if (t.id < 0) return Status::Error(what + " has id " + std::to_string(t.id) + ": expected an id >= 0");
    auto [it, fresh] = content_of_id.emplace(t.id, &t.content);
    if (!fresh && *it->second != t.content)
      return Status::Error("added tokens '" + *it->second + "' and '" + t.content + "' have the same id " +
                           std::to_string(t.id) + ": each id names one token");
    auto [at, new_content] = impl->added_ids.emplace(t.content, t.id);
    if (!new_content && at->second != t.id)
      return Status::Error(what + " has two ids, " + std::to_string(at->second) + " and " + std::to_string(t.id));
    if (!fresh) continue;  // listed twice: the first entry decides
    impl->num_ids = std::max(impl->num_ids, static_cast<size_t>(t.id) + 1);
    if (t.special) impl->special_ids.push_back(t.id);
    int32_t m = static_cast<int32_t>(impl->matches.size());
    impl->matches.push_back(Impl::Match{t.id, t.lstrip, t.rstrip, t.single_word});
    std::string text = t.content;
    if (t.normalized) {
      std::u32string normalized = impl->NormalizedContent(t.content, &scratch);
      if (normalized.empty())
        return Status::Error(what + " is empty once normalized (cleaned up, lower-cased, accents stripped): add it "
                             "with normalized=False");
      impl->normalized_trie.Insert(normalized, m);
      text.clear();
      for (char32_t c : normalized) unicode::AppendUtf8(c, &text);
    } else {
      impl->raw_trie.Insert(t.content, m);
    }
    // HF shows a token as its matched text: the normalized content for a normalized token
    if (static_cast<size_t>(t.id) >= impl->vocab.size() || impl->vocab[t.id] != text)
      impl->id_texts.emplace_back(t.id, std::move(text));
  }
  std::sort(impl->id_texts.begin(), impl->id_texts.end());
  std::sort(impl->special_ids.begin(), impl->special_ids.end());
  impl->special_ids.erase(std::unique(impl->special_ids.begin(), impl->special_ids.end()), impl->special_ids.end());
  impl->unk = impl->initial.Find(o.unk_token);
  if (impl->unk < 0) return Status::Error("unk_token '" + o.unk_token + "' is not in the vocab: WordPiece needs it there");
  impl->cls = impl->TokenToId(o.cls_token);
  impl->sep = impl->TokenToId(o.sep_token);
  impl->pad = impl->TokenToId(o.pad_token);
  out->reset(new Tokenizer(std::move(impl)));
  return Status::Ok();
}

Status Tokenizer::EncodeText(std::string_view text, int32_t word_offset, Encoding* out) const {
  Impl::Scratch scratch;
  Pieces pieces;
  Status st = impl_->Encode(text, word_offset, &pieces, &scratch);
  if (!st.ok) return st;
  out->Reserve(out->size() + pieces.size());
  for (size_t i = 0; i < pieces.size(); ++i) out->Push(pieces.ids[i], 0, 0, pieces.offsets[i], pieces.word_ids[i], 0);
  return Status::Ok();
}

Status Tokenizer::EncodePieces(std::string_view text, Pieces* out) const {
  Impl::Scratch scratch;
  return impl_->Encode(text, 0, out, &scratch);
}

int32_t Tokenizer::TokenToId(std::string_view token) const { return impl_->TokenToId(token); }
const std::string* Tokenizer::IdToToken(int64_t id) const {
  const auto& texts = impl_->id_texts;
  if (!texts.empty()) {
    auto it = std::lower_bound(texts.begin(), texts.end(), id,
                               [](const std::pair<int32_t, std::string>& e, int64_t v) { return e.first < v; });
    if (it != texts.end() && it->first == id) return &it->second;
  }
  return id >= 0 && static_cast<size_t>(id) < impl_->vocab.size() ? &impl_->vocab[id] : nullptr;
}
size_t Tokenizer::VocabSize() const { return impl_->vocab.size(); }
size_t Tokenizer::NumIds() const { return impl_->num_ids; }
const std::vector<std::string>& Tokenizer::Vocab() const { return impl_->vocab; }
const std::vector<int32_t>& Tokenizer::SpecialIds() const { return impl_->special_ids; }
int32_t Tokenizer::cls_id() const { return impl_->cls; }
int32_t Tokenizer::sep_id() const { return impl_->sep; }
int32_t Tokenizer::pad_id() const { return impl_->pad; }
int32_t Tokenizer::unk_id() const { return impl_->unk; }

namespace {

// The [start, stop) windows HF's Encoding::truncate cuts a sequence of `len` tokens into.
std::vector<std::pair<size_t, size_t>> Windows(size_t len, size_t max_len, size_t stride, Side side) {
  std::vector<std::pair<size_t, size_t>> parts;
  if (max_len >= len) return {{0, len}};
  if (max_len == 0) return {{0, 0}, {0, len}};  // everything overflows
  size_t step = max_len - stride;
  if (side == Side::kRight) {
    for (size_t start = 0; start < len; start += step) {
      size_t stop = std::min(start + max_len, len);
      parts.emplace_back(start, stop);
      if (stop == len) break;
    }
  } else {
    for (size_t i = 0; i < len; i += step) {
      size_t stop = len - i;
      size_t start = stop > max_len ? stop - max_len : 0;
      parts.emplace_back(start, stop);
      if (start == 0) break;
    }
  }
  return parts;
}

}  // namespace

Status Tokenizer::Encode(const std::vector<Input>& inputs, const EncodeOptions& o, int num_threads,
                         EncodedBatch* out) const {
  bool truncate = o.truncation != Truncation::kNone;
  if ((truncate || o.padding == Padding::kMaxLength) && o.max_length < 0)
    return Status::Error("max_length is required with truncation or padding='max_length'");
  if (o.stride < 0) return Status::Error("stride must be >= 0, got " + std::to_string(o.stride));
  if (o.pad_to_multiple_of < 0)
    return Status::Error("pad_to_multiple_of must be >= 0, got " + std::to_string(o.pad_to_multiple_of));
  if (inputs.size() > UINT32_MAX) return Status::Error("a batch holds at most 2^32 - 1 inputs");

  using Row = EncodedBatch::Row;
  const size_t n = inputs.size();
  out->inputs_.clear();
  out->inputs_.resize(n);
  out->rows_.clear();
  out->add_special_ = o.add_special_tokens;
  out->cls_id_ = impl_->cls;
  out->sep_id_ = impl_->sep;
  out->pad_id_ = impl_->pad;
  out->pad_type_ = o.pad_token_type_id;
  out->padding_side_ = o.padding_side;
  out->pad_to_ = 0;
  std::vector<Row> first_row(n);
  std::vector<std::vector<Row>> overflow_rows(n);  // empty (no allocation) unless return_overflowing
  std::vector<Status> statuses(n);
  std::atomic<size_t> rows_counted{0};
  std::atomic<bool> over_cap{false};

  auto encode_one = [&](size_t idx, Impl::Scratch* scratch) -> Status {
    const Input& in = inputs[idx];
    auto& encoded = out->inputs_[idx];
    encoded.has_pair = in.has_pair;
    Pieces* seq = encoded.seq;
    for (int s = 0; s < (in.has_pair ? 2 : 1); ++s) {
      const auto& parts = s == 0 ? in.first : in.second;
      bool split_words = in.pre_split;
      for (size_t w = 0; w < parts.size(); ++w) {
        size_t before = seq[s].size();
        Status st = impl_->Encode(parts[w], split_words ? static_cast<int32_t>(w) : 0, &seq[s], scratch);
        if (!st.ok) return Status::Error(st.message + (s == 0 ? " in the text" : " in the text pair"));
        if (split_words)  // each pre-split word is one word, whatever special tokens it holds
          std::fill(seq[s].word_ids.begin() + before, seq[s].word_ids.end(), static_cast<int32_t>(w));
      }
      if (seq[s].size() > UINT32_MAX) return Status::Error("a sequence has more than 2^32 - 1 tokens");
    }
    size_t n_added = o.add_special_tokens ? NumSpecialTokensToAdd(in.has_pair) : 0;
    std::vector<std::pair<size_t, size_t>> win[2] = {{{0, seq[0].size()}}, {{0, seq[1].size()}}};
    if (truncate) {
      if (static_cast<size_t>(o.max_length) < n_added)
        return Status::Error("max_length=" + std::to_string(o.max_length) + " is less than the " +
                             std::to_string(n_added) + " special tokens added to each sequence");
      size_t max_len = o.max_length - n_added;
      size_t n1 = seq[0].size(), n2 = in.has_pair ? seq[1].size() : 0;
      size_t target[2] = {n1, n2};
      bool cut = false;
      if (max_len == 0) {
        target[0] = target[1] = 0;
        cut = true;
      } else if (n1 + n2 > max_len) {
        cut = true;
        size_t to_remove = n1 + n2 - max_len;
        if (o.truncation == Truncation::kLongestFirst && in.has_pair) {
          // HF: the shorter keeps its length if the longer can absorb the cut, else both halve
          size_t a = std::min(n1, n2);
          size_t b = a > max_len ? a : std::max(a, max_len - a);
          if (a + b > max_len) {
            a = max_len / 2;
            b = a + max_len % 2;
          }
          target[0] = n1 <= n2 ? a : b;
          target[1] = n1 <= n2 ? b : a;
        } else {
          int which = o.truncation == Truncation::kOnlySecond ? 1 : 0;
          if (which == 1 && !in.has_pair)
            return Status::Error("truncation='only_second' needs a pair of sequences");
          if (o.truncation == Truncation::kLongestFirst) which = 0;
          size_t len = seq[which].size();
          if (len <= to_remove)
            return Status::Error("cannot truncate to max_length=" + std::to_string(o.max_length) + " with truncation='" +
                                 (which == 0 ? "only_first" : "only_second") + "': the " +
                                 (which == 0 ? "first" : "second") + " sequence has " + std::to_string(len) +
                                 " tokens and " + std::to_string(to_remove) + " must go");
          target[which] = len - to_remove;
        }
      }
      if (cut) {
        for (int s = 0; s < (in.has_pair ? 2 : 1); ++s) {
          if (target[s] < seq[s].size() && target[s] > 0 && static_cast<size_t>(o.stride) >= target[s])
            return Status::Error("stride=" + std::to_string(o.stride) + " must be less than the " +
                                 std::to_string(target[s]) + " tokens kept of the " + (s == 0 ? "first" : "second") +
                                 " sequence (max_length minus special tokens" +
                                 std::string(in.has_pair ? ", shared between the pair" : "") + ")");
          win[s] = Windows(seq[s].size(), target[s], o.stride, o.truncation_side);
        }
      }
    }
    // HF's merge order: (a0,b0), then (ai,b0), (ai,b1..) for each overflow ai, then (a0,bj)
    size_t na = win[0].size(), nb = in.has_pair ? win[1].size() : 1;
    size_t n_rows = o.return_overflowing ? na * nb : 1;
    if (o.max_rows) {
      size_t before = rows_counted.fetch_add(n_rows);
      if (before + n_rows > o.max_rows) {
        over_cap = true;
        std::string how = in.has_pair ? std::to_string(na) + " windows of the text x " + std::to_string(nb) +
                                            " of the text pair"
                                      : std::to_string(na) + " windows";
        return Status::Error("this call would produce more than max_rows=" + std::to_string(o.max_rows) +
                             " rows (this input alone gives " + std::to_string(n_rows) + ": " + how +
                             " at max_length=" + std::to_string(o.max_length) + ", stride=" +
                             std::to_string(o.stride) + ")");
      }
    }
    auto row = [&](size_t i, size_t j) {
      Row r{static_cast<uint32_t>(idx), static_cast<uint32_t>(win[0][i].first),
            static_cast<uint32_t>(win[0][i].second)};
      if (in.has_pair) {
        r.b_begin = static_cast<uint32_t>(win[1][j].first);
        r.b_end = static_cast<uint32_t>(win[1][j].second);
      }
      return r;
    };
    first_row[idx] = row(0, 0);
    if (n_rows > 1) {
      auto& extra = overflow_rows[idx];
      extra.reserve(n_rows - 1);
      for (size_t i = 1; i < na; ++i)
        for (size_t j = 0; j < nb; ++j) extra.push_back(row(i, j));
      for (size_t j = 1; j < nb; ++j) extra.push_back(row(0, j));
    }
    return Status::Ok();
  };

  size_t bytes = 0;
  for (const Input& in : inputs) {
    for (auto s : in.first) bytes += s.size();
    for (auto s : in.second) bytes += s.size();
  }
  // small batches are not worth a thread start (tens of microseconds)
  int threads = WorkerCount(num_threads, std::min(n, std::max<size_t>(1, bytes / 16384)));
  std::atomic<size_t> next{0};
  RunWorkers(threads, [&] {
    Impl::Scratch scratch;
    // past the row cap the rest is not worth encoding
    for (size_t i; !over_cap && (i = next.fetch_add(1)) < n;) statuses[i] = encode_one(i, &scratch);
  });
  for (size_t i = 0; i < n; ++i)
    if (!statuses[i].ok) {
      out->inputs_.clear();
      return Status::Error(n > 1 ? statuses[i].message + " (batch item " + std::to_string(i) + ")"
                                 : statuses[i].message);
    }

  size_t total_rows = n;
  for (const auto& extra : overflow_rows) total_rows += extra.size();
  out->rows_.reserve(total_rows);
  for (size_t i = 0; i < n; ++i) {
    out->rows_.push_back(first_row[i]);
    out->rows_.insert(out->rows_.end(), overflow_rows[i].begin(), overflow_rows[i].end());
    std::vector<Row>().swap(overflow_rows[i]);
  }

  if (o.padding != Padding::kNone) {
    size_t target = 0;
    if (o.padding == Padding::kMaxLength) {
      target = o.max_length;
    } else {
      // HF pads to the longest of the main rows: an overflow window longer than that stays as it is
      for (size_t r = 0; r < out->rows_.size(); ++r)
        if (r == 0 || out->rows_[r].input != out->rows_[r - 1].input)
          target = std::max(target, out->UnpaddedLength(r));
    }
    if (o.pad_to_multiple_of > 0 && target % o.pad_to_multiple_of)
      target += o.pad_to_multiple_of - target % o.pad_to_multiple_of;
    out->pad_to_ = target;
  }
  return Status::Ok();
}

Status Tokenizer::EncodeBatch(const std::vector<Input>& inputs, const EncodeOptions& o, int num_threads,
                              std::vector<Encoding>* rows, std::vector<int32_t>* sample_of_row) const {
  EncodedBatch batch;
  Status st = Encode(inputs, o, num_threads, &batch);
  if (!st.ok) return st;
  rows->clear();
  sample_of_row->clear();
  rows->reserve(batch.num_rows());
  for (size_t r = 0; r < batch.num_rows(); ++r) {
    rows->push_back(batch.MaterializeRow(r));
    sample_of_row->push_back(batch.InputOfRow(r));
  }
  return Status::Ok();
}

size_t EncodedBatch::TotalTokens() const {
  size_t total = 0;
  for (size_t r = 0; r < rows_.size(); ++r) total += Length(r);
  return total;
}

Encoding EncodedBatch::MaterializeRow(size_t r) const {
  struct Sink {
    Encoding* e;
    void Special(int32_t id, int32_t type) { e->Push(id, type, 1, {0, 0}, -1, -1); }
    void Piece(const Pieces& p, int32_t seq, size_t begin, size_t end) {
      for (size_t k = begin; k < end; ++k) e->Push(p.ids[k], seq, 0, p.offsets[k], p.word_ids[k], seq);
    }
    void Pad(size_t n, int32_t id, int32_t type) {
      for (size_t k = 0; k < n; ++k) {
        e->Push(id, type, 1, {0, 0}, -1, -1);
        e->attention_mask.back() = 0;
      }
    }
  };
  Encoding e;
  e.Reserve(Length(r));
  Sink sink{&e};
  Emit(r, &sink);
  return e;
}

int WorkerCount(int num_threads, size_t max_useful) {
  size_t threads = num_threads > 0 ? num_threads : std::max(1u, std::thread::hardware_concurrency());
  return static_cast<int>(std::max<size_t>(1, std::min(threads, max_useful)));
}

void RunWorkers(int threads, const std::function<void()>& worker) {
  if (threads <= 1) return worker();
  std::vector<std::thread> pool;
  pool.reserve(threads - 1);
  for (int t = 1; t < threads; ++t) pool.emplace_back(worker);
  worker();
  for (auto& t : pool) t.join();
}

Status Tokenizer::Decode(const std::vector<int64_t>& ids, bool skip_special_tokens, std::string* out) const {
  out->clear();
  const std::string& prefix = impl_->opt.continuing_subword_prefix;
  bool first = true;
  for (int64_t id : ids) {
    const std::string* tok = IdToToken(id);
    if (!tok)
      return Status::Error("token id " + std::to_string(id) + " is out of range: expected 0 <= id < " +
                           std::to_string(NumIds()) + " (the vocab and the added tokens)");
    if (skip_special_tokens && std::binary_search(impl_->special_ids.begin(), impl_->special_ids.end(), id)) continue;
    std::string piece;
    if (!first && tok->compare(0, prefix.size(), prefix) == 0) {
      piece = tok->substr(prefix.size());
    } else {
      piece = first ? *tok : " " + *tok;
    }
    first = false;
    // HF's WordPiece decoder cleans each piece up (on one piece only " ." and the like can match)
    static const std::pair<const char*, const char*> kCleanup[] = {
        {" .", "."}, {" ?", "?"}, {" !", "!"}, {" ,", ","}, {" ' ", "'"}, {" n't", "n't"},
        {" 'm", "'m"}, {" do not", " don't"}, {" 's", "'s"}, {" 've", "'ve"}, {" 're", "'re"}};
    for (const auto& [from, to] : kCleanup) {
      size_t at = 0, flen = std::strlen(from), tlen = std::strlen(to);
      while ((at = piece.find(from, at)) != std::string::npos) {
        piece.replace(at, flen, to);
        at += tlen;
      }
    }
    out->append(piece);
  }
  return Status::Ok();
}

std::string UnicodeVersions() {
  return std::string("categories ") + unicode::kCategoryVersion + ", normalization " + unicode::kNormalizationVersion +
         ", case mappings " + unicode::kCaseVersion;
}

}  // namespace dbf_tok
