"""Compile every Triton kernel variant the GPU tests launch for sm_90 (an H100 / H200), on a
machine without a GPU, and report each one's registers, spills and shared memory.

    python bench/triton_sm90.py [--record]      (TRITON_INTERPRET must be unset)

The real launchers run on CPU tensors shaped like the GPU tests' cases; Triton's launch is
intercepted so that each new variant is compiled for GPUTarget("cuda", 90, 64) (all the way to a
cubin, through ptxas) and nothing runs:

- a stand-in driver whose current target is sm_90 (JITFunction.run asks the driver for the
  target, device and stream, nothing else, before it compiles);
- ``knobs.runtime.jit_cache_hook``, called with the variant's signature, constexprs, attributes
  and options before Triton would compile it: it compiles the variant here and answers True, so
  Triton skips its own compile and the launch;
- the launchers' CUDA-only checks and SM count (132, an H200) patched.

The cases come from the GPU test files themselves (their top-level case lists, evaluated with
ON_CUDA = True, and conftest's SMALL_CONFIG for the model tests), so the shapes, dtypes and flags
cannot drift from what the GPU run launches; the per-test extras (activations, dropout, the
model's ops) are listed here. The exit status is 1 if
any variant fails to compile. ``--record`` appends the table to bench/results/triton_sm90.csv.
tests/test_triton_sm90_compile.py runs this in CI.
"""

import argparse
import ast
import multiprocessing
import os
import re
import subprocess
import sys
import time

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("unset TRITON_INTERPRET: the kernels must be real JITFunctions to compile for sm_90")

import tempfile  # noqa: E402

# a fresh cache: every variant really goes through ptxas, whose log holds the counts
os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="triton_sm90_")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(BENCH_DIR)
TESTS_DIR = os.path.join(REPO_ROOT, "tests")
TARGET = GPUTarget("cuda", 90, 32)
H200_SMS = 132


# -- intercepting the launch -------------------------------------------------------------------
class _Sm90Driver:
    """The part of Triton's driver that JITFunction.run consults before compiling."""

    def get_current_target(self):
        return TARGET

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_device_interface(self):
        return torch.cuda


_PTXAS_LOG = {}


def _capture_ptxas_log():
    """Keep the last ``ptxas -v`` log: Triton's nvidia backend writes it to a temporary file and
    reads the register and spill counts back only when it loads the cubin on a device."""
    from triton.backends.nvidia import compiler as nv

    real_run = nv.subprocess.run

    def run(cmd, *args, **kwargs):
        result = real_run(cmd, *args, **kwargs)
        log = kwargs.get("stderr")
        if "-v" in cmd and hasattr(log, "name"):
            with open(log.name) as f:
                _PTXAS_LOG["last"] = f.read()
        return result

    nv.subprocess = type("subprocess", (), {"run": staticmethod(run), **{
        k: getattr(subprocess, k) for k in ("CalledProcessError", "check_output", "PIPE", "STDOUT")}})


def _parse_ptxas(log):
    regs = re.search(r"Used (\d+) registers", log)
    stores = re.search(r"(\d+) bytes spill stores", log)
    loads = re.search(r"(\d+) bytes spill loads", log)
    return (int(regs.group(1)) if regs else -1,
            int(stores.group(1)) if stores else 0, int(loads.group(1)) if loads else 0)


class Compiler:
    """The jit_cache_hook: note each new variant (Triton's own compile key) with the first case
    that launched it, and skip the launch. ``compile_all`` then compiles them."""

    def __init__(self):
        self.variants, self.case = {}, ""

    def __call__(self, *, key, fn, compile, **_):
        if key not in self.variants:
            options = {k: compile[k] for k in ("num_warps", "num_ctas", "num_stages", "enable_fp_fusion",
                                               "launch_cooperative_grid", "extern_libs")}
            self.variants[key] = (fn.jit_function, compile["signature"], compile["constants"],
                                  compile["configs"][0], options, self.case)
        return True

    def compile_all(self, jobs):
        """One row per variant, compiled in ``jobs`` forked processes (the variants hold
        JITFunctions, which a fork inherits and a pickle would not)."""
        global _VARIANTS
        _VARIANTS = list(self.variants.values())
        if jobs <= 1:
            return [_compile_variant(i) for i in range(len(_VARIANTS))]
        with multiprocessing.get_context("fork").Pool(jobs) as pool:
            return pool.map(_compile_variant, range(len(_VARIANTS)), chunksize=1)


_VARIANTS = []


def _compile_variant(index):
    jit_fn, signature, constexprs, attrs, options, case = _VARIANTS[index]
    shown = {name: constexprs[(i,)] for i, name in enumerate(jit_fn.arg_names)
             if (i,) in constexprs and signature[name] == "constexpr"}
    dtypes = sorted({t for t in signature.values() if t.startswith("*") and t not in ("*i8", "*u8", "*i32", "*i64")})
    row = dict(kernel=jit_fn.fn.__name__, case=case,
               constexprs=" ".join(f"{k}={v}" for k, v in shown.items()),
               dtypes=" ".join(dtypes), num_warps=options["num_warps"], num_stages=options["num_stages"],
               error="")
    try:
        _PTXAS_LOG.pop("last", None)
        kernel = triton.compile(ASTSource(jit_fn, signature, constexprs, attrs), target=TARGET, options=options)
        regs, spill_stores, spill_loads = _parse_ptxas(_PTXAS_LOG.get("last", ""))
        row.update(regs=regs, spill_stores=spill_stores, spill_loads=spill_loads, shared=kernel.metadata.shared)
        row["error"] = hopper_limits_error(row)
    except Exception as e:  # noqa: BLE001 - every failure is reported, then the run fails
        row.update(regs=-1, spill_stores=-1, spill_loads=-1, shared=-1,
                   error=f"{type(e).__name__}: {str(e)[:2000]}")
    return row


# What one block may take on sm_90 (CUDA's compute capability 9.0 table): a compiled variant over
# these would compile here and fail only at its launch on the GPU (Triton's OutOfResources).
SM90_MAX_SHARED = 227 * 1024  # bytes of shared memory per block (the opt-in maximum)
SM90_REGISTERS = 65536  # 32-bit registers per block (and per SM)
SM90_MAX_THREADS = 1024


def hopper_limits_error(row) -> str:
    """Why a compiled variant (regs, shared, num_warps) cannot launch on sm_90, or ''."""
    threads = row["num_warps"] * 32
    problems = []
    if row["shared"] > SM90_MAX_SHARED:
        problems.append(f"{row['shared']} B of shared memory > {SM90_MAX_SHARED}")
    if threads > SM90_MAX_THREADS:
        problems.append(f"{threads} threads > {SM90_MAX_THREADS}")
    if row["regs"] > 0 and row["regs"] * threads > SM90_REGISTERS:
        problems.append(f"{row['regs']} registers x {threads} threads > {SM90_REGISTERS}")
    return "over sm_90's per-block limits: " + "; ".join(problems) if problems else ""


def _intercept(compiler):
    from triton import knobs
    from triton.runtime import driver

    driver.set_active(_Sm90Driver())
    knobs.runtime.jit_cache_hook = compiler
    _capture_ptxas_log()

    from distilbert_fast.kernels import (triton_attention, triton_bias_activation, triton_layernorm,
                                         triton_linear_activation, triton_varlen_attention)

    for module in (triton_attention, triton_bias_activation, triton_layernorm, triton_linear_activation):
        module.sm_count = lambda device: H200_SMS
    check_qkv = triton_attention.check_qkv

    def check_qkv_anywhere(*args):  # the same checks, the device one passed as if on CUDA
        triton_attention._INTERPRETED = True
        try:
            return check_qkv(*args)
        finally:
            triton_attention._INTERPRETED = False

    triton_attention.check_qkv = triton_varlen_attention.check_qkv = check_qkv_anywhere


# -- the GPU tests' cases ----------------------------------------------------------------------
def test_constants(filename, names, namespace=None):
    """The top-level assignments (and functions) ``names`` of tests/``filename``, evaluated as
    they are on a CUDA machine (ON_CUDA = True), without importing the test module (which
    skips at import on a machine without a GPU)."""
    with open(os.path.join(TESTS_DIR, filename)) as f:
        tree = ast.parse(f.read())
    ns = {"torch": torch, "ON_CUDA": True, **(namespace or {})}
    for node in tree.body:
        targets = ([t.id for t in node.targets if isinstance(t, ast.Name)] if isinstance(node, ast.Assign)
                   else [node.name] if isinstance(node, ast.FunctionDef) else [])
        if any(t in names for t in targets):
            exec(compile(ast.Module(body=[node], type_ignores=[]), filename, "exec"), ns)
    missing = [n for n in names if n not in ns]
    if missing:
        raise RuntimeError(f"tests/{filename} no longer defines {missing}")
    return ns


def _attention_mask(kind, batch, seq):
    if kind is None:
        return None
    if kind == "ones":
        return torch.ones(batch, seq, dtype=torch.bool)
    return torch.rand(batch, seq) < 0.6


def _head_mask(with_head_mask, heads, dtype):
    return torch.rand(heads).to(dtype) if with_head_mask else None


def attention_cases():
    from distilbert_fast.kernels import triton_attention as ta

    ns = test_constants("test_triton_attention.py",
                        ["DTYPES", "SMALL_CASES", "FULL_CASES", "match_params", "DROPOUT_DTYPES"])
    params = [(d, c, 0.0) for d, c in ns["match_params"](ns["SMALL_CASES"], ns["FULL_CASES"])]
    # test_dropout_matches_eager_with_the_kernels_mask: (3, 2, 48, 48), random mask, head mask
    params += [(d, (3, 2, 48, 48, "random", True), 0.3) for d in ns["DROPOUT_DTYPES"]]
    for dtype, (batch, heads, seq, head_dim, mask_kind, with_head_mask), p in params:
        yield f"attention {batch}x{heads}x{seq}x{head_dim} {mask_kind} p={p} {str(dtype)[6:]}", lambda: (
            _run_attention(ta, dtype, batch, heads, seq, head_dim, mask_kind, with_head_mask, p))


def _run_attention(ta, dtype, batch, heads, seq, head_dim, mask_kind, with_head_mask, p):
    q, k, v, grad_out = (torch.empty(batch, heads, seq, head_dim, dtype=dtype) for _ in range(4))
    mask, head_mask = _attention_mask(mask_kind, batch, seq), _head_mask(with_head_mask, heads, dtype)
    out, lse = ta.attention_fwd(q, k, v, mask, head_mask, p, head_dim**-0.5, 1)
    ta.attention_bwd(q, k, v, out, lse, grad_out, mask, head_mask, p, head_dim**-0.5, 1,
                     need_head_mask_grad=True)


def varlen_attention_cases():
    from distilbert_fast.kernels import triton_varlen_attention as tva

    shared = test_constants("test_triton_attention.py", ["DTYPES", "match_params", "DROPOUT_DTYPES"])
    ns = test_constants("test_triton_varlen_attention.py", ["SMALL_CASES", "FULL_CASES"])
    params = [(d, c, 0.0) for d, c in shared["match_params"](ns["SMALL_CASES"], ns["FULL_CASES"])]
    params += [(d, ((7, 30, 1), 2, 48, 0, True, True), 0.3) for d in shared["DROPOUT_DTYPES"]]
    for dtype, (lengths, heads, head_dim, slack, with_head_mask, fused), p in params:
        yield f"varlen {len(lengths)}seqs x{heads}x{head_dim} fused={fused} p={p} {str(dtype)[6:]}", lambda: (
            _run_varlen(tva, dtype, lengths, heads, head_dim, slack, with_head_mask, fused, p))


def _run_varlen(tva, dtype, lengths, heads, head_dim, slack, with_head_mask, fused, p):
    total, dim = sum(lengths), heads * head_dim
    if fused:
        qkv = torch.empty(total, 3 * dim, dtype=dtype)
        q, k, v = (qkv[:, i * dim:(i + 1) * dim].view(total, heads, head_dim) for i in range(3))
    else:
        q, k, v = (torch.empty(total, heads, head_dim, dtype=dtype) for _ in range(3))
    grad_out = torch.empty(total, heads, head_dim, dtype=dtype)
    offsets = [0]
    for n in lengths:
        offsets.append(offsets[-1] + n)
    cu_seqlens = torch.tensor(offsets, dtype=torch.int32)
    max_seqlen = max(lengths) + slack
    head_mask = _head_mask(with_head_mask, heads, dtype)
    out, lse = tva.varlen_attention_fwd(q, k, v, cu_seqlens, max_seqlen, head_mask, p, head_dim**-0.5, 1)
    tva.varlen_attention_bwd(q, k, v, out, lse, grad_out, cu_seqlens, max_seqlen, head_mask, p,
                             head_dim**-0.5, 1, need_head_mask_grad=True)


def op_cases():
    """test_triton_ops.py: bias + activation, residual + LayerNorm (with dropout), the fused
    linear + activation, over its TOKENS x HIDDEN x DTYPES and FUSED_SHAPES."""
    from distilbert_fast.kernels import triton_bias_activation as tba
    from distilbert_fast.kernels import triton_layernorm as tln
    from distilbert_fast.kernels import triton_linear_activation as tla

    ns = test_constants("test_triton_ops.py", ["DTYPES", "TOKENS", "HIDDEN", "FUSED_SHAPES"])
    for dtype in ns["DTYPES"]:
        name = str(dtype)[6:]
        for tokens in ns["TOKENS"]:
            for hidden in ns["HIDDEN"]:
                yield f"bias_activation {tokens}x{hidden} {name}", lambda: _run_bias_activation(
                    tba, dtype, tokens, hidden, "gelu")
                yield f"layernorm {tokens}x{hidden} {name}", lambda: _run_layernorm(
                    tln, dtype, tokens, hidden, 0.0)
            for k, n in ns["FUSED_SHAPES"]:
                yield f"linear_activation {tokens}x{k}x{n} {name}", lambda: _run_linear(
                    tla, dtype, tokens, k, n, "gelu")
        for act in ("gelu_new", "relu", "silu"):
            yield f"bias_activation 7x768 {act} {name}", lambda: _run_bias_activation(tba, dtype, 7, 768, act)
        yield f"bias_activation 512x5000 no bias {name}", lambda: _run_bias_activation(
            tba, dtype, 512, 5000, "gelu", bias=False)
        yield f"layernorm dropout 65x768 {name}", lambda: _run_layernorm(tln, dtype, 65, 768, 0.1)
    for act in ("gelu_new", "relu", "silu"):
        yield f"linear_activation 7x768x256 {act} no bias", lambda: _run_linear(
            tla, torch.float32, 7, 768, 256, act, bias=False)


def _run_bias_activation(tba, dtype, tokens, hidden, act, bias=True):
    x = torch.empty(tokens, hidden, dtype=dtype)
    b = torch.empty(hidden, dtype=dtype) if bias else None
    tba.bias_activation_fwd(x, b, act)
    tba.bias_activation_bwd(x, b, torch.empty_like(x), act, need_dbias=True)


def _run_layernorm(tln, dtype, tokens, hidden, p):
    x, residual = torch.empty(tokens, hidden, dtype=dtype), torch.empty(tokens, hidden, dtype=dtype)
    weight, bias, x_bias = (torch.empty(hidden, dtype=dtype) for _ in range(3))
    seed = torch.ones(1, dtype=torch.int64) if p > 0 else None
    y, mean, rstd = tln.residual_layernorm_fwd(x, residual, weight, bias, 1e-12, x_bias, p, seed)
    tln.residual_layernorm_bwd(x, residual, weight, x_bias, mean, rstd, y, p, seed)
    if p > 0:
        tln.dropout_keep_mask(seed, x.shape, p, x.device)


def _run_linear(tla, dtype, tokens, k, n, act, bias=True):
    x, w = torch.empty(tokens, k, dtype=dtype), torch.empty(n, k, dtype=dtype)
    b = torch.empty(n, dtype=dtype) if bias else None
    tla.linear_activation_fwd(x, w, b, act, store_preact=True)
    tla.linear_activation_fwd(x, w, b, act)


def model_cases():
    """test_triton_model.py: the ops of the small test model (conftest's SMALL_CONFIG) in each
    dtype, training (dropout) and inference: attention, residual + LayerNorm over dim, the FFN's
    and the MLM head's linear + activation."""
    from distilbert_fast.kernels import triton_attention as ta
    from distilbert_fast.kernels import triton_layernorm as tln
    from distilbert_fast.kernels import triton_linear_activation as tla

    cfg = test_constants("conftest.py", ["SMALL_CONFIG"])["SMALL_CONFIG"]
    dim, heads, ffn = cfg["dim"], cfg["n_heads"], cfg["hidden_dim"]
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        name = str(dtype)[6:]
        for p in (0.0, 0.1):
            yield f"model attention 2x{heads}x16x{dim // heads} p={p} {name}", lambda: _run_attention(
                ta, dtype, 2, heads, 16, dim // heads, "padded", False, p)
            yield f"model layernorm 32x{dim} p={p} {name}", lambda: _run_layernorm(tln, dtype, 32, dim, p)
        for n in (ffn, dim):
            yield f"model linear_activation 32x{dim}x{n} {name}", lambda: _run_linear(tla, dtype, 32, dim, n, "gelu")


CASES = (op_cases, attention_cases, varlen_attention_cases, model_cases)


# -- report ------------------------------------------------------------------------------------
COLUMNS = ("kernel", "dtypes", "constexprs", "num_warps", "num_stages", "regs", "spill_stores",
           "spill_loads", "shared", "case")


def _table(rows):
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in COLUMNS[:-1]}
    lines = ["  ".join(c.ljust(widths[c]) for c in COLUMNS[:-1]) + "  first case"]
    for r in rows:
        lines.append("  ".join(str(r[c]).ljust(widths[c]) for c in COLUMNS[:-1]) + "  " + r["case"])
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--record", action="store_true",
                        help="append the table to bench/results/triton_sm90.csv")
    parser.add_argument("--jobs", type=int, default=min(os.cpu_count() or 1, 4),
                        help="compile in this many processes")
    args = parser.parse_args()
    sys.path.insert(0, REPO_ROOT)
    compiler = Compiler()
    _intercept(compiler)
    torch.manual_seed(0)
    start = time.perf_counter()
    cases = 0
    for make in CASES:
        for case, launch in make():
            compiler.case = case
            launch()
            cases += 1
    rows = compiler.compile_all(args.jobs)
    seconds = time.perf_counter() - start
    print(_table(rows))
    spilling = [r for r in rows if r["spill_stores"] > 0]
    failures = [r for r in rows if r["error"]]
    print(f"\n{len(rows)} variants from {cases} cases compiled for sm_90 in {seconds:.1f} s "
          f"({args.jobs} processes); {len(spilling)} spill registers; {len(failures)} failed")
    for row in failures:
        print(f"\nFAILED {row['kernel']} {row['dtypes']} {row['constexprs']} ({row['case']}):\n{row['error']}")
    if args.record:
        sys.path.insert(0, BENCH_DIR)
        from _common import append_rows, environment

        env = environment(torch.device("cpu"))
        keep = {k: env[k] for k in ("commit", "date", "machine") if k in env}
        append_rows(os.path.join(BENCH_DIR, "results", "triton_sm90.csv"),
                    [{**keep, "target": "cuda sm_90", "triton": triton.__version__,
                      **{k: v for k, v in r.items() if k != "error"}} for r in rows])
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
