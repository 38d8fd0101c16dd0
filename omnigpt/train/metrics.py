"""Progress lines, metrics JSONL and the loss-curve PNG (rank 0 only)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

# Dense bf16 tensor-core peaks (no sparsity), the denominator of MFU. Override with OMNIGPT_PEAK_FLOPS.
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "GH200": 989e12, "B200": 2250e12,
                   "A100": 312e12, "A800": 312e12, "L40S": 362e12, "L4": 121e12, "A10": 125e12}


def peak_flops(device: torch.device) -> float | None:
    """Peak bf16 FLOP/s of one device, or None where unknown (CPU: MFU is reported as n/a)."""
    if os.environ.get("OMNIGPT_PEAK_FLOPS"):
        return float(os.environ["OMNIGPT_PEAK_FLOPS"])
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key in sorted(PEAK_BF16_FLOPS, key=len, reverse=True):  # "GH200" before "H200"
        if key in name:
            return PEAK_BF16_FLOPS[key]
    return None


def human(n: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.1f}{unit}"
    return f"{n:.0f}"


def duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def progress_line(step: int, steps: int, loss: float, lr: float, grad_norm: float, tok_s: float, mfu: float | None,
                  eta_s: float, aux: float | None = None) -> str:
    parts = [f"step {step:>{len(str(steps))}}/{steps}", f"loss {loss:.4f}"]
    if aux is not None:
        parts.append(f"aux {aux:.4f}")
    parts += [f"lr {lr:.2e}", f"gnorm {grad_norm:.3f}", f"{human(tok_s)} tok/s",
              "MFU n/a" if mfu is None else f"MFU {100 * mfu:.1f}%", f"ETA {duration(eta_s)}"]
    return " | ".join(parts)


class MetricsLog:
    """Append-only JSONL of records, each with a "step". On resume from step S, records after S (written by the
    interrupted run past its last checkpoint) are dropped so the file reads as one uninterrupted run."""

    def __init__(self, path: str | os.PathLike, enabled: bool = True):
        self.path, self.enabled = Path(path), enabled

    def truncate_after(self, step: int) -> None:
        if not self.enabled or not self.path.is_file():
            return
        keep = [line for line in self.path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in keep))
        os.replace(tmp, self.path)

    def reset(self) -> None:
        if self.enabled and self.path.is_file():
            self.path.unlink()

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def read(self) -> list[dict]:
        if not self.path.is_file():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]


def plot_losses(records: list[dict], out_png: str | os.PathLike, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    if train:
        ax.plot(*zip(*train), label="train", lw=1)
    if val:
        ax.plot(*zip(*val), "o-", label="validation", ms=3)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = Path(out_png).with_name(Path(out_png).stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, out_png)
