"""The one place the engine calls the model: ``run_packed``.

The engine builds packed batches only (real tokens, no padding): ``ids`` (total_tokens,) int64,
``cu_seqlens`` (batch + 1,) int32 starting at 0, ``max_seqlen`` (a host int): the model's packed
entry point takes exactly that, with no host synchronisation (so a CUDA graph can capture it).

Outputs follow the packed entry point's contract: token-level fields (``last_hidden_state``,
token-classification / masked-LM ``logits``, ``start_logits`` / ``end_logits``) are
(total_tokens, ...); sequence-level fields (sequence-classification ``logits``) are (batch, ...).
"""

import torch


def run_packed(model, ids: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int):
    """``model``'s output on the packed batch (ids, cu_seqlens, max_seqlen), fields packed."""
    return model(input_ids=ids, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, return_dict=True)
