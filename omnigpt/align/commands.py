"""`omnigpt align tasks|sft|label|reward|dpo|ppo|grpo|constitution|eval`: the alignment stages, one command each.

    omnigpt align tasks --out data/align                               # synthetic verifiable tasks (all files)
    omnigpt align sft    --model runs/base --tokenizer tok/ --data data/align/sft.jsonl --val data/align/sft_val.jsonl --out runs/sft
    omnigpt align label  --model runs/sft --prompts data/align/prompts.jsonl --out data/align/sft_pairs.jsonl   # optional
    omnigpt align reward --model runs/sft --data data/align/comparisons.jsonl --val data/align/comparisons_val.jsonl --out runs/rm
    omnigpt align ppo    --model runs/sft --reward-model runs/rm --prompts data/align/prompts.jsonl \\
                         --ptx-data data/align/pretrain.txt --ptx-coef 0.5 --out runs/ppo
    omnigpt align dpo    --model runs/sft --data data/align/comparisons.jsonl --out runs/dpo
    omnigpt align grpo   --model runs/sft --verifier --prompts data/align/prompts.jsonl --out runs/grpo
    omnigpt align constitution --model runs/sft --principles principles.txt --prompts data/align/prompts.jsonl --out runs/cai
    omnigpt align eval   --model runs/ppo --ref runs/sft --prompts data/align/heldout.jsonl

Every trainer runs under torchrun (FSDP2) and continues with --resume, like `omnigpt train`. --model takes a model
folder, an alignment run folder (its model/) or a pretraining run folder (its latest checkpoint); the tokenizer
is saved with every alignment model, so --tokenizer is only needed for the first stage.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

HELP = {
    "steps": "optimizer steps (PPO/GRPO: rollout batches)", "batch_size": "per rank: conversations / comparisons / prompts per step",
    "max_len": "max tokens of prompt + answer", "eval_every": "steps between validation passes (0: at the end)",
    "ckpt_every": "steps between checkpoints (0: at the end)", "device": "cpu or cuda (default: cuda when available)",
    "seq_len": "packed row length", "pack": "pack several conversations per row", "beta": "DPO temperature",
    "kl_coef": "beta of the KL penalty", "target_kl": "> 0: adaptive beta aiming at this KL per response (nats)",
    "ptx_coef": "weight of the pretraining loss (PPO-ptx; needs --ptx-data)", "group_size": "responses per prompt",
    "missing_eos_penalty": "subtracted from the score of responses cut at --max-new-tokens",
    "reward_norm_samples": "> 0: normalise reward-model scores (and values) to mean 0, std 1 over this many of the "
                           "starting policy's responses, measured before training",
}


def add_config_args(p: argparse.ArgumentParser, cls) -> None:
    """One --flag per dataclass field, typed by its default."""
    g = p.add_argument_group("training")
    for f in dataclasses.fields(cls):
        if f.name == "out_dir":
            continue
        flag, d = "--" + f.name.replace("_", "-"), f.default
        if isinstance(d, bool):
            g.add_argument(flag, action=argparse.BooleanOptionalAction, default=d, help=HELP.get(f.name))
        elif f.name == "device":
            g.add_argument(flag, choices=("cpu", "cuda"), default=None, help=HELP.get(f.name))
        else:
            g.add_argument(flag, type=type(d), default=d, metavar=type(d).__name__.upper(), help=HELP.get(f.name, f"default {d}"))


def config_from(args, cls):
    keys = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in vars(args).items() if k in keys}, out_dir=args.out)


def add_commands(subparsers) -> None:
    from omnigpt.align.config import DPOConfig, GRPOConfig, PPOConfig, RewardConfig, SFTConfig

    top = subparsers.add_parser("align", help="alignment: SFT, reward model, PPO, DPO, GRPO, Constitutional AI",
                                description=__doc__.split("\n\n")[0])
    sub = top.add_subparsers(dest="align_command", metavar="STAGE")
    sub.required = True

    def stage(name, help, cls, data=None, prompts=False):
        p = sub.add_parser(name, help=help)
        p.add_argument("--model", required=True, metavar="DIR", help="starting policy (model folder or run folder)")
        p.add_argument("--tokenizer", metavar="SPEC", help="default: the tokenizer saved with --model")
        if data:
            p.add_argument("--data", required=True, metavar="JSONL", help=data)
            p.add_argument("--val", metavar="JSONL", help="held-out file of the same format")
        if prompts:
            p.add_argument("--prompts", required=True, metavar="JSONL", help='{"messages": [...]} per line ("task" for --verifier)')
            r = p.add_mutually_exclusive_group(required=True)
            r.add_argument("--reward-model", metavar="DIR", help="reward model (omnigpt align reward)")
            r.add_argument("--verifier", action="store_true", help="reward 1/0 from the task checker (omnigpt.data.chat_tasks)")
        p.add_argument("--out", required=True, metavar="DIR", help="run folder: checkpoints/, metrics.jsonl, model/")
        p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
        add_config_args(p, cls)
        p.set_defaults(func=globals()[f"cmd_{name}"])
        return p

    stage("sft", "supervised fine-tuning on demonstrations", SFTConfig, data='{"messages": [...]} per line')
    stage("reward", "train a reward model on comparisons", RewardConfig,
          data='{"prompt", "chosen", "rejected"} or {"prompt", "ranking": [best, ..., worst]} per line')
    p = stage("dpo", "direct preference optimization on comparisons", DPOConfig, data="comparisons, as for `align reward`")
    p.add_argument("--ref", metavar="DIR", help="reference policy (default: --model)")
    p = stage("ppo", "PPO against a reward model with a KL penalty (and PPO-ptx)", PPOConfig, prompts=True)
    p.add_argument("--value-model", metavar="DIR", help="value model init (default: --reward-model, else the policy + a new head)")
    p.add_argument("--ref", metavar="DIR", help="reference policy for the KL penalty (default: --model)")
    p.add_argument("--ptx-data", metavar="FILE", help="pretraining text: one document per line (.txt) or {\"text\"} per line (.jsonl)")
    p = stage("grpo", "group relative policy optimization", GRPOConfig, prompts=True)
    p.add_argument("--ref", metavar="DIR", help="reference policy for the KL penalty (default: --model)")

    c = sub.add_parser("constitution", help="Constitutional AI: critique/revise demonstrations and AI preference labels")
    c.add_argument("--model", required=True, metavar="DIR")
    c.add_argument("--tokenizer", metavar="SPEC")
    c.add_argument("--principles", required=True, metavar="FILE", help="one principle per line")
    c.add_argument("--prompts", required=True, metavar="JSONL")
    c.add_argument("--out", required=True, metavar="DIR", help="writes revisions.jsonl and ai_comparisons.jsonl")
    c.add_argument("--mode", choices=("both", "revise", "label"), default="both")
    c.add_argument("--rounds", type=int, default=1, help="critique-revision rounds")
    c.add_argument("--limit", type=int, default=0, help="use only the first N prompts (0: all)")
    _generation_args(c, temperature=0.7)
    c.set_defaults(func=cmd_constitution)

    e = sub.add_parser("eval", help="verified score (and KL to a reference) on prompts with task specs")
    e.add_argument("--model", required=True, metavar="DIR")
    e.add_argument("--tokenizer", metavar="SPEC")
    e.add_argument("--prompts", required=True, metavar="JSONL")
    e.add_argument("--ref", metavar="DIR", help="reference policy: also report KL(pi || ref) per response")
    e.add_argument("--samples", type=int, default=1, help="responses per prompt")
    e.add_argument("--json", metavar="FILE", help="write the figures here")
    _generation_args(e, temperature=1.0)
    e.set_defaults(func=cmd_eval)

    lab = sub.add_parser("label", help="comparisons between a policy's own answers, labelled by the task verifier")
    lab.add_argument("--model", required=True, metavar="DIR")
    lab.add_argument("--tokenizer", metavar="SPEC")
    lab.add_argument("--prompts", required=True, metavar="JSONL", help="prompts with task specs")
    lab.add_argument("--out", required=True, metavar="JSONL", help="comparison file (for `align reward` / `align dpo`)")
    lab.add_argument("--samples", type=int, default=4, help="answers per prompt")
    _generation_args(lab, temperature=1.0)
    lab.set_defaults(func=cmd_label)

    t = sub.add_parser("tasks", help="write synthetic verifiable task files (omnigpt.data.chat_tasks)")
    t.add_argument("--out", required=True, metavar="DIR")
    t.add_argument("--n-sft", type=int, default=2000)
    t.add_argument("--n-pairs", type=int, default=2000)
    t.add_argument("--n-prompts", type=int, default=2000)
    t.add_argument("--n-heldout", type=int, default=200)
    t.add_argument("--flawed-frac", type=float, default=0.3, help="fraction of demonstrations with one flaw")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--kinds", default="arith,one_word,json,system,shapebind",
                   help="task kinds, in turn (shapebind: ShapeBind scenes as text, then one of their questions)")
    t.set_defaults(func=cmd_tasks)


def _generation_args(p, temperature: float) -> None:
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=temperature)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=("cpu", "cuda"))


# ---- commands --------------------------------------------------------------------------------------------------
def _tok(args):
    from omnigpt.align.modeling import resolve_tokenizer

    return resolve_tokenizer(args.tokenizer, args.model)


def _distributed(fn):
    def run(args):
        from omnigpt.train.parallelize import shutdown_distributed

        try:
            return fn(args)
        finally:
            shutdown_distributed()
    return run


@_distributed
def cmd_sft(args) -> None:
    from omnigpt.align.data import load_conversations
    from omnigpt.align.config import SFTConfig
    from omnigpt.align.sft import train_sft

    train_sft(args.model, _tok(args), load_conversations(args.data), load_conversations(args.val) if args.val else None,
              config_from(args, SFTConfig), resume=args.resume)


def _comparisons(args, tok, tc):
    from omnigpt.align.data import encode_comparisons, load_comparisons

    out = []
    for path in (args.data, args.val):
        if not path:
            out.append(None)
            continue
        items, skipped = encode_comparisons(tok, load_comparisons(path), tc.max_len)
        if skipped:
            print(f"{path}: skipped {skipped} comparison(s) longer than --max-len {tc.max_len}")
        if not items:
            raise ValueError(f"{path}: no comparison fits in --max-len {tc.max_len}")
        out.append(items)
    return out


@_distributed
def cmd_reward(args) -> None:
    from omnigpt.align.config import RewardConfig
    from omnigpt.align.reward import train_reward

    tok, tc = _tok(args), config_from(args, RewardConfig)
    train, val = _comparisons(args, tok, tc)
    train_reward(args.model, tok, train, val, tc, resume=args.resume)


@_distributed
def cmd_dpo(args) -> None:
    from omnigpt.align.config import DPOConfig
    from omnigpt.align.dpo import train_dpo

    tok, tc = _tok(args), config_from(args, DPOConfig)
    train, val = _comparisons(args, tok, tc)
    train_dpo(args.model, tok, train, val, tc, resume=args.resume, ref_path=args.ref)


def read_ptx_docs(path, tok) -> list[list[int]]:
    """Documents for PPO-ptx, each ending in <|endoftext|>: a .jsonl of {"text"} or a text file, one per line."""
    from omnigpt.align.data import _read_jsonl

    if str(path).endswith(".jsonl"):
        class Doc:  # _read_jsonl sets .line
            def __init__(self, obj):
                if not isinstance(obj.get("text"), str):
                    raise ValueError('no "text" string')
                self.text = obj["text"]
        texts = [d.text for d in _read_jsonl(path, Doc)]
    else:
        texts = [t for t in Path(path).read_text(encoding="utf-8").splitlines() if t.strip()]
    if not texts:
        raise ValueError(f"{path}: no documents")
    return [ids + [tok.eot_id] for ids in tok.encode_batch(texts)]


@_distributed
def cmd_ppo(args) -> None:
    from omnigpt.align.data import load_prompts
    from omnigpt.align.config import PPOConfig
    from omnigpt.align.ppo import train_ppo

    tok, tc = _tok(args), config_from(args, PPOConfig)
    ptx = read_ptx_docs(args.ptx_data, tok) if args.ptx_data else None
    train_ppo(args.model, tok, load_prompts(args.prompts, need_task=args.verifier), tc, reward_path=args.reward_model,
              verifier=args.verifier, value_path=args.value_model, ref_path=args.ref, ptx_docs=ptx, resume=args.resume)


@_distributed
def cmd_grpo(args) -> None:
    from omnigpt.align.data import load_prompts
    from omnigpt.align.config import GRPOConfig
    from omnigpt.align.grpo import train_grpo

    tok, tc = _tok(args), config_from(args, GRPOConfig)
    train_grpo(args.model, tok, load_prompts(args.prompts, need_task=args.verifier), tc, reward_path=args.reward_model,
               verifier=args.verifier, ref_path=args.ref, resume=args.resume)


def _device(args):
    import torch

    return args.device or ("cuda" if torch.cuda.is_available() else "cpu")


def cmd_constitution(args) -> None:
    from omnigpt.align.constitution import ai_preferences, critique_and_revise, label_agreement, load_principles
    from omnigpt.align.data import load_prompts
    from omnigpt.align.modeling import load_policy
    from omnigpt.data.chat_tasks import write_jsonl

    tok, principles = _tok(args), load_principles(args.principles)
    prompts = load_prompts(args.prompts)
    prompts = prompts[: args.limit] if args.limit > 0 else prompts
    model = load_policy(args.model).to(_device(args)).eval()
    kw = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, batch_size=args.batch_size, seed=args.seed)
    out = Path(args.out)
    if args.mode in ("both", "revise"):
        recs = critique_and_revise(model, tok, prompts, principles, rounds=args.rounds, **kw)
        write_jsonl(out / "revisions.jsonl", recs)
        print(f"constitution: {len(recs)} revised demonstrations -> {out / 'revisions.jsonl'} (train with `align sft`)")
    if args.mode in ("both", "label"):
        recs = ai_preferences(model, tok, prompts, principles, **kw)
        write_jsonl(out / "ai_comparisons.jsonl", recs)
        print(f"constitution: {len(recs)} AI-labelled comparisons -> {out / 'ai_comparisons.jsonl'} (train with `align reward`); "
              f"agreement with the task verifier: {json.dumps(label_agreement(recs))}")


def cmd_eval(args) -> None:
    from omnigpt.align.data import load_prompts
    from omnigpt.align.modeling import load_policy
    from omnigpt.align.rollout import evaluate_policy

    device = _device(args)
    tok = _tok(args)
    model = load_policy(args.model).to(device).eval()
    ref = load_policy(args.ref).to(device).eval() if args.ref else None
    res = evaluate_policy(model, tok, load_prompts(args.prompts, need_task=True), samples=args.samples, temperature=args.temperature,
                          max_new_tokens=args.max_new_tokens, ref=ref, batch_size=args.batch_size, seed=args.seed)
    for k, v in res.items():
        print(f"{k:>16}: {v:.4f}" if isinstance(v, float) else f"{k:>16}: {v}")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))


def cmd_label(args) -> None:
    from omnigpt.align.data import load_prompts
    from omnigpt.align.modeling import load_policy
    from omnigpt.align.rollout import verifier_comparisons
    from omnigpt.data.chat_tasks import write_jsonl

    model = load_policy(args.model).to(_device(args)).eval()
    prompts = load_prompts(args.prompts, need_task=True)
    recs = verifier_comparisons(model, _tok(args), prompts, samples=args.samples, temperature=args.temperature,
                                max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, seed=args.seed)
    write_jsonl(args.out, recs)
    print(f"label: {len(recs)} comparisons from {len(prompts)} prompts -> {args.out}")


def cmd_tasks(args) -> None:
    from omnigpt.data.chat_tasks import write_task_files

    files = write_task_files(args.out, n_sft=args.n_sft, n_pairs=args.n_pairs, n_prompts=args.n_prompts, n_heldout=args.n_heldout,
                             flawed_frac=args.flawed_frac, seed=args.seed, kinds=tuple(args.kinds.split(",")))
    for name, path in files.items():
        print(f"{name:>22}: {path}")
