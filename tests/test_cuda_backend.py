"""The ``cuda`` backend (kernels/cuda via csrc/cuda) against the eager backend.

On a CUDA machine with a CUDA build: every op and every gradient at full size and on odd shapes
in float32/float16/bfloat16, by STYLE.md's rule (|cuda(d) - eager(float64)| <= 2 x
|eager(d) - eager(float64)| + atol(d)), masks with fully-masked rows, a head_mask with a zero,
dropout (deterministic per seed, and exactly the eager formulas given the kernel's own keep
mask), varlen attention against eager's padded op on the padded sequences, new dropout masks on
every CUDA-graph replay, bad inputs, and whole models. Elsewhere those skip; what runs
everywhere: the backend is absent on a build without CUDA (selecting it is a clear error), its
device/dtype checks, its Python side driven on CPU through the real autograd Functions (and the
varlen methods directly) by a torch model of the extension (whose signatures are checked against
the binding), the plain-nvcc compile and link check of kernels/cuda, and a syntax check of the
csrc/cuda launchers.
"""

import inspect
import os
import re
import shutil
import subprocess
import sysconfig

import pytest
import torch
import torch.nn.functional as F

import distilbert_fast
from distilbert_fast import ops
from distilbert_fast.ops import cuda_backend
from distilbert_fast.ops.eager import EagerBackend, activation_derivative, activation_forward

from conftest import SMALL_CONFIG, cuda_graph_replays, packed_qkv

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAS_CUDA_BACKEND = "cuda" in ops.registered_backends()
needs_gpu = pytest.mark.skipif(
    not (torch.cuda.is_available() and HAS_CUDA_BACKEND),
    reason="needs a CUDA device and an extension built with CUDA",
)
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# slack on top of 2x eager's own error, relative to the reference's largest magnitude
ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}


# -- runs everywhere -----------------------------------------------------------------------------
@pytest.mark.skipif(distilbert_fast.BUILD_INFO["with_cuda"], reason="this build has CUDA")
def test_cuda_backend_absent_and_a_clear_error_without_cuda_build():
    assert "cuda" not in ops.registered_backends()
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match="backend must be one of .*got 'cuda'"):
        ops.bias_activation(x, None, backend="cuda")
    with pytest.raises(ValueError, match="got 'cuda'"):
        ops.set_default_backend("cuda")
    assert not hasattr(distilbert_fast._extension._C, "cuda_masked_attention_fwd")


def test_unsupported_reason_names_device_and_dtype():
    backend = cuda_backend.CudaBackend(ext=None)  # only the Python-side checks run here
    assert "CUDA tensor" in backend.unsupported_reason(torch.zeros(1))
    meta = torch.zeros(1, dtype=torch.float64, device="meta")
    assert "CUDA tensor" in backend.unsupported_reason(meta)
    assert backend.name == "cuda" and backend.priority == 20


# -- the backend's Python side, on CPU, driving a torch model of the extension -----------------------
class TorchModelOfCudaOps:
    """The contract of ``distilbert_fast._C.cuda_*`` (csrc/cuda/cuda_ops.cpp) written in torch, so
    that CudaBackend's Python side (argument order, saved tensors and state, needs_grad flags, the
    eager fallbacks, dtype promotion) is exercised on CPU through the real autograd Functions. Its
    parameter names are checked against the binding's py::arg lists. Dropout keeps a mask that is
    a function of (dropout_rng, shape), as the kernels' hash is a function of (seed, offset +
    index), read from the same int64 (2,) tensor."""

    @staticmethod
    def keep(rng, shape, p):
        assert rng.dtype == torch.int64 and rng.shape == (2,), "dropout_rng must be int64 (2,)"
        seed = (int(rng[0]) * 31 + int(rng[1])) % 2**63
        return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) >= p

    def cuda_residual_layernorm_fwd(self, x, residual, weight, bias, eps, x_bias, dropout_rng,
                                    dropout_p, save_for_backward):
        h = x.float() if x_bias is None else x.float() + x_bias.float()
        if dropout_p > 0:
            h = h * self.keep(dropout_rng, h.shape, dropout_p) / (1 - dropout_p)
        z = h
        if residual is not None:  # (R, cols): row r of x adds row r % R
            assert residual.dim() == 2 and z.numel() // z.shape[-1] % residual.shape[0] == 0
            z = (h.reshape(-1, *residual.shape) + residual.float()).view(h.shape)
        rows = z.reshape(-1, z.shape[-1])
        mean, rstd = rows.mean(-1), torch.rsqrt(rows.var(-1, unbiased=False) + eps)
        y = ((rows - mean[:, None]) * rstd[:, None] * weight.float() + bias.float()).view(z.shape)
        if not save_for_backward:
            return [y.to(x.dtype), None, None, None]
        return [y.to(x.dtype), z.to(x.dtype), mean, rstd]

    def cuda_residual_layernorm_bwd(self, grad_out, z, weight, dropout_rng, dropout_p, mean, rstd,
                                    needs):
        need_dx, need_dresidual, need_dweight, need_dbias, need_dx_bias = needs
        cols = z.shape[-1]
        xhat = (z.float().reshape(-1, cols) - mean[:, None]) * rstd[:, None]
        dy = grad_out.float().reshape(-1, cols)
        dxhat = dy * weight.float()
        dz = rstd[:, None] * (dxhat - dxhat.mean(-1, keepdim=True)
                              - xhat * (dxhat * xhat).mean(-1, keepdim=True))
        dh = dz
        if dropout_p > 0:
            dh = dz * self.keep(dropout_rng, z.shape, dropout_p).reshape(-1, cols) / (1 - dropout_p)
        return [dh.view(z.shape).to(z.dtype) if need_dx else None,
                dz.view(z.shape).to(z.dtype) if need_dresidual else None,
                (dy * xhat).sum(0) if need_dweight else None, dy.sum(0) if need_dbias else None,
                dh.sum(0) if need_dx_bias else None]

    def cuda_bias_activation_fwd(self, x, bias, activation):
        z = x.float() if bias is None else x.float() + bias.float()
        return activation_forward(z, activation).to(x.dtype)

    def cuda_bias_activation_bwd(self, grad_out, x, bias, activation, need_dbias):
        z = x.float() if bias is None else x.float() + bias.float()
        dz = grad_out.float() * activation_derivative(z, activation)
        return [dz.to(x.dtype), dz.reshape(-1, dz.shape[-1]).sum(0) if need_dbias else None]

    @staticmethod
    def _scores(q, k, key_padding_mask, scale):
        # the kernels' rule: masked keys score -inf, except that a row whose keys are all masked
        # scores 0 everywhere (uniform, as eager's equal lowest scores give)
        scores = q.float() @ k.float().transpose(-1, -2) * scale
        if key_padding_mask is not None:
            scores = scores.masked_fill(~key_padding_mask[:, None, None, :], float("-inf"))
            fully_masked = ~key_padding_mask.any(-1)[:, None, None, None]
            scores = torch.where(fully_masked, torch.zeros_like(scores), scores)
        return scores

    def cuda_masked_attention_fwd(self, q, k, v, key_padding_mask, head_mask, dropout_rng,
                                  dropout_p, scale, save_for_backward):
        scores = self._scores(q, k, key_padding_mask, scale)
        weights = torch.softmax(scores, -1)
        if dropout_p > 0:
            weights = weights * self.keep(dropout_rng, weights.shape, dropout_p) / (1 - dropout_p)
        if head_mask is not None:
            weights = weights * head_mask.float().view(1, -1, 1, 1)
        out = (weights @ v.float()).to(q.dtype)
        return [out, torch.logsumexp(scores, -1) if save_for_backward else None]

    def cuda_masked_attention_bwd(self, grad_out, q, k, v, out, lse, key_padding_mask, head_mask,
                                  dropout_rng, dropout_p, scale, need_dhead_mask):
        probs = torch.exp(self._scores(q, k, key_padding_mask, scale) - lse[..., None])
        keep = self.keep(dropout_rng, probs.shape, dropout_p) if dropout_p > 0 else None
        masked = None if key_padding_mask is None else ~key_padding_mask[:, None, None, :]
        dq, dk, dv, dhead_mask = EagerBackend().attention_backward(
            (q.float(), k.float(), v.float(), probs, keep, masked, head_mask), (dropout_p, scale),
            grad_out, None, (True, True, True, False, need_dhead_mask),
        )
        return [dq.to(q.dtype), dk.to(q.dtype), dv.to(q.dtype), dhead_mask]

    def _sequences(self, q, cu_seqlens, max_seqlen, dropout_rng, dropout_p):
        """(start, end, keep or None) per sequence: the mask is a padded (batch, heads, max_seqlen,
        max_seqlen) draw, each sequence taking its corner, as the kernels index it."""
        bounds = cu_seqlens.tolist()
        batch, heads = len(bounds) - 1, q.shape[1]
        keep = None
        if dropout_p > 0:
            keep = self.keep(dropout_rng, (batch, heads, max_seqlen, max_seqlen), dropout_p)
        for b in range(batch):
            n = bounds[b + 1] - bounds[b]
            yield bounds[b], bounds[b + 1], None if keep is None else keep[b:b + 1, :, :n, :n]

    def cuda_varlen_attention_fwd(self, q, k, v, cu_seqlens, max_seqlen, head_mask, dropout_rng,
                                  dropout_p, scale, save_for_backward):
        assert q.stride() == k.stride() == v.stride() and q.stride(-1) == 1
        out = torch.empty(q.shape, dtype=q.dtype)
        lse = torch.empty(q.shape[1], q.shape[0])
        for start, end, keep in self._sequences(q, cu_seqlens, max_seqlen, dropout_rng, dropout_p):
            if end == start:
                continue
            qs, ks, vs = (t[start:end].transpose(0, 1)[None].float() for t in (q, k, v))
            scores = self._scores(qs, ks, None, scale)
            weights = torch.softmax(scores, -1)
            if keep is not None:
                weights = weights * keep / (1 - dropout_p)
            if head_mask is not None:
                weights = weights * head_mask.float().view(1, -1, 1, 1)
            out[start:end] = (weights @ vs)[0].transpose(0, 1).to(q.dtype)
            lse[:, start:end] = torch.logsumexp(scores, -1)[0]
        return [out, lse if save_for_backward else None]

    def cuda_varlen_attention_bwd(self, grad_out, q, k, v, out, lse, cu_seqlens, max_seqlen,
                                  head_mask, dropout_rng, dropout_p, scale, need_dhead_mask):
        grads = [torch.zeros(q.shape, dtype=q.dtype) for _ in range(3)]
        dhead_mask = torch.zeros(q.shape[1]) if need_dhead_mask else None
        for start, end, keep in self._sequences(q, cu_seqlens, max_seqlen, dropout_rng, dropout_p):
            if end == start:
                continue
            qs, ks, vs, gs = (t[start:end].transpose(0, 1)[None].float()
                              for t in (q, k, v, grad_out))
            probs = torch.exp(self._scores(qs, ks, None, scale) - lse[None, :, start:end, None])
            *dqkv, dhm = EagerBackend().attention_backward(
                (qs, ks, vs, probs, keep, None, head_mask), (dropout_p, scale), gs, None,
                (True, True, True, False, need_dhead_mask),
            )
            for g, d in zip(grads, dqkv):
                g[start:end] = d[0].transpose(0, 1).to(q.dtype)
            if need_dhead_mask:
                dhead_mask += dhm
        return [*grads, dhead_mask]


def _binding_arg_names():
    """{function name: [py::arg names]} from csrc/cuda/cuda_ops.cpp's m.def lines."""
    with open(os.path.join(ROOT, "csrc", "cuda", "cuda_ops.cpp")) as f:
        source = f.read()
    defs = {}
    for block in source.split("m.def(")[1:]:
        name = re.match(r'\s*"(\w+)"', block).group(1)
        defs[name] = re.findall(r'py::arg\("(\w+)"\)', block.split(");")[0])
    return defs


def test_torch_model_of_the_ops_has_the_bindings_signatures():
    defs = _binding_arg_names()
    assert sorted(defs) == sorted(f"cuda_{op}_{d}" for op in (
        "residual_layernorm", "bias_activation", "masked_attention", "varlen_attention")
        for d in ("fwd", "bwd"))
    for name, args in defs.items():
        params = list(inspect.signature(getattr(TorchModelOfCudaOps(), name)).parameters)
        assert params == args, f"{name}: binding takes {args}, the torch model {params}"


def test_python_constants_match_the_kernel_header():
    with open(os.path.join(ROOT, "kernels", "cuda", "distilbert_kernels.h")) as f:
        header = f.read()
    assert int(re.search(r"kMaxHeadDim = (\d+);", header).group(1)) == cuda_backend.MAX_HEAD_DIM
    enum = re.search(r"enum class Activation \{([^}]*)\}", header).group(1)
    enum_names = {re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()
                  for name in re.findall(r"k(\w+) = \d+", enum)}
    with open(os.path.join(ROOT, "csrc", "cuda", "bias_activation.cpp")) as f:
        by_name = dict(re.findall(r'name == "(\w+)"\) return cuda::Activation::k(\w+);', f.read()))
    # the names Python sends, each mapped to its own enum value
    assert sorted(by_name) == sorted(ops.ACTIVATIONS) == sorted(enum_names)
    assert all(re.sub(r"(?<!^)(?=[A-Z])", "_", e).lower() == n for n, e in by_name.items())


def _fake_backend():
    return cuda_backend.CudaBackend(ext=TorchModelOfCudaOps())


def _function_grads(apply, tensors, upstream_seed=0):
    """Outputs and input grads of apply(*tensors) with fixed random upstream grads."""
    leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) if t is not None else None
              for t in tensors]
    outs = apply(*leaves)
    outs = [o for o in (outs if isinstance(outs, tuple) else (outs,)) if o is not None]
    gen = torch.Generator().manual_seed(upstream_seed)
    for o in outs:
        o.backward(torch.randn(o.shape, generator=gen).to(o.dtype), retain_graph=True)
    return outs, [None if t is None or not t.requires_grad else t.grad for t in leaves]


def _assert_all_close(got, want, what):
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        assert (g is None) == (w is None), f"{what} {i}: {g is None} vs {w is None}"
        if g is not None:
            assert g.dtype == w.dtype, f"{what} {i}: dtype {g.dtype} vs {w.dtype}"
            torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5, msg=lambda m: f"{what} {i}: {m}")


EAGER = EagerBackend()


@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_backend_plumbing_residual_layernorm(dropout_p):
    fake = _fake_backend()
    x, residual = torch.randn(3, 5, 16), torch.randn(1, 5, 16).expand(3, 5, 16)  # as the model's
    w, b, xb = torch.randn(16), torch.randn(16), torch.randn(16)

    def run(backend):
        torch.manual_seed(11)
        return _function_grads(
            lambda x, r, w, b, xb: ops.ResidualLayerNormFunction.apply(x, r, w, b, 1e-12, xb, dropout_p, backend),
            [x, residual, w, b, xb])

    got = run(fake)
    if dropout_p == 0:
        want = run(EAGER)
    else:  # eager's formulas with the mask the backend's seed gives
        torch.manual_seed(11)
        keep = TorchModelOfCudaOps.keep(cuda_backend.dropout_rng(x.device), x.shape, dropout_p)

        class Fixed(EagerBackend):  # eager, with the mask fixed to the fake kernels' one
            def residual_layernorm_forward(self, x, residual, weight, bias, eps, x_bias, p):
                z = (x + x_bias) * keep / (1 - p) + residual
                return F.layer_norm(z, (16,), weight, bias, eps), (z, weight, keep), (eps, p)

        want = run(Fixed())
    _assert_all_close(got[0], want[0], "output")
    _assert_all_close(got[1], want[1], "grad")


@pytest.mark.parametrize("dropout_p", [0.0, 0.2])
@pytest.mark.parametrize("need_weights", [False, True])
def test_backend_plumbing_masked_attention(dropout_p, need_weights):
    fake = _fake_backend()
    q, k, v = (torch.randn(2, 3, 7, 8) for _ in range(3))
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[0, 4:] = False
    mask[1] = False
    head_mask = torch.tensor([1.0, 0.0, 0.5])

    def run(backend):
        torch.manual_seed(5)
        return _function_grads(
            lambda q, k, v, hm: ops.MaskedAttentionFunction.apply(
                q, k, v, mask, hm, dropout_p, 8**-0.5, need_weights, backend),
            [q, k, v, head_mask])

    got = run(fake)
    if dropout_p == 0 or need_weights:  # need_weights runs eager's own code, dropout included
        _assert_all_close(got[0], run(EAGER)[0], "output")
        _assert_all_close(got[1], run(EAGER)[1], "grad")
        return
    torch.manual_seed(5)
    keep = TorchModelOfCudaOps.keep(cuda_backend.dropout_rng(q.device), (2, 3, 7, 7), dropout_p)

    class Fixed(EagerBackend):
        def attention_forward(self, q, k, v, kpm, hm, p, scale, nw):
            probs = torch.softmax((q @ k.transpose(-1, -2) * scale).masked_fill(
                ~kpm[:, None, None, :], torch.finfo(q.dtype).min), -1)
            out = (probs * keep / (1 - p) * hm.view(1, -1, 1, 1)) @ v
            return (out, None), (q, k, v, probs, keep, ~kpm[:, None, None, :], hm), (p, scale)

    want = run(Fixed())
    _assert_all_close(got[0], want[0], "output")
    _assert_all_close(got[1], want[1], "grad")


def _varlen_reference(q, k, v, grad_out, lengths, head_mask, scale, keep, dropout_p):
    """(out, dq, dk, dv, dhead_mask) of varlen attention by torch autograd, one sequence at a
    time; keep: (batch, heads, max_len, max_len) or None."""
    q, k, v, head_mask = (t.detach().double().requires_grad_() for t in (q, k, v, head_mask))
    outs, start = [], 0
    for b, n in enumerate(lengths):
        qs, ks, vs = (t[start:start + n].transpose(0, 1) for t in (q, k, v))  # (heads, n, dim)
        weights = torch.softmax(qs @ ks.transpose(-1, -2) * scale, -1)
        if keep is not None:
            weights = weights * keep[b, :, :n, :n] / (1 - dropout_p)
        outs.append(((weights * head_mask.view(-1, 1, 1)) @ vs).transpose(0, 1))
        start += n
    out = torch.cat(outs)
    grads = torch.autograd.grad(out, (q, k, v, head_mask), grad_out.double())
    return (out.detach(), *grads)


@pytest.mark.parametrize("dropout_p", [0.0, 0.25])
def test_backend_plumbing_varlen_attention(dropout_p):
    """CudaBackend's varlen methods: q, k, v views of one fused QKV tensor go in uncopied, the
    default scale, the saved state, needs_grad's head_mask slot (5), and the dropout state the
    backward gets are the forward's."""
    fake = _fake_backend()
    lengths, heads, head_dim, max_seqlen = [3, 0, 5, 1], 2, 8, 6
    q, k, v, cu_seqlens = packed_qkv(lengths, heads, head_dim)
    head_mask, grad_out = torch.tensor([1.0, 0.0]), torch.randn(q.shape)
    torch.manual_seed(5)
    out, saved, state = fake.varlen_attention_forward(q, k, v, cu_seqlens, max_seqlen, head_mask,
                                                      dropout_p, None)
    assert saved.q.data_ptr() == q.data_ptr(), "q was copied"
    needs = (True, True, True, False, False, True, False, False)
    got = (out, *fake.varlen_attention_backward(saved, state, grad_out, needs))
    keep = None
    if dropout_p > 0:
        torch.manual_seed(5)
        keep = TorchModelOfCudaOps.keep(cuda_backend.dropout_rng(q.device),
                                        (len(lengths), heads, max_seqlen, max_seqlen), dropout_p)
    want = _varlen_reference(q, k, v, grad_out, lengths, head_mask, head_dim**-0.5, keep, dropout_p)
    for name, g, w in zip(["out", "dq", "dk", "dv", "dhead_mask"], got, want):
        torch.testing.assert_close(g.double(), w, atol=1e-5, rtol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
    no_hm = (True, True, True, False, False, False, False, False)
    assert fake.varlen_attention_backward(saved, state, grad_out, no_hm)[3] is None
    # strides q, k, v do not share: contiguous copies go in
    _, saved, _ = fake.varlen_attention_forward(q.contiguous(), k, v, cu_seqlens, max_seqlen, None,
                                                0.0, 0.5)
    assert all(t.is_contiguous() for t in (saved.q, saved.k, saved.v))


@pytest.mark.parametrize("with_bias", [True, False])
def test_backend_plumbing_bias_activation(with_bias):
    x, bias = torch.randn(4, 6, 10), torch.randn(10) if with_bias else None
    for activation in ops.ACTIVATIONS:
        def run(backend):
            return _function_grads(
                lambda x, b: ops.BiasActivationFunction.apply(x, b, activation, backend), [x, bias])

        got, want = run(_fake_backend()), run(EAGER)
        _assert_all_close(got[0], want[0], f"{activation} output")
        _assert_all_close(got[1], want[1], f"{activation} grad")


def test_backend_promotes_like_eager_and_falls_back_where_kernels_cannot_run():
    fake, w, b = _fake_backend(), torch.ones(8), torch.zeros(8)
    x = torch.randn(2, 8, dtype=torch.bfloat16)
    # bfloat16 + float32 residual (autocast's mix): the sum and the output are float32
    y, saved, state = fake.residual_layernorm_forward(x, torch.randn(2, 8), w, b, 1e-12, None, 0.0)
    assert y.dtype == torch.float32 and saved.z.dtype == torch.float32
    assert not isinstance(state, cuda_backend.RanOnEager)
    # a float64 residual promotes past the kernels' dtypes: eager's code runs, forward and backward
    y, saved, state = fake.residual_layernorm_forward(
        x.float(), torch.randn(2, 8, dtype=torch.float64), w.double(), b.double(), 1e-12, None, 0.0
    )
    assert y.dtype == torch.float64 and isinstance(state, cuda_backend.RanOnEager)
    # head_dim above the kernels' limit: eager's code
    q = torch.randn(1, 1, 3, cuda_backend.MAX_HEAD_DIM + 1)
    (out, _), _, state = fake.attention_forward(q, q, q, None, None, 0.0, 0.1, False)
    assert isinstance(state, cuda_backend.RanOnEager) and out.shape == q.shape


def test_backend_saves_nothing_without_grad():
    fake, x, w, b = _fake_backend(), torch.randn(2, 8), torch.ones(8), torch.zeros(8)
    cu_seqlens = torch.tensor([0, 1, 3], dtype=torch.int32)
    with torch.inference_mode():
        _, saved, _ = fake.residual_layernorm_forward(x, None, w, b, 1e-12, None, 0.0)
        _, saved_attn, _ = fake.attention_forward(*(torch.randn(1, 2, 3, 4),) * 3, None, None, 0.0, 0.5, False)
        _, saved_varlen, _ = fake.varlen_attention_forward(
            *(torch.randn(3, 2, 4),) * 3, cu_seqlens, 2, None, 0.0, 0.5)
    assert saved == () and saved_attn == () and saved_varlen == ()


def _cuda_homes():
    env = [os.environ.get(v) for v in ("CUDA_HOME", "CUDA_PATH")]
    return [h for h in env if h] + ["/usr/local/cuda"]


def _nvcc():
    for home in _cuda_homes():
        if os.path.isfile(os.path.join(home, "bin", "nvcc")):
            return os.path.join(home, "bin", "nvcc")
    return shutil.which("nvcc")


@pytest.mark.build_check
@pytest.mark.skipif(_nvcc() is None or shutil.which("cmake") is None, reason="needs nvcc and cmake")
def test_cuda_kernels_compile_with_plain_nvcc(tmp_path):
    """CMakeLists.txt's cuda_kernels_check target (kernels/cuda for sm_80 and sm_90, warnings as
    errors, no torch headers) and cuda_kernels_link_check (every entry point links)."""
    env = {**os.environ, "CUDACXX": _nvcc()}
    configure = subprocess.run(
        ["cmake", "-S", ROOT, "-B", str(tmp_path), "-DCMAKE_BUILD_TYPE=Release"],
        capture_output=True, text=True, env=env,
    )
    assert configure.returncode == 0, configure.stdout + configure.stderr
    assert "CUDA compile check skipped" not in configure.stdout, configure.stdout
    build = subprocess.run(
        ["cmake", "--build", str(tmp_path), "--target", "cuda_kernels_link_check", "-j", "2"],
        capture_output=True, text=True, env=env,
    )
    assert build.returncode == 0, (build.stdout + build.stderr)[-6000:]


def _cuda_include():
    for home in _cuda_homes():
        if os.path.isfile(os.path.join(home, "include", "cuda_runtime_api.h")):
            return os.path.join(home, "include")
    return None


# The launchers must compile against every torch the package supports, not only the pinned one:
# torch 2.11's headers (the GPU machine's; unpacked by scripts/torch_headers.sh, which
# `scripts/setup.sh --test` runs) reject some calls that 2.13's accept.
OLDEST_TORCH = "2.11.0"


def _torch_include_paths(torch_version):
    """The C++ include directories of this torch ('installed') or of unpacked headers."""
    from torch.utils import cpp_extension

    if torch_version == "installed":
        return cpp_extension.include_paths()
    root = os.path.join(ROOT, "build", "torch-headers", torch_version, "torch", "include")
    if not os.path.isfile(os.path.join(root, "torch", "extension.h")):
        reason = f"torch {torch_version} headers not unpacked: run scripts/torch_headers.sh {torch_version}"
        if os.environ.get("CI"):
            pytest.fail(reason + " (CI must run this check)")
        pytest.skip(reason)
    return [root, os.path.join(root, "torch", "csrc", "api", "include")]


@pytest.mark.build_check
@pytest.mark.skipif(
    _cuda_include() is None or shutil.which("g++") is None, reason="needs g++ and the CUDA headers"
)
@pytest.mark.parametrize("torch_version", ["installed", OLDEST_TORCH])
def test_cuda_launchers_pass_a_syntax_check(tmp_path, torch_version):
    """csrc/cuda/*.cpp with -DWITH_CUDA against a torch's headers (a CPU wheel ships the c10/cuda
    headers but not the one CMake generates, which a stub stands in for)."""
    stub = tmp_path / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True)
    (stub / "cuda_cmake_macros.h").write_text("#pragma once\n")
    unit = tmp_path / "all_launchers.cpp"  # one translation unit: the torch headers parse once
    sources = sorted(f for f in os.listdir(os.path.join(ROOT, "csrc", "cuda")) if f.endswith(".cpp"))
    assert sources, "csrc/cuda has no launchers"
    unit.write_text("".join(f'#include "{os.path.join(ROOT, "csrc", "cuda", f)}"\n' for f in sources))
    includes = [*_torch_include_paths(torch_version), sysconfig.get_paths()["include"], _cuda_include()]
    cmd = ["g++", "-std=c++17", "-fsyntax-only", "-Wall", "-Werror", "-DWITH_CUDA",
           "-DTORCH_EXTENSION_NAME=_C", f"-I{os.path.join(ROOT, 'kernels', 'cuda')}",
           f"-I{os.path.join(ROOT, 'csrc', 'cuda')}", f"-isystem{tmp_path}"]
    cmd += [f"-isystem{p}" for p in includes] + [str(unit)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-6000:]


# -- helpers for the GPU tests --------------------------------------------------------------------
def _grads(fn, inputs, grad_names, upstream_seed=1234):
    """Runs fn(**inputs) and backpropagates fixed random upstream gradients into grad_names.
    Returns (outputs, {name: grad})."""
    args = dict(inputs)
    for name in grad_names:
        args[name] = args[name].detach().clone().requires_grad_(True)
    outs = fn(**args)
    outs = [o for o in (outs if isinstance(outs, tuple) else (outs,)) if o is not None]
    gen = torch.Generator().manual_seed(upstream_seed)
    upstream = [torch.randn(o.shape, generator=gen).to(o.device, o.dtype) for o in outs]
    grads = torch.autograd.grad(outs, [args[n] for n in grad_names], upstream)
    return [o.detach() for o in outs], dict(zip(grad_names, grads))


def _assert_within(name, actual, eager_d, eager64, dtype):
    assert actual.shape == eager64.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(eager64.shape)}"
    assert actual.dtype == eager_d.dtype, f"{name}: dtype {actual.dtype} != {eager_d.dtype}"
    scale = eager64.abs().max().item() if eager64.numel() else 0.0
    own = (eager_d.double() - eager64).abs().max().item() if eager64.numel() else 0.0
    bound = 2.0 * own + ATOL[dtype] * max(scale, 1.0)
    diff = (actual.double() - eager64).abs()
    if not bool((diff <= bound).all()):  # NaN fails too
        raise AssertionError(
            f"{name} ({dtype}): max diff vs float64 {diff.max().item():.3e} (mean "
            f"{diff.mean().item():.3e}), bound {bound:.3e} = 2 x eager's own error {own:.3e} + "
            f"atol; {(diff > bound).sum().item()} of {diff.numel()} elements off"
        )


def _compare(op, inputs, grad_names, dtype):
    """op(backend='cuda') in dtype vs op(backend='eager') in dtype and in float64, outputs and
    every gradient in grad_names."""
    def cast(v, d):
        return v.detach().to(d) if isinstance(v, torch.Tensor) and v.is_floating_point() else v

    args_d = {k: cast(v, dtype) for k, v in inputs.items()}
    args64 = {k: cast(v, torch.float64) for k, v in args_d.items()}
    outs, grads = _grads(lambda **a: op(**a, backend="cuda"), args_d, grad_names)
    assert ops.last_backend(op.__name__) == "cuda"
    outs_d, grads_d = _grads(lambda **a: op(**a, backend="eager"), args_d, grad_names)
    outs64, grads64 = _grads(lambda **a: op(**a, backend="eager"), args64, grad_names)
    for i, (a, r, r64) in enumerate(zip(outs, outs_d, outs64)):
        _assert_within(f"output {i}", a, r, r64, dtype)
    for name in grad_names:
        assert grads[name] is not None, f"no gradient for {name}"
        _assert_within(f"grad {name}", grads[name], grads_d[name], grads64[name], dtype)


def _cuda(*shape):
    return torch.randn(*shape, device="cuda")


def _mask(batch, seq, fully_masked_row=True):
    mask = torch.rand(batch, seq, device="cuda") > 0.3
    mask[:, 0] = True
    if fully_masked_row and batch > 1:
        mask[1] = False  # every key of this row masked: uniform attention, finite everything
    return mask


# -- residual + LayerNorm ------------------------------------------------------------------------
LN_SHAPES = [
    (8, 128, 768),  # full size, the 768 specialisation
    (3, 7, 1000),  # any size, vector path (1000 % 8 == 0)
    (5, 37),  # any size, scalar path
    (1, 1, 768),
    (2, 4096),
]


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", LN_SHAPES, ids=str)
@pytest.mark.parametrize("with_residual,with_x_bias", [(True, True), (True, False), (False, False)])
def test_residual_layernorm_matches_eager(dtype, shape, with_residual, with_x_bias):
    dim = shape[-1]
    inputs = dict(x=_cuda(*shape), residual=_cuda(*shape) if with_residual else None,
                  weight=1 + 0.1 * _cuda(dim), bias=0.1 * _cuda(dim), eps=1e-12,
                  x_bias=0.1 * _cuda(dim) if with_x_bias else None)
    grad_names = ["x", "weight", "bias"] + ["residual"] * with_residual + ["x_bias"] * with_x_bias
    _compare(ops.residual_layernorm, inputs, grad_names, dtype)


@needs_gpu
def test_residual_layernorm_unaligned_rows_take_the_scalar_path():
    # a view starting one element in: not 16-byte aligned, must still be right
    base = _cuda(6 * 768 + 1)
    x = base[1:].view(6, 768)
    w, b = torch.ones(768, device="cuda"), torch.zeros(768, device="cuda")
    got = ops.residual_layernorm(x, None, w, b, backend="cuda")
    want = ops.residual_layernorm(x, None, w, b, backend="eager")
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


# -- bias + activation ---------------------------------------------------------------------------
BA_SHAPES = [(8, 128, 3072), (3, 5, 37), (7, 1), (2, 16), (1, 1, 8)]


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", ["gelu", "gelu_new", "relu", "silu"])
@pytest.mark.parametrize("shape", BA_SHAPES, ids=str)
@pytest.mark.parametrize("with_bias", [True, False])
def test_bias_activation_matches_eager(dtype, activation, shape, with_bias):
    inputs = dict(x=2 * _cuda(*shape), bias=_cuda(shape[-1]) if with_bias else None,
                  activation=activation)
    _compare(ops.bias_activation, inputs, ["x"] + ["bias"] * with_bias, dtype)


# -- masked attention ------------------------------------------------------------------------------
ATTN_SHAPES = [
    (8, 12, 128, 64),  # DistilBERT, head_dim 64 specialised
    (2, 3, 37, 64),  # seq not a multiple of the tiles
    (1, 2, 1, 64),  # one token
    (2, 2, 33, 40),  # any head_dim, vector loads in half precision
    (2, 2, 17, 20),  # any head_dim, scalar loads
    (1, 2, 50, 128),  # the largest head_dim
    (2, 1, 300, 8),
]


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", ATTN_SHAPES, ids=str)
@pytest.mark.parametrize("masking", ["none", "random", "all_ones"])
def test_attention_matches_eager(dtype, shape, masking):
    batch, heads, seq, head_dim = shape
    mask = None if masking == "none" else _mask(batch, seq)
    if masking == "all_ones":
        mask = torch.ones(batch, seq, dtype=torch.bool, device="cuda")
    inputs = dict(q=_cuda(*shape), k=_cuda(*shape), v=_cuda(*shape), key_padding_mask=mask)
    _compare(ops.masked_attention, inputs, ["q", "k", "v"], dtype)


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_attention_head_mask_with_a_zero_and_its_gradient(dtype):
    batch, heads, seq, head_dim = 3, 4, 45, 64
    head_mask = torch.tensor([1.0, 0.0, 0.5, 2.0], device="cuda")
    inputs = dict(q=_cuda(batch, heads, seq, head_dim), k=_cuda(batch, heads, seq, head_dim),
                  v=_cuda(batch, heads, seq, head_dim), key_padding_mask=_mask(batch, seq),
                  head_mask=head_mask)
    _compare(ops.masked_attention, inputs, ["q", "k", "v", "head_mask"], dtype)


@needs_gpu
def test_fully_masked_row_attends_uniformly_and_gets_zero_dq():
    q, k, v = (_cuda(2, 2, 9, 64).requires_grad_() for _ in range(3))
    mask = torch.zeros(2, 9, dtype=torch.bool, device="cuda")
    mask[0, :4] = True
    out, _ = ops.masked_attention(q, k, v, key_padding_mask=mask, backend="cuda")
    torch.testing.assert_close(out[1], v[1].mean(dim=1, keepdim=True).expand(2, 9, 64).detach(),
                               atol=1e-5, rtol=1e-5)
    out.sum().backward()
    assert bool(torch.isfinite(q.grad).all()) and bool((q.grad[1] == 0).all())
    assert bool((k.grad[1] == 0).all())


@needs_gpu
def test_need_weights_runs_the_eager_code_and_returns_weights():
    q, k, v = (_cuda(2, 3, 11, 64) for _ in range(3))
    mask = _mask(2, 11)
    out, weights = ops.masked_attention(q, k, v, key_padding_mask=mask, need_weights=True, backend="cuda")
    ref_out, ref_w = ops.masked_attention(q, k, v, key_padding_mask=mask, need_weights=True, backend="eager")
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(weights, ref_w)


# -- varlen attention ------------------------------------------------------------------------------
def _backend():
    return ops.backends._registry["cuda"]


def _varlen_run(backend, q, k, v, cu_seqlens, max_seqlen, head_mask, grad_out):
    out, saved, state = backend.varlen_attention_forward(q, k, v, cu_seqlens, max_seqlen,
                                                         head_mask, 0.0, None)
    needs = (True, True, True, False, False, head_mask is not None, False, False)
    return (out, *backend.varlen_attention_backward(saved, state, grad_out, needs))


def _padded_eager_as_varlen(q, k, v, grad_out, lengths, head_mask, dtype):
    """The eager padded op on each sequence padded to the longest, in dtype, unpadded again:
    (out, dq, dk, dv, dhead_mask)."""
    max_len, heads, head_dim = max(lengths), q.shape[1], q.shape[2]

    def pad(t):
        padded = t.new_zeros(len(lengths), heads, max_len, head_dim, dtype=dtype)
        for b, (start, n) in enumerate(zip(_starts(lengths), lengths)):
            padded[b, :, :n] = t[start:start + n].transpose(0, 1).to(dtype)
        return padded.requires_grad_()

    mask = torch.arange(max_len, device="cuda")[None, :] < torch.tensor(lengths, device="cuda")[:, None]
    pq, pk, pv = pad(q), pad(k), pad(v)
    hm = head_mask.detach().to(dtype).requires_grad_()
    out, _ = ops.masked_attention(pq, pk, pv, key_padding_mask=mask, head_mask=hm, backend="eager")
    grads = torch.autograd.grad(out, (pq, pk, pv, hm), pad(grad_out).detach())

    def unpad(t):
        return torch.cat([t[b, :, :n].transpose(0, 1) for b, n in enumerate(lengths)]).detach()

    return (unpad(out), *(unpad(g) for g in grads[:3]), grads[3].detach())


def _starts(lengths):
    starts, total = [], 0
    for n in lengths:
        starts.append(total)
        total += n
    return starts


VARLEN_CASES = [  # (lengths, heads, head_dim)
    ([128, 37, 1, 0, 512, 300, 64, 2], 12, 64),  # ragged, length 1, empty, the specialised 64
    ([33, 7, 0], 2, 40),  # any head_dim, vector loads in half precision
    ([17, 5], 2, 20),  # scalar loads
    ([50, 1], 2, 128),  # the largest head_dim
]


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", VARLEN_CASES, ids=str)
def test_varlen_attention_matches_padded_eager(dtype, case):
    """q, k, v as views of one fused QKV tensor, max_seqlen above the longest, a head_mask with a
    zero: output and every gradient within 2x eager's own error of float64."""
    lengths, heads, head_dim = case
    q, k, v, cu_seqlens = packed_qkv(lengths, heads, head_dim, dtype, "cuda")
    grad_out = _cuda(*q.shape).to(dtype)
    head_mask = torch.rand(heads, device="cuda") + 0.5
    head_mask[0] = 0.0
    got = _varlen_run(_backend(), q, k, v, cu_seqlens, max(lengths) + 5, head_mask.to(dtype), grad_out)
    ref_d = _padded_eager_as_varlen(q, k, v, grad_out, lengths, head_mask, dtype)
    ref64 = _padded_eager_as_varlen(q, k, v, grad_out, lengths, head_mask, torch.float64)
    for name, a, r, r64 in zip(["out", "dq", "dk", "dv", "dhead_mask"], got, ref_d, ref64):
        if name == "dhead_mask":
            a, r = a.to(dtype), r.to(dtype)
        _assert_within(name, a, r, r64, dtype)


@needs_gpu
@pytest.mark.parametrize("layout", ["varlen", "padded"])
def test_attention_takes_more_than_65535_sequence_heads(layout):
    """batch * heads above 65535, the grid's y limit: 5,600 short sequences x 12 heads (a packed
    batch of short texts, or the static rows of a CUDA graph, half its token bucket). The kernels
    put (sequence, head) on the grid's x; they refused this batch when it was the grid's y."""
    batch, heads, head_dim = 5600, 12, 64
    lengths = [1 + i % 4 for i in range(batch)]
    if layout == "varlen":
        q, k, v, cu_seqlens = packed_qkv(lengths, heads, head_dim, torch.float32, "cuda")
    else:
        q, k, v = (_cuda(batch, heads, 4, head_dim) for _ in range(3))
        mask = torch.arange(4, device="cuda")[None, :] < torch.tensor(lengths, device="cuda")[:, None]

    def run(backend, q, k, v):
        if layout == "varlen":
            return ops.varlen_attention(q, k, v, cu_seqlens, max(lengths), backend=backend)
        return ops.masked_attention(q, k, v, key_padding_mask=mask, backend=backend)[0]

    grad_out = torch.randn_like(q)
    results = {}
    for backend in ("cuda", "eager"):
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        out = run(backend, *leaves)
        results[backend] = (out.detach(), *torch.autograd.grad(out, leaves, grad_out))
    for name, got, want in zip(("out", "dq", "dk", "dv"), results["cuda"], results["eager"]):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


@needs_gpu
def test_varlen_dropout_is_deterministic_per_seed_and_local_to_each_sequence():
    be = _backend()
    lengths = [40, 3, 64]
    q, k, v = (_cuda(sum(lengths), 2, 64) for _ in range(3))
    cu_seqlens = torch.tensor([0, 40, 43, 107], dtype=torch.int32, device="cuda")

    def run(seed):
        torch.manual_seed(seed)
        return be.varlen_attention_forward(q, k, v, cu_seqlens, 64, None, 0.3, None)[0]

    a, b, c = run(0), run(0), run(1)
    assert torch.equal(a, b) and not torch.equal(a, c)


# -- dropout ----------------------------------------------------------------------------------------
@needs_gpu
@pytest.mark.parametrize("op", ["masked_attention", "varlen_attention", "layernorm"])
def test_dropout_draws_new_masks_on_each_cuda_graph_replay(op):
    """The kernels read their (seed, offset) from a device tensor drawn inside the captured
    region, so replays of a CUDA graph differ from each other (a host seed would repeat)."""
    be = _backend()
    x = _cuda(256, 2, 64)
    cu_seqlens = torch.tensor([0, 100, 256], dtype=torch.int32, device="cuda")
    w, b = torch.ones(128, device="cuda"), torch.zeros(128, device="cuda")

    def step():
        if op == "masked_attention":
            return be.attention_forward(x.view(2, 2, 128, 64), x.view(2, 2, 128, 64),
                                        x.view(2, 2, 128, 64), None, None, 0.3, 0.125, False)[0][0]
        if op == "varlen_attention":
            return be.varlen_attention_forward(x, x, x, cu_seqlens, 156, None, 0.3, None)[0]
        return be.residual_layernorm_forward(x.view(256, 128), None, w, b, 1e-12, None, 0.3)[0]

    replays = cuda_graph_replays(step)
    assert not torch.equal(replays[0], replays[1]) and not torch.equal(replays[1], replays[2])


@needs_gpu
@pytest.mark.parametrize("op", ["attention", "layernorm"])
def test_dropout_is_deterministic_per_seed(op):
    x = _cuda(4, 2, 64, 64)
    w, b = torch.ones(64, device="cuda"), torch.zeros(64, device="cuda")

    def run(seed):
        torch.manual_seed(seed)
        if op == "attention":
            return ops.masked_attention(x, x, x, dropout_p=0.3, backend="cuda")[0]
        return ops.residual_layernorm(x, None, w, b, dropout_p=0.3, backend="cuda")

    a, b_, c = run(0), run(0), run(1)
    assert torch.equal(a, b_)
    assert not torch.equal(a, c)


@needs_gpu
def test_layernorm_dropout_matches_eager_formulas_given_its_mask():
    p, eps = 0.25, 1e-12
    be = _backend()
    x, residual = _cuda(512, 768), _cuda(512, 768)
    w, b, xb = 1 + 0.1 * _cuda(768), 0.1 * _cuda(768), 0.1 * _cuda(768)
    torch.manual_seed(7)  # first call: no residual, no x_bias, so z = 0 exactly where dropped
    _, (z_probe, *_), _ = be.residual_layernorm_forward(x, None, w, b, eps, None, p)
    keep = z_probe != 0
    assert abs(keep.float().mean().item() - (1 - p)) < 0.01
    torch.manual_seed(7)  # same seed: same mask, now with residual and x_bias
    y, saved, state = be.residual_layernorm_forward(x, residual, w, b, eps, xb, p)
    z_ref = (x + xb) * keep / (1 - p) + residual
    torch.testing.assert_close(y, F.layer_norm(z_ref, (768,), w, b, eps), atol=1e-4, rtol=1e-4)
    dy = _cuda(512, 768)
    needs = (True, True, True, True, False, True)
    got = be.residual_layernorm_backward(saved, state, dy, needs)
    want = EagerBackend().residual_layernorm_backward((z_ref, w, keep), (eps, p), dy, needs)
    for name, g, r in zip(["dx", "dresidual", "dweight", "dbias", "dx_bias"], got, want):
        torch.testing.assert_close(g, r, atol=1e-3, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


@needs_gpu
def test_attention_dropout_matches_eager_formulas_given_its_mask():
    p, batch, heads, seq = 0.2, 2, 3, 64  # head_dim == seq, so v = identity reads the weights out
    be = _backend()
    q, k, v = (_cuda(batch, heads, seq, seq) for _ in range(3))
    mask = _mask(batch, seq)
    head_mask = torch.tensor([1.0, 0.5, 2.0], device="cuda")
    scale = seq**-0.5
    eye = torch.eye(seq, device="cuda").expand(batch, heads, seq, seq).contiguous()
    torch.manual_seed(3)
    (weights, _), _, _ = be.attention_forward(q, k, eye, mask, None, p, scale, False)
    keep = weights != 0
    torch.manual_seed(3)
    (out, _), saved, state = be.attention_forward(q, k, v, mask, head_mask, p, scale, False)
    probs = torch.softmax(
        (q @ k.transpose(-1, -2) * scale).masked_fill(~mask[:, None, None, :], torch.finfo(q.dtype).min), -1
    )
    valid = probs > 0
    assert abs(keep[valid].float().mean().item() - (1 - p)) < 0.02
    ref_out = (probs * keep / (1 - p) * head_mask.view(1, -1, 1, 1)) @ v
    torch.testing.assert_close(out, ref_out, atol=1e-4, rtol=1e-4)
    dout = _cuda(batch, heads, seq, seq)
    needs = (True, True, True, False, True)
    got = be.attention_backward(saved, state, dout, None, needs)
    masked = ~mask[:, None, None, :]
    want = EagerBackend().attention_backward(
        (q, k, v, probs, keep, masked, head_mask), (p, scale), dout, None, needs
    )
    for name, g, r in zip(["dq", "dk", "dv", "dhead_mask"], got, want):
        torch.testing.assert_close(g, r, atol=1e-3, rtol=1e-3, msg=lambda m, n=name: f"{n}: {m}")


# -- bad inputs -----------------------------------------------------------------------------------
# One contract for the cpu and cuda entry points: the same exception type, and with several bad
# arguments the same one named (they check in argument order). (cpu args, cuda args) overrides.
_VARLEN_BAD_PAIRS = {
    "k shape, head_mask": dict(k=(7, 3, 5), head_mask=(2,)),
    "v dtype": dict(v_dtype=torch.float16),
    "cu_seqlens dtype, head_mask": dict(cu_dtype=torch.int64, head_mask=(2,)),
    "cu_seqlens shape": dict(cu=[0]),
    "max_seqlen, head_mask": dict(max_seqlen=0, head_mask=(2,)),
    "head_mask, dropout_p": dict(head_mask=(2,), dropout_p=1.0),
    "dropout_p": dict(dropout_p=1.5),
}


def _varlen_call(device, k=(7, 3, 4), v_dtype=torch.float32, cu=(0, 3, 7), cu_dtype=torch.int32,
                 max_seqlen=4, head_mask=None, dropout_p=0.0):
    C = distilbert_fast._extension._C
    q = torch.randn(7, 3, 4, device=device)
    args = (q, torch.randn(*k, device=device), torch.randn(7, 3, 4, device=device).to(v_dtype),
            torch.tensor(cu, dtype=cu_dtype, device=device), max_seqlen,
            None if head_mask is None else torch.ones(*head_mask, device=device))
    if device == "cpu":
        return lambda: C.cpu_varlen_attention_fwd(*args, None, dropout_p, 0.5)
    rng = torch.zeros(2, dtype=torch.int64, device=device)
    return lambda: C.cuda_varlen_attention_fwd(*args, rng, dropout_p, 0.5, False)


@needs_gpu
@pytest.mark.parametrize("case", list(_VARLEN_BAD_PAIRS))
def test_cpu_and_cuda_entry_points_raise_alike(case):
    errors = []
    for device in ("cpu", "cuda"):
        with pytest.raises((ValueError, TypeError)) as info:
            _varlen_call(device, **_VARLEN_BAD_PAIRS[case])()
        errors.append((type(info.value), str(info.value).split()[0]))
    assert errors[0] == errors[1], errors


@needs_gpu
def test_bad_inputs_raise_errors_that_name_the_argument():
    C = distilbert_fast._extension._C
    x = _cuda(4, 768)
    w, b = torch.ones(768, device="cuda"), torch.zeros(768, device="cuda")
    ln = C.cuda_residual_layernorm_fwd  # (x, residual, weight, bias, eps, x_bias, dropout_rng, p, save)
    with pytest.raises(TypeError, match="x must be float32, float16 or bfloat16"):
        ln(x.double(), None, w, b, 1e-12, None, None, 0.0, False)
    with pytest.raises(ValueError, match="x must be a CUDA tensor"):
        ln(x.cpu(), None, w, b, 1e-12, None, None, 0.0, False)
    with pytest.raises(ValueError, match="x must be contiguous"):
        ln(_cuda(768, 4).t(), None, w, b, 1e-12, None, None, 0.0, False)
    with pytest.raises(ValueError, match=r"residual must have shape \(R, 768\) with R dividing x's 4 rows, got \(4, 767\)"):
        ln(x, _cuda(4, 767), w, b, 1e-12, None, None, 0.0, False)
    with pytest.raises(ValueError, match=r"residual must have shape \(R, 768\) with R dividing x's 4 rows, got \(3, 768\)"):
        ln(x, _cuda(3, 768), w, b, 1e-12, None, None, 0.0, False)
    with pytest.raises(TypeError, match="residual must have dtype"):
        ln(x, x.half(), w, b, 1e-12, None, None, 0.0, False)
    with pytest.raises(ValueError, match=r"weight must have shape \(768,\)"):
        ln(x, None, w[:5], b, 1e-12, None, None, 0.0, False)
    with pytest.raises(ValueError, match="dropout_p must be in"):
        ln(x, None, w, b, 1e-12, None, None, 1.0, False)
    with pytest.raises(ValueError, match="dropout_rng must be an int64 \\(2,\\) CUDA tensor"):
        ln(x, None, w, b, 1e-12, None, None, 0.1, False)
    with pytest.raises(TypeError, match="dropout_rng must be an int64 tensor"):
        ln(x, None, w, b, 1e-12, None, torch.zeros(2, device="cuda"), 0.1, False)
    with pytest.raises(ValueError, match=r"dropout_rng must have shape \(2,\)"):
        ln(x, None, w, b, 1e-12, None, torch.zeros(1, dtype=torch.int64, device="cuda"), 0.1, False)
    with pytest.raises(ValueError, match=r"bias must have shape \(768,\)"):
        C.cuda_bias_activation_fwd(x, _cuda(3), "gelu")
    with pytest.raises(ValueError, match="activation must be one of gelu, gelu_new, relu, silu"):
        C.cuda_bias_activation_fwd(x, None, "tanh")
    with pytest.raises(ValueError, match=r"grad_out must have shape"):
        C.cuda_bias_activation_bwd(_cuda(4, 3), x, None, "gelu", False)
    q = _cuda(2, 3, 5, 64)
    attn = C.cuda_masked_attention_fwd  # (q, k, v, mask, head_mask, dropout_rng, p, scale, save)
    with pytest.raises(ValueError, match="q must have shape"):
        attn(q[0], q[0], q[0], None, None, None, 0.0, 0.125, False)
    with pytest.raises(ValueError, match=r"k must have shape \(2, 3, 5, 64\)"):
        attn(q, _cuda(2, 3, 6, 64), q, None, None, None, 0.0, 0.125, False)
    with pytest.raises(TypeError, match="key_padding_mask must be a bool tensor"):
        attn(q, q, q, torch.ones(2, 5, device="cuda"), None, None, 0.0, 0.125, False)
    with pytest.raises(ValueError, match=r"key_padding_mask must have shape \(2, 5\)"):
        attn(q, q, q, torch.ones(2, 6, dtype=torch.bool, device="cuda"), None, None, 0.0, 0.125, False)
    with pytest.raises(ValueError, match=r"head_mask must have shape \(3,\)"):
        attn(q, q, q, None, torch.ones(4, device="cuda"), None, 0.0, 0.125, False)
    with pytest.raises(ValueError, match="head_dim must be <= 128"):
        big = _cuda(1, 1, 4, 256)
        attn(big, big, big, None, None, None, 0.0, 0.1, False)
    tokens = _cuda(7, 3, 64)
    cu_seqlens = torch.tensor([0, 2, 7], dtype=torch.int32, device="cuda")
    varlen = C.cuda_varlen_attention_fwd  # (q, k, v, cu_seqlens, max_seqlen, head_mask, rng, p, scale, save)
    with pytest.raises(ValueError, match=r"q must have shape \(total_tokens, heads, head_dim\)"):
        varlen(q, q, q, cu_seqlens, 5, None, None, 0.0, 0.125, False)
    with pytest.raises(ValueError, match=r"k must have shape \(7, 3, 64\)"):
        varlen(tokens, _cuda(6, 3, 64), tokens, cu_seqlens, 5, None, None, 0.0, 0.125, False)
    with pytest.raises(TypeError, match="cu_seqlens must be an int32 tensor"):
        varlen(tokens, tokens, tokens, cu_seqlens.long(), 5, None, None, 0.0, 0.125, False)
    with pytest.raises(ValueError, match="cu_seqlens must be a CUDA tensor"):
        varlen(tokens, tokens, tokens, cu_seqlens.cpu(), 5, None, None, 0.0, 0.125, False)
    with pytest.raises(ValueError, match="max_seqlen must be in"):
        varlen(tokens, tokens, tokens, cu_seqlens, -1, None, None, 0.0, 0.125, False)
    with pytest.raises(ValueError, match="q, k and v must have the same strides"):
        varlen(tokens, tokens.transpose(0, 1).contiguous().transpose(0, 1), tokens, cu_seqlens, 5,
               None, None, 0.0, 0.125, False)
    torch.cuda.synchronize()  # nothing reached a kernel: the context is healthy


@needs_gpu
def test_cpu_tensors_are_refused_by_name():
    with pytest.raises(RuntimeError, match="backend 'cuda' cannot run .* CUDA tensor"):
        ops.bias_activation(torch.randn(2, 3), None, backend="cuda")
    with pytest.raises(RuntimeError, match="float64"):
        ops.bias_activation(torch.randn(2, 3, device="cuda", dtype=torch.float64), None, backend="cuda")


# -- whole models ---------------------------------------------------------------------------------
FULL_CONFIG = dict(vocab_size=500, dim=768, n_layers=2, n_heads=12, hidden_dim=3072,
                   max_position_embeddings=128)


@needs_gpu
@pytest.mark.parametrize("config", [SMALL_CONFIG, FULL_CONFIG], ids=["small", "full"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_model_with_cuda_backend_matches_eager(config, dtype):
    model = distilbert_fast.DistilBertModel(distilbert_fast.DistilBertConfig(**config)).cuda().eval()
    ids = torch.randint(1, config["vocab_size"], (3, 64), device="cuda")
    mask = torch.ones(3, 64, dtype=torch.long, device="cuda")
    mask[1, 40:] = 0
    mask[2] = 0  # fully masked
    results = {}
    for precision, backend in [(dtype, "cuda"), (dtype, "eager"), (torch.float64, "eager")]:
        m = model.to(precision).set_backend(backend)
        m.zero_grad()
        ops.backends._last.clear()  # so last_backend() reports only this run's ops
        out = m(ids, attention_mask=mask).last_hidden_state
        out.double().pow(2).mean().backward()
        grads = {n: p.grad.double().clone() for n, p in m.named_parameters() if p.grad is not None}
        results[(precision, backend)] = (out.detach().double(), grads)
        if backend == "cuda":
            assert set(ops.last_backend().values()) == {"cuda"}
    (out, grads), (out_d, grads_d), (out64, grads64) = results.values()
    _assert_within("last_hidden_state", out.to(dtype), out_d.to(dtype), out64, dtype)
    for name in grads64:
        _assert_within(f"grad {name}", grads[name].to(dtype), grads_d[name].to(dtype), grads64[name], dtype)


@needs_gpu
def test_model_trains_with_dropout_and_autocast():
    config = distilbert_fast.DistilBertConfig(**FULL_CONFIG)
    model = distilbert_fast.DistilBertForSequenceClassification(config).cuda().train().set_backend("cuda")
    ids = torch.randint(1, FULL_CONFIG["vocab_size"], (4, 32), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(ids, labels=torch.tensor([0, 1, 0, 1], device="cuda"))
    out.loss.backward()
    assert bool(torch.isfinite(out.loss))
    assert all(bool(torch.isfinite(p.grad).all()) for p in model.parameters() if p.grad is not None)
