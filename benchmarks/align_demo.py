"""The alignment demonstration, end to end on synthetic tasks a program can check (omnigpt.data.chat_tasks).

    python benchmarks/align_demo.py --out runs/align_demo                 # CPU (about 5 minutes on 2 idle cores) or GPU
    python benchmarks/align_demo.py --out /tmp/d --quick                  # a 20-second smoke run (figures meaningless)
    python benchmarks/align_demo.py --out runs/d --set seed=1 ppo_steps=80 dpo_beta=0.1
    python benchmarks/align_demo.py --out runs/d --set kinds=arith,one_word,json,system   # without ShapeBind questions

1. data      task files: prose over the world's facts and ShapeBind scenes as text (pretraining), demonstrations of
             mixed quality (30% carry one flaw), comparisons (correct > one flaw > two flaws; half as K=3 rankings),
             prompts; task kinds in turn: arithmetic, one-word answers, JSON, system-message rules, ShapeBind
             questions (a scene from omnigpt.data.scenes written out as text, then one of its questions); held-out
             prompts are unseen (task, fact, rule) combinations and unseen scenes
2. base      a byte-level BPE and a small transformer pretrained briefly on the prose (no chat format)
3. sft       supervised fine-tuning on the demonstrations
4. label     the SFT model answers 4 times per train prompt; a passing and a failing answer make a comparison
             (the verifier plays the labeler); these join the synthetic comparisons for the reward model and DPO
5. reward    reward model from the SFT model; pairwise accuracy on held-out synthetic comparisons and on held-out
             comparisons of SFT answers
6. ppo       PPO from SFT against the reward model, its scores normalised to mean 0 / std 1 over SFT's own answers,
             per-token KL penalty to SFT whose beta adapts towards a target KL per response (bounds
             over-optimisation of the imperfect reward model), PPO-ptx on the prose; and the
             same PPO with the verifier's 1/0 as the reward and a fixed beta (`ppo_verifier`: what a perfect reward
             model would give)
7. dpo       DPO from SFT on the same comparisons
8. grpo      GRPO from SFT with the verifier as reward (--set grpo_steps=0 skips it)

Each policy is scored on the held-out prompts: the verified score (fraction of replies the checker accepts) with
samples at temperature 1 (the policy's own distribution, `eval_samples` per prompt) and greedy, per task kind, and
KL(pi || pi_SFT) per response estimated from the temperature-1 samples. Prints a table; writes OUT/results.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from omnigpt.align.config import DPOConfig, GRPOConfig, PPOConfig, RewardConfig, SFTConfig
from omnigpt.align.data import comparison_batch, encode_comparisons, load_comparisons, load_conversations, load_prompts
from omnigpt.align.dpo import train_dpo
from omnigpt.align.grpo import train_grpo
from omnigpt.align.modeling import load_policy, load_scalar_model, resolve_model_dir, scalar_outputs
from omnigpt.align.ppo import train_ppo
from omnigpt.align.reward import train_reward
from omnigpt.align.rollout import evaluate_policy, verifier_comparisons
from omnigpt.align.sft import train_sft
from omnigpt.config import ModelConfig, override_fields
from omnigpt.data.chat_tasks import write_jsonl, write_task_files
from omnigpt.data.packing import ListSource
from omnigpt.tokenizer.text import train_bpe
from omnigpt.train.trainer import TrainConfig, TrainData, train


@dataclass
class Demo:
    seed: int = 0
    # data
    n_sft: int = 3000
    n_pairs: int = 3000
    n_prompts: int = 3000
    n_heldout: int = 200
    n_pretrain_docs: int = 6000
    flawed_frac: float = 0.3
    max_operand: int = 6
    kinds: str = "arith,one_word,json,system,shapebind"  # task kinds, in turn (omnigpt.data.chat_tasks.KINDS)
    scene_frac: float = 0.2  # fraction of the pretraining prose that is ShapeBind scenes (when shapebind is a kind)
    vocab_size: int = 512
    # model
    d_model: int = 96
    n_layers: int = 3
    n_heads: int = 4
    d_ff: int = 256
    # stages
    pretrain_steps: int = 800
    pretrain_batch: int = 16
    pretrain_seq: int = 128
    pretrain_lr: float = 3e-3
    sft_steps: int = 400
    sft_batch: int = 16
    sft_seq: int = 128
    sft_lr: float = 1e-3
    label_prompts: int = 3000  # train prompts whose SFT answers the verifier labels into comparisons
    label_samples: int = 4
    rm_steps: int = 400
    rm_batch: int = 16
    rm_lr: float = 3e-4
    ppo_steps: int = 40
    ppo_batch: int = 32
    ppo_lr: float = 3e-5
    ppo_epochs: int = 2
    kl_coef: float = 0.3  # beta of the KL penalty (checker-reward PPO: fixed; reward-model PPO: its starting value)
    # reward-model PPO: adaptive beta (Ziegler et al. 2019) aiming at this KL per response, so the policy cannot drift
    # far from the SFT answers on which the reward model was measured (over-optimisation, Gao et al. 2022); 0: fixed
    ppo_target_kl: float = 0.2
    # responses: 2 steps' rollouts, so beta can move up to 10% a step (a factor e^4 over 40 steps) and recover within
    # the run from the early steps where the policy has not moved yet (KL ~ 0 lowers beta); 200 allowed 3.2% a step
    ppo_kl_horizon: int = 64
    # reward-model scores normalised over this many SFT responses (PPOConfig.reward_norm_samples): the reward
    # model's scale differs from seed to seed, and with it what a fixed starting beta means
    ppo_reward_norm: int = 128
    ptx_coef: float = 0.1
    ppo_verifier_steps: int = 60  # PPO with the verifier's 1/0 as reward (0: skip)
    dpo_steps: int = 200
    dpo_batch: int = 16
    dpo_lr: float = 3e-5
    dpo_beta: float = 0.3
    grpo_steps: int = 60
    grpo_lr: float = 5e-5
    max_new_tokens: int = 32
    eval_samples: int = 4


QUICK = dict(n_sft=300, n_pairs=300, n_prompts=300, n_heldout=40, n_pretrain_docs=400, d_model=64, n_layers=2, d_ff=128,
             pretrain_steps=20, sft_steps=10, label_prompts=50, rm_steps=10, ppo_steps=3, ppo_verifier_steps=2, ppo_batch=8, dpo_steps=5, grpo_steps=2,
             ppo_reward_norm=16,
             eval_samples=1)




def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run")
    ap.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE", help="override a Demo field")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        d = override_fields(Demo(**(QUICK if args.quick else {})), args.set)
    except ValueError as e:
        sys.exit(f"--set {e}")
    out, dev = Path(args.out), args.device
    if out.exists() and any(out.iterdir()):
        sys.exit(f"{out} is not empty: choose a new --out")
    t0 = time.perf_counter()
    times: dict[str, float] = {}

    def timed(name, fn):
        t = time.perf_counter()
        r = fn()
        times[name] = round(time.perf_counter() - t, 1)
        print(f"== {name}: {times[name]:.1f} s (total {time.perf_counter() - t0:.0f} s)", flush=True)
        return r

    # 1. data
    files = timed("data", lambda: write_task_files(out / "data", n_sft=d.n_sft, n_pairs=d.n_pairs, n_prompts=d.n_prompts,
                                                   n_heldout=d.n_heldout, n_pretrain_docs=d.n_pretrain_docs,
                                                   flawed_frac=d.flawed_frac, seed=d.seed, max_operand=d.max_operand,
                                                   kinds=tuple(d.kinds.split(",")), scene_frac=d.scene_frac))
    sft_data, sft_val = load_conversations(files["sft.jsonl"]), load_conversations(files["sft_val.jsonl"])
    prompts, heldout = load_prompts(files["prompts.jsonl"]), load_prompts(files["heldout.jsonl"], need_task=True)

    # 2. tokenizer and base model
    corpus = out / "data" / "tokenizer_corpus.txt"
    corpus.write_text(files["pretrain.txt"].read_text() + "\n".join(m["content"] for c in sft_data for m in c.messages) + "\n")
    tok = timed("tokenizer", lambda: train_bpe([str(corpus)], d.vocab_size))
    tok.save(str(out / "tokenizer"))
    docs = [ids + [tok.eot_id] for ids in tok.encode_batch(files["pretrain.txt"].read_text().splitlines())]
    cfg = ModelConfig(vocab_size=tok.padded_vocab_size(), d_model=d.d_model, n_layers=d.n_layers, n_heads=d.n_heads,
                      n_kv_heads=d.n_heads, d_ff=d.d_ff, max_seq_len=256)
    tc = TrainConfig(out_dir=str(out / "base"), steps=d.pretrain_steps, batch_size=d.pretrain_batch, seq_len=d.pretrain_seq,
                     lr=d.pretrain_lr, warmup_steps=max(1, d.pretrain_steps // 20), log_every=max(1, d.pretrain_steps // 8),
                     val_every=0, ckpt_every=0, plot=False, device=dev, seed=d.seed)
    timed("pretrain", lambda: train(cfg, tc, TrainData(train=[ListSource("prose", docs)])))
    base = resolve_model_dir(out / "base")

    common = dict(device=dev, seed=d.seed, log_every=10, max_len=256)
    # 3. SFT
    timed("sft", lambda: train_sft(base, tok, sft_data, sft_val, SFTConfig(
        out_dir=str(out / "sft"), steps=d.sft_steps, batch_size=d.sft_batch, seq_len=d.sft_seq, lr=d.sft_lr,
        warmup_steps=10, eval_every=max(1, d.sft_steps // 3), **common)))
    # 4. comparisons: the synthetic ones (correct > flawed), plus the SFT model's own answers labelled by the verifier
    #    (the checker plays InstructGPT's labelers, who compare model outputs); held-out ones of both kinds
    sft_model = load_policy(out / "sft").to(dev).eval()
    label = lambda ps, n, seed: verifier_comparisons(sft_model, tok, ps, samples=n,  # noqa: E731
                                                     max_new_tokens=d.max_new_tokens, seed=seed)
    write_jsonl(out / "data" / "sft_pairs.jsonl", timed("label", lambda: label(prompts[:d.label_prompts], d.label_samples, d.seed)))
    write_jsonl(out / "data" / "sft_pairs_val.jsonl", label(heldout, 8, d.seed + 1))

    def encode(name):
        path = out / "data" / name
        return encode_comparisons(tok, load_comparisons(path), 256)[0] if path.read_text().strip() else []

    synthetic, from_sft = encode("comparisons.jsonl"), encode("sft_pairs.jsonl")
    pairs = synthetic + from_sft
    pairs_val, policy_pairs_val = encode("comparisons_val.jsonl"), encode("sft_pairs_val.jsonl")
    print(f"comparisons: {len(synthetic)} synthetic + {len(from_sft)} of SFT answers for training; held out "
          f"{len(pairs_val)} synthetic + {len(policy_pairs_val)} of SFT answers", flush=True)
    policies, rm = ["base", "sft"], {}
    if d.rm_steps > 0:
        rm = timed("reward", lambda: train_reward(out / "sft", tok, pairs, pairs_val, RewardConfig(
            out_dir=str(out / "rm"), steps=d.rm_steps, batch_size=d.rm_batch, lr=d.rm_lr, warmup_steps=10, **common)))
        rm["policy_val_accuracy"] = pair_accuracy(load_scalar_model(out / "rm").to(dev), tok, policy_pairs_val)
    # 5. PPO against the reward model (RLHF), and against the verifier itself (the reward the RM approximates)
    def ppo(name, steps, target_kl=0.0, reward_norm_samples=0, **reward):
        timed(name, lambda: train_ppo(out / "sft", tok, prompts, PPOConfig(
            out_dir=str(out / name), steps=steps, batch_size=d.ppo_batch, lr=d.ppo_lr, ppo_epochs=d.ppo_epochs,
            max_new_tokens=d.max_new_tokens, kl_coef=d.kl_coef, target_kl=target_kl, kl_horizon=d.ppo_kl_horizon,
            reward_norm_samples=reward_norm_samples,
            ptx_coef=d.ptx_coef, ptx_seq_len=64, missing_eos_penalty=1.0, **common),
            ptx_docs=docs if d.ptx_coef > 0 else None, **reward))
        policies.append(name)

    if d.ppo_steps > 0 and d.rm_steps > 0:
        ppo("ppo", d.ppo_steps, target_kl=d.ppo_target_kl, reward_norm_samples=d.ppo_reward_norm, reward_path=out / "rm")
    if d.ppo_verifier_steps > 0:
        ppo("ppo_verifier", d.ppo_verifier_steps, verifier=True)
    # 6. DPO
    if d.dpo_steps > 0:
        timed("dpo", lambda: train_dpo(out / "sft", tok, pairs, pairs_val, DPOConfig(
            out_dir=str(out / "dpo"), steps=d.dpo_steps, batch_size=d.dpo_batch, lr=d.dpo_lr, beta=d.dpo_beta, **common)))
        policies.append("dpo")
    # 7. GRPO (optional)
    if d.grpo_steps > 0:
        timed("grpo", lambda: train_grpo(out / "sft", tok, prompts, GRPOConfig(
            out_dir=str(out / "grpo"), steps=d.grpo_steps, batch_size=4, group_size=8, lr=d.grpo_lr,
            max_new_tokens=d.max_new_tokens, **common), verifier=True))
        policies.append("grpo")

    # evaluation on held-out prompts
    ref = load_policy(out / "sft").to(dev).eval()
    results = {}

    def evaluate(name):
        model = load_policy(base if name == "base" else out / name).to(dev).eval()
        kw = dict(max_new_tokens=d.max_new_tokens, seed=d.seed + 1)
        sampled = evaluate_policy(model, tok, heldout, samples=d.eval_samples, temperature=1.0, ref=ref, **kw)
        greedy = evaluate_policy(model, tok, heldout, samples=1, temperature=0.0, **kw)
        return {"sampled": sampled, "greedy": greedy}

    for name in policies:
        results[name] = timed(f"eval {name}", lambda: evaluate(name))
    total = time.perf_counter() - t0
    cpu = time.process_time()  # on a shared machine, CPU seconds / threads bounds the wall time it would take alone

    kinds = sorted(k for k in results["sft"]["sampled"] if k.startswith("score_"))
    head = ["policy", "verified T=1", "greedy", *[k[6:] for k in kinds], "KL to SFT", "length", "ended"]
    rows = []
    for name in policies:
        s, g = results[name]["sampled"], results[name]["greedy"]
        rows.append([name, f"{s['score']:.3f}", f"{g['score']:.3f}", *[f"{s[k]:.2f}" for k in kinds],
                     f"{s.get('kl', float('nan')):.2f}", f"{s['length']:.1f}", f"{s['eos_rate']:.2f}"])
    print("\n| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for r in rows:
        print("| " + " | ".join(r) + " |")
    if rm:
        print(f"\nreward model, held-out pairwise accuracy: {rm['val_accuracy']:.3f} on {len(pairs_val)} synthetic comparisons, "
              f"{rm['policy_val_accuracy']:.3f} on {len(policy_pairs_val)} comparisons of SFT answers")
    print(f"total {total:.0f} s wall, {cpu:.0f} s CPU on {dev} ({torch.get_num_threads()} threads); stages: {json.dumps(times)}")
    report = {"demo": dataclasses.asdict(d), "quick": args.quick, "device": dev,
              "device_name": torch.cuda.get_device_name() if dev == "cuda" else platform.processor() or platform.machine(),
              "threads": torch.get_num_threads(), "torch": torch.__version__, "results": results,
              "reward_model": {"val_accuracy": rm.get("val_accuracy"), "val_loss": rm.get("val_loss"), "n_val": len(pairs_val),
                               "policy_val_accuracy": rm.get("policy_val_accuracy"), "n_policy_val": len(policy_pairs_val)},
              "seconds": {"total": round(total, 1), "cpu": round(cpu, 1), **times}, "date": time.strftime("%Y-%m-%d")}
    (out / "results.json").write_text(json.dumps(report, indent=2))
    print(f"wrote {out / 'results.json'}")


@torch.no_grad()
def pair_accuracy(rm, tok, items, batch_size: int = 32) -> float:
    """Fraction of held-out comparisons whose first answer the reward model scores higher (ties count half)."""
    right = 0.0
    for k in range(0, len(items), batch_size):
        batch, sizes, _ = comparison_batch(items[k:k + batch_size], tok.pad_id)
        scores = scalar_outputs(rm, batch.to(rm.head_weight().device))[1].view(-1, 2)
        right += ((scores[:, 0] > scores[:, 1]).float() + 0.5 * (scores[:, 0] == scores[:, 1]).float()).sum().item()
    return right / len(items) if items else float("nan")


if __name__ == "__main__":
    main()
