"""Texts -> packed rows -> token-budget batches, on the host (numpy).

``encode_packed`` tokenizes a window of texts into one packed array of ids with ``cu`` row
boundaries (no padding kept), plus the per-token data the tasks need (offsets, word ids, which
text of a pair). ``plan_batches`` sorts the window's rows by length and fills batches up to a
budget of real tokens; ``pack_batch`` gathers one batch's rows into the model's packed inputs.
"""

from dataclasses import dataclass

import numpy as np


@dataclass
class Encoded:
    """The rows of one window, packed. A text gives one row, or several overflow windows."""

    ids: np.ndarray  # (total,) int64
    cu: np.ndarray  # (rows + 1,) int64, cu[0] == 0: row r is ids[cu[r]:cu[r + 1]]
    item: np.ndarray  # (rows,) int64: the window's item each row comes from
    offsets: np.ndarray | None = None  # (total, 2) int64: code point span of each token in its text
    word_ids: np.ndarray | None = None  # (total,) int64: word index in its text, -1 for special tokens
    sequence_ids: np.ndarray | None = None  # (total,) int8: 0 / 1 = first / second text, -1 = special

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.cu)


def encode_packed(tokenizer, texts, pairs=None, *, max_length: int, truncation: str = "longest_first",
                  stride: int = 0, overflow: bool = False, offsets: bool = False, word_ids: bool = False,
                  sequence_ids: bool = False) -> Encoded:
    """Tokenizes ``texts`` (and ``pairs``) into packed rows with the tokenizer's packed entry point:
    ids and row boundaries written with no padding, on its C++ threads with the GIL released."""
    enc = tokenizer.encode_packed(
        list(texts), None if pairs is None else list(pairs), truncation=truncation, max_length=max_length,
        stride=stride, return_overflowing_tokens=overflow, return_offsets_mapping=offsets,
        return_word_ids=word_ids, return_sequence_ids=sequence_ids, return_tensors="np")
    return Encoded(ids=enc.input_ids, cu=enc.cu_seqlens.astype(np.int64), item=enc.overflow_to_sample_mapping,
                   offsets=enc.offset_mapping, word_ids=enc.word_ids, sequence_ids=enc.sequence_ids)


def plan_batches(lengths: np.ndarray, max_batch_tokens: int, max_batch_rows: int | None = None) -> list[np.ndarray]:
    """Row indices of each batch: rows sorted by length (longest first, so the largest batch comes
    first and memory peaks early), each batch filled up to ``max_batch_tokens`` real tokens (a
    row longer than the budget is a batch of its own) and at most ``max_batch_rows`` rows."""
    order = np.argsort(-lengths, kind="stable")
    batches, start, tokens = [], 0, 0
    for i, row in enumerate(order):
        n = int(lengths[row])
        full = tokens + n > max_batch_tokens or (max_batch_rows is not None and i - start >= max_batch_rows)
        if i > start and full:
            batches.append(order[start:i])
            start, tokens = i, 0
        tokens += n
    if start < len(order):
        batches.append(order[start:])
    return batches


@dataclass
class PackedBatch:
    """One batch's model inputs (host arrays) and where its tokens came from."""

    rows: np.ndarray  # (batch,) row indices into the window's Encoded
    ids: np.ndarray  # (total,) int64
    cu_seqlens: np.ndarray  # (batch + 1,) int32
    max_seqlen: int
    source: np.ndarray  # (total,) int64: each token's index in the window's packed ids

    @property
    def num_tokens(self) -> int:
        return int(self.ids.shape[0])

    def row_of_token(self) -> np.ndarray:
        """(total,) int64: the batch row each token belongs to."""
        return np.repeat(np.arange(len(self.rows)), np.diff(self.cu_seqlens))


def pack_batch(enc: Encoded, rows: np.ndarray) -> PackedBatch:
    """Gathers ``rows`` of ``enc`` into one packed batch (vectorised, no per-row Python work)."""
    starts = enc.cu[rows]
    lengths = enc.cu[rows + 1] - starts
    cu = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum(lengths, out=cu[1:])
    source = np.repeat(starts - cu[:-1], lengths) + np.arange(cu[-1])
    return PackedBatch(rows=rows, ids=enc.ids[source], cu_seqlens=cu.astype(np.int32),
                       max_seqlen=int(lengths.max()), source=source)
