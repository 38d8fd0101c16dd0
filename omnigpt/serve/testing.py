"""Helpers for tests and benchmarks: tiny random checkpoints (text, or vision-language), and a real uvicorn server
in a thread.

The server listens on a real loopback socket (port chosen by the OS), so clients under test talk HTTP exactly
as they would to `omnigpt serve`.
"""

from __future__ import annotations

import random
import socket
import threading
import time
from pathlib import Path

import torch

from omnigpt.config import tiny
from omnigpt.model.transformer import Transformer
from omnigpt.serve.checkpoint import save_for_serving

WORDS = ("the quick brown fox jumps over a lazy dog while hello world says hi to you and me { } [ ] : , "
         '" true false null 0 1 2 3 4 5 6 7 8 9 . - é 世界 🎉 json name age list').split()


def tiny_tokenizer(out_dir: Path, vocab_size: int = 512, seed: int = 0):
    """A small byte-level BPE trained on generated text (its corpus is written to out_dir, then removed)."""
    from omnigpt.tokenizer.text import train_bpe

    rng = random.Random(seed)
    corpus = out_dir / "corpus.txt"
    corpus.write_text("\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 15))) for _ in range(2000)),
                      encoding="utf-8")
    tok = train_bpe([str(corpus)], vocab_size=vocab_size)
    corpus.unlink()
    return tok


def make_tiny_checkpoint(out_dir: str | Path, vocab_size: int = 512, max_seq_len: int = 512, seed: int = 0,
                         name: str = "omnigpt-tiny", **model_overrides) -> Path:
    """Train a small byte-level BPE on generated text and save a random tiny model with it."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = tiny_tokenizer(out, vocab_size, seed)
    torch.manual_seed(seed)
    model = Transformer(tiny(vocab_size=tok.padded_vocab_size(), max_seq_len=max_seq_len, **model_overrides))
    return save_for_serving(model, tok, out, name=name)


def make_tiny_vlm_checkpoint(out_dir: str | Path, fusion: str = "inline", vocab_size: int = 512, max_seq_len: int = 512,
                             seed: int = 0, name: str = "omnigpt-tiny-vlm", **vlm_overrides) -> Path:
    """A random tiny vision-language model (a 2-block ViT on 32px images + the tiny LM) and its tokenizer.
    Inline: 2x2 pixel-shuffled patches, 4 tokens per image; cross: 4 resampled latents, gates opened a little (at
    their initial 0 the images would change nothing)."""
    from omnigpt.model.multimodal import VLM, VLMConfig
    from omnigpt.model.vision import VisionConfig

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = tiny_tokenizer(out, vocab_size, seed)
    torch.manual_seed(seed)
    cfg = VLMConfig(vision=VisionConfig(image_size=32, patch_size=8, d_model=32, n_layers=2, n_heads=2, d_ff=64),
                    text=tiny(vocab_size=tok.padded_vocab_size(), max_seq_len=max_seq_len), image_id=tok.image_id,
                    fusion=fusion, pixel_shuffle=2 if fusion == "inline" else 1, n_latents=4, resampler_layers=1,
                    resampler_heads=2, **vlm_overrides)
    vlm = VLM(cfg)
    with torch.no_grad():
        for block in vlm.xattn.values():
            block.attn_gate.fill_(0.03)  # (wider open, the random image attention drowns the text)
            block.mlp_gate.fill_(0.5)
    return save_for_serving(vlm, tok, out, name=name)


class ServerThread:
    """Run an ASGI app under uvicorn on 127.0.0.1 in a daemon thread (a context manager)."""

    def __init__(self, app, host: str = "127.0.0.1"):
        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://{host}:{self.port}"
        config = uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> "ServerThread":
        self.thread.start()
        deadline = time.time() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.time() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()
