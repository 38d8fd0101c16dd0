"""Requests with images in the serving engine: what a vision-language model (omnigpt.model.multimodal.VLM) changes.

Requests that carry images go through the same engine as text (continuous batching, KV cache, prefix cache,
sampling, streaming, n choices, stop strings, logprobs, JSON mode, cancellation, usage, 429s), rather than a
path of their own around generate_vlm: a second path would have to repeat all of that or lack some of it, and
the difference images make to a forward pass is small and local:

- admission encodes a request's images once (ViT + connector: `VLM.encode_images`) into `RequestImages`;
- inline fusion (KOSMOS): in a prefill chunk, the `<|image|>` placeholder embeddings are replaced by the image
  vectors, as VLM.forward does; decode steps are plain (a sampled token is never a placeholder: the engine
  samples text tokens only);
- cross fusion (Flamingo): every forward, prefill and decode, runs inside `vlm.attending(media)`, where each row
  sees the latents of its own request's images placed at or before each token's position (rows without images,
  and padding images, see nothing);
- the prefix cache may reuse a prompt's KV only up to its first image: after it, keys and values depend on pixels
  that the token ids do not show. Before it they do not (in both modes a token sees no image before its own).

A text-only request to a VLM runs on its language model as is (with cross fusion, the gated blocks still run
their dense part, exactly as VLM.forward without images). Shape legend: B rows, T tokens, D LM width, K image
placeholders of a request, L vectors per image, M images of a row (padded across rows), Q = M*L.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import torch

from omnigpt.model.multimodal import VLM, media_context

NO_POSITION = torch.iinfo(torch.long).max  # a padding image's position: no token sees it


@dataclass
class RequestImages:
    slots: list[int]  # prompt positions of the request's <|image|> placeholders, in order
    vectors: torch.Tensor  # inline: (K, D), one per placeholder; cross: (M*L, D), the images' latents in order
    positions: torch.Tensor | None = None  # cross: (M,) each image's placeholder position


class ImageRows:
    """The engine's view of a VLM: checks, encodes and splices requests' images (one per engine)."""

    def __init__(self, vlm: VLM):
        self.vlm, self.cfg = vlm.eval(), vlm.cfg
        self.image_id = vlm.cfg.image_id

    def check(self, prompt: list[int], images: torch.Tensor | None) -> str | None:
        """Why a prompt and its images cannot run together (None: they can)."""
        n_images = 0 if images is None else len(images)
        vc = self.cfg.vision
        if n_images and tuple(images.shape[1:]) != (vc.n_channels, vc.image_size, vc.image_size):
            return (f"images must be preprocessed to ({vc.n_channels}, {vc.image_size}, {vc.image_size}) pixels, "
                    f"got {tuple(images.shape[1:])}")
        n_slots = prompt.count(self.image_id)
        if n_slots != n_images * self.cfg.image_tokens:
            return (f"the prompt has {n_slots} <|image|> placeholders but {n_images} image(s) come with it "
                    f"({self.cfg.image_tokens} placeholder(s) per image)")
        return None

    def reusable_prefix(self, prompt: list[int]) -> int:
        """Tokens of the prompt whose KV depends on token ids alone: those before its first image."""
        return prompt.index(self.image_id) if self.image_id in prompt else len(prompt)

    def encode(self, prompt: list[int], pixels_NCHW: torch.Tensor) -> RequestImages:
        weight = self.vlm.lm.head_weight()
        feats_NLD = self.vlm.encode_images(pixels_NCHW.to(weight.device, weight.dtype))
        slots = [i for i, t in enumerate(prompt) if t == self.image_id]
        vectors = feats_NLD.reshape(-1, feats_NLD.shape[-1])
        if self.cfg.fusion == "inline":
            return RequestImages(slots, vectors)
        return RequestImages(slots, vectors, torch.tensor(slots, dtype=torch.long, device=weight.device))

    @property
    def decode_needs_images(self) -> bool:
        return self.cfg.fusion == "cross"

    def forward(self, model, tokens_BT: torch.Tensor, pos_BT: torch.Tensor, cache, rows: list[RequestImages | None],
                spans: list[tuple[int, int]] | None = None, last_only: bool = False):
        """model(tokens_BT, ...) with each row's images. spans (a prefill): row b holds prompt tokens
        start..start+count-1, count-1 of them from column 0 and the last in the last column (the engine's layout)."""
        if all(r is None for r in rows):
            return model(tokens_BT, pos_BT=pos_BT, cache=cache, last_only=last_only)
        if self.cfg.fusion == "inline":
            if spans is None:  # a decode step: no placeholders
                return model(tokens_BT, pos_BT=pos_BT, cache=cache, last_only=last_only)
            x_BTD = model.embed(tokens_BT)
            T = tokens_BT.shape[1]
            for b, (r, (start, count)) in enumerate(zip(rows, spans)):
                if r is None:
                    continue
                lo, hi = bisect.bisect_left(r.slots, start), bisect.bisect_left(r.slots, start + count)
                cols = [k - start if k - start < count - 1 else T - 1 for k in r.slots[lo:hi]]
                x_BTD[b, cols] = r.vectors[lo:hi].to(x_BTD.dtype)
            return model(None, embeds_BTD=x_BTD, pos_BT=pos_BT, cache=cache, last_only=last_only)
        B, L = tokens_BT.shape[0], self.cfg.tokens_per_image
        M = max(len(r.positions) for r in rows if r is not None)
        some = next(r for r in rows if r is not None).vectors
        media_BQD = some.new_zeros(B, M * L, some.shape[-1])
        img_pos_BM = torch.full((B, M), NO_POSITION, dtype=torch.long, device=some.device)
        for b, r in enumerate(rows):
            if r is not None:
                media_BQD[b, : len(r.vectors)] = r.vectors
                img_pos_BM[b, : len(r.positions)] = r.positions
        with self.vlm.attending(media_context(media_BQD, img_pos_BM, pos_BT, L)):
            return model(tokens_BT, pos_BT=pos_BT, cache=cache, last_only=last_only)
