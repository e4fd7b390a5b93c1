"""The model and the ops on a CUDA device: same results as on CPU, clear errors instead of
device-side asserts. Skipped where CUDA is absent (run by bench/gpu/run1.sh on the GPU machine)."""

import pytest
import torch

import distilbert_fast
from distilbert_fast import ops

from conftest import SMALL_CONFIG, assert_close

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _inputs(batch=3, seq=9, vocab=SMALL_CONFIG["vocab_size"]):
    ids = torch.randint(1, vocab, (batch, seq))
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[1, 5:] = 0
    mask[2] = 0  # a fully-masked row
    return ids, mask


@pytest.mark.parametrize("class_name", ["DistilBertModel", "DistilBertForSequenceClassification"])
def test_cuda_matches_cpu_forward_and_backward(class_name):
    config = distilbert_fast.DistilBertConfig(**SMALL_CONFIG)
    cpu = getattr(distilbert_fast, class_name)(config).train()
    gpu = getattr(distilbert_fast, class_name)(distilbert_fast.DistilBertConfig(**SMALL_CONFIG)).train()
    gpu.load_state_dict(cpu.state_dict())
    gpu.cuda()
    for model in (cpu, gpu):  # dropout off, grads on
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
    ids, mask = _inputs()
    out_cpu = cpu(ids, attention_mask=mask)[0]
    out_gpu = gpu(ids.cuda(), attention_mask=mask.cuda())[0]
    # TF32 matmuls on the GPU: allow their rounding
    assert_close(out_gpu.cpu(), out_cpu.detach(), atol=2e-3, name="output")
    out_cpu.float().pow(2).mean().backward()
    out_gpu.float().pow(2).mean().backward()
    gpu_params = dict(gpu.named_parameters())
    for name, p in cpu.named_parameters():
        if p.grad is not None:
            scale = p.grad.abs().max().item() + 1e-6
            assert_close(gpu_params[name].grad.cpu(), p.grad, atol=2e-2 * scale, name=f"grad {name}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision_runs_finite(dtype):
    model = distilbert_fast.DistilBertModel(distilbert_fast.DistilBertConfig(**SMALL_CONFIG)).cuda().to(dtype).eval()
    ids, mask = _inputs()
    out = model(ids.cuda(), attention_mask=mask.cuda()).last_hidden_state
    assert out.dtype == dtype and bool(torch.isfinite(out).all())


def test_bad_token_id_is_a_value_error_not_a_device_assert():
    model = distilbert_fast.DistilBertModel(distilbert_fast.DistilBertConfig(**SMALL_CONFIG)).cuda()
    ids, _ = _inputs()
    ids[0, 0] = SMALL_CONFIG["vocab_size"]
    with pytest.raises(ValueError, match="input_ids must lie in"):
        model(ids.cuda())
    torch.cuda.synchronize()  # the context is still healthy


def test_ops_on_cuda_report_their_backend():
    q = torch.randn(2, 4, 7, 16, device="cuda")
    ops.masked_attention(q, q, q)
    assert ops.last_backend("masked_attention") in ops.available_backends(q)
