"""Supervised fine-tuning on demonstrations: ChatML, loss on assistant tokens only, conversations packed into rows.

Packing puts several conversations in one row of `seq_len` tokens; `doc_ids` keep attention inside each
conversation and positions restart at each (the pretraining model's document masking). The loss is the mean over
the assistant tokens of the global batch, so one rank with batch 2B and two ranks with batch B compute the same step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from omnigpt.align.data import IGNORE, Conversation, batch_indices, encode_sft, eval_shards, pack
from omnigpt.align.config import SFTConfig
from omnigpt.align.loop import Run
from omnigpt.align.modeling import load_policy
from omnigpt.train.parallelize import all_reduce_sum


def encode_rows(tok, convs: list[Conversation], seq_len: int, do_pack: bool, say=print, max_len: int | None = None) -> dict[str, torch.Tensor]:
    """Conversations (each cut to max_len tokens, default seq_len) as packed rows, or one per row."""
    max_len = max_len or seq_len
    examples, truncated, dropped = [], 0, 0
    for c in convs:
        ex, cut = encode_sft(tok, c, max_len)
        truncated += cut
        if ex is None:
            dropped += 1
        else:
            examples.append(ex)
    if truncated or dropped:
        say(f"sft: {truncated} conversation(s) truncated to {max_len} tokens, {dropped} dropped (no assistant token left)")
    if not examples:
        raise ValueError(f"no conversation has an assistant token within {max_len} tokens")
    if do_pack:
        return pack(examples, seq_len, tok.pad_id)
    rows = [pack([ex], seq_len, tok.pad_id) for ex in examples]
    return {k: torch.cat([r[k] for r in rows]) for k in rows[0]}


def token_loss_sum(model, rows: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of cross-entropies over target tokens, number of target tokens)."""
    logits = model(rows["inputs"], doc_ids_BT=rows["doc_ids"], pos_BT=rows["pos"]).logits
    loss = F.cross_entropy(logits.float().flatten(0, 1), rows["targets"].flatten(), ignore_index=IGNORE, reduction="sum")
    return loss, (rows["targets"] != IGNORE).sum()


@torch.no_grad()
def evaluate_sft(model, rows, run: Run) -> dict[str, float]:
    acc = torch.zeros(2, dtype=torch.float64, device=run.device)
    n = rows["inputs"].shape[0]
    for idx, w in eval_shards(n, run.tc.batch_size, run.info.rank, run.info.world_size):
        batch = {k: v[idx].to(run.device) for k, v in rows.items()}
        batch["targets"][torch.tensor(w, device=run.device) == 0] = IGNORE  # padding rows count for nothing
        with run.autocast():
            loss, count = token_loss_sum(model, batch)
        acc += torch.stack([loss.double(), count.double()])
    all_reduce_sum(acc, run.info)
    return {"val_loss": (acc[0] / acc[1].clamp(min=1)).item()}


def train_sft(model_path, tok, train: list[Conversation], val: list[Conversation] | None, tc: SFTConfig,
              resume: bool = False, info=None) -> dict:
    run = Run("sft", tc, resume, info)
    rows = encode_rows(tok, train, tc.seq_len, tc.pack, run.say, min(tc.seq_len, tc.max_len))
    val_rows = encode_rows(tok, val, tc.seq_len, tc.pack, run.say, min(tc.seq_len, tc.max_len)) if val else None
    model = load_policy(model_path)
    cfg = model.cfg
    if tok.vocab_size > cfg.vocab_size:
        raise ValueError(f"the tokenizer has {tok.vocab_size} ids but the model only {cfg.vocab_size}")
    model = run.prepare(model)
    opt = run.optimizer(model)
    params = [p for p in model.parameters() if p.requires_grad]
    run.restore(model, opt, cfg)
    n_rows = rows["inputs"].shape[0]
    run.say(f"sft: {len(train)} conversations in {n_rows} rows of {tc.seq_len} tokens; "
            f"{int((rows['targets'] != IGNORE).sum()):,} assistant tokens; {run.info.world_size} rank(s)")
    record = {}
    while run.step < tc.steps:
        lr = run.set_lr(opt)
        idx = batch_indices(n_rows, run.step, tc.batch_size, run.info.rank, run.info.world_size, tc.seed)
        batch = {k: v[idx].to(run.device) for k, v in rows.items()}
        with run.autocast():
            loss_sum, count = token_loss_sum(model, batch)
        n_global = all_reduce_sum(count.double().clone(), run.info)
        # FSDP averages gradients over ranks, so scale each rank's sum to give the global mean per token.
        gnorm = run.update(loss_sum * run.info.world_size / n_global.clamp(min=1), opt, params)
        run.step += 1
        sums = run.reduce({"loss": loss_sum.item(), "tokens": count.item()}, op="sum")
        record = {"loss": sums["loss"] / max(sums["tokens"], 1), "tokens": int(sums["tokens"]), "lr": lr, "grad_norm": gnorm}
        if val_rows is not None and run.due(tc.eval_every):
            record.update(evaluate_sft(model, val_rows, run))
        run.log(record)
        run.maybe_checkpoint(model, opt, cfg)
    run.export(model, cfg, tok, {"stage": "sft"})
    return record
