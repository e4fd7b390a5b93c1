"""Runs every CUDA kernel of the ``cuda`` backend once, forward and backward, at small sizes, for
``compute-sanitizer --tool memcheck`` (bench/gpu/run2.sh):

    compute-sanitizer --tool memcheck --report-api-errors no --error-exitcode 1 \
        python bench/cuda_memcheck.py

Covers each specialisation: hidden 768 (registers), any hidden size with vector and with scalar
loads; every activation with and without bias; attention with head_dim 64 and a generic one
(vector and scalar staging), masks with a fully-masked row, head_mask, dropout, seq not a
multiple of the tiles; varlen attention on ragged packed sequences (an empty one, one token),
fused-QKV views and contiguous inputs, head_dim up to 128; a broadcast residual. Exits 2 (not 1, which is memcheck's error code) if the backend is absent.
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
            # a residual broadcast over the rows (read in place, row r % 1)
            y = ops.residual_layernorm(x, res[:1].expand(5, dim), w, b, 1e-12, None, backend="cuda")
            y.float().sum().backward()
            calls += 2
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
        # varlen attention: ragged lengths with an empty and a one-token sequence, max_seqlen above
        # the longest; q, k, v as strided views of one fused QKV tensor and as contiguous tensors;
        # head_dim 64, 40, 20 and 128 (the backward then takes over 48 KiB of shared memory)
        lengths = [37, 0, 1, 16, 5]
        cu_seqlens = torch.tensor([0, 37, 37, 38, 54, 59], dtype=torch.int32, device=dev)
        for head_dim in (64, 40, 20, 128):
            for fused in (True, False):
                total, dim = sum(lengths), 2 * head_dim
                if fused:
                    qkv = torch.randn(total, 3 * dim, device=dev, dtype=dtype, requires_grad=True)
                    q, k, v = (qkv[:, i * dim:(i + 1) * dim].view(total, 2, head_dim) for i in range(3))
                else:
                    q, k, v = (torch.randn(total, 2, head_dim, device=dev, dtype=dtype, requires_grad=True)
                               for _ in range(3))
                head_mask = torch.tensor([1.0, 0.5], device=dev, dtype=dtype, requires_grad=True)
                out = ops.varlen_attention(q, k, v, cu_seqlens, max(lengths) + 3, head_mask,
                                           dropout_p=0.1, backend="cuda")
                out.float().sum().backward()
                calls += 1
    torch.cuda.synchronize()
    assert set(ops.last_backend().values()) == {"cuda"}, ops.last_backend()
    print(f"{calls} op calls (forward + backward) ran on the cuda backend; build {distilbert_fast.BUILD_INFO}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
