"""Alignment trainers on tiny models: a reward model learns a separable preference, a PPO step follows the advantage,
resume gives the identical next step, the commands run and report bad input, 2 ranks (FSDP2) match 1."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from omnigpt.align.config import PPOConfig, RewardConfig
from omnigpt.align.constitution import Principle, ai_preferences, critique_and_revise
from omnigpt.align.data import Prompt, encode_comparisons, load_comparisons, make_batch, parse_comparison, parse_conversation
from omnigpt.align.modeling import add_scalar_head, export_model, response_logprobs
from omnigpt.align.ppo import ppo_losses, train_ppo
from omnigpt.align.reward import train_reward
from omnigpt.cli import main
from omnigpt.config import tiny
from omnigpt.data import chat_tasks as ct
from omnigpt.model.transformer import Transformer
from omnigpt.model.weights import save_model
from omnigpt.tokenizer.text import train_bpe

CFG = dict(d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=64, max_seq_len=256)
TINY = ["--log-every", "1", "--device", "cpu", "--max-len", "128"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tokenizer, a random tiny policy (with its tokenizer) and a random reward model, and task files."""
    root = tmp_path_factory.mktemp("align")
    files = ct.write_task_files(root / "data", n_sft=48, n_pairs=24, n_prompts=24, n_heldout=8, n_pretrain_docs=40)
    text = root / "text.txt"
    text.write_text(files["pretrain.txt"].read_text() + files["sft.jsonl"].read_text())
    tok = train_bpe([str(text)], 320)
    torch.manual_seed(0)
    policy = Transformer(tiny(vocab_size=tok.padded_vocab_size(), **CFG))
    save_model(policy, root / "policy")
    tok.save(str(root / "policy"))
    rm = add_scalar_head(Transformer(tiny(vocab_size=tok.padded_vocab_size(), **CFG)))
    torch.nn.init.normal_(rm.lm_head.weight, std=1.0)
    export_model(rm.state_dict(), rm.cfg, root / "rm", tok, {"head": "scalar"})
    return {"root": root, "tok": tok, "files": files, "policy": root / "policy", "rm": root / "rm"}


def test_reward_model_learns_a_separable_preference(world, tmp_path):
    def comps(n, start):
        return [parse_comparison({"prompt": f"Question number {i}?", "chosen": "Yes, good answer.", "rejected": "No. Bad bad."})
                for i in range(start, start + n)]

    tok = world["tok"]
    train, _ = encode_comparisons(tok, comps(32, 0), 128)
    val, _ = encode_comparisons(tok, comps(16, 100), 128)
    rec = train_reward(world["policy"], tok, train, val, RewardConfig(out_dir=str(tmp_path), steps=25, batch_size=8, lr=3e-3,
                                                                      log_every=25, device="cpu"))
    assert rec["val_accuracy"] == 1.0 and rec["val_loss"] < 0.3
    assert json.loads((tmp_path / "model" / "config.json").read_text())["align"]["head"] == "scalar"


def test_ppo_step_moves_logprobs_in_the_direction_of_the_advantage(world):
    tok = world["tok"]
    torch.manual_seed(1)
    model = Transformer(tiny(vocab_size=tok.padded_vocab_size(), **CFG))
    prompts = [tok.encode("What is 1 + 2?"), tok.encode("What color is snow?")]
    responses = [tok.encode("1 + 2 = 3.") + [tok.im_end_id], tok.encode("Snow is white.") + [tok.im_end_id]]
    batch = make_batch(prompts, responses, pad_id=tok.pad_id)
    old = response_logprobs(model, batch).detach()
    adv = torch.stack([torch.ones(batch.mask.shape[1]), -torch.ones(batch.mask.shape[1])]) * batch.mask
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    zeros = torch.zeros_like(old)
    losses = ppo_losses(response_logprobs(model, batch), old, adv, zeros, zeros, zeros, batch.mask, 0.2, 0.2)
    losses["pg_loss"].backward()
    opt.step()
    change = (response_logprobs(model, batch).detach() - old).sum(1)
    assert change[0] > 0 > change[1], change


def _copy_until(src: Path, dst: Path, step: int) -> None:
    """A run folder holding only the checkpoint of `step`, as if the run had stopped there."""
    name = f"step_{step:07d}"
    (dst / "checkpoints").mkdir(parents=True)
    shutil.copytree(src / "checkpoints" / name, dst / "checkpoints" / name)
    (dst / "checkpoints" / "latest").write_text(name)


def _record(out: Path, step: int) -> dict:
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rec = next(r for r in recs if r["step"] == step)
    rec.pop("elapsed")
    return rec


def _same_weights(a: Path, b: Path) -> None:
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_ppo_resume_gives_the_identical_next_step(world, tmp_path):
    tok, files = world["tok"], world["files"]
    from omnigpt.align.data import load_prompts

    prompts = load_prompts(files["prompts.jsonl"])
    docs = [tok.encode(t) + [tok.eot_id] for t in files["pretrain.txt"].read_text().splitlines()]
    cfg = dict(steps=3, batch_size=4, max_new_tokens=6, ppo_epochs=2, minibatches=2, target_kl=0.5, ptx_coef=0.5,
               ptx_batch_size=2, ptx_seq_len=32, ckpt_every=2, keep_checkpoints=5, log_every=1, device="cpu", lr=1e-3,
               reward_norm_samples=8)  # the normalisation measured at the start must come back with the checkpoint
    full = tmp_path / "full"
    train_ppo(world["policy"], tok, prompts, PPOConfig(out_dir=str(full), **cfg), reward_path=world["rm"], ptx_docs=docs)
    resumed = tmp_path / "resumed"
    _copy_until(full, resumed, 2)
    train_ppo(world["policy"], tok, prompts, PPOConfig(out_dir=str(resumed), **cfg), reward_path=world["rm"], ptx_docs=docs,
              resume=True)
    assert _record(full, 3) == _record(resumed, 3)
    assert _record(full, 3)["kl_coef"] != 0.05  # the adaptive beta moved and was restored
    _same_weights(full / "model", resumed / "model")
    _same_weights(full / "value", resumed / "value")


def test_ppo_reward_normalisation_rescales_the_same_rollouts(world, tmp_path):
    """Normalised scores are (score - mean) / std of the reward model over the starting policy's responses, measured
    under their own seed: the first step's rollouts are the same with and without it."""
    tok, files = world["tok"], world["files"]
    from omnigpt.align.data import load_prompts

    prompts = load_prompts(files["prompts.jsonl"])
    cfg = dict(steps=1, batch_size=4, max_new_tokens=6, ppo_epochs=1, minibatches=1, log_every=1, device="cpu")
    train_ppo(world["policy"], tok, prompts, PPOConfig(out_dir=str(tmp_path / "raw"), **cfg), reward_path=world["rm"])
    train_ppo(world["policy"], tok, prompts, PPOConfig(out_dir=str(tmp_path / "norm"), reward_norm_samples=16, **cfg),
              reward_path=world["rm"])
    mean, std = json.loads((tmp_path / "norm" / "value" / "config.json").read_text())["align"]["reward_norm"]
    assert std > 0 and mean != 0.0
    raw, norm = _record(tmp_path / "raw", 1), _record(tmp_path / "norm", 1)
    assert raw["response_len"] == norm["response_len"] and raw["kl"] == norm["kl"]
    assert norm["score"] == pytest.approx((raw["score"] - mean) / std, rel=1e-4, abs=1e-5)


def test_commands_sft_resume_dpo_eval_and_bad_input(world, tmp_path, capsys):
    files, policy = world["files"], str(world["policy"])
    sft = ["align", "sft", "--model", policy, "--data", str(files["sft.jsonl"]), "--val", str(files["sft_val.jsonl"]),
           "--steps", "3", "--batch-size", "4", "--seq-len", "96", "--ckpt-every", "2", "--keep-checkpoints", "5", *TINY]
    full, resumed = tmp_path / "sft", tmp_path / "sft_resumed"
    assert main([*sft, "--out", str(full)]) == 0
    _copy_until(full, resumed, 2)
    assert main([*sft, "--out", str(resumed), "--resume"]) == 0
    assert _record(full, 3) == _record(resumed, 3) and "val_loss" in _record(full, 3)
    _same_weights(full / "model", resumed / "model")
    assert main([*sft, "--out", str(full)]) == 2  # existing checkpoints and no --resume
    assert "pass --resume" in capsys.readouterr().err

    dpo = tmp_path / "dpo"
    assert main(["align", "dpo", "--model", str(full), "--data", str(files["comparisons.jsonl"]), "--steps", "2",
                 "--batch-size", "4", "--out", str(dpo), *TINY]) == 0
    assert main(["align", "eval", "--model", str(dpo), "--ref", str(full), "--prompts", str(files["heldout.jsonl"]),
                 "--max-new-tokens", "8", "--json", str(tmp_path / "eval.json"), "--device", "cpu"]) == 0
    res = json.loads((tmp_path / "eval.json").read_text())
    assert 0 <= res["score"] <= 1 and res["n"] == 8 and "kl" in res

    bad = tmp_path / "bad.jsonl"
    bad.write_text(files["sft.jsonl"].read_text().splitlines()[0] + "\n{oops\n")
    capsys.readouterr()
    assert main(["align", "sft", "--model", policy, "--data", str(bad), "--out", str(tmp_path / "x"), *TINY]) == 2
    assert "line 2: not valid JSON" in capsys.readouterr().err


def test_constitution_and_verifier_records_feed_sft_and_reward(world, tmp_path, monkeypatch):
    tok = world["tok"]
    from omnigpt.align.modeling import load_policy

    model = load_policy(world["policy"])
    prompts = [Prompt([{"role": "user", "content": f"What is {i} + 1?"}], {"kind": "arith", "answer": i + 1}) for i in range(4)]
    principles = [Principle("Be correct.", "Critique: is it correct?", "Revise: make it correct.")]
    revised = critique_and_revise(model, tok, prompts, principles, max_new_tokens=8, temperature=1.0)
    assert revised and all(parse_conversation(r).messages[-1]["role"] == "assistant" for r in revised)
    assert len(revised[0]["critiques"]) == 1
    labels = ai_preferences(model, tok, prompts, principles, max_new_tokens=8, temperature=1.0)
    path = tmp_path / "ai.jsonl"
    ct.write_jsonl(path, labels)
    for c in load_comparisons(path):  # equal answers are never emitted; soft labels in [0.5, 1]
        assert 0.5 <= c.p_chosen <= 1.0
    # comparisons of the policy's own answers labelled by the verifier (here one that passes even-length answers)
    import omnigpt.align.rollout as rollout

    monkeypatch.setattr(rollout, "check", lambda task, text: len(text) % 2 == 0)
    pairs = rollout.verifier_comparisons(model, tok, prompts, samples=6, max_new_tokens=6, temperature=2.0)
    assert pairs and all(len(r["chosen"]) % 2 == 0 and len(r["rejected"]) % 2 == 1 for r in pairs)
    (tmp_path / "principles.txt").write_text("# comment\nBe correct.\n")
    assert main(["align", "constitution", "--model", str(world["policy"]), "--principles", str(tmp_path / "principles.txt"),
                 "--prompts", str(world["files"]["heldout.jsonl"]), "--limit", "3", "--max-new-tokens", "6",
                 "--out", str(tmp_path / "cai"), "--device", "cpu"]) == 0
    assert (tmp_path / "cai" / "revisions.jsonl").is_file()


DIST_SCRIPT = """
import sys
from omnigpt.align.config import PPOConfig, SFTConfig
from omnigpt.align.data import load_conversations, load_prompts
from omnigpt.align.modeling import resolve_tokenizer
from omnigpt.align.ppo import train_ppo
from omnigpt.align.sft import train_sft
from omnigpt.train.parallelize import init_distributed, shutdown_distributed


def run(policy, rm, data, prompts, out, batch):
    info = init_distributed("cpu")
    tok = resolve_tokenizer(None, policy)
    train_sft(policy, tok, load_conversations(data), None, SFTConfig(out_dir=out + "/sft", steps=3, batch_size=int(batch),
              seq_len=96, log_every=1, device="cpu"), info=info)
    if info.distributed:  # PPO under FSDP: lockstep generation, four models, two of them trained
        train_ppo(policy, tok, load_prompts(prompts), PPOConfig(out_dir=out + "/ppo", steps=2, batch_size=2, max_new_tokens=5,
                  ppo_epochs=1, log_every=1, device="cpu"), reward_path=rm, info=info)
    shutdown_distributed()


if __name__ == "__main__":
    run(*sys.argv[1:7])
"""


def test_two_ranks_match_one(world, tmp_path):
    """SFT on 2 ranks (FSDP2, gloo) with batch 2 == 1 rank with batch 4; PPO runs on 2 ranks."""
    script = tmp_path / "run_align.py"
    script.write_text(DIST_SCRIPT)
    args = [str(world["policy"]), str(world["rm"]), str(world["files"]["sft.jsonl"]), str(world["files"]["prompts.jsonl"])]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script), *args,
                          str(tmp_path / "two"), "2"], env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    assert "2 rank(s)" in two.stdout
    sys.path.insert(0, str(tmp_path))
    try:
        __import__("run_align").run(*args, str(tmp_path / "one"), "4")
    finally:
        sys.path.remove(str(tmp_path))
    losses = lambda run: [json.loads(x)["loss"] for x in (tmp_path / run / "sft" / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert len(losses("one")) == 3 and losses("one") == pytest.approx(losses("two"), abs=1e-5, rel=0)
    wa, wb = (load_file(str(tmp_path / r / "sft" / "model" / "model.safetensors")) for r in ("one", "two"))
    assert all(torch.allclose(wa[k], wb[k], atol=1e-5, rtol=0) for k in wa)
    assert (tmp_path / "two" / "ppo" / "model" / "model.safetensors").is_file()
