// Masked multi-head attention on the CPU, forward and backward, blocked over keys with an online
// softmax, so the (seq x seq) scores are never materialised:
//
//     P = softmax(q k^T * scale) over the keys the padding mask keeps
//     W = P * keep / (1 - p) * head_mask[h]           (dropout keep-mask, optional)
//     out = W v
//
// One task per (batch, head), spread with at::parallel_for. A task gathers the kept keys in
// blocks of kBlock: K (and in the backward V) of a block is transposed into an acc_t buffer
// (D x kBlock) so that a query row's scores against the block are kBlock-wide FMAs over head_dim,
// then every query row folds the block into its running max m, normaliser l and output o
// (flash-attention's recurrence). Both directions take a few query rows per pass, so each vector
// of K, V (or dK, dV) they load serves all of them. The forward saves lse = m + log(l) per row;
// the backward recomputes P from it.
//
// Masked keys get exactly zero weight, as eager's masked_fill(finfo.min) + softmax gives. A batch
// row whose keys are all masked attends uniformly to every key (eager's scores there are all the
// same constant); its scores then carry no gradient to q or k.
//
// q, k, v and grad_out may be strided views (the last dim must have stride 1), such as the model's
// (batch, seq, heads, head_dim) projections transposed to (batch, heads, seq, head_dim). out, dq,
// dk and dv are allocated as (batch, seq, heads, head_dim) memory returned as (batch, heads, seq,
// head_dim) views, so the model's transpose back to (batch, seq, dim) is free.
//
// out is returned in acc_t (float32 for bf16 inputs; the caller narrows it): the backward's
// delta_i = dout_i . out_i must see the unrounded output, or a row whose exact gradient is zero
// (one key) picks up bf16 rounding noise.
#include "common.h"

#include <cmath>
#include <limits>
#include <type_traits>

namespace distilbert_fast {
namespace cpu {
namespace {

constexpr int64_t kBlock = 64;  // keys per block

// A (batch, heads, seq, head_dim) tensor's data and strides.
template <typename scalar_t>
struct Heads {
  scalar_t* data;
  int64_t sb, sh, ss;
  Heads(const at::Tensor& t)
      : data(t.data_ptr<scalar_t>()), sb(t.stride(0)), sh(t.stride(1)), ss(t.stride(2)) {}
  scalar_t* row(int64_t b, int64_t h, int64_t s) const { return data + b * sb + h * sh + s * ss; }
};

// Query rows folded together per key block in the forward: each vector of K or V loaded from L1
// then serves that many rows, with R x (kBlock / Vec::size()) accumulators in registers (16).
template <typename T>
constexpr int rows_per_pass() {
  constexpr int64_t vecs = kBlock / Vectorized<T>::size();
  return vecs >= 16 ? 1 : static_cast<int>(16 / vecs);
}

// out[r * kBlock + 0:kBlock] = sum_d a[r * dim + d] * bt[d * kBlock + 0:kBlock] for r < R: R rows
// against a transposed block.
template <int R, typename T>
inline void rows_times_block(const T* a, const T* bt, int64_t dim, T* out) {
  using Vec = Vectorized<T>;
  constexpr int64_t n = kBlock / Vec::size();
  Vec acc[R][n];
  for (int r = 0; r < R; ++r) {
    for (int64_t t = 0; t < n; ++t) acc[r][t] = Vec(T(0));
  }
  for (int64_t d = 0; d < dim; ++d) {
    const T* brow = bt + d * kBlock;
    Vec bv[n];
    for (int64_t t = 0; t < n; ++t) bv[t] = Vec::loadu(brow + t * Vec::size());
    for (int r = 0; r < R; ++r) {
      const Vec ad(a[r * dim + d]);
      for (int64_t t = 0; t < n; ++t) acc[r][t] = at::vec::fmadd(ad, bv[t], acc[r][t]);
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int64_t t = 0; t < n; ++t) acc[r][t].store(out + r * kBlock + t * Vec::size());
  }
}

// o[r * dim + 0:dim] += sum_j w[r * kBlock + j] * rows[j * dim + 0:dim], j < nb, r < R: the
// outputs stay in registers across the keys.
template <int R, typename T>
inline void accumulate_rows(const T* w, const T* rows, int64_t nb, int64_t dim, T* o) {
  using Vec = Vectorized<T>;
  constexpr int64_t kVecs = 4;
  int64_t d0 = 0;
  for (; d0 + kVecs * Vec::size() <= dim; d0 += kVecs * Vec::size()) {
    Vec acc[R][kVecs];
    for (int r = 0; r < R; ++r) {
      for (int64_t t = 0; t < kVecs; ++t) acc[r][t] = Vec::loadu(o + r * dim + d0 + t * Vec::size());
    }
    for (int64_t j = 0; j < nb; ++j) {
      const T* src = rows + j * dim + d0;
      Vec rv[kVecs];
      for (int64_t t = 0; t < kVecs; ++t) rv[t] = Vec::loadu(src + t * Vec::size());
      for (int r = 0; r < R; ++r) {
        const Vec wj(w[r * kBlock + j]);
        for (int64_t t = 0; t < kVecs; ++t) acc[r][t] = at::vec::fmadd(wj, rv[t], acc[r][t]);
      }
    }
    for (int r = 0; r < R; ++r) {
      for (int64_t t = 0; t < kVecs; ++t) acc[r][t].store(o + r * dim + d0 + t * Vec::size());
    }
  }
  if (d0 < dim) {
    for (int r = 0; r < R; ++r) {
      for (int64_t j = 0; j < nb; ++j) {
        const T wj = w[r * kBlock + j];
        if (wj != T(0)) row_axpy(wj, rows + j * dim + d0, o + r * dim + d0, dim - d0);
      }
    }
  }
}

// dst[j * dim + 0:dim] += sum_r w[r * kBlock + j] * src[r * dim + 0:dim], j < nb, r < R: the
// backward's dK and dV updates from R query rows at once, each dst row loaded and stored once.
// accumulate_rows's transpose: there the R outputs stay in registers while the nb rows stream
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

// Writes rows keys[0:nb] of `src` (head (b, h)) transposed into dst (dim x kBlock, zero padded).
template <typename scalar_t>
inline void gather_transposed(const Heads<scalar_t>& src, int64_t b, int64_t h, const int64_t* keys,
                              int64_t nb, int64_t dim, acc_t<scalar_t>* dst) {
  using acc = acc_t<scalar_t>;
  for (int64_t j = 0; j < nb; ++j) {
    const scalar_t* r = src.row(b, h, keys[j]);
    for (int64_t d = 0; d < dim; ++d) dst[d * kBlock + j] = static_cast<acc>(r[d]);
  }
  for (int64_t d = 0; d < dim; ++d) {
    for (int64_t j = nb; j < kBlock; ++j) dst[d * kBlock + j] = acc(0);
  }
}

// The keys head (b, *) attends to: the kept ones, or all of them (uniform = true) when none is.
inline bool kept_keys(const bool* mask, int64_t b, int64_t seq, std::vector<int64_t>& keys) {
  keys.clear();
  if (mask) {
    for (int64_t j = 0; j < seq; ++j) {
      if (mask[b * seq + j]) keys.push_back(j);
    }
  }
  const bool uniform = mask && keys.empty();
  if (!mask || uniform) {
    for (int64_t j = 0; j < seq; ++j) keys.push_back(j);
  }
  return uniform;
}

struct Dims {
  int64_t batch, heads, seq, dim;
};

template <typename scalar_t>
void attention_fwd_kernel(const Dims& n, const Heads<scalar_t>& q, const Heads<scalar_t>& k,
                          const Heads<scalar_t>& v, const bool* mask,
                          const acc_t<scalar_t>* head_mask, const bool* keep, double dropout_p,
                          double scale, const Heads<acc_t<scalar_t>>& out, acc_t<scalar_t>* lse) {
  using acc = acc_t<scalar_t>;
  const int64_t S = n.seq, D = n.dim;
  const acc keep_scale = acc(1.0 / (1.0 - dropout_p));
  at::parallel_for(0, n.batch * n.heads, grain_for(S * S * D), [&](int64_t begin, int64_t end) {
    constexpr int kRows = rows_per_pass<acc>();
    std::vector<acc> qs(S * D), o(S * D), kt(D * kBlock), vb(kBlock * D), m(S), l(S);
    std::vector<acc> s(kRows * kBlock);
    std::vector<int64_t> keys;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / n.heads, h = task % n.heads;
      const bool uniform = kept_keys(mask, b, S, keys);
      for (int64_t i = 0; i < S; ++i) {
        load_row(q.row(b, h, i), qs.data() + i * D, D);
        for (int64_t d = 0; d < D; ++d) qs[i * D + d] *= acc(scale);
      }
      std::fill(o.begin(), o.end(), acc(0));
      std::fill(m.begin(), m.end(), -std::numeric_limits<acc>::infinity());
      std::fill(l.begin(), l.end(), acc(0));
      const bool* keep_bh = keep ? keep + task * S * S : nullptr;

      for (int64_t j0 = 0; j0 < static_cast<int64_t>(keys.size()); j0 += kBlock) {
        const int64_t nb = std::min<int64_t>(kBlock, keys.size() - j0);
        const int64_t* kb = keys.data() + j0;
        if (!uniform) gather_transposed(k, b, h, kb, nb, D, kt.data());
        for (int64_t j = 0; j < nb; ++j) load_row(v.row(b, h, kb[j]), vb.data() + j * D, D);

        // Folds the block into rows i0 .. i0 + R - 1 (R a compile-time constant).
        auto fold_rows = [&](auto rows_constant, int64_t i0) {
          constexpr int R = decltype(rows_constant)::value;
          if (uniform) {
            std::fill(s.begin(), s.end(), acc(0));
          } else {
            rows_times_block<R>(qs.data() + i0 * D, kt.data(), D, s.data());
          }
          for (int r = 0; r < R; ++r) {
            const int64_t i = i0 + r;
            acc* si = s.data() + r * kBlock;
            const acc m_new = std::max(m[i], row_max(si, nb));
            const acc corr = std::exp(m[i] - m_new);  // 0 on the first block (m = -inf)
            acc* oi = o.data() + i * D;
            if (corr != acc(1)) {
              for (int64_t d = 0; d < D; ++d) oi[d] *= corr;
            }
            const acc lsum = exp_shifted(si, nb, m_new, si);
            if (keep_bh) {
              for (int64_t j = 0; j < nb; ++j) si[j] = keep_bh[i * S + kb[j]] ? si[j] * keep_scale : acc(0);
            }
            l[i] = l[i] * corr + lsum;
            m[i] = m_new;
          }
          accumulate_rows<R>(s.data(), vb.data(), nb, D, o.data() + i0 * D);
        };
        int64_t i0 = 0;
        for (; i0 + kRows <= S; i0 += kRows) fold_rows(std::integral_constant<int, kRows>{}, i0);
        for (; i0 < S; ++i0) fold_rows(std::integral_constant<int, 1>{}, i0);
      }
      const acc hm = head_mask ? head_mask[h] : acc(1);
      for (int64_t i = 0; i < S; ++i) {
        const acc f = hm / l[i];
        acc* oi = o.data() + i * D;
        for (int64_t d = 0; d < D; ++d) oi[d] *= f;
        std::copy_n(oi, D, out.row(b, h, i));
        lse[task * S + i] = m[i] + std::log(l[i]);
      }
    }
  });
}

template <typename scalar_t>
void attention_bwd_kernel(const Dims& n, const Heads<scalar_t>& q, const Heads<scalar_t>& k,
                          const Heads<scalar_t>& v, const Heads<acc_t<scalar_t>>& out,
                          const Heads<scalar_t>& dout, const acc_t<scalar_t>* lse,
                          const bool* mask, const acc_t<scalar_t>* head_mask, const bool* keep,
                          double dropout_p, double scale, const Heads<scalar_t>& dq,
                          const Heads<scalar_t>& dk, const Heads<scalar_t>& dv,
                          acc_t<scalar_t>* dhead_mask) {
  using acc = acc_t<scalar_t>;
  const int64_t S = n.seq, D = n.dim;
  const acc keep_scale = acc(1.0 / (1.0 - dropout_p));
  at::parallel_for(0, n.batch * n.heads, grain_for(S * S * D), [&](int64_t begin, int64_t end) {
    std::vector<acc> qs(S * D), dO(S * D), dQ(S * D), delta(S);
    constexpr int kRows = rows_per_pass<acc>();
    std::vector<acc> kt(D * kBlock), vt(D * kBlock), kb_rows(kBlock * D), dK(kBlock * D),
        dV(kBlock * D), s(kRows * kBlock), pr(kRows * kBlock), dw(kRows * kBlock);
    std::vector<int64_t> keys;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / n.heads, h = task % n.heads;
      const bool uniform = kept_keys(mask, b, S, keys);
      const acc hm = head_mask ? head_mask[h] : acc(1);
      const bool* keep_bh = keep ? keep + task * S * S : nullptr;
      const acc* lse_bh = lse + task * S;
      for (int64_t i = 0; i < S; ++i) {
        load_row(q.row(b, h, i), qs.data() + i * D, D);
        for (int64_t d = 0; d < D; ++d) qs[i * D + d] *= acc(scale);
        load_row(dout.row(b, h, i), dO.data() + i * D, D);
        // sum_j P_ij dP_ij = dout_i . out_i, whatever the dropout and head mask
        delta[i] = row_dot(dO.data() + i * D, out.row(b, h, i), D);
      }
      std::fill(dQ.begin(), dQ.end(), acc(0));
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
            rows_times_block<R>(q0, kt.data(), D, s.data());
          }
          rows_times_block<R>(do0, vt.data(), D, dw.data());  // dW_ij = dout_i . v_j
          for (int r = 0; r < R; ++r) {
            const int64_t i = i0 + r;
            acc* pi = pr.data() + r * kBlock;  // P_ij, then W_ij = P_ij * keep_ij / (1 - p) * hm
            acc* si = s.data() + r * kBlock;   // scores, then dS_ij (zero when uniform)
            const acc* dwi = dw.data() + r * kBlock;
            exp_shifted(si, nb, lse_bh[i], pi);
            for (int64_t j = 0; j < nb; ++j) {
              const acc p = pi[j];
              const acc c = keep_bh ? (keep_bh[i * S + kb[j]] ? keep_scale : acc(0)) : acc(1);
              if (dhm_terms) dhm += dwi[j] * p * c;
              pi[j] = p * c * hm;
              // constant scores (uniform) carry no gradient to q, k
              si[j] = uniform ? acc(0) : p * (dwi[j] * c * hm - delta[i]);
            }
          }
          add_row_products<R>(pr.data(), do0, nb, D, dV.data());
          if (!uniform) {
            add_row_products<R>(s.data(), q0, nb, D, dK.data());
            accumulate_rows<R>(s.data(), kb_rows.data(), nb, D, dQ.data() + i0 * D);
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

Dims check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  TORCH_CHECK(q.defined(), "q must be a tensor, got None");
  check_float_dtype(q.scalar_type(), "q");
  check_arg(q, "q", q.scalar_type(), 4, /*inner_only=*/true);
  check_arg(k, "k", q.scalar_type(), 4, true);
  check_shape(k, "k", q.sizes());
  check_arg(v, "v", q.scalar_type(), 4, true);
  check_shape(v, "v", q.sizes());
  const Dims n{q.size(0), q.size(1), q.size(2), q.size(3)};
  TORCH_CHECK(n.seq > 0 && n.dim > 0, "q must have seq > 0 and head_dim > 0, got shape ",
              shape_str(q.sizes()));
  return n;
}

void check_masks(const Dims& n, at::ScalarType dtype, const c10::optional<at::Tensor>& mask,
                 const c10::optional<at::Tensor>& head_mask, const c10::optional<at::Tensor>& keep,
                 double dropout_p) {
  if (mask) {
    check_arg(*mask, "key_padding_mask", at::kBool, 2);
    check_shape(*mask, "key_padding_mask", {n.batch, n.seq});
  }
  if (head_mask) {
    check_arg(*head_mask, "head_mask", acc_dtype(dtype), 1);
    check_shape(*head_mask, "head_mask", {n.heads});
  }
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, "dropout_p must be in [0, 1), got ", dropout_p);
  if (keep) {
    check_arg(*keep, "keep", at::kBool, 4);
    check_shape(*keep, "keep", {n.batch, n.heads, n.seq, n.seq});
  }
}

// (batch, seq, heads, head_dim) memory seen as (batch, heads, seq, head_dim).
at::Tensor empty_heads(const Dims& n, const at::TensorOptions& options) {
  return empty_output({n.batch, n.seq, n.heads, n.dim}, options).transpose(1, 2);
}

template <typename T>
const T* opt_ptr(const c10::optional<at::Tensor>& t) {
  return t ? t->data_ptr<T>() : nullptr;
}

}  // namespace

// out (batch, heads, seq, head_dim) and lse (batch, heads, seq), both in the accumulation dtype.
std::vector<at::Tensor> masked_attention_fwd(const at::Tensor& q, const at::Tensor& k,
                                             const at::Tensor& v,
                                             const c10::optional<at::Tensor>& key_padding_mask,
                                             const c10::optional<at::Tensor>& head_mask,
                                             const c10::optional<at::Tensor>& keep,
                                             double dropout_p, double scale) {
  const Dims n = check_qkv(q, k, v);
  check_masks(n, q.scalar_type(), key_padding_mask, head_mask, keep, dropout_p);
  const auto acc_options = q.options().dtype(acc_dtype(q.scalar_type()));
  at::Tensor out = empty_heads(n, acc_options);
  at::Tensor lse = at::empty({n.batch, n.heads, n.seq}, acc_options);
  DBF_DISPATCH(q.scalar_type(), "masked_attention_fwd", [&] {
    using acc = acc_t<scalar_t>;
    attention_fwd_kernel<scalar_t>(n, Heads<scalar_t>(q), Heads<scalar_t>(k), Heads<scalar_t>(v),
                                   opt_ptr<bool>(key_padding_mask), opt_ptr<acc>(head_mask),
                                   opt_ptr<bool>(keep), dropout_p, scale, Heads<acc>(out),
                                   lse.data_ptr<acc>());
  });
  return {out, lse};
}

// dq, dk, dv (batch, heads, seq, head_dim) and, when need_dhead_mask and a head_mask is given,
// dhead_mask (heads,) in the accumulation dtype.
std::vector<at::Tensor> masked_attention_bwd(const at::Tensor& grad_out, const at::Tensor& q,
                                             const at::Tensor& k, const at::Tensor& v,
                                             const at::Tensor& out, const at::Tensor& lse,
                                             const c10::optional<at::Tensor>& key_padding_mask,
                                             const c10::optional<at::Tensor>& head_mask,
                                             const c10::optional<at::Tensor>& keep,
                                             double dropout_p, double scale,
                                             bool need_dhead_mask) {
  const Dims n = check_qkv(q, k, v);
  check_masks(n, q.scalar_type(), key_padding_mask, head_mask, keep, dropout_p);
  check_arg(grad_out, "grad_out", q.scalar_type(), 4, true);
  check_shape(grad_out, "grad_out", q.sizes());
  check_arg(out, "out", acc_dtype(q.scalar_type()), 4, true);
  check_shape(out, "out", q.sizes());
  check_arg(lse, "lse", acc_dtype(q.scalar_type()), 3);
  check_shape(lse, "lse", {n.batch, n.heads, n.seq});
  at::Tensor dq = empty_heads(n, q.options()), dk = empty_heads(n, q.options()),
             dv = empty_heads(n, q.options());
  at::Tensor dhm_bh;
  if (need_dhead_mask && head_mask) dhm_bh = at::empty({n.batch, n.heads}, lse.options());
  DBF_DISPATCH(q.scalar_type(), "masked_attention_bwd", [&] {
    using acc = acc_t<scalar_t>;
    attention_bwd_kernel<scalar_t>(
        n, Heads<scalar_t>(q), Heads<scalar_t>(k), Heads<scalar_t>(v), Heads<acc>(out),
        Heads<scalar_t>(grad_out), lse.data_ptr<acc>(), opt_ptr<bool>(key_padding_mask),
        opt_ptr<acc>(head_mask), opt_ptr<bool>(keep), dropout_p, scale, Heads<scalar_t>(dq),
        Heads<scalar_t>(dk), Heads<scalar_t>(dv),
        dhm_bh.defined() ? dhm_bh.data_ptr<acc>() : nullptr);
  });
  at::Tensor dhead_mask;
  if (dhm_bh.defined()) {
    // Summed over the batch here, in a fixed order: the per-(batch, head) partials need no atomics.
    dhead_mask = at::zeros({n.heads}, lse.options());
    DBF_DISPATCH(q.scalar_type(), "masked_attention_bwd_dhead_mask", [&] {
      using acc = acc_t<scalar_t>;
      const acc* src = dhm_bh.data_ptr<acc>();
      acc* dst = dhead_mask.data_ptr<acc>();
      for (int64_t b = 0; b < n.batch; ++b)
        for (int64_t h = 0; h < n.heads; ++h) dst[h] += src[b * n.heads + h];
    });
  }
  return {dq, dk, dv, dhead_mask};
}

}  // namespace cpu
}  // namespace distilbert_fast
