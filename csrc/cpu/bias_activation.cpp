// Bias + activation on the CPU, forward and backward, one pass over memory per row:
//
//     y = act(x + bias),   dx = dy * act'(x + bias),   dbias = sum over rows of dx
//
// act: gelu (erf), gelu_new (tanh approximation, HuggingFace's NewGELUActivation), relu, silu.
// The backward recomputes z = x + bias from the saved input rather than saving z or y.
#include "common.h"
#include "cpu_ops.h"

namespace distilbert_fast {
namespace cpu {
namespace {

enum class Act { kGelu, kGeluNew, kRelu, kSilu };

Act parse_activation(const std::string& name) {
  if (name == "gelu") return Act::kGelu;
  if (name == "gelu_new") return Act::kGeluNew;
  if (name == "relu") return Act::kRelu;
  if (name == "silu") return Act::kSilu;
  TORCH_CHECK_VALUE(false, "activation must be one of 'gelu', 'gelu_new', 'relu', 'silu', got '", name,
                    "'");
}

// erf on float vectors as x P(x^2) / Q(x^2) on |x| <= 3.925 (beyond it erf is +-1 in float): a
// rational least-squares fit made for this kernel, 4e-8 from erf in exact arithmetic, ~3e-7 in
// float. No exp and no branch: GELU on one core took about half the time it took with
// Vectorized<float>::erf (4096x3072, in place: ~5 ms vs ~10 ms). The tests hold
// GELU's result to the float64 reference within the STYLE.md bound.
inline Vectorized<float> fast_erf(Vectorized<float> x) {
  using Vec = Vectorized<float>;
  static constexpr float kP[] = {1.987352258e-08f, -1.993748644e-06f, 1.493724626e-04f, 3.992245786e-03f, 5.145998387e-02f, 2.065904508e-01f, 1.128378772e+00f};  // highest degree first
  static constexpr float kQ[] = {1.028561406e-03f, 1.492928760e-02f, 1.177610186e-01f, 5.164147215e-01f, 1.000000000e+00f};
  x = at::vec::clamp(x, Vec(-3.925f), Vec(3.925f));
  const Vec s = x * x;
  Vec num(kP[0]), den(kQ[0]);
  for (int i = 1; i < 7; ++i) num = at::vec::fmadd(num, s, Vec(kP[i]));
  for (int i = 1; i < 5; ++i) den = at::vec::fmadd(den, s, Vec(kQ[i]));
  return x * num / den;
}

// erf(x): the fast rational form for float, Vectorized's erf for double.
template <typename T>
inline Vectorized<T> erf_of(Vectorized<T> x) {
  if constexpr (std::is_same_v<T, float>) {
    return fast_erf(x);
  } else {
    return x.erf();
  }
}

// act(z) and act'(z) on one vector of acc_t (float or double).
template <Act A, typename T>
struct ActOps {
  using Vec = Vectorized<T>;
  static constexpr double kInvSqrt2 = 0.70710678118654752440;
  static constexpr double kInvSqrt2Pi = 0.39894228040143267794;
  static constexpr double kSqrt2OverPi = 0.79788456080286535588;
  static constexpr double kCubic = 0.044715;

  // gelu_new's tanh argument u = sqrt(2 / pi) (z + 0.044715 z^3)
  static Vec inner(Vec z) { return Vec(T(kSqrt2OverPi)) * at::vec::fmadd(Vec(T(kCubic)) * z * z, z, z); }

  static Vec fwd(Vec z) {
    if constexpr (A == Act::kGelu) {
      return Vec(T(0.5)) * z * (Vec(T(1)) + erf_of<T>(z * Vec(T(kInvSqrt2))));
    } else if constexpr (A == Act::kGeluNew) {
      // 0.5 z (1 + tanh(u)) = z * sigmoid(2u): one exp instead of a (slower) vector tanh.
      return z / (Vec(T(1)) + (Vec(T(-2)) * inner(z)).exp());
    } else if constexpr (A == Act::kRelu) {
      return at::vec::clamp_min(z, Vec(T(0)));
    } else {
      return z / (Vec(T(1)) + z.neg().exp());
    }
  }

  static Vec grad(Vec z) {
    if constexpr (A == Act::kGelu) {
      const Vec cdf = Vec(T(0.5)) * (Vec(T(1)) + erf_of<T>(z * Vec(T(kInvSqrt2))));
      const Vec pdf = (Vec(T(-0.5)) * z * z).exp() * Vec(T(kInvSqrt2Pi));
      return at::vec::fmadd(z, pdf, cdf);
    } else if constexpr (A == Act::kGeluNew) {
      // With e = exp(-2u), s = sigmoid(2u) = 1 / (1 + e): 0.5 (1 + tanh u) = s and
      // 0.5 (1 - tanh^2 u) = 2 s (1 - s) = 2 e s^2 (1 - s as e s: no cancellation near s = 1).
      // -2u is capped at 80 so that e stays finite (the derivative there is ~1e-35 anyway).
      const Vec e = at::vec::minimum(Vec(T(-2)) * inner(z), Vec(T(80))).exp();
      const Vec s = Vec(T(1)) / (Vec(T(1)) + e);
      const Vec dinner = Vec(T(kSqrt2OverPi)) * (Vec(T(1)) + Vec(T(3 * kCubic)) * z * z);
      return s + Vec(T(2)) * z * (e * s * s) * dinner;
    } else if constexpr (A == Act::kRelu) {
      return Vec::blendv(Vec(T(0)), Vec(T(1)), z > Vec(T(0)));
    } else {
      const Vec s = Vec(T(1)) / (Vec(T(1)) + z.neg().exp());
      return s * (Vec(T(1)) + z * (Vec(T(1)) - s));
    }
  }
};

// bf16 rows are processed in chunks of kChunk columns widened to acc_t in a stack buffer, so each
// is converted once and the vector loop runs on acc_t; float and double rows go straight through.
constexpr int64_t kChunk = 512;

template <typename scalar_t, Act A>
void fwd_kernel(const scalar_t* x, const acc_t<scalar_t>* bias, int64_t rows, int64_t cols,
                scalar_t* y) {
  using acc = acc_t<scalar_t>;
  using Vec = Vectorized<acc>;
  using Ops = ActOps<A, acc>;
  const int64_t grain = grain_for(cols);
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    alignas(64) acc buf[kChunk];
    for (int64_t r = begin; r < end; ++r) {
      if constexpr (std::is_same_v<scalar_t, acc>) {  // no widening needed: straight through
        if (bias) {
          at::vec::map2([](Vec a, Vec b) { return Ops::fwd(a + b); }, y + r * cols, x + r * cols, bias, cols);
        } else {
          at::vec::map([](Vec a) { return Ops::fwd(a); }, y + r * cols, x + r * cols, cols);
        }
        continue;
      }
      for (int64_t c0 = 0; c0 < cols; c0 += kChunk) {
        const int64_t n = std::min(kChunk, cols - c0);
        load_row(x + r * cols + c0, buf, n);
        if (bias) {
          at::vec::map2([](Vec a, Vec b) { return Ops::fwd(a + b); }, buf, buf, bias + c0, n);
        } else {
          at::vec::map([](Vec a) { return Ops::fwd(a); }, buf, buf, n);
        }
        store_row(buf, y + r * cols + c0, n);
      }
    }
  });
}

template <typename scalar_t, Act A>
void bwd_kernel(const scalar_t* dy, const scalar_t* x, const acc_t<scalar_t>* bias, int64_t rows,
                int64_t cols, scalar_t* dx, acc_t<scalar_t>* dbias) {
  using acc = acc_t<scalar_t>;
  using Vec = Vectorized<acc>;
  using Ops = ActOps<A, acc>;
  ThreadPartials<acc> partial(dbias ? cols : 0);
  const int64_t grain = grain_for(cols);
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    alignas(64) acc zb[kChunk], gb[kChunk];
    acc* mine = dbias ? partial.mine() : nullptr;
    for (int64_t r = begin; r < end; ++r) {
      if constexpr (std::is_same_v<scalar_t, acc>) {  // no widening needed: straight through
        acc* dxr = dx + r * cols;
        if (bias) {
          at::vec::map3([](Vec g, Vec a, Vec b) { return g * Ops::grad(a + b); }, dxr, dy + r * cols,
                        x + r * cols, bias, cols);
        } else {
          at::vec::map2([](Vec g, Vec a) { return g * Ops::grad(a); }, dxr, dy + r * cols, x + r * cols, cols);
        }
        if (mine) at::vec::map2([](Vec s, Vec g) { return s + g; }, mine, mine, dxr, cols);
        continue;
      }
      for (int64_t c0 = 0; c0 < cols; c0 += kChunk) {
        const int64_t n = std::min(kChunk, cols - c0);
        load_row(x + r * cols + c0, zb, n);
        load_row(dy + r * cols + c0, gb, n);
        if (bias) {
          at::vec::map3([](Vec g, Vec a, Vec b) { return g * Ops::grad(a + b); }, gb, gb, zb,
                        bias + c0, n);
        } else {
          at::vec::map2([](Vec g, Vec a) { return g * Ops::grad(a); }, gb, gb, zb, n);
        }
        if (mine) at::vec::map2([](Vec s, Vec g) { return s + g; }, mine + c0, mine + c0, gb, n);
        store_row(gb, dx + r * cols + c0, n);
      }
    }
  });
  if (dbias) partial.sum_into(dbias);
}

template <typename F>
void dispatch_activation(Act act, F&& f) {
  switch (act) {
    case Act::kGelu: return f(std::integral_constant<Act, Act::kGelu>());
    case Act::kGeluNew: return f(std::integral_constant<Act, Act::kGeluNew>());
    case Act::kRelu: return f(std::integral_constant<Act, Act::kRelu>());
    case Act::kSilu: return f(std::integral_constant<Act, Act::kSilu>());
  }
}

void check_inputs(const at::Tensor& x, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK_VALUE(x.defined(), "x must be a tensor, got None");
  check_float_dtype(x.scalar_type(), "x");
  check_arg(x, "x", x.scalar_type(), 2);
  if (bias) {
    check_arg(*bias, "bias", acc_dtype(x.scalar_type()), 1);
    check_shape(*bias, "bias", {x.size(1)});
  }
}

}  // namespace

// y = act(x + bias) for x (rows, cols) and bias (cols,) in x's accumulation dtype. With
// `inplace`, y is written over x (each element is read before it is written) and x is returned:
// the caller's fresh matmul output is reused instead of paging in a second buffer as large.
at::Tensor bias_activation_fwd(const at::Tensor& x, const c10::optional<at::Tensor>& bias,
                               const std::string& activation, bool inplace) {
  const Act act = parse_activation(activation);
  check_inputs(x, bias);
  at::Tensor y = inplace ? x : empty_output(x.sizes(), x.options());
  DBF_DISPATCH(x.scalar_type(), "bias_activation_fwd", [&] {
    using acc = acc_t<scalar_t>;
    dispatch_activation(act, [&](auto a) {
      fwd_kernel<scalar_t, decltype(a)::value>(x.data_ptr<scalar_t>(),
                                               bias ? bias->data_ptr<acc>() : nullptr, x.size(0),
                                               x.size(1), y.data_ptr<scalar_t>());
    });
  });
  return y;
}

// dx (x's dtype) and, when need_dbias and a bias is given, dbias (the accumulation dtype).
std::vector<at::Tensor> bias_activation_bwd(const at::Tensor& grad_out, const at::Tensor& x,
                                            const c10::optional<at::Tensor>& bias,
                                            const std::string& activation, bool need_dbias) {
  const Act act = parse_activation(activation);
  check_inputs(x, bias);
  check_arg(grad_out, "grad_out", x.scalar_type(), 2);
  check_shape(grad_out, "grad_out", x.sizes());
  at::Tensor dx = empty_output(x.sizes(), x.options());
  at::Tensor dbias;
  if (need_dbias && bias) dbias = at::empty({x.size(1)}, bias->options());
  DBF_DISPATCH(x.scalar_type(), "bias_activation_bwd", [&] {
    using acc = acc_t<scalar_t>;
    dispatch_activation(act, [&](auto a) {
      bwd_kernel<scalar_t, decltype(a)::value>(
          grad_out.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(),
          bias ? bias->data_ptr<acc>() : nullptr, x.size(0), x.size(1), dx.data_ptr<scalar_t>(),
          dbias.defined() ? dbias.data_ptr<acc>() : nullptr);
    });
  });
  return {dx, dbias};
}

}  // namespace cpu
}  // namespace distilbert_fast
