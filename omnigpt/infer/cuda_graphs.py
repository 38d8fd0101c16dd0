"""CUDA-graph decoding: one captured decode step per cache-length bucket, replayed for every token.

A decode step of a small model is hundreds of tiny kernels; launched one by one from Python they cost more than
the math (batch-1 decode is bound by reading the weights once per token). A graph replays them all with one
launch. Shapes must be static, so the KV cache is read at a fixed length (the bucket) instead of up to the
furthest position, and the step's inputs live in fixed tensors that are overwritten before each replay.

Measured on an H100 (benchmarks/RESULTS.md, 1.1B Llama shape): eager decode 46 tok/s at batch 1; graphs of eager
kernels 401; graphs of torch.compile'd kernels 629-673 (49.5% of the weight-bandwidth roofline). At 128 streams
the eager-kernel graph is faster (296 vs 161 steps/s), hence `compile` is a per-decoder choice.
"""

from __future__ import annotations

import torch

from omnigpt.model.transformer import KVCache, Transformer

BUCKETS = (128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)


def first_rows(cache: KVCache, n: int) -> KVCache:
    """Rows 0..n-1 of `cache` as a KVCache of batch n sharing its storage (writes land in `cache`)."""
    view = KVCache.__new__(KVCache)
    view.k, view.v, view.max_len, view.read_len = cache.k[:, :n], cache.v[:, :n], cache.max_len, None
    return view


class CudaGraphDecoder:
    """Greedy-or-sampled decode for `batch_size` rows of a slot KV cache (rows advance independently).

    prefill() runs eagerly; step() replays the graph of the smallest bucket holding every row's position.
    The cache has one spare slot past max_len (slot max_len): capture-time warm-up writes go there, never into a
    real slot, and so do the writes of rows a caller marks idle by giving them position max_len.

    compile: torch.compile the step (True), or the name of an Inductor mode to compile it with.
    greedy: step() returns each row's argmax token (B,), taken inside the graph, instead of the logits (B, V).
    cache: decode into the first batch_size rows of this cache (a serving engine's), else a new one of its own.
    graphs: capture CUDA graphs (default: when the model is on CUDA); without, step() runs the same static-shape
    forward eagerly, which is how CPU tests check the bucketing and the idle rows.
    """

    def __init__(self, model: Transformer, batch_size: int, max_len: int, compile: bool | str = False,
                 cache: KVCache | None = None, graphs: bool | None = None, greedy: bool = False):
        w = model.head_weight()
        self.model, self.max_len, self.batch_size, self.greedy = model, max_len, batch_size, greedy
        if cache is None:
            cache = KVCache(model.cfg, batch_size, max_len + 1, device=w.device, dtype=w.dtype)
        elif cache.max_len != max_len + 1 or cache.k.shape[1] < batch_size:
            raise ValueError(f"the cache has {cache.k.shape[1]} rows of {cache.max_len} slots; need {batch_size} rows "
                             f"of {max_len + 1} (max_len + a spare slot)")
        self.cache = first_rows(cache, batch_size)
        self.use_graphs = w.is_cuda if graphs is None else graphs
        self.tokens = torch.zeros(batch_size, 1, dtype=torch.long, device=w.device)
        self.pos = torch.full((batch_size, 1), max_len, dtype=torch.long, device=w.device)
        self.buckets = [b for b in BUCKETS if b < max_len] + [max_len]
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        # torch.compile fuses the step's elementwise work (norms, RoPE, SwiGLU) into few kernels; the graph then
        # replays those. Static shapes: read_len is a Python int, so each bucket is its own specialisation.
        # compile may name an Inductor mode, e.g. "max-autotune-no-cudagraphs" (we capture our own graphs).
        mode = compile if isinstance(compile, str) else None
        self._forward = torch.compile(self._raw_step, dynamic=False, mode=mode) if compile else self._raw_step

    def _raw_step(self) -> torch.Tensor:
        logits = self.model(self.tokens, pos_BT=self.pos, cache=self.cache).logits[:, -1]
        return logits.argmax(-1) if self.greedy else logits

    @torch.no_grad()
    def prefill(self, tokens_BT: torch.Tensor, lengths: list[int]) -> torch.Tensor:
        """Right-padded prompts (row b holds lengths[b] real tokens); returns each row's next-token logits."""
        B, T = tokens_BT.shape
        pos = torch.arange(T, device=tokens_BT.device).expand(B, T)
        logits = self.model(tokens_BT, pos_BT=pos, cache=first_rows(self.cache, B)).logits
        return logits[torch.arange(B, device=logits.device), torch.tensor(lengths, device=logits.device) - 1]

    @torch.no_grad()
    def _capture(self, length: int):
        self.cache.read_len = length
        saved = self.pos.clone()
        self.pos.fill_(self.max_len)  # warm-up and capture write into the spare slot
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):  # lazy initialisation (cuBLAS handles, compilation, autotuning) outside the graph
                self._forward()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            logits = self._forward()
        self.cache.read_len = None
        self.pos.copy_(saved)
        return graph, logits

    def bucket(self, max_pos: int) -> int:
        return next(b for b in self.buckets if b > max_pos)

    def warm_up(self, max_pos: int) -> None:
        """Capture every graph that positions up to max_pos will use (capturing writes only the spare slot)."""
        if not self.use_graphs:
            return
        for length in self.buckets[: self.buckets.index(self.bucket(max_pos)) + 1]:
            if length not in self.graphs:
                self.graphs[length] = self._capture(length)

    @torch.no_grad()
    def step(self, tokens_B: torch.Tensor, pos_B: torch.Tensor, max_pos: int) -> torch.Tensor:
        """Write tokens_B at positions pos_B and return next-token logits (B, V), or with greedy the tokens (B,).
        max_pos = the largest position of a live row, known to the caller without a device sync (it counts
        tokens); idle rows pass max_len.
        The returned tensor is overwritten by the next step: index or copy it first."""
        length = self.bucket(max_pos)
        self.tokens.copy_(tokens_B.view(-1, 1))
        self.pos.copy_(pos_B.view(-1, 1))
        if not self.use_graphs:
            self.cache.read_len = length
            try:
                return self._forward()
            finally:
                self.cache.read_len = None
        if length not in self.graphs:
            self.graphs[length] = self._capture(length)
        graph, logits = self.graphs[length]
        graph.replay()
        return logits
