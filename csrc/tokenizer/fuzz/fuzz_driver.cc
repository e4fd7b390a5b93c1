// A main() for the fuzz target where libFuzzer is not available (gcc has none): random inputs
// built by mutating seeds (random bytes, UTF-8 of random code points, special tokens, long
// words), replayed deterministically from -seed. Accepts libFuzzer's -runs=N, -max_total_time=S
// and -seed=N flags, and files or directories of inputs to replay first.
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <dirent.h>
#include <fstream>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "unicode.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size);

namespace {

using dbf_tok::unicode::AppendUtf8;

std::string Generate(std::mt19937_64& rng, const std::vector<std::string>& corpus) {
  static const char* kPieces[] = {"[CLS]", "[SEP]", "[MASK]", "[UNK]", "[PAD]", "ab", "a", "##", " ", "\t", "!",
                                  "e\xCC\x81", "\xC4\xB0", "\xCE\xA3", "\xE4\xB8\xAD", "\xE2\x80\x8B", "{\"model\":",
                                  "\"vocab\":{", "\\u00e9", "\xC3\xA9", "\xE3\x80\xAA", "\xE3\x80\xAE", "\xED\xA0\x80"};
  std::string s;
  if (!corpus.empty() && rng() % 4 == 0) s = corpus[rng() % corpus.size()];
  for (int i = 0; i < 4; ++i) s.push_back(static_cast<char>(rng()));
  int parts = 1 + rng() % 24;
  for (int p = 0; p < parts; ++p) {
    switch (rng() % 6) {
      case 0: s += kPieces[rng() % (sizeof(kPieces) / sizeof(*kPieces))]; break;
      case 1: s.push_back(static_cast<char>(rng())); break;  // any byte, often invalid UTF-8
      case 2: {  // a random code point (no surrogates)
        uint32_t cp = rng() % 0x110000;
        if (cp >= 0xD800 && cp <= 0xDFFF) cp = 0xFFFD;
        AppendUtf8(cp, &s);
        break;
      }
      case 3: AppendUtf8(0x300 + rng() % 0x70, &s); break;  // combining marks
      case 4: s.append(rng() % 130, "abx"[rng() % 3]); break;  // long words around the 100 limit
      default: if (!s.empty()) s.erase(rng() % s.size(), 1 + rng() % 3); break;
    }
  }
  return s;
}

void LoadCorpus(const std::string& path, std::vector<std::string>* out) {
  if (DIR* dir = opendir(path.c_str())) {
    while (dirent* ent = readdir(dir))
      if (ent->d_name[0] != '.') LoadCorpus(path + "/" + ent->d_name, out);
    closedir(dir);
    return;
  }
  std::ifstream f(path, std::ios::binary);
  std::ostringstream ss;
  ss << f.rdbuf();
  out->push_back(ss.str());
}

}  // namespace

int main(int argc, char** argv) {
  long runs = -1;
  double max_time = 10;
  uint64_t seed = 1;
  std::vector<std::string> corpus;
  for (int i = 1; i < argc; ++i) {
    if (std::strncmp(argv[i], "-runs=", 6) == 0) runs = std::atol(argv[i] + 6);
    else if (std::strncmp(argv[i], "-max_total_time=", 16) == 0) max_time = std::atof(argv[i] + 16);
    else if (std::strncmp(argv[i], "-seed=", 6) == 0) seed = std::strtoull(argv[i] + 6, nullptr, 10);
    else if (argv[i][0] != '-') LoadCorpus(argv[i], &corpus);
  }
  for (const auto& c : corpus) LLVMFuzzerTestOneInput(reinterpret_cast<const uint8_t*>(c.data()), c.size());
  std::mt19937_64 rng(seed);
  auto start = std::chrono::steady_clock::now();
  long n = 0;
  for (; runs < 0 || n < runs; ++n) {
    if ((n & 255) == 0 && std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() > max_time)
      break;
    std::string input = Generate(rng, corpus);
    LLVMFuzzerTestOneInput(reinterpret_cast<const uint8_t*>(input.data()), input.size());
  }
  std::printf("fuzz: %ld inputs (seed %llu, %zu corpus files), no failure\n", n, static_cast<unsigned long long>(seed),
              corpus.size());
  return 0;
}
