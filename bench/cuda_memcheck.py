"""Runs every CUDA kernel of the ``cuda`` backend once, forward and backward, at small sizes, for
``compute-sanitizer --tool memcheck`` (bench/gpu/run2.sh):

    compute-sanitizer --tool memcheck --report-api-errors no --error-exitcode 1 \
        python bench/cuda_memcheck.py

Covers each specialisation: hidden 768 (registers), any hidden size with vector and with scalar
loads; every activation with and without bias; attention with head_dim 64 and a generic one
(vector and scalar staging), masks with a fully-masked row, head_mask, dropout, seq not a
multiple of the tiles. Exits 2 (not 1, which is memcheck's error code) if the backend is absent.
"""

import sys

import torch

import distilbert_fast
from distilbert_fast import ops


def main() -> int:
    if not torch.cuda.is_available() or "cuda" not in ops.registered_backends():
        print("cuda backend not available (no GPU, or the extension was built without CUDA)")
        return 2
    torch.manual_seed(0)
    dev = "cuda"
    calls = 0
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        # residual + LayerNorm: 768 specialised, any size vectorised (40), scalar (37)
        for dim in (768, 40, 37):
            x = torch.randn(5, dim, device=dev, dtype=dtype, requires_grad=True)
            res = torch.randn(5, dim, device=dev, dtype=dtype, requires_grad=True)
            w = torch.randn(dim, device=dev, dtype=dtype, requires_grad=True)
            b = torch.randn(dim, device=dev, dtype=dtype, requires_grad=True)
            xb = torch.randn(dim, device=dev, dtype=dtype, requires_grad=True)
            y = ops.residual_layernorm(x, res, w, b, 1e-12, xb, dropout_p=0.1, backend="cuda")
            y.float().sum().backward()
            calls += 1
        # bias + activation: every activation, vector (16) and scalar (7) widths, bias or not
        for act in ops.ACTIVATIONS:
            for dim, with_bias in ((16, True), (7, True), (16, False)):
                x = torch.randn(3, 5, dim, device=dev, dtype=dtype, requires_grad=True)
                bias = torch.randn(dim, device=dev, dtype=dtype, requires_grad=True) if with_bias else None
                ops.bias_activation(x, bias, act, backend="cuda").float().sum().backward()
                calls += 1
        # attention: head_dim 64 (specialised), 40 (vector staging), 20 (scalar staging)
        for head_dim, seq in ((64, 37), (40, 33), (20, 17)):
            q, k, v = (torch.randn(2, 3, seq, head_dim, device=dev, dtype=dtype, requires_grad=True)
                       for _ in range(3))
            mask = torch.rand(2, seq, device=dev) > 0.3
            mask[1] = False  # a fully-masked row
            head_mask = torch.tensor([1.0, 0.0, 0.5], device=dev, dtype=dtype, requires_grad=True)
            out, _ = ops.masked_attention(q, k, v, mask, head_mask, dropout_p=0.1, backend="cuda")
            out.float().sum().backward()
            calls += 1
    torch.cuda.synchronize()
    assert set(ops.last_backend().values()) == {"cuda"}, ops.last_backend()
    print(f"{calls} op calls (forward + backward) ran on the cuda backend; build {distilbert_fast.BUILD_INFO}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
