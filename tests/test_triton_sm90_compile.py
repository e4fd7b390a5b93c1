"""Every Triton kernel variant the GPU tests launch compiles for sm_90, on a machine without a GPU.

bench/triton_sm90.py runs the real launchers on CPU tensors shaped like the GPU tests' cases,
with Triton's launch intercepted so that each new variant is compiled (through ptxas) for
GPUTarget("cuda", 90, 32) instead of running. It runs in a subprocess without TRITON_INTERPRET:
the kernels must be real JITFunctions, which the interpreter (set by conftest for this process)
replaces. Its table (registers, spills, shared memory per variant) is printed on failure and
with `pytest -s`; bench/results/triton_sm90.csv holds the recorded ones.
"""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "bench", "triton_sm90.py")


def _missing_triton_api():
    """Why Triton cannot compile for a target it is not running on here, or None."""
    try:
        import triton
        from triton import knobs
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.backends.nvidia import compiler  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
        from triton.runtime import driver
    except ImportError as e:
        return f"triton lacks what the sm_90 compile check needs: {e}"
    if not hasattr(knobs.runtime, "jit_cache_hook") or not hasattr(driver, "set_active"):
        return f"triton {triton.__version__} has no jit_cache_hook / driver.set_active"
    return None


@pytest.mark.build_check
@pytest.mark.skipif(_missing_triton_api() is not None, reason=str(_missing_triton_api()))
def test_every_triton_variant_compiles_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = env.get("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9 warns if unset
    run = subprocess.run([sys.executable, SCRIPT], capture_output=True, text=True, env=env,
                         cwd=ROOT, timeout=900)
    print(run.stdout)
    assert run.returncode == 0, f"exit {run.returncode}\n{run.stdout[-20000:]}\n{run.stderr[-5000:]}"
    summary = run.stdout.strip().splitlines()[-1]
    assert " 0 failed" in summary and "variants" in summary, summary
    variants = int(summary.split()[0])
    # every kernel the GPU tests launch: attention fwd / bwd preprocess / dkdv / dq, LayerNorm fwd /
    # bwd / dropout mask, bias + activation fwd / bwd, the fused linear + activation
    for kernel in ("_attn_fwd_kernel", "_attn_bwd_preprocess_kernel", "_attn_bwd_dkdv_kernel",
                   "_attn_bwd_dq_kernel", "_residual_layernorm_fwd_kernel",
                   "_residual_layernorm_bwd_kernel", "_dropout_keep_kernel",
                   "_bias_activation_fwd_kernel", "_bias_activation_bwd_kernel",
                   "_linear_activation_fwd_kernel"):
        assert f"\n{kernel} " in run.stdout, f"no variant of {kernel} was compiled"
    assert variants > 50, summary
