// Multi-head attention on the CPU, forward and backward, blocked over keys with an online softmax,
// so the (seq x seq) scores are never materialised. Two entry points share the kernels:
//   masked_attention: a padded (batch, heads, seq, head_dim) batch with a key padding mask;
//   varlen_attention: packed (total, heads, head_dim) tokens, sequence b being rows
//                     cu_seqlens[b] .. cu_seqlens[b + 1] - 1 (flash-attn's varlen layout).
// The kernels see one "window" per (batch row, head): its query rows, its keys, and where its
// rows live in memory (Heads, Windows); a padded batch is the varlen case with windows of equal
// length and a key mask.
//
//
//     P = softmax(q k^T * scale) over the keys the padding mask keeps
//     W = P * keep / (1 - p) * head_mask[h]           (dropout keep-mask, optional)
//     out = W v
//
// One task per (batch, head), spread over the threads by work (for_task_lists). A task gathers
// the kept keys in blocks (the forward kFwdBlock, the backward kBlock): K (and in the backward V)
// of a block is transposed into an acc_t buffer (D x block) so that a query row's scores against
// the block are block-wide FMAs over head_dim, then every query row folds the block into its
// running max m, normaliser l and output o (flash-attention's recurrence). Both directions take a
// few query rows per pass, so each vector of K, V (or dK, dV) they load serves all of them. The
// forward saves lse = m + log(l) per row; the backward recomputes P from it.
//
// Masked keys get exactly zero weight, as eager's masked_fill(finfo.min) + softmax gives. A batch
// row whose keys are all masked attends uniformly to every key (eager's scores there are all the
// same constant); its scores then carry no gradient to q or k.
//
// q, k, v and grad_out may be strided views (the last dim must have stride 1), such as the model's
// (batch, seq, heads, head_dim) projections transposed to (batch, heads, seq, head_dim), or the
// (total, heads, head_dim) thirds of one fused (total, 3 * dim) QKV projection. Padded: out, dq,
// dk and dv are allocated as (batch, seq, heads, head_dim) memory returned as (batch, heads, seq,
// head_dim) views, so the model's transpose back to (batch, seq, dim) is free; varlen: they are
// contiguous (total, heads, head_dim). lse and the dropout keep-mask are laid out per window as
// (batch, heads, max_seqlen) and (batch, heads, max_seqlen, max_seqlen) in both cases.
//
// out is returned in acc_t (float32 for bf16 inputs; the caller narrows it): the backward's
// delta_i = dout_i . out_i must see the unrounded output, or a row whose exact gradient is zero
// (one key) picks up bf16 rounding noise.
#include "common.h"
#include "cpu_ops.h"

#include <ATen/native/CPUBlas.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>

namespace distilbert_fast {
namespace cpu {
namespace {

constexpr int64_t kBlock = 64;  // keys per block

// Row s of head h of window b: in a padded (batch, heads, seq, head_dim) tensor, or in packed
// (total, heads, head_dim) tokens whose window b starts at token starts[b].
template <typename scalar_t>
struct Heads {
  scalar_t* data;
  int64_t sb, sh, ss;
  const int32_t* starts = nullptr;
  explicit Heads(const at::Tensor& t)
      : data(t.data_ptr<scalar_t>()), sb(t.stride(0)), sh(t.stride(1)), ss(t.stride(2)) {}
  Heads(const at::Tensor& t, const int32_t* cu_seqlens)
      : data(t.data_ptr<scalar_t>()), sb(0), sh(t.stride(1)), ss(t.stride(0)), starts(cu_seqlens) {}
  scalar_t* row(int64_t b, int64_t h, int64_t s) const {
    return data + b * sb + h * sh + (starts ? s + starts[b] : s) * ss;
  }
};

// Vector registers the accumulators may take: half the register file (AVX-512 has 32, AVX2 16),
// the rest holding the block's vectors and the broadcast query values. On AVX2, 16 accumulators
// (two rows of a 64-key block) spill to the stack: varlen attention over 32 x U[16, 256] tokens,
// 1 thread, Zen 3, took 94-103 ms with them, 84-86 ms with one row per pass.
#if defined(CPU_CAPABILITY_AVX512)
constexpr int64_t kAccumulators = 16;
#else
constexpr int64_t kAccumulators = 8;
#endif

// Query rows folded together per key block: each vector of K or V loaded from L1 then serves that
// many rows, with R x (kBlock / Vec::size()) accumulators in registers (kAccumulators).
template <typename T>
constexpr int rows_per_pass() {
  constexpr int64_t vecs = kBlock / Vectorized<T>::size();
  return vecs >= kAccumulators ? 1 : static_cast<int>(kAccumulators / vecs);
}

// dst[j * dim + 0:dim] += sum_r w[r * kBlock + j] * src[r * dim + 0:dim], j < nb, r < R: the
// backward's dK and dV updates from R query rows at once, each dst row loaded and stored once.
// weighted_rows_tile's transpose: there the R outputs stay in registers while the nb rows stream
// through; here the R sources stay while the nb outputs stream.
template <int R, typename T>
inline void add_row_products(const T* w, const T* src, int64_t nb, int64_t dim, T* dst) {
  using Vec = Vectorized<T>;
  constexpr int64_t kVecs = 4;
  int64_t d0 = 0;
  for (; d0 + kVecs * Vec::size() <= dim; d0 += kVecs * Vec::size()) {
    Vec sv[R][kVecs];
    for (int r = 0; r < R; ++r) {
      for (int64_t t = 0; t < kVecs; ++t) sv[r][t] = Vec::loadu(src + r * dim + d0 + t * Vec::size());
    }
    for (int64_t j = 0; j < nb; ++j) {
      T* out = dst + j * dim + d0;
      Vec acc[kVecs];
      for (int64_t t = 0; t < kVecs; ++t) acc[t] = Vec::loadu(out + t * Vec::size());
      for (int r = 0; r < R; ++r) {
        const Vec wr(w[r * kBlock + j]);
        for (int64_t t = 0; t < kVecs; ++t) acc[t] = at::vec::fmadd(wr, sv[r][t], acc[t]);
      }
      for (int64_t t = 0; t < kVecs; ++t) acc[t].store(out + t * Vec::size());
    }
  }
  if (d0 < dim) {
    for (int64_t j = 0; j < nb; ++j) {
      for (int r = 0; r < R; ++r) {
        const T wr = w[r * kBlock + j];
        if (wr != T(0)) row_axpy(wr, src + r * dim + d0, dst + j * dim + d0, dim - d0);
      }
    }
  }
}

// -- register tiles (the forward's q k^T and P v; the backward's scores and dout v^T) --------------
// The forward takes up to kFwdBlock keys per block (every window of DistilBERT's 512 positions in
// one block, so the online softmax rescales nothing), and works in tiles of kTileRows query rows x
// kTileVecs vectors: q k^T and P v as small GEMMs whose accumulators stay in registers, each
// loaded vector of K or V serving kTileRows rows and each broadcast query value or weight serving
// kTileVecs vectors (AVX2: 12 accumulators + 2 loaded vectors + 1 broadcast of 16 registers).
// Measured on varlen 32 x U[16, 256] tokens, 12 heads of 64, 1 thread, Zen 3 (AVX2): 106-108 ms
// with 64-key blocks and one row per pass, 62-79 ms with these tiles, against 76-95 ms for a
// per-sequence bmm + softmax + bmm (ours / bmm, median of 12 rounds: 1.08 before, 0.73 after).
constexpr int64_t kFwdBlock = 512;
constexpr int kTileRows = 6;
constexpr int64_t kTileVecs = kAccumulators / 4;  // 2 on AVX2, 4 on AVX-512: 12 or 24 accumulators

// Keys (columns) of one tile.
template <typename T>
constexpr int64_t tile_width() {
  return kTileVecs * Vectorized<T>::size();
}

// out[r * ldo + 0:tile_width] (+)= sum_k a[r * lda + k] * b[k * ldb + 0:tile_width], k < depth, for
// r < R: one register tile of a small GEMM, R x kTileVecs accumulators.
template <int R, bool kAccumulate, typename T>
inline void tile_product(const T* a, int64_t lda, const T* b, int64_t ldb, int64_t depth, T* out, int64_t ldo) {
  using Vec = Vectorized<T>;
  constexpr int64_t C = kTileVecs;
  Vec acc[R][C];
  for (int r = 0; r < R; ++r) {
    for (int64_t c = 0; c < C; ++c) acc[r][c] = kAccumulate ? Vec::loadu(out + r * ldo + c * Vec::size()) : Vec(T(0));
  }
  for (int64_t k = 0; k < depth; ++k) {
    Vec bv[C];
    for (int64_t c = 0; c < C; ++c) bv[c] = Vec::loadu(b + k * ldb + c * Vec::size());
    for (int r = 0; r < R; ++r) {
      const Vec ak(a[r * lda + k]);
      for (int64_t c = 0; c < C; ++c) acc[r][c] = at::vec::fmadd(ak, bv[c], acc[r][c]);
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int64_t c = 0; c < C; ++c) acc[r][c].store(out + r * ldo + c * Vec::size());
  }
}

// out[r * width + c] = sum_d a[r * dim + d] * bt[d * width + c] for r < R, c < width (a multiple of
// tile_width): R query rows' scores against keys stored transposed.
template <int R, typename T>
inline void scores_tile(const T* a, int64_t dim, const T* bt, int64_t width, T* out) {
  for (int64_t c0 = 0; c0 < width; c0 += tile_width<T>()) {
    tile_product<R, false>(a, dim, bt + c0, width, dim, out + c0, width);
  }
}

// o[r * dim + 0:dim] += sum_j w[r * width + j] * rows[j * dim + 0:dim], j < nb, r < R: P v for R
// rows, tile_width output columns at a time kept in registers across the keys.
template <int R, typename T>
inline void weighted_rows_tile(const T* w, int64_t width, const T* rows, int64_t nb, int64_t dim, T* o) {
  int64_t d0 = 0;
  for (; d0 + tile_width<T>() <= dim; d0 += tile_width<T>()) {
    tile_product<R, true>(w, width, rows + d0, dim, nb, o + d0, dim);
  }
  if (d0 < dim) {  // head_dim not a multiple of the tile: the last columns row by row
    for (int r = 0; r < R; ++r) {
      for (int64_t j = 0; j < nb; ++j) row_axpy(w[r * width + j], rows + j * dim + d0, o + r * dim + d0, dim - d0);
    }
  }
}

// f(std::integral_constant<int, rows>{}) for a run-time rows in 1 .. kTileRows, so each tile
// height is its own compile-time kernel.
template <typename F>
inline void with_tile_rows(int rows, F&& f) {
  switch (rows) {
    case 1: return f(std::integral_constant<int, 1>{});
    case 2: return f(std::integral_constant<int, 2>{});
    case 3: return f(std::integral_constant<int, 3>{});
    case 4: return f(std::integral_constant<int, 4>{});
    case 5: return f(std::integral_constant<int, 5>{});
    default: return f(std::integral_constant<int, kTileRows>{});
  }
}
static_assert(kTileRows == 6, "with_tile_rows dispatches 1 .. 6 rows");

// The largest of s[0:n], vectorised.
template <typename T>
inline T row_max(const T* s, int64_t n) {
  using Vec = Vectorized<T>;
  T best = -std::numeric_limits<T>::infinity();
  int64_t j = 0;
  if (n >= Vec::size()) {
    Vec acc = Vec::loadu(s);
    for (j = Vec::size(); j + Vec::size() <= n; j += Vec::size()) acc = at::vec::maximum(acc, Vec::loadu(s + j));
    best = at::vec::vec_reduce_all<T>([](Vec& x, Vec& y) { return at::vec::maximum(x, y); }, acc);
  }
  for (; j < n; ++j) best = std::max(best, s[j]);
  return best;
}

// p[0:n] = exp(s[0:n] - shift), vectorised (Sleef's exp, 1 ulp); returns sum_j p[j]. p may be s.
template <typename T>
inline T exp_shifted(const T* s, int64_t n, T shift, T* p) {
  using Vec = Vectorized<T>;
  const Vec vshift(shift);
  Vec acc(T(0));
  int64_t j = 0;
  for (; j + Vec::size() <= n; j += Vec::size()) {
    const Vec e = (Vec::loadu(s + j) - vshift).exp();
    e.store(p + j);
    acc += e;
  }
  T sum = at::vec::vec_reduce_all<T>([](Vec& x, Vec& y) { return x + y; }, acc);
  if (j < n) {  // tail: the lanes past n load as zeros and are neither stored nor summed
    const int64_t r = n - j;
    const Vec e = (Vec::loadu(s + j, r) - vshift).exp();
    e.store(p + j, r);
    for (int64_t t = 0; t < r; ++t) sum += p[j + t];
  }
  return sum;
}

// Writes rows keys[0:nb] of `src` (head (b, h)) transposed into dst (dim x width, zero padded
// past nb).
template <typename scalar_t>
inline void gather_transposed(const Heads<scalar_t>& src, int64_t b, int64_t h, const int64_t* keys,
                              int64_t nb, int64_t dim, acc_t<scalar_t>* dst, int64_t width = kBlock) {
  using acc = acc_t<scalar_t>;
  // Eight rows at a time, so that each d writes 8 adjacent values (one store per key into a
  // different cache line cost 11% of the forward's time).
  constexpr int64_t kRowsAtOnce = 8;
  int64_t j0 = 0;
  for (; j0 + kRowsAtOnce <= nb; j0 += kRowsAtOnce) {
    const scalar_t* r[kRowsAtOnce];
    for (int64_t t = 0; t < kRowsAtOnce; ++t) r[t] = src.row(b, h, keys[j0 + t]);
    for (int64_t d = 0; d < dim; ++d) {
      acc* out = dst + d * width + j0;
      for (int64_t t = 0; t < kRowsAtOnce; ++t) out[t] = static_cast<acc>(r[t][d]);
    }
  }
  for (int64_t j = j0; j < nb; ++j) {
    const scalar_t* r = src.row(b, h, keys[j]);
    for (int64_t d = 0; d < dim; ++d) dst[d * width + j] = static_cast<acc>(r[d]);
  }
  for (int64_t d = 0; d < dim; ++d) {
    for (int64_t j = nb; j < width; ++j) dst[d * width + j] = acc(0);
  }
}

// The attention windows: batch x heads of them, each of length(b) query rows (at most seq) that
// attend to keys(b). Padded: every window has length seq, keys are those the mask keeps; varlen
// (cu_seqlens set): window b is its sequence, every key of it is kept.
struct Windows {
  int64_t batch, heads, seq, dim;  // seq: the longest window (max_seqlen)
  const bool* mask = nullptr;      // padded: (batch, seq) key padding mask, or none
  const int32_t* cu_seqlens = nullptr;  // varlen: (batch + 1,)

  int64_t length(int64_t b) const { return cu_seqlens ? cu_seqlens[b + 1] - cu_seqlens[b] : seq; }

  // The keys window b attends to: the kept ones, or all of them (uniform = true) when the mask
  // keeps none.
  bool keys(int64_t b, std::vector<int64_t>& keys) const {
    const int64_t n = length(b);
    keys.clear();
    if (mask) {
      for (int64_t j = 0; j < n; ++j) {
        if (mask[b * seq + j]) keys.push_back(j);
      }
    }
    const bool uniform = mask && keys.empty();
    if (!mask || uniform) {
      for (int64_t j = 0; j < n; ++j) keys.push_back(j);
    }
    return uniform;
  }
};

// Splits the (window, head) tasks, task = window * heads + head, into one list per thread and runs
// body(list) for each, in parallel: by work rather than by count, since a window's work grows as
// its length squared and a ragged batch split into halves by index can leave one thread with most
// of it (60% of the attention FLOPs of bench_optimize's 32 x U[16, 256] batch sit in its first 16
// sequences). Tasks go largest first to the least loaded list (LPT). Small problems run as one
// list on the calling thread.
template <typename Body>
void for_task_lists(const Windows& n, Body body) {
  const int64_t tasks = n.batch * n.heads;
  auto work = [&](int64_t task) {
    const int64_t len = n.length(task / n.heads);
    return (len + 1) * len * n.dim;
  };
  int64_t total = 0;
  for (int64_t task = 0; task < tasks; ++task) total += work(task);
  const int64_t parts = std::min<int64_t>(at::get_num_threads(), std::max<int64_t>(1, total / kMinWorkPerTask));
  std::vector<std::vector<int64_t>> lists(parts);
  std::vector<int64_t> order(tasks), load(parts, 0);
  for (int64_t task = 0; task < tasks; ++task) order[task] = task;
  if (parts > 1) {
    std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return work(a) > work(b); });
  }
  for (int64_t task : order) {
    const int64_t p = std::min_element(load.begin(), load.end()) - load.begin();
    lists[p].push_back(task);
    load[p] += work(task);
  }
  if (parts == 1) return body(lists[0]);
  at::parallel_for(0, parts, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) body(lists[p]);
  });
}

template <typename scalar_t>
void attention_fwd_kernel(const Windows& n, const Heads<scalar_t>& q, const Heads<scalar_t>& k,
                          const Heads<scalar_t>& v, const acc_t<scalar_t>* head_mask,
                          const bool* keep, double dropout_p, double scale,
                          const Heads<acc_t<scalar_t>>& out, acc_t<scalar_t>* lse) {
  using acc = acc_t<scalar_t>;
  const int64_t M = n.seq, D = n.dim;  // M: the longest window; per-window strides of keep, lse
  const acc keep_scale = acc(1.0 / (1.0 - dropout_p));
  for_task_lists(n, [&](const std::vector<int64_t>& tasks) {
    constexpr int64_t kWidth = tile_width<acc>();
    const int64_t block = std::min(kFwdBlock, M);
    const int64_t block_width = (block + kWidth - 1) / kWidth * kWidth;  // block rounded up to tiles
    std::vector<acc> qs(M * D), o(M * D), kt(D * block_width), vb(block * D), m(M), l(M);
    std::vector<acc> s(kTileRows * block_width);
    std::vector<int64_t> keys;
    for (int64_t task : tasks) {
      const int64_t b = task / n.heads, h = task % n.heads;
      const int64_t S = n.length(b);
      const bool uniform = n.keys(b, keys);
      for (int64_t i = 0; i < S; ++i) {
        load_row(q.row(b, h, i), qs.data() + i * D, D);
        for (int64_t d = 0; d < D; ++d) qs[i * D + d] *= acc(scale);
      }
      std::fill_n(o.begin(), S * D, acc(0));
      std::fill_n(m.begin(), S, -std::numeric_limits<acc>::infinity());
      std::fill_n(l.begin(), S, acc(0));
      const bool* keep_bh = keep ? keep + task * M * M : nullptr;

      for (int64_t j0 = 0; j0 < static_cast<int64_t>(keys.size()); j0 += block) {
        const int64_t nb = std::min<int64_t>(block, keys.size() - j0);
        const int64_t width = (nb + kWidth - 1) / kWidth * kWidth;
        const int64_t* kb = keys.data() + j0;
        if (!uniform) gather_transposed(k, b, h, kb, nb, D, kt.data(), width);
        for (int64_t j = 0; j < nb; ++j) load_row(v.row(b, h, kb[j]), vb.data() + j * D, D);

        // Folds the block into rows i0 .. i0 + R - 1 (R a compile-time constant).
        auto fold_rows = [&](auto rows_constant, int64_t i0) {
          constexpr int R = decltype(rows_constant)::value;
          if (uniform) {
            std::fill(s.begin(), s.end(), acc(0));
          } else {
            scores_tile<R>(qs.data() + i0 * D, D, kt.data(), width, s.data());
          }
          for (int r = 0; r < R; ++r) {
            const int64_t i = i0 + r;
            acc* si = s.data() + r * width;
            const acc m_new = std::max(m[i], row_max(si, nb));
            const acc corr = std::exp(m[i] - m_new);  // 0 on the first block (m = -inf)
            acc* oi = o.data() + i * D;
            if (corr != acc(1)) {
              for (int64_t d = 0; d < D; ++d) oi[d] *= corr;
            }
            const acc lsum = exp_shifted(si, nb, m_new, si);
            if (keep_bh) {
              for (int64_t j = 0; j < nb; ++j) si[j] = keep_bh[i * M + kb[j]] ? si[j] * keep_scale : acc(0);
            }
            l[i] = l[i] * corr + lsum;
            m[i] = m_new;
          }
          weighted_rows_tile<R>(s.data(), width, vb.data(), nb, D, o.data() + i0 * D);
        };
        for (int64_t i0 = 0; i0 < S; i0 += kTileRows) {
          with_tile_rows(static_cast<int>(std::min<int64_t>(kTileRows, S - i0)),
                         [&](auto rows_constant) { fold_rows(rows_constant, i0); });
        }
      }
      const acc hm = head_mask ? head_mask[h] : acc(1);
      for (int64_t i = 0; i < S; ++i) {
        const acc f = hm / l[i];
        acc* oi = o.data() + i * D;
        for (int64_t d = 0; d < D; ++d) oi[d] *= f;
        std::copy_n(oi, D, out.row(b, h, i));
        lse[task * M + i] = m[i] + std::log(l[i]);
      }
    }
  });
}

template <typename scalar_t>
void attention_bwd_kernel(const Windows& n, const Heads<scalar_t>& q, const Heads<scalar_t>& k,
                          const Heads<scalar_t>& v, const Heads<acc_t<scalar_t>>& out,
                          const Heads<scalar_t>& dout, const acc_t<scalar_t>* lse,
                          const acc_t<scalar_t>* head_mask, const bool* keep, double dropout_p,
                          double scale, const Heads<scalar_t>& dq, const Heads<scalar_t>& dk,
                          const Heads<scalar_t>& dv, acc_t<scalar_t>* dhead_mask) {
  using acc = acc_t<scalar_t>;
  const int64_t M = n.seq, D = n.dim;  // M: the longest window; per-window strides of keep, lse
  const acc keep_scale = acc(1.0 / (1.0 - dropout_p));
  for_task_lists(n, [&](const std::vector<int64_t>& tasks) {
    std::vector<acc> qs(M * D), dO(M * D), dQ(M * D), delta(M);
    static_assert(kBlock % tile_width<acc>() == 0, "a key block holds whole score tiles");
    constexpr int kRows = rows_per_pass<acc>();
    std::vector<acc> kt(D * kBlock), vt(D * kBlock), kb_rows(kBlock * D), dK(kBlock * D),
        dV(kBlock * D), s(kRows * kBlock), pr(kRows * kBlock), dw(kRows * kBlock);
    std::vector<int64_t> keys;
    for (int64_t task : tasks) {
      const int64_t b = task / n.heads, h = task % n.heads;
      const int64_t S = n.length(b);
      const bool uniform = n.keys(b, keys);
      const acc hm = head_mask ? head_mask[h] : acc(1);
      const bool* keep_bh = keep ? keep + task * M * M : nullptr;
      const acc* lse_bh = lse + task * M;
      for (int64_t i = 0; i < S; ++i) {
        load_row(q.row(b, h, i), qs.data() + i * D, D);
        for (int64_t d = 0; d < D; ++d) qs[i * D + d] *= acc(scale);
        load_row(dout.row(b, h, i), dO.data() + i * D, D);
        // sum_j P_ij dP_ij = dout_i . out_i, whatever the dropout and head mask
        delta[i] = row_dot(dO.data() + i * D, out.row(b, h, i), D);
      }
      std::fill_n(dQ.begin(), S * D, acc(0));
      // Keys outside the kept set get no gradient: start from zeros.
      for (int64_t j = 0; j < S; ++j) {
        std::fill_n(dk.row(b, h, j), D, scalar_t(0));
        std::fill_n(dv.row(b, h, j), D, scalar_t(0));
      }
      // dhead_mask[h] sums dW_ij * P_ij * keep_ij / (1 - p) over the head. Where hm != 0 that is
      // sum_i delta_i / hm, from the forward's output, which is more accurate than P recomputed
      // from lse; a pruned head (hm == 0) sums the terms. Double: batch * seq^2 terms.
      const bool dhm_terms = dhead_mask && hm == acc(0);
      double dhm = 0;

      for (int64_t j0 = 0; j0 < static_cast<int64_t>(keys.size()); j0 += kBlock) {
        const int64_t nb = std::min<int64_t>(kBlock, keys.size() - j0);
        const int64_t* kb = keys.data() + j0;
        if (!uniform) {
          gather_transposed(k, b, h, kb, nb, D, kt.data());
          for (int64_t j = 0; j < nb; ++j) load_row(k.row(b, h, kb[j]), kb_rows.data() + j * D, D);
        }
        gather_transposed(v, b, h, kb, nb, D, vt.data());
        std::fill(dK.begin(), dK.end(), acc(0));
        std::fill(dV.begin(), dV.end(), acc(0));

        // Rows i0 .. i0 + R - 1 against the block (R a compile-time constant): their P and dS
        // (R x kBlock), then dV += W^T dO, dK += dS^T q and dQ += dS K for all R rows at once.
        auto fold_rows = [&](auto rows_constant, int64_t i0) {
          constexpr int R = decltype(rows_constant)::value;
          const acc* q0 = qs.data() + i0 * D;
          const acc* do0 = dO.data() + i0 * D;
          if (uniform) {
            std::fill(s.begin(), s.end(), acc(0));
          } else {
            scores_tile<R>(q0, D, kt.data(), kBlock, s.data());
          }
          scores_tile<R>(do0, D, vt.data(), kBlock, dw.data());  // dW_ij = dout_i . v_j
          for (int r = 0; r < R; ++r) {
            const int64_t i = i0 + r;
            acc* pi = pr.data() + r * kBlock;  // P_ij, then W_ij = P_ij * keep_ij / (1 - p) * hm
            acc* si = s.data() + r * kBlock;   // scores, then dS_ij (zero when uniform)
            const acc* dwi = dw.data() + r * kBlock;
            exp_shifted(si, nb, lse_bh[i], pi);
            for (int64_t j = 0; j < nb; ++j) {
              const acc p = pi[j];
              const acc c = keep_bh ? (keep_bh[i * M + kb[j]] ? keep_scale : acc(0)) : acc(1);
              if (dhm_terms) dhm += dwi[j] * p * c;
              pi[j] = p * c * hm;
              // constant scores (uniform) carry no gradient to q, k
              si[j] = uniform ? acc(0) : p * (dwi[j] * c * hm - delta[i]);
            }
          }
          add_row_products<R>(pr.data(), do0, nb, D, dV.data());
          if (!uniform) {
            add_row_products<R>(s.data(), q0, nb, D, dK.data());
            weighted_rows_tile<R>(s.data(), kBlock, kb_rows.data(), nb, D, dQ.data() + i0 * D);
          }
        };
        int64_t i0 = 0;
        for (; i0 + kRows <= S; i0 += kRows) fold_rows(std::integral_constant<int, kRows>{}, i0);
        for (; i0 < S; ++i0) fold_rows(std::integral_constant<int, 1>{}, i0);
        for (int64_t j = 0; j < nb; ++j) {
          store_row(dV.data() + j * D, dv.row(b, h, kb[j]), D);
          store_row(dK.data() + j * D, dk.row(b, h, kb[j]), D);
        }
      }
      for (int64_t i = 0; i < S; ++i) {
        acc* dqi = dQ.data() + i * D;
        for (int64_t d = 0; d < D; ++d) dqi[d] *= acc(scale);
        store_row(dqi, dq.row(b, h, i), D);
      }
      if (dhead_mask && !dhm_terms) {
        for (int64_t i = 0; i < S; ++i) dhm += delta[i];
        dhm /= hm;
      }
      if (dhead_mask) dhead_mask[task] = static_cast<acc>(dhm);
    }
  });
}

// q, k, v of `ndim` dims (4: padded, 3: packed tokens), same shape and dtype, last dim of stride 1.
void check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t ndim) {
  TORCH_CHECK_VALUE(q.defined(), "q must be a tensor, got None");
  check_float_dtype(q.scalar_type(), "q");
  check_arg(q, "q", q.scalar_type(), ndim, /*inner_only=*/true);
  check_arg(k, "k", q.scalar_type(), ndim, true);
  check_shape(k, "k", q.sizes());
  check_arg(v, "v", q.scalar_type(), ndim, true);
  check_shape(v, "v", q.sizes());
  TORCH_CHECK_VALUE(q.size(-1) > 0, "q must have head_dim > 0, got shape ", shape_str(q.sizes()));
}

// The checks of every entry point run in its arguments' order, as the CUDA launchers' do
// (csrc/cuda/attention.cpp): q, k, v; the layout (key_padding_mask, or cu_seqlens and
// max_seqlen); the backward's grad_out, out and lse; head_mask; dropout_p and keep.
Windows padded_windows(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                       const c10::optional<at::Tensor>& mask) {
  check_qkv(q, k, v, 4);
  Windows n{q.size(0), q.size(1), q.size(2), q.size(3)};
  TORCH_CHECK_VALUE(n.seq > 0, "q must have seq > 0, got shape ", shape_str(q.sizes()));
  if (mask) {
    check_arg(*mask, "key_padding_mask", at::kBool, 2);
    check_shape(*mask, "key_padding_mask", {n.batch, n.seq});
    n.mask = mask->data_ptr<bool>();
  }
  return n;
}

// cu_seqlens (batch + 1,) int32 on the CPU: starts at 0, non-decreasing, ends at total, no
// sequence longer than max_seqlen. Checked here in full (it is on the host): no window reads
// outside q.
Windows varlen_windows(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                       const at::Tensor& cu_seqlens, int64_t max_seqlen) {
  check_qkv(q, k, v, 3);
  TORCH_CHECK_VALUE(cu_seqlens.defined(), "cu_seqlens must be a tensor, got None");
  check_arg(cu_seqlens, "cu_seqlens", at::kInt, 1);
  TORCH_CHECK_VALUE(cu_seqlens.size(0) >= 2, "cu_seqlens must have shape (batch + 1,) with batch >= 1, got ",
                    shape_str(cu_seqlens.sizes()));
  TORCH_CHECK_VALUE(max_seqlen >= 1, "max_seqlen must be at least 1, got ", max_seqlen);
  const int32_t* cu = cu_seqlens.data_ptr<int32_t>();
  const int64_t batch = cu_seqlens.size(0) - 1, total = q.size(0);
  TORCH_CHECK_VALUE(cu[0] == 0, "cu_seqlens must start at 0, got cu_seqlens[0] = ", cu[0]);
  for (int64_t b = 0; b < batch; ++b) {
    TORCH_CHECK_VALUE(cu[b + 1] >= cu[b], "cu_seqlens must be non-decreasing, got cu_seqlens[", b,
                      "] = ", cu[b], " > cu_seqlens[", b + 1, "] = ", cu[b + 1]);
    TORCH_CHECK_VALUE(cu[b + 1] - cu[b] <= max_seqlen, "max_seqlen must be at least the longest ",
                      "sequence (", cu[b + 1] - cu[b], "), got ", max_seqlen);
  }
  TORCH_CHECK_VALUE(cu[batch] == total, "cu_seqlens[-1] must equal the number of tokens in q (",
                    total, "), got ", cu[batch]);
  Windows n{batch, q.size(1), max_seqlen, q.size(2)};
  n.cu_seqlens = cu;
  return n;
}

void check_head_mask_and_dropout(const Windows& n, at::ScalarType dtype,
                                 const c10::optional<at::Tensor>& head_mask,
                                 const c10::optional<at::Tensor>& keep, double dropout_p) {
  if (head_mask) {
    check_arg(*head_mask, "head_mask", acc_dtype(dtype), 1);
    check_shape(*head_mask, "head_mask", {n.heads});
  }
  TORCH_CHECK_VALUE(dropout_p >= 0.0 && dropout_p < 1.0, "dropout_p must be in [0, 1), got ", dropout_p);
  if (keep) {
    check_arg(*keep, "keep", at::kBool, 4);
    check_shape(*keep, "keep", {n.batch, n.heads, n.seq, n.seq});
  }
}

// The backward's saved forward results: out in the accumulation dtype, lse per window.
void check_saved(const at::Tensor& q, const Windows& n, const at::Tensor& grad_out,
                 const at::Tensor& out, const at::Tensor& lse) {
  check_arg(grad_out, "grad_out", q.scalar_type(), q.dim(), true);
  check_shape(grad_out, "grad_out", q.sizes());
  check_arg(out, "out", acc_dtype(q.scalar_type()), q.dim(), true);
  check_shape(out, "out", q.sizes());
  check_arg(lse, "lse", acc_dtype(q.scalar_type()), 3);
  check_shape(lse, "lse", {n.batch, n.heads, n.seq});
}

// (batch, seq, heads, head_dim) memory seen as (batch, heads, seq, head_dim).
at::Tensor empty_heads(const Windows& n, const at::TensorOptions& options) {
  return empty_output({n.batch, n.seq, n.heads, n.dim}, options).transpose(1, 2);
}

template <typename T>
const T* opt_ptr(const c10::optional<at::Tensor>& t) {
  return t ? t->data_ptr<T>() : nullptr;
}

// Rows of a padded (4-dim) or packed (3-dim) tensor.
template <typename T>
Heads<T> heads_of(const at::Tensor& t, const Windows& n) {
  return n.cu_seqlens ? Heads<T>(t, n.cu_seqlens) : Heads<T>(t);
}

// -- bfloat16 inference on the CPU's matrix units ------------------------------------------------
// Varlen attention in bf16 with no backward to feed (no lse, no float32 output kept), for CPUs
// whose bf16 matrix units oneDNN's brgemm micro-kernel drives (AMX: at::native::cpublas::could_pack
// says so). q k^T and P v are bf16 x bf16 -> float32 brgemm calls; the softmax runs in float32
// between them, exact per row (all of a window's scores are held: kQRows x max_seqlen floats), and
// P is rounded to bf16 for the second product, as PyTorch's flash CPU kernel and eager bf16 do.
// One task per (sequence, head): its keys and values are packed once into the VNNI layout the
// micro-kernel reads (pairs of bf16 along the reduction dim), then its query rows run kQRows at a
// time. Every brgemm has M = kQRows and N, K of kKeys or head_dim, so each thread JITs a handful of
// kernels (one per leading dimension, i.e. per max_seqlen rounded up to kKeys) and caches them.
constexpr int64_t kQRows = 32;  // query rows per brgemm
constexpr int64_t kKeys = 64;   // keys per brgemm block

using bf16 = c10::BFloat16;

// Keys j < n (rows of head h of window b) as q k^T's B operands, one per block of kKeys keys:
// K^T of the block (dim x kKeys) in VNNI layout, element (d, j) at ((d / 2) * kKeys + j) * 2 + d % 2,
// the blocks one after another (dim * kKeys apart), keys n .. kp - 1 zero (read from `zeros`, dim
// zeros). A bf16 pair moves as one 32-bit word, 16 keys at a time, so each store run fills a
// cache line (a key at a time, the stores 256 bytes apart stalled on 4K aliasing).
inline void pack_keys_vnni(const Heads<bf16>& k, int64_t b, int64_t h, int64_t n, int64_t kp,
                           int64_t dim, const bf16* zeros, bf16* dst) {
  constexpr int64_t kGroup = 16;
  static_assert(kKeys % kGroup == 0, "key blocks hold whole groups");
  const int64_t pairs = dim / 2;
  for (int64_t j0 = 0; j0 < kp; j0 += kGroup) {
    const char* rows[kGroup];
    for (int64_t t = 0; t < kGroup; ++t) {
      rows[t] = reinterpret_cast<const char*>(j0 + t < n ? k.row(b, h, j0 + t) : zeros);
    }
    char* base = reinterpret_cast<char*>(dst) + 4 * ((j0 / kKeys) * pairs * kKeys + j0 % kKeys);
    for (int64_t p = 0; p < pairs; ++p) {
      uint32_t group[kGroup];
      for (int64_t t = 0; t < kGroup; ++t) std::memcpy(group + t, rows[t] + 4 * p, 4);
      std::memcpy(base + 4 * p * kKeys, group, sizeof(group));
    }
  }
}

// Values j < n as P v's B operand, V (kp x dim) in VNNI layout: element (j, d) at
// ((j / 2) * dim + d) * 2 + j % 2, rows n .. kp - 1 zero (read from `zeros`).
inline void pack_values_vnni(const Heads<bf16>& v, int64_t b, int64_t h, int64_t n, int64_t kp,
                             int64_t dim, const bf16* zeros, bf16* dst) {
  for (int64_t j = 0; j < kp; j += 2) {
    uint16_t* out = reinterpret_cast<uint16_t*>(dst + j * dim);
    const uint16_t* even = reinterpret_cast<const uint16_t*>(j < n ? v.row(b, h, j) : zeros);
    const uint16_t* odd = reinterpret_cast<const uint16_t*>(j + 1 < n ? v.row(b, h, j + 1) : zeros);
    for (int64_t d = 0; d < dim; ++d) {
      out[2 * d] = even[d];
      out[2 * d + 1] = odd[d];
    }
  }
}

void bf16_attention_fwd_kernel(const Windows& n, const Heads<bf16>& q, const Heads<bf16>& k,
                               const Heads<bf16>& v, double scale, const Heads<bf16>& out) {
  namespace blas = at::native::cpublas;
  const int64_t D = n.dim;
  const int64_t kp_max = (n.seq + kKeys - 1) / kKeys * kKeys;
  for_task_lists(n, [&](const std::vector<int64_t>& tasks) {
    std::vector<bf16> kt(kp_max * D), vp(kp_max * D), qb(kQRows * D), p(kQRows * kp_max), zeros(D, bf16(0.0f));
    std::vector<float> s(kQRows * kp_max), o(kQRows * D), l(kQRows);
    for (int64_t task : tasks) {
      const int64_t b = task / n.heads, h = task % n.heads;
      const int64_t S = n.length(b);
      if (S == 0) continue;
      const int64_t kp = (S + kKeys - 1) / kKeys * kKeys;  // keys padded to whole blocks
      pack_keys_vnni(k, b, h, S, kp, D, zeros.data(), kt.data());
      pack_values_vnni(v, b, h, S, kp, D, zeros.data(), vp.data());
      for (int64_t i0 = 0; i0 < S; i0 += kQRows) {
        const int64_t rows = std::min(kQRows, S - i0);
        for (int64_t r = 0; r < rows; ++r) std::copy_n(q.row(b, h, i0 + r), D, qb.data() + r * D);
        std::fill(qb.begin() + rows * D, qb.end(), bf16(0.0f));
        for (int64_t j0 = 0; j0 < kp; j0 += kKeys) {
          blas::brgemm(kQRows, kKeys, D, D, kKeys, kp, false, qb.data(), kt.data() + j0 * D,
                       s.data() + j0, true);
        }
        for (int64_t r = 0; r < rows; ++r) {
          float* sr = s.data() + r * kp;
          at::vec::map([&](Vectorized<float> x) { return x * Vectorized<float>(float(scale)); }, sr, sr, S);
          l[r] = exp_shifted(sr, S, row_max(sr, S), sr);
          store_row<bf16>(sr, p.data() + r * kp, S);
          std::fill(p.data() + r * kp + S, p.data() + (r + 1) * kp, bf16(0.0f));
        }
        std::fill(p.begin() + rows * kp, p.begin() + kQRows * kp, bf16(0.0f));
        for (int64_t j0 = 0; j0 < kp; j0 += kKeys) {
          blas::brgemm(kQRows, D, kKeys, kp, D, D, j0 > 0, p.data() + j0, vp.data() + j0 * D,
                       o.data(), true);
        }
        for (int64_t r = 0; r < rows; ++r) {
          float* orow = o.data() + r * D;
          const float f = 1.0f / l[r];
          at::vec::map([&](Vectorized<float> x) { return x * Vectorized<float>(f); }, orow, orow, D);
          store_row<bf16>(orow, out.row(b, h, i0 + r), D);
        }
      }
    }
    blas::brgemm_release(true);
  });
}

// out (like q) in the accumulation dtype and lse (batch, heads, max window).
std::vector<at::Tensor> attention_fwd(const Windows& n, const at::Tensor& q, const at::Tensor& k,
                                      const at::Tensor& v,
                                      const c10::optional<at::Tensor>& head_mask,
                                      const c10::optional<at::Tensor>& keep, double dropout_p,
                                      double scale) {
  check_head_mask_and_dropout(n, q.scalar_type(), head_mask, keep, dropout_p);
  const auto acc_options = q.options().dtype(acc_dtype(q.scalar_type()));
  at::Tensor out = n.cu_seqlens ? empty_output(q.sizes(), acc_options) : empty_heads(n, acc_options);
  at::Tensor lse = at::empty({n.batch, n.heads, n.seq}, acc_options);
  DBF_DISPATCH(q.scalar_type(), "attention_fwd", [&] {
    using acc = acc_t<scalar_t>;
    attention_fwd_kernel<scalar_t>(n, heads_of<scalar_t>(q, n), heads_of<scalar_t>(k, n),
                                   heads_of<scalar_t>(v, n), opt_ptr<acc>(head_mask),
                                   opt_ptr<bool>(keep), dropout_p, scale, heads_of<acc>(out, n),
                                   lse.data_ptr<acc>());
  });
  return {out, lse};
}

// dq, dk, dv (like q) and, when need_dhead_mask and a head_mask is given, dhead_mask (heads,) in
// the accumulation dtype.
std::vector<at::Tensor> attention_bwd(const Windows& n, const at::Tensor& grad_out,
                                      const at::Tensor& q, const at::Tensor& k,
                                      const at::Tensor& v, const at::Tensor& out,
                                      const at::Tensor& lse,
                                      const c10::optional<at::Tensor>& head_mask,
                                      const c10::optional<at::Tensor>& keep, double dropout_p,
                                      double scale, bool need_dhead_mask) {
  check_saved(q, n, grad_out, out, lse);
  check_head_mask_and_dropout(n, q.scalar_type(), head_mask, keep, dropout_p);
  auto empty_like_q = [&] {
    return n.cu_seqlens ? empty_output(q.sizes(), q.options()) : empty_heads(n, q.options());
  };
  at::Tensor dq = empty_like_q(), dk = empty_like_q(), dv = empty_like_q();
  at::Tensor dhm_bh;
  if (need_dhead_mask && head_mask) dhm_bh = at::empty({n.batch, n.heads}, lse.options());
  DBF_DISPATCH(q.scalar_type(), "attention_bwd", [&] {
    using acc = acc_t<scalar_t>;
    attention_bwd_kernel<scalar_t>(
        n, heads_of<scalar_t>(q, n), heads_of<scalar_t>(k, n), heads_of<scalar_t>(v, n),
        heads_of<acc>(out, n), heads_of<scalar_t>(grad_out, n), lse.data_ptr<acc>(),
        opt_ptr<acc>(head_mask), opt_ptr<bool>(keep), dropout_p, scale, heads_of<scalar_t>(dq, n),
        heads_of<scalar_t>(dk, n), heads_of<scalar_t>(dv, n),
        dhm_bh.defined() ? dhm_bh.data_ptr<acc>() : nullptr);
  });
  at::Tensor dhead_mask;
  if (dhm_bh.defined()) {
    // Summed over the batch here, in a fixed order: the per-(batch, head) partials need no atomics.
    dhead_mask = dhm_bh.sum(0);
  }
  return {dq, dk, dv, dhead_mask};
}

}  // namespace

// Padded: q, k, v (batch, heads, seq, head_dim); out (batch, heads, seq, head_dim) and lse
// (batch, heads, seq), both in the accumulation dtype.
std::vector<at::Tensor> masked_attention_fwd(const at::Tensor& q, const at::Tensor& k,
                                             const at::Tensor& v,
                                             const c10::optional<at::Tensor>& key_padding_mask,
                                             const c10::optional<at::Tensor>& head_mask,
                                             const c10::optional<at::Tensor>& keep,
                                             double dropout_p, double scale) {
  return attention_fwd(padded_windows(q, k, v, key_padding_mask), q, k, v, head_mask, keep, dropout_p,
                       scale);
}

std::vector<at::Tensor> masked_attention_bwd(const at::Tensor& grad_out, const at::Tensor& q,
                                             const at::Tensor& k, const at::Tensor& v,
                                             const at::Tensor& out, const at::Tensor& lse,
                                             const c10::optional<at::Tensor>& key_padding_mask,
                                             const c10::optional<at::Tensor>& head_mask,
                                             const c10::optional<at::Tensor>& keep,
                                             double dropout_p, double scale,
                                             bool need_dhead_mask) {
  return attention_bwd(padded_windows(q, k, v, key_padding_mask), grad_out, q, k, v, out, lse,
                       head_mask, keep, dropout_p, scale, need_dhead_mask);
}

// Packed: q, k, v (total, heads, head_dim) (strided views of a fused QKV projection are fine),
// cu_seqlens (batch + 1,) int32; out (total, heads, head_dim) and lse (batch, heads, max_seqlen)
// in the accumulation dtype; keep, if any, (batch, heads, max_seqlen, max_seqlen).
std::vector<at::Tensor> varlen_attention_fwd(const at::Tensor& q, const at::Tensor& k,
                                             const at::Tensor& v, const at::Tensor& cu_seqlens,
                                             int64_t max_seqlen,
                                             const c10::optional<at::Tensor>& head_mask,
                                             const c10::optional<at::Tensor>& keep,
                                             double dropout_p, double scale) {
  return attention_fwd(varlen_windows(q, k, v, cu_seqlens, max_seqlen), q, k, v, head_mask, keep,
                       dropout_p, scale);
}

std::vector<at::Tensor> varlen_attention_bwd(const at::Tensor& grad_out, const at::Tensor& q,
                                             const at::Tensor& k, const at::Tensor& v,
                                             const at::Tensor& out, const at::Tensor& lse,
                                             const at::Tensor& cu_seqlens, int64_t max_seqlen,
                                             const c10::optional<at::Tensor>& head_mask,
                                             const c10::optional<at::Tensor>& keep,
                                             double dropout_p, double scale,
                                             bool need_dhead_mask) {
  return attention_bwd(varlen_windows(q, k, v, cu_seqlens, max_seqlen), grad_out, q, k, v, out, lse,
                       head_mask, keep, dropout_p, scale, need_dhead_mask);
}

bool bf16_matrix_units() { return at::native::cpublas::could_pack(at::kBFloat16); }

// Packed bf16 inference: out (total, heads, head_dim) bf16 of attention within each sequence, on the
// matrix units (see bf16_attention_fwd_kernel); head_dim even.
at::Tensor varlen_attention_bf16_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                     const at::Tensor& cu_seqlens, int64_t max_seqlen, double scale) {
  const Windows n = varlen_windows(q, k, v, cu_seqlens, max_seqlen);
  TORCH_CHECK_TYPE(q.scalar_type() == at::kBFloat16, "q must have dtype bfloat16, got ", q.scalar_type());
  TORCH_CHECK_VALUE(n.dim % 2 == 0, "q must have an even head_dim, got shape ", shape_str(q.sizes()));
  TORCH_CHECK_VALUE(bf16_matrix_units(), "varlen_attention_bf16_fwd needs a CPU with bf16 matrix units ",
                    "(AMX) and torch's oneDNN brgemm; cpu_bf16_matrix_units() says whether they are here");
  at::Tensor out = empty_output(q.sizes(), q.options());
  bf16_attention_fwd_kernel(n, heads_of<bf16>(q, n), heads_of<bf16>(k, n), heads_of<bf16>(v, n), scale,
                            heads_of<bf16>(out, n));
  return out;
}

}  // namespace cpu
}  // namespace distilbert_fast
