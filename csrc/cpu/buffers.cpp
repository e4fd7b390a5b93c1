// The cpu kernels' output buffers (common.h: empty_output).
//
// Why a cache: a buffer of 32 MiB or more is mapped and unmapped by glibc on every call and faulted
// in afresh (4096 x 3072 float: ~22 ms of faults against ~5 ms of GELU on one core); smaller ones
// come from glibc's heap, which keeps freed pages only until a large free trims it. A
// transformers model run between two of our calls did that: our forward on 4352 tokens (2
// threads, AVX2 Zen 3 VM) then took 39k page faults and 3100 ms, against 6.8k and 2841 ms after
// our own forward. Blocks here are 2 MiB-aligned and advised to use transparent huge pages
// (Linux's usual THP setting, "madvise", gives them only on request); an idle block is kept for
// the next output of about its size, up to a limit, oldest evicted first.
#include "common.h"

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <mutex>
#include <vector>

namespace distilbert_fast {
namespace cpu {
namespace {

constexpr size_t kHugePage = size_t(2) << 20;
constexpr size_t kCachedFrom = size_t(1) << 20;  // smaller outputs are at::empty's

// Idle blocks kept: an eighth of the machine's memory, at most 1 GiB (a DistilBERT-base forward
// on 4352 tokens leaves about 150 MB of them).
size_t cache_limit() {
  const long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGESIZE);
  const size_t physical = pages > 0 && page > 0 ? static_cast<size_t>(pages) * static_cast<size_t>(page) : 0;
  return std::min(size_t(1) << 30, physical / 8);
}

class OutputCache {
 public:
  // A block of at least `bytes` (its size in *capacity), or nullptr if none can be had.
  void* take(size_t bytes, size_t* capacity) {
    // blocks are whole huge pages: a 3 MiB output needs a 4 MiB block
    const size_t rounded = (bytes + kHugePage - 1) / kHugePage * kHugePage;
    {
      std::lock_guard<std::mutex> lock(mu_);
      // the smallest idle block that fits, a quarter larger at most
      auto best = idle_.end();
      for (auto it = idle_.begin(); it != idle_.end(); ++it) {
        if (it->bytes >= rounded && it->bytes <= rounded + rounded / 4 &&
            (best == idle_.end() || it->bytes < best->bytes)) {
          best = it;
        }
      }
      if (best != idle_.end()) {
        void* p = best->ptr;
        *capacity = best->bytes;
        idle_bytes_ -= best->bytes;
        idle_.erase(best);
        return p;
      }
    }
    void* p = nullptr;
    if (posix_memalign(&p, kHugePage, rounded) != 0) return nullptr;
#ifdef MADV_HUGEPAGE
    madvise(p, rounded, MADV_HUGEPAGE);  // advice only: failure just means small pages
#endif
    *capacity = rounded;
    return p;
  }

  // A dead tensor's block: kept idle, the oldest idle ones freed past the limit.
  void give(void* p, size_t bytes) {
    std::vector<void*> evicted;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (bytes > limit_) {
        evicted.push_back(p);
      } else {
        idle_.push_back({p, bytes});
        idle_bytes_ += bytes;
        while (idle_bytes_ > limit_) {  // idle_ is oldest first
          evicted.push_back(idle_.front().ptr);
          idle_bytes_ -= idle_.front().bytes;
          idle_.erase(idle_.begin());
        }
      }
    }
    for (void* q : evicted) std::free(q);
  }

  size_t release() {
    std::vector<Block> idle;
    {
      std::lock_guard<std::mutex> lock(mu_);
      idle.swap(idle_);
      idle_bytes_ = 0;
    }
    size_t freed = 0;
    for (const Block& b : idle) {
      std::free(b.ptr);
      freed += b.bytes;
    }
    return freed;
  }

  size_t idle_bytes() {
    std::lock_guard<std::mutex> lock(mu_);
    return idle_bytes_;
  }

 private:
  struct Block {
    void* ptr;
    size_t bytes;
  };
  std::mutex mu_;
  std::vector<Block> idle_;
  size_t idle_bytes_ = 0;
  const size_t limit_ = cache_limit();
};

// Never destroyed: tensors may die after static destructors have run.
OutputCache& output_cache() {
  static OutputCache* cache = new OutputCache();
  return *cache;
}

}  // namespace

at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  const size_t nbytes = static_cast<size_t>(c10::multiply_integers(sizes)) *
                        c10::elementSize(c10::typeMetaToScalarType(options.dtype()));
  if (nbytes >= kCachedFrom) {
    size_t capacity = 0;
    if (void* p = output_cache().take(nbytes, &capacity)) {
      return at::from_blob(p, sizes, [capacity](void* q) { output_cache().give(q, capacity); },
                           options.device(at::kCPU));
    }
  }
  return at::empty(sizes, options);
}

int64_t cached_output_bytes() { return static_cast<int64_t>(output_cache().idle_bytes()); }

int64_t release_cached_outputs() { return static_cast<int64_t>(output_cache().release()); }

}  // namespace cpu
}  // namespace distilbert_fast
