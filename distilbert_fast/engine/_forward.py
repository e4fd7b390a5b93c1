"""The one place the engine calls the model: ``run_packed``.

The engine builds packed batches only (real tokens, no padding): ``ids`` (total_tokens,) int64,
``cu_seqlens`` (batch + 1,) int32 starting at 0, ``max_seqlen`` (a host int). The model's packed
entry point (issue #13) takes exactly that. Until it is merged, ``run_packed`` pads the batch, runs
the padded forward and packs the outputs again (a boolean-mask gather); at merge its body becomes ``return model(input_ids=ids, cu_seqlens=cu_seqlens,
max_seqlen=max_seqlen)``.

Outputs follow the packed entry point's contract: token-level fields (``last_hidden_state``,
token-classification / masked-LM ``logits``, ``start_logits`` / ``end_logits``) are
(total_tokens, ...); sequence-level fields (sequence-classification ``logits``) are (batch, ...).
"""

import torch

# Fields that are per token in a padded output: (batch, seq, ...).
_TOKEN_FIELDS = ("last_hidden_state", "start_logits", "end_logits")


def run_packed(model, ids: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int):
    """``model``'s output on the packed batch (ids, cu_seqlens, max_seqlen), fields packed."""
    device = ids.device
    total = ids.shape[0]
    starts = cu_seqlens[:-1].long()  # (batch,)
    lengths = cu_seqlens[1:].long() - starts  # (batch,)
    cols = torch.arange(max_seqlen, device=device)  # (max_seqlen,)
    mask = cols[None, :] < lengths[:, None]  # (batch, max_seqlen): rows are consecutive in ids
    padded = ids.new_full(mask.shape, model.config.pad_token_id or 0).masked_scatter_(mask, ids)
    out = model(input_ids=padded, attention_mask=mask.long(), return_dict=True)
    for name in _TOKEN_FIELDS:
        if name in out:
            setattr(out, name, out[name][mask])  # (total, ...) in row-major order: packed order
    if "logits" in out and out["logits"].dim() == 3:  # token classification, masked LM
        out.logits = out["logits"][mask]
    return out
