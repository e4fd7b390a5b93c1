"""Packed tokens: the real tokens of a batch as one ``(total, ...)`` tensor, described by
``cu_seqlens`` (int32, batch + 1, cumulative lengths starting at 0) and ``max_seqlen`` (a host
int), as flash-attn's varlen API and its ``bert_padding`` take them.

    (batch, seq, ...) + attention_mask  --unpad-->  (total, ...), indices, cu_seqlens, max_seqlen
    (total, ...)                        --pad---->  (batch, seq, ...), zeros at padding

Sequence b of a packed batch is rows ``cu_seqlens[b]:cu_seqlens[b + 1]``; zero-length sequences
are allowed. Nothing here reads a device tensor back to the host except ``unpad`` (once: the
number of real tokens sizes the packed tensor, and ``max_seqlen`` must be a host int).
"""

from dataclasses import dataclass

import torch

from .tracing import tracing


@dataclass(frozen=True)
class Packing:
    """Where the real tokens of a padded (batch, seq) layout sit: pack with ``unpad``, scatter
    back with ``pad``."""

    indices: torch.Tensor  # (total,) int64: each real token's row in the flattened (batch * seq)
    cu_seqlens: torch.Tensor  # (batch + 1,) int32
    max_seqlen: int
    batch: int
    seq: int

    @property
    def total(self) -> int:
        return self.indices.shape[0]

    def unpad(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, seq, ...) -> (total, ...): the real tokens, in order. Broadcast inputs (a
        (1, seq) position_ids) are expanded first."""
        x = x.expand(self.batch, self.seq, *x.shape[2:])
        return x.reshape(self.batch * self.seq, *x.shape[2:]).index_select(0, self.indices)

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """(total, ...) -> (batch, seq, ...) with zeros at padding positions (differentiable)."""
        return pad(x, self.indices, self.batch, self.seq)


def cu_seqlens_of(keep: torch.Tensor) -> torch.Tensor:
    """(batch + 1,) int32 cumulative row lengths of a (batch, seq) bool mask, from 0."""
    lengths = keep.sum(dim=1, dtype=torch.int32)
    return torch.nn.functional.pad(torch.cumsum(lengths, 0, dtype=torch.int32), (1, 0))


def packing_of(keep: torch.Tensor, total: int, max_seqlen: int) -> Packing:
    """The Packing of a (batch, seq) bool mask (True = real token) whose number of real tokens
    ``total`` and longest row ``max_seqlen`` the caller already knows (so nothing syncs here)."""
    batch, seq = keep.shape
    cu_seqlens = cu_seqlens_of(keep)
    # Row of each real token in the packed tensor; padding goes to a scratch row `total`, dropped.
    flat = keep.reshape(-1)
    dest = torch.where(flat, torch.cumsum(flat, 0) - 1, total)
    flat_index = torch.arange(batch * seq, device=keep.device)
    indices = torch.empty(total + 1, dtype=torch.long, device=keep.device).scatter_(0, dest, flat_index)
    return Packing(indices[:total], cu_seqlens, int(max_seqlen), batch, seq)


@torch.library.custom_op("distilbert_fast::real_token_rows", mutates_args=())
def real_token_rows(keep: torch.Tensor) -> torch.Tensor:
    """(total,) int64: the rows of the flattened (batch * seq) bool mask ``keep`` that are True,
    in order. A custom op so that torch.compile traces it with a data-dependent size (an
    unbacked symbol) instead of breaking the graph on the host read that sizes it."""
    return keep.reshape(-1).nonzero().squeeze(1)


@real_token_rows.register_fake
def _(keep):
    return keep.new_empty((torch.library.get_ctx().new_dynamic_size(),), dtype=torch.long)


def compiled_packing_of(keep: torch.Tensor) -> Packing:
    """The Packing of a (batch, seq) bool mask under torch.compile: no host read (the number of
    real tokens stays symbolic, ``max_seqlen`` is seq, an upper bound)."""
    batch, seq = keep.shape
    return Packing(real_token_rows(keep), cu_seqlens_of(keep), seq, batch, seq)


def unpad(hidden: torch.Tensor, attention_mask: torch.Tensor):
    """flash-attn's ``unpad_input``: hidden (batch, seq, ...), attention_mask (batch, seq) with
    nonzero = real token -> (packed (total, ...), indices (total,), cu_seqlens (batch + 1,) int32,
    max_seqlen int). Reads two numbers back to the host (one sync on a GPU)."""
    keep = attention_mask != 0
    total, max_seqlen = torch.stack([keep.sum(), keep.sum(dim=1).max()]).tolist()
    packing = packing_of(keep, total, max_seqlen)
    return packing.unpad(hidden), packing.indices, packing.cu_seqlens, packing.max_seqlen


def pad(packed: torch.Tensor, indices: torch.Tensor, batch: int, seq: int) -> torch.Tensor:
    """flash-attn's ``pad_input``: (total, ...) -> (batch, seq, ...), zeros at padding
    (differentiable)."""
    out = packed.new_zeros(batch * seq, *packed.shape[1:])
    return out.index_copy(0, indices, packed).view(batch, seq, *packed.shape[1:])


def sequence_positions(cu_seqlens: torch.Tensor, total: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sequence index, position within its sequence) of each of the ``total`` packed tokens,
    both (total,) int64, computed on cu_seqlens' device without a sync. Position ids of packed
    input are the second: 0 .. len - 1 per sequence."""
    # A token's sequence is the number of sequence starts at or before it, less one: a running
    # count of marks at every entry of cu_seqlens (not torch.searchsorted, which neither ONNX
    # exporter has; and all of cu_seqlens, not a slice: under torch.export a slice of a dynamic
    # size makes the tracer guard batch >= 2, failing a batch Dim from 1).
    starts = cu_seqlens.long()
    marks = torch.zeros(total + 1, dtype=torch.long, device=cu_seqlens.device)
    marks = marks.scatter_add(0, starts, torch.ones_like(starts))  # the last entry, total, lands past the tokens
    sequence = marks.cumsum(0)[:total] - 1
    return sequence, torch.arange(total, device=cu_seqlens.device) - starts[sequence]


def varlen_to_padded_index(cu_seqlens: torch.Tensor, total: int, max_seqlen: int) -> torch.Tensor:
    """(total,) int64: each packed token's row in a (batch * max_seqlen) padded layout, so
    ``padded.view(batch * max_seqlen, ...)[index]`` unpads and ``index_copy`` pads."""
    sequence, position = sequence_positions(cu_seqlens, total)
    return sequence * max_seqlen + position


def check_cu_seqlens(cu_seqlens, total: int, max_seqlen, max_allowed: int | None = None,
                     device=None) -> None:
    """ValueError/TypeError naming the argument unless cu_seqlens is a 1-D int32 tensor of at
    least 2 entries (on the CPU or on ``device``) and max_seqlen an int in [1, max_allowed]. The
    values (cu_seqlens[0] == 0, non-decreasing, cu_seqlens[-1] == total, no sequence longer
    than max_seqlen) are checked only when cu_seqlens is on the CPU and no compiler or tracer is
    tracing: on a GPU that would be a sync, so there the caller vouches for them (checked where
    the batch is made)."""
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"cu_seqlens must be a torch.Tensor, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype != torch.int32:
        raise ValueError(f"cu_seqlens must have dtype torch.int32, got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 2:
        raise ValueError(f"cu_seqlens must have shape (batch + 1,) with batch >= 1, got {tuple(cu_seqlens.shape)}")
    if cu_seqlens.device.type != "cpu" and device is not None and cu_seqlens.device != torch.device(device):
        raise ValueError(f"cu_seqlens must be on the CPU or on the device of the packed input ({device}), "
                         f"got {cu_seqlens.device}")
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int):
        raise TypeError(f"max_seqlen must be a Python int, got {type(max_seqlen).__name__}")
    if max_seqlen < 1 or (max_allowed is not None and max_seqlen > max_allowed):
        upper = "" if max_allowed is None else f", at most max_position_embeddings={max_allowed}"
        raise ValueError(f"max_seqlen must be at least 1{upper}, got {max_seqlen}")
    if cu_seqlens.device.type != "cpu" or tracing():
        return
    cu = cu_seqlens.tolist()
    if cu[0] != 0:
        raise ValueError(f"cu_seqlens must start at 0, got cu_seqlens[0] = {cu[0]}")
    lengths = [b - a for a, b in zip(cu, cu[1:])]
    if min(lengths) < 0:
        i = next(i for i, n in enumerate(lengths) if n < 0)
        raise ValueError(f"cu_seqlens must be non-decreasing, got cu_seqlens[{i}] = {cu[i]} > "
                         f"cu_seqlens[{i + 1}] = {cu[i + 1]}")
    if cu[-1] != total:
        raise ValueError(f"cu_seqlens[-1] must equal the number of packed tokens {total}, got {cu[-1]}")
    if max(lengths) > max_seqlen:
        raise ValueError(f"max_seqlen must be at least the longest sequence ({max(lengths)}), got {max_seqlen}")


__all__ = ["Packing", "check_cu_seqlens", "pad", "packing_of", "sequence_positions", "unpad",
           "varlen_to_padded_index"]
