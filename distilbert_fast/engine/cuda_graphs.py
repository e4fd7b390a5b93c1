"""CUDA graphs for the engine's batches: one graph per token-count bucket.

A batch of n tokens and b rows runs in the graph of the smallest bucket >= n. Its static inputs
hold the batch's tokens, then dummy tokens up to the bucket (rows of at most ``max_seqlen``
tokens each, so their positions stay inside the position table), then empty rows up to the
static row count. Outputs of the dummy rows and tokens are cut off. Filling the static inputs
uses only device copies and shapes known on the host: no synchronisation.

A padded forward synchronises (it sizes the packed tensor), so capture needs the model's packed
entry point (issue #13); ``graphs_pay`` turns graphs on by default only where it exists.
"""

import inspect

import torch

# Tasks whose outputs have static shapes (fill-mask gathers a data-dependent number of rows).
GRAPHABLE = ("embed", "classify", "tag", "qa")


def graphs_pay(model, device: torch.device, task) -> bool:
    return (device.type == "cuda" and task.name in GRAPHABLE
            and "cu_seqlens" in inspect.signature(model.forward).parameters)


def buckets_for(max_batch_tokens: int, smallest: int = 256) -> list[int]:
    """Powers of two from ``smallest`` below ``max_batch_tokens``, then ``max_batch_tokens``."""
    out, b = [], smallest
    while b < max_batch_tokens:
        out.append(b)
        b *= 2
    return out + [max_batch_tokens]


class GraphedForward:
    """``task.forward`` replayed from a CUDA graph per bucket (captured on first use)."""

    def __init__(self, task, model, device: torch.device, max_batch_tokens: int, warmup: int = 2):
        if device.type != "cuda":
            raise ValueError(f"cuda_graphs needs a CUDA device, got {device}")
        if task.name not in GRAPHABLE:
            raise ValueError(f"cuda_graphs supports the tasks {GRAPHABLE}, not {task.name!r}")
        self.task, self.model, self.device, self.warmup = task, model, device, warmup
        self.max_seqlen = model.config.max_position_embeddings
        self.buckets = buckets_for(max_batch_tokens)
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs = {}  # bucket -> (graph, static inputs, static outputs)

    def fits(self, batch) -> bool:
        return batch.num_tokens <= self.buckets[-1]

    def static_rows(self, bucket: int) -> int:
        # every real row has >= 2 tokens ([CLS], [SEP]); dummy rows take at most max_seqlen each
        return bucket // 2 + bucket // self.max_seqlen + 1

    def __call__(self, model, inputs):
        # captured and replayed with the model's device current: a graph (its capture stream, its
        # replay) belongs to the current device, not to the tensors' (cuda:1 in a worker whose
        # current device is cuda:0)
        with torch.cuda.device(self.device):
            return self._replay(model, inputs)

    def _replay(self, model, inputs):
        n, rows = inputs.ids.shape[0], inputs.cu_seqlens.shape[0] - 1
        bucket = next(b for b in self.buckets if b >= n)
        graph, static, outputs = self.graphs.get(bucket) or self._capture(bucket)
        self._fill(static, inputs, n, rows, bucket)
        graph.replay()
        return {k: v[:n] if v.shape[0] == bucket else v[:rows] for k, v in outputs.items()}

    def _fill(self, static, inputs, n, rows, bucket):
        R, L, dev = static.cu_seqlens.shape[0] - 1, self.max_seqlen, self.device
        static.ids[:n].copy_(inputs.ids)
        static.ids[n:].fill_(0)
        static.cu_seqlens[: rows + 1].copy_(inputs.cu_seqlens)
        tail = torch.arange(1, R - rows + 1, device=dev, dtype=torch.int64) * L + n
        static.cu_seqlens[rows + 1:].copy_(tail.clamp_(max=bucket))
        static.row_of_token[:n].copy_(inputs.row_of_token)
        static.row_of_token[n:].copy_(torch.arange(bucket - n, device=dev) // L + rows)
        static.lengths.copy_(static.cu_seqlens[1:] - static.cu_seqlens[:-1])

    def _capture(self, bucket):
        from .engine import DeviceBatch

        R, dev = self.static_rows(bucket), self.device
        static = DeviceBatch(
            ids=torch.zeros(bucket, dtype=torch.int64, device=dev),
            cu_seqlens=torch.zeros(R + 1, dtype=torch.int32, device=dev),
            max_seqlen=self.max_seqlen,
            row_of_token=torch.zeros(bucket, dtype=torch.int64, device=dev),
            lengths=torch.zeros(R, dtype=torch.int64, device=dev),
            mask_positions=torch.zeros(0, dtype=torch.int64, device=dev),
        )
        # a valid layout to warm up on: one row per max_seqlen tokens
        cu = torch.arange(R + 1, device=dev, dtype=torch.int64) * self.max_seqlen
        static.cu_seqlens.copy_(cu.clamp_(max=bucket))
        static.row_of_token.copy_(torch.arange(bucket, device=dev) // self.max_seqlen)
        static.lengths.copy_(static.cu_seqlens[1:] - static.cu_seqlens[:-1])
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                self.task.forward(self.model, static)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            outputs = self.task.forward(self.model, static)
        self.graphs[bucket] = (graph, static, outputs)
        return self.graphs[bucket]
