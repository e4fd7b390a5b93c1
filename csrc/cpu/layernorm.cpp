// Residual + LayerNorm on the CPU, forward and backward, one pass over memory per row:
//
//     z = dropout(x + x_bias) + residual            (dropout: z = h * keep / (1 - p))
//     y = (z - mean(z)) * rstd * weight + bias,     rstd = 1 / sqrt(var(z) + eps)
//
// Each row is built in acc_t (float for bf16) in a per-thread buffer, its statistics taken from
// that buffer (two-pass mean and variance, L1-resident), and y written once. The forward keeps only
// mean and rstd per row; the backward rebuilds z from the inputs instead of having the forward
// write it out, which saves a full write and read of the activations in inference. float32 and
// float64 without dropout (the common case) take a fused path: z built and summed in one pass,
// y and dz stored straight to the output, and the backward's dweight/dbias partials taken in the
// same pass as its row means; bf16 and dropout go through RowInputs::build.
//
// `residual` may have fewer rows than x (R rows, rows % R == 0): row r then reads residual row
// r % R. This serves a residual broadcast over the batch (the position embeddings) without a copy.
#include "common.h"
#include "cpu_ops.h"

namespace distilbert_fast {
namespace cpu {
namespace {

template <typename scalar_t>
struct RowInputs {
  using acc = acc_t<scalar_t>;
  const scalar_t* x;
  const scalar_t* residual;  // or nullptr
  int64_t residual_rows;
  const acc* x_bias;  // or nullptr
  const bool* keep;   // or nullptr
  acc keep_scale;     // 1 / (1 - p)
  int64_t dim;

  // z[0:dim] = dropout(x[row] + x_bias) + residual[row % R], in acc.
  void build(int64_t row, acc* z) const {
    using Vec = Vectorized<acc>;
    load_row(x + row * dim, z, dim);
    if (x_bias) at::vec::map2([](Vec a, Vec b) { return a + b; }, z, z, x_bias, dim);
    if (keep) {
      const bool* k = keep + row * dim;
      for (int64_t j = 0; j < dim; ++j) z[j] = k[j] ? z[j] * keep_scale : acc(0);
    }
    if (residual) {
      const scalar_t* r = residual + (row % residual_rows) * dim;
      if constexpr (std::is_same_v<scalar_t, acc>) {
        at::vec::map2([](Vec a, Vec b) { return a + b; }, z, z, r, dim);
      } else {
        // bf16 residual: widen a vector's worth at a time.
        constexpr int64_t kChunk = 256;
        acc tmp[kChunk];
        for (int64_t j = 0; j < dim; j += kChunk) {
          const int64_t n = std::min(kChunk, dim - j);
          load_row(r + j, tmp, n);
          at::vec::map2([](Vec a, Vec b) { return a + b; }, z + j, z + j, tmp, n);
        }
      }
    }
  }
};

// z[0:dim] = x[row] + x_bias + residual[row % R], returning sum(z): one pass over the inputs, z
// left in L1 for the next passes. Only for scalar_t == acc without dropout (the common case); the
// optional inputs are template flags so the inner loop has no branches.
template <typename T, bool kBias, bool kRes>
inline T build_sum_fused(const RowInputs<T>& in, int64_t row, T* z) {
  using Vec = Vectorized<T>;
  const int64_t dim = in.dim;
  const T* x = in.x + row * dim;
  const T* r = kRes ? in.residual + (row % in.residual_rows) * dim : nullptr;
  const T* xb = in.x_bias;
  Vec s0(T(0)), s1(T(0));
  int64_t j = 0;
  for (; j + 2 * Vec::size() <= dim; j += 2 * Vec::size()) {
    Vec a = Vec::loadu(x + j), b = Vec::loadu(x + j + Vec::size());
    if constexpr (kBias) {
      a += Vec::loadu(xb + j);
      b += Vec::loadu(xb + j + Vec::size());
    }
    if constexpr (kRes) {
      a += Vec::loadu(r + j);
      b += Vec::loadu(r + j + Vec::size());
    }
    a.store(z + j);
    b.store(z + j + Vec::size());
    s0 += a;
    s1 += b;
  }
  T s = at::vec::vec_reduce_all<T>([](Vec& p, Vec& q) { return p + q; }, s0 + s1);
  for (; j < dim; ++j) {
    T v = x[j];
    if constexpr (kBias) v += xb[j];
    if constexpr (kRes) v += r[j];
    z[j] = v;
    s += v;
  }
  return s;
}

// Calls f(std::integral_constant<bool, has_x_bias>, std::integral_constant<bool, has_residual>).
template <typename F>
inline void with_row_flags(bool has_bias, bool has_res, F&& f) {
  using T = std::true_type;
  using N = std::false_type;
  if (has_bias) {
    if (has_res) f(T{}, T{}); else f(T{}, N{});
  } else {
    if (has_res) f(N{}, T{}); else f(N{}, N{});
  }
}

// Variance about `mean` of z[0:dim] (L1-resident), two accumulators for latency.
template <typename acc>
inline acc row_var(const acc* z, int64_t dim, acc mean) {
  using Vec = Vectorized<acc>;
  const Vec vm(mean);
  Vec q0(acc(0)), q1(acc(0));
  int64_t j = 0;
  for (; j + 2 * Vec::size() <= dim; j += 2 * Vec::size()) {
    const Vec d0 = Vec::loadu(z + j) - vm, d1 = Vec::loadu(z + j + Vec::size()) - vm;
    q0 = at::vec::fmadd(d0, d0, q0);
    q1 = at::vec::fmadd(d1, d1, q1);
  }
  acc sq = at::vec::vec_reduce_all<acc>([](Vec& a, Vec& b) { return a + b; }, q0 + q1);
  for (; j < dim; ++j) sq += (z[j] - mean) * (z[j] - mean);
  return sq / acc(dim);
}

template <typename acc>
inline void row_stats(const acc* z, int64_t dim, double eps, acc& mean, acc& rstd) {
  using Vec = Vectorized<acc>;
  mean = row_sum(z, dim) / acc(dim);
  const Vec vm(mean);
  Vec acc_sq(acc(0));
  int64_t j = 0;
  for (; j + Vec::size() <= dim; j += Vec::size()) {
    const Vec d = Vec::loadu(z + j) - vm;
    acc_sq = at::vec::fmadd(d, d, acc_sq);
  }
  acc sq = at::vec::vec_reduce_all<acc>([](Vec& a, Vec& b) { return a + b; }, acc_sq);
  for (; j < dim; ++j) sq += (z[j] - mean) * (z[j] - mean);
  rstd = acc(1) / std::sqrt(sq / acc(dim) + acc(eps));
}

template <typename scalar_t>
void layernorm_fwd_kernel(const RowInputs<scalar_t>& in, const acc_t<scalar_t>* weight,
                          const acc_t<scalar_t>* bias, double eps, int64_t rows, scalar_t* y,
                          acc_t<scalar_t>* mean_out, acc_t<scalar_t>* rstd_out) {
  using acc = acc_t<scalar_t>;
  using Vec = Vectorized<acc>;
  const int64_t dim = in.dim;
  if constexpr (std::is_same_v<scalar_t, acc>) {
    if (!in.keep) {  // the common case: fused build, statistics from L1, y written directly
      with_row_flags(in.x_bias != nullptr, in.residual != nullptr, [&](auto kb, auto kr) {
        at::parallel_for(0, rows, grain_for(dim), [&](int64_t begin, int64_t end) {
          std::vector<acc> zbuf(dim);
          acc* z = zbuf.data();
          for (int64_t row = begin; row < end; ++row) {
            const acc mean = build_sum_fused<acc, decltype(kb)::value, decltype(kr)::value>(
                                 in, row, z) / acc(dim);
            const acc rstd = acc(1) / std::sqrt(row_var(z, dim, mean) + acc(eps));
            mean_out[row] = mean;
            rstd_out[row] = rstd;
            const Vec vm(mean), vr(rstd);
            acc* yr = y + row * dim;
            int64_t j = 0;
            for (; j + Vec::size() <= dim; j += Vec::size()) {
              at::vec::fmadd((Vec::loadu(z + j) - vm) * vr, Vec::loadu(weight + j),
                             Vec::loadu(bias + j)).store(yr + j);
            }
            for (; j < dim; ++j) yr[j] = (z[j] - mean) * rstd * weight[j] + bias[j];
          }
        });
      });
      return;
    }
  }
  at::parallel_for(0, rows, grain_for(dim), [&](int64_t begin, int64_t end) {
    std::vector<acc> z(dim);
    for (int64_t row = begin; row < end; ++row) {
      in.build(row, z.data());
      acc mean, rstd;
      row_stats(z.data(), dim, eps, mean, rstd);
      mean_out[row] = mean;
      rstd_out[row] = rstd;
      const Vec vm(mean), vr(rstd);
      at::vec::map3(
          [&](Vec v, Vec w, Vec b) { return at::vec::fmadd((v - vm) * vr, w, b); }, z.data(),
          z.data(), weight, bias, dim);
      store_row(z.data(), y + row * dim, dim);
    }
  });
}

template <typename scalar_t>
void layernorm_bwd_kernel(const RowInputs<scalar_t>& in, const acc_t<scalar_t>* weight,
                          const acc_t<scalar_t>* mean_in, const acc_t<scalar_t>* rstd_in,
                          const scalar_t* dy, int64_t rows, scalar_t* dz_out, scalar_t* dh_out,
                          acc_t<scalar_t>* dweight, acc_t<scalar_t>* dbias,
                          acc_t<scalar_t>* dx_bias) {
  using acc = acc_t<scalar_t>;
  using Vec = Vectorized<acc>;
  const int64_t dim = in.dim;
  ThreadPartials<acc> pw(dweight ? dim : 0), pb(dbias ? dim : 0), pxb(dx_bias ? dim : 0);
  if constexpr (std::is_same_v<scalar_t, acc>) {
    if (!in.keep) {
      // The common case in two passes per row: (1) rebuild z, xhat into L1, the two row means and
      // the dweight/dbias partials; (2) dz from L1, written once (dx and dresidual share it),
      // and the dx_bias partial. Partials not asked for go to a per-thread scratch row, which keeps
      // the loops free of branches.
      acc* out = dz_out ? dz_out : dh_out;
      with_row_flags(in.x_bias != nullptr, in.residual != nullptr, [&](auto kb, auto kr) {
        constexpr bool kBias = decltype(kb)::value, kRes = decltype(kr)::value;
        at::parallel_for(0, rows, grain_for(dim), [&](int64_t begin, int64_t end) {
          std::vector<acc> buf(6 * static_cast<size_t>(dim), acc(0));
          acc* xh = buf.data();
          acc* my_w = dweight ? pw.mine() : xh + dim;
          acc* my_b = dbias ? pb.mine() : xh + 2 * dim;
          acc* my_xb = dx_bias ? pxb.mine() : xh + 3 * dim;
          acc* dz_scratch = xh + 4 * dim;
          acc* gb = xh + 5 * dim;  // dy * weight, kept so both passes see the same rounding
          const acc* xb = in.x_bias;
          for (int64_t row = begin; row < end; ++row) {
            const acc mean = mean_in[row], rstd = rstd_in[row];
            const acc* x = in.x + row * dim;
            const acc* r = kRes ? in.residual + (row % in.residual_rows) * dim : nullptr;
            const acc* d = dy + row * dim;
            const Vec vm(mean), vr(rstd);
            Vec sg(acc(0)), sgx(acc(0));
            int64_t j = 0;
            for (; j + Vec::size() <= dim; j += Vec::size()) {
              Vec z = Vec::loadu(x + j);
              if constexpr (kBias) z += Vec::loadu(xb + j);
              if constexpr (kRes) z += Vec::loadu(r + j);
              const Vec h = (z - vm) * vr;
              h.store(xh + j);
              const Vec dv = Vec::loadu(d + j);
              const Vec g = dv * Vec::loadu(weight + j);
              g.store(gb + j);
              sg += g;
              sgx = at::vec::fmadd(g, h, sgx);
              at::vec::fmadd(dv, h, Vec::loadu(my_w + j)).store(my_w + j);
              (Vec::loadu(my_b + j) + dv).store(my_b + j);
            }
            acc s_g = at::vec::vec_reduce_all<acc>([](Vec& a, Vec& b) { return a + b; }, sg);
            acc s_gx = at::vec::vec_reduce_all<acc>([](Vec& a, Vec& b) { return a + b; }, sgx);
            for (; j < dim; ++j) {
              acc z = x[j];
              if constexpr (kBias) z += xb[j];
              if constexpr (kRes) z += r[j];
              const acc h = (z - mean) * rstd;
              xh[j] = h;
              const acc g = d[j] * weight[j];
              gb[j] = g;
              s_g += g;
              s_gx += g * h;
              my_w[j] += d[j] * h;
              my_b[j] += d[j];
            }
            const acc mg = s_g / acc(dim), mgx = s_gx / acc(dim);
            // dz = rstd * (dy * weight - mg - xhat * mgx)
            acc* o = out ? out + row * dim : dz_scratch;
            const Vec vmg(mg), vmgx(mgx);
            for (j = 0; j + Vec::size() <= dim; j += Vec::size()) {
              const Vec dz = vr * (Vec::loadu(gb + j) - vmg - Vec::loadu(xh + j) * vmgx);
              dz.store(o + j);
              (Vec::loadu(my_xb + j) + dz).store(my_xb + j);
            }
            for (; j < dim; ++j) {
              const acc dz = rstd * (gb[j] - mg - xh[j] * mgx);
              o[j] = dz;
              my_xb[j] += dz;
            }
          }
        });
      });
      if (dweight) pw.sum_into(dweight);
      if (dbias) pb.sum_into(dbias);
      if (dx_bias) pxb.sum_into(dx_bias);
      return;
    }
  }
  at::parallel_for(0, rows, grain_for(dim), [&](int64_t begin, int64_t end) {
    std::vector<acc> xhat(dim), g(dim), dyf(dim);
    acc* my_w = dweight ? pw.mine() : nullptr;
    acc* my_b = dbias ? pb.mine() : nullptr;
    acc* my_xb = dx_bias ? pxb.mine() : nullptr;
    for (int64_t row = begin; row < end; ++row) {
      const acc mean = mean_in[row], rstd = rstd_in[row];
      in.build(row, xhat.data());
      const Vec vm(mean), vr(rstd);
      at::vec::map([&](Vec v) { return (v - vm) * vr; }, xhat.data(), xhat.data(), dim);
      load_row(dy + row * dim, dyf.data(), dim);
      // g = dy * weight; the row's two means: mean(g) and mean(g * xhat)
      at::vec::map2([](Vec a, Vec w) { return a * w; }, g.data(), dyf.data(), weight, dim);
      const acc mg = row_sum(g.data(), dim) / acc(dim);
      const acc mgx = row_dot(g.data(), xhat.data(), dim) / acc(dim);
      if (my_w) {
        at::vec::map3([](Vec s, Vec a, Vec b) { return at::vec::fmadd(a, b, s); }, my_w, my_w,
                      dyf.data(), xhat.data(), dim);
      }
      if (my_b) at::vec::map2([](Vec s, Vec a) { return s + a; }, my_b, my_b, dyf.data(), dim);
      // dz = rstd * (g - mg - xhat * mgx), reusing g's buffer
      const Vec vmg(mg), vmgx(mgx);
      at::vec::map2([&](Vec gv, Vec xh) { return vr * (gv - vmg - xh * vmgx); }, g.data(),
                    g.data(), xhat.data(), dim);
      if (dz_out) store_row(g.data(), dz_out + row * dim, dim);
      if (in.keep) {  // dh = dz * keep / (1 - p)
        const bool* k = in.keep + row * dim;
        for (int64_t j = 0; j < dim; ++j) g[j] = k[j] ? g[j] * in.keep_scale : acc(0);
      }
      if (dh_out && dh_out != dz_out) store_row(g.data(), dh_out + row * dim, dim);
      if (my_xb) at::vec::map2([](Vec s, Vec a) { return s + a; }, my_xb, my_xb, g.data(), dim);
    }
  });
  if (dweight) pw.sum_into(dweight);
  if (dbias) pb.sum_into(dbias);
  if (dx_bias) pxb.sum_into(dx_bias);
}

// Checks the row inputs shared by forward and backward and fills `in` (pointers set at dispatch).
struct Checked {
  int64_t rows, dim, residual_rows;
};

Checked check_inputs(const at::Tensor& x, const c10::optional<at::Tensor>& residual,
                     const at::Tensor& weight, const c10::optional<at::Tensor>& x_bias,
                     const c10::optional<at::Tensor>& keep, double dropout_p) {
  TORCH_CHECK_VALUE(x.defined(), "x must be a tensor, got None");
  check_float_dtype(x.scalar_type(), "x");
  check_arg(x, "x", x.scalar_type(), 2);
  const int64_t rows = x.size(0), dim = x.size(1);
  TORCH_CHECK_VALUE(dim > 0, "x must have a non-empty last dim, got shape ", shape_str(x.sizes()));
  const auto acc = acc_dtype(x.scalar_type());
  int64_t residual_rows = rows;
  if (residual) {
    check_arg(*residual, "residual", x.scalar_type(), 2);
    residual_rows = residual->size(0);
    TORCH_CHECK_VALUE(residual->size(1) == dim && residual_rows > 0 && rows % residual_rows == 0,
                      "residual must have shape (R, ", dim, ") with R dividing x's ", rows,
                      " rows, got ", shape_str(residual->sizes()));
  }
  check_arg(weight, "weight", acc, 1);
  check_shape(weight, "weight", {dim});
  if (x_bias) {
    check_arg(*x_bias, "x_bias", acc, 1);
    check_shape(*x_bias, "x_bias", {dim});
  }
  TORCH_CHECK_VALUE(dropout_p >= 0.0 && dropout_p < 1.0, "dropout_p must be in [0, 1), got ", dropout_p);
  if (keep) {
    check_arg(*keep, "keep", at::kBool, 2);
    check_shape(*keep, "keep", {rows, dim});
  }
  return {rows, dim, residual_rows};
}

template <typename scalar_t>
RowInputs<scalar_t> row_inputs(const Checked& c, const at::Tensor& x,
                               const c10::optional<at::Tensor>& residual,
                               const c10::optional<at::Tensor>& x_bias,
                               const c10::optional<at::Tensor>& keep, double dropout_p) {
  using acc = acc_t<scalar_t>;
  return {x.data_ptr<scalar_t>(),
          residual ? residual->data_ptr<scalar_t>() : nullptr,
          c.residual_rows,
          x_bias ? x_bias->data_ptr<acc>() : nullptr,
          keep ? keep->data_ptr<bool>() : nullptr,
          static_cast<acc>(1.0 / (1.0 - dropout_p)),
          c.dim};
}

}  // namespace

// y, mean, rstd = LayerNorm(dropout(x + x_bias) + residual); see the file comment.
std::vector<at::Tensor> residual_layernorm_fwd(const at::Tensor& x,
                                               const c10::optional<at::Tensor>& residual,
                                               const at::Tensor& weight, const at::Tensor& bias,
                                               double eps,
                                               const c10::optional<at::Tensor>& x_bias,
                                               const c10::optional<at::Tensor>& keep,
                                               double dropout_p) {
  const Checked c = check_inputs(x, residual, weight, x_bias, keep, dropout_p);
  check_arg(bias, "bias", weight.scalar_type(), 1);
  check_shape(bias, "bias", {c.dim});
  TORCH_CHECK_VALUE(eps >= 0.0, "eps must be >= 0, got ", eps);
  at::Tensor y = empty_output(x.sizes(), x.options());
  at::Tensor mean = at::empty({c.rows}, weight.options());
  at::Tensor rstd = at::empty({c.rows}, weight.options());
  DBF_DISPATCH(x.scalar_type(), "residual_layernorm_fwd", [&] {
    using acc = acc_t<scalar_t>;
    layernorm_fwd_kernel<scalar_t>(row_inputs<scalar_t>(c, x, residual, x_bias, keep, dropout_p),
                                   weight.data_ptr<acc>(), bias.data_ptr<acc>(), eps, c.rows,
                                   y.data_ptr<scalar_t>(), mean.data_ptr<acc>(),
                                   rstd.data_ptr<acc>());
  });
  return {y, mean, rstd};
}

// dx, dresidual, dweight, dbias, dx_bias of residual_layernorm_fwd; a gradient whose flag in
// `needs` (dx, dresidual, dweight, dbias, dx_bias) is false comes back undefined (None). Without
// dropout dx and dresidual are the same tensor.
std::vector<at::Tensor> residual_layernorm_bwd(const at::Tensor& grad_out, const at::Tensor& x,
                                               const c10::optional<at::Tensor>& residual,
                                               const at::Tensor& weight,
                                               const c10::optional<at::Tensor>& x_bias,
                                               const c10::optional<at::Tensor>& keep,
                                               double dropout_p, const at::Tensor& mean,
                                               const at::Tensor& rstd, std::vector<bool> needs) {
  const Checked c = check_inputs(x, residual, weight, x_bias, keep, dropout_p);
  check_arg(grad_out, "grad_out", x.scalar_type(), 2);
  check_shape(grad_out, "grad_out", x.sizes());
  check_arg(mean, "mean", weight.scalar_type(), 1);
  check_shape(mean, "mean", {c.rows});
  check_arg(rstd, "rstd", weight.scalar_type(), 1);
  check_shape(rstd, "rstd", {c.rows});
  TORCH_CHECK_VALUE(needs.size() == 5, "needs must hold 5 flags (dx, dresidual, dweight, dbias, dx_bias), got ",
                    needs.size());
  const bool need_dx = needs[0], need_dres = needs[1] && residual.has_value();
  const bool need_dxb = needs[4] && x_bias.has_value();
  at::Tensor dz, dh, dweight, dbias, dx_bias;
  if (need_dres) dz = empty_output(x.sizes(), x.options());
  if (need_dx) dh = (keep || !dz.defined()) ? empty_output(x.sizes(), x.options()) : dz;
  if (!keep && !dz.defined()) dz = dh;  // the same values: write them once
  if (needs[2]) dweight = at::empty({c.dim}, weight.options());
  if (needs[3]) dbias = at::empty({c.dim}, weight.options());
  if (need_dxb) dx_bias = at::empty({c.dim}, weight.options());
  DBF_DISPATCH(x.scalar_type(), "residual_layernorm_bwd", [&] {
    using acc = acc_t<scalar_t>;
    auto ptr = [](at::Tensor& t) { return t.defined() ? t.data_ptr<scalar_t>() : nullptr; };
    auto aptr = [](at::Tensor& t) { return t.defined() ? t.data_ptr<acc>() : nullptr; };
    layernorm_bwd_kernel<scalar_t>(row_inputs<scalar_t>(c, x, residual, x_bias, keep, dropout_p),
                                   weight.data_ptr<acc>(), mean.data_ptr<acc>(),
                                   rstd.data_ptr<acc>(), grad_out.data_ptr<scalar_t>(), c.rows,
                                   ptr(dz), ptr(dh), aptr(dweight), aptr(dbias), aptr(dx_bias));
  });
  return {need_dx ? dh : at::Tensor(), need_dres ? dz : at::Tensor(), dweight, dbias, dx_bias};
}

}  // namespace cpu
}  // namespace distilbert_fast
