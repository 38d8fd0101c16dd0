"""2 processes over gloo (torchrun) with FSDP2, and with expert parallelism, match 1 process on the same global batch."""

import json
import os
import subprocess
import sys

import pytest

from omnigpt.cli import main
from omnigpt.train.synthetic import write_synthetic_corpus

STEPS = 4


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus")
    write_synthetic_corpus(path, {"alpha": 80, "beta": 40}, vocab=256)
    return path


def args(corpus, out, batch_size, *extra):
    return ["--data", str(corpus), "--out", str(out), "--steps", str(STEPS), "--batch-size", str(batch_size), "--seq-len", "32",
            "--warmup", "2", "--log-every", "1", "--val-every", "0", "--val-batches", "2", "--no-plot", "--device", "cpu", *extra]


def records(out):
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in recs if "loss" in r], [r["val_loss"] for r in recs if "val_loss" in r]


def run_two_ranks(cli_args):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "omnigpt.train", *cli_args]
    r = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "2 rank(s) on cpu" in r.stdout
    return r


@pytest.mark.parametrize("kind", ["fsdp-dense", "fsdp-expert-parallel-moe"])
def test_two_ranks_match_one(corpus, tmp_path, kind):
    model = ["--preset", "tiny"] if kind == "fsdp-dense" else [
        # The Switch load-balancing loss is a product of two batch means, so it is not additive over ranks (each
        # rank balances its own micro-batch, as everywhere in data-parallel MoE training); turn it off to compare the
        # MoE math itself. The z-loss is a per-token mean and stays on.
        "--preset", "tiny-moe", "--model", "aux_loss_coef=0", "--optimizer", "muon"]
    one = tmp_path / "one"
    assert main(["train", *args(corpus, one, 4, *model)]) == 0
    two = tmp_path / "two"
    run_two_ranks(args(corpus, two, 2, *model, *(["--expert-parallel"] if "expert" in kind else [])))
    (l1, v1), (l2, v2) = records(one), records(two)
    assert len(l1) == len(l2) == STEPS and len(v1) == len(v2) == 1
    assert l1 == pytest.approx(l2, abs=1e-5, rel=0)
    assert v1 == pytest.approx(v2, abs=1e-5, rel=0)
    # The 2-rank checkpoint holds whole tensors: identical in layout to the 1-rank one.
    from safetensors.torch import load_file

    a = load_file(str(one / "checkpoints/step_0000004/model.safetensors"))
    b = load_file(str(two / "checkpoints/step_0000004/model.safetensors"))
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4
