"""KV-cache plumbing for the serving engine: forward passes over some rows of a slot cache, and a prefix cache.

The model's `KVCache` is slot based (row b = one sequence, slot s = its token at position s) and a forward
pass with a cache touches rows 0..B-1. The engine runs each forward over the rows it needs (the sequences
being prefilled, or those decoding) through `CacheRows`, which `Attention` uses exactly like a KVCache.

Shape legend: L layers, R cache rows, S slots, G key/value heads, h head dim, B rows in this forward, T tokens.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from omnigpt.config import ModelConfig
from omnigpt.model.transformer import KVCache


class CacheRows:
    """Rows `rows` of `cache`, looking like a KVCache of batch len(rows) to the model."""

    def __init__(self, cache: KVCache, rows: list[int]):
        self.cache = cache
        self.max_len = cache.max_len
        self.rows = torch.tensor(rows, device=cache.k.device)
        first = rows[0]
        # A run of consecutive rows is read as a view (no copy); scattered rows are gathered.
        self.span = (first, first + len(rows)) if rows == list(range(first, first + len(rows))) else None

    def write(self, layer: int, pos_BT: torch.Tensor, k_BTGh: torch.Tensor, v_BTGh: torch.Tensor):
        rows = self.rows.unsqueeze(1)
        self.cache.k[layer][rows, pos_BT] = k_BTGh.to(self.cache.k.dtype)
        self.cache.v[layer][rows, pos_BT] = v_BTGh.to(self.cache.v.dtype)

    def read(self, layer: int, length: int):
        if self.span is not None:
            lo, hi = self.span
            return self.cache.k[layer, lo:hi, :length], self.cache.v[layer, lo:hi, :length]
        return (self.cache.k[layer, :, :length].index_select(0, self.rows),
                self.cache.v[layer, :, :length].index_select(0, self.rows))


def copy_slots(src: KVCache, src_row: int, dst: KVCache, dst_row: int, length: int) -> None:
    """Slots 0..length-1 of one row into another row (all layers): the KV of a shared token prefix."""
    dst.k[:, dst_row, :length] = src.k[:, src_row, :length]
    dst.v[:, dst_row, :length] = src.v[:, src_row, :length]


def common_prefix_len(a: list[int], b: tuple[int, ...] | list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class PrefixCache:
    """Recently prefilled prompts and their KV, in rows of a cache of their own.

    A token's keys and values depend only on the tokens before it, so any common prefix between a new
    prompt and a stored one can be copied instead of recomputed (a shared system prompt, the earlier turns
    of a conversation, the n choices of one request). Least recently used prompts are dropped first.
    """

    def __init__(self, cfg: ModelConfig, rows: int, max_len: int, device, dtype, min_tokens: int = 16):
        self.rows = rows
        self.min_tokens = min_tokens
        self.cache = KVCache(cfg, rows, max_len, device=device, dtype=dtype) if rows else None
        self.entries: OrderedDict[int, tuple[int, ...]] = OrderedDict()  # row -> prompt tokens, oldest first

    def lookup(self, prompt: list[int]) -> tuple[int, int]:
        """(row, length) of the longest stored prefix shared with prompt; length 0 when none."""
        best_row, best_len = -1, 0
        for row, tokens in self.entries.items():
            n = common_prefix_len(prompt, tokens)
            if n > best_len:
                best_row, best_len = row, n
        if best_len:
            self.entries.move_to_end(best_row)
        return best_row, best_len

    def store(self, prompt: list[int], src: KVCache, src_row: int) -> None:
        """Keep the KV of prompt (already in src_row of src) unless a stored prompt already covers it."""
        if not self.rows or len(prompt) < self.min_tokens:
            return
        target = None
        for row, tokens in self.entries.items():
            n = common_prefix_len(prompt, tokens)
            if n == len(prompt):  # a stored prompt starts with this one: nothing new
                self.entries.move_to_end(row)
                return
            if n == len(tokens):  # this prompt extends a stored one: replace it
                target = row
        if target is None:
            unused = [r for r in range(self.rows) if r not in self.entries]
            target = unused[0] if unused else next(iter(self.entries))  # else evict the least recently used
        self.entries.pop(target, None)
        copy_slots(src, src_row, self.cache, target, len(prompt))
        self.entries[target] = tuple(prompt)

    def clear(self) -> None:
        self.entries.clear()
