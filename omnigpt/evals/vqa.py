"""ShapeBind VQA: accuracy by question type as the number of objects N grows, and caption exact match.

Held-out: evaluation scenes come from their own seed namespace ("eval:<N>:<i>"), never drawn in training. For each
N and type, `per_type` questions, each from a different scene. Answers are generated greedily (KV cache, images in
the prefill) and scored by exact match after stripping whitespace. Types: color, shape, count, position
("horizontally, where is A relative to B?" -> left/right; "vertically" -> above/below), where ("where is A?" ->
"row r, column c"), list (all objects in reading order), multi (a question about one of two images
in one turn) and caption (the full grammar caption). Position answers reason first ("column 1 vs column 3: left");
their final word is scored.
"""

from __future__ import annotations

import functools
import random
import re

import numpy as np
import torch

from omnigpt.data import scenes as sb
from omnigpt.data.vision_samples import Sample, caption_sample, multi_sample, pick_question, scene_qa_sample
from omnigpt.model.multimodal import VLM, generate_vlm
from omnigpt.model.vision import normalize

EVAL_TYPES = ("color", "shape", "count", "position", "where", "list", "multi", "caption")
SHORT_ANSWER_TOKENS = 8


@functools.lru_cache(maxsize=None)
def eval_scene(sid: str, n: int, image_size: int) -> tuple[sb.Scene, np.ndarray]:
    """A held-out scene and its image (cached: every model evaluated in a process sees the same ones)."""
    scene = sb.make_scene(sid, n, image_size)
    return scene, sb.render_array(scene)


def eval_samples(tok, image_tokens: int, n: int, per_type: int = 50, image_size: int = 128,
                 types: tuple[str, ...] = EVAL_TYPES, seed: int = 0, question_first: bool = True,
                 ground_grid: int = 0) -> list[Sample]:
    """per_type held-out samples of each type with N objects; question_first=False puts the images first in the
    user turn (a model trained so: VLMConfig.image_first); with ground_grid, question samples carry the cells of
    the objects they name (Sample.ground_cells, as in training)."""
    out = []
    for qtype in types:
        rng = random.Random(f"eval:{seed}:{n}:{qtype}")
        got, i = 0, 0
        while got < per_type and i < 50 * per_type:
            sid = f"eval{seed}:{n}:{qtype}:{i}"
            i += 1
            if qtype == "multi":
                s = multi_sample(tok, image_tokens, rng, [eval_scene(f"{sid}.{k}", n, image_size) for k in range(2)],
                                 question_first)
            elif qtype == "caption":
                s = caption_sample(tok, image_tokens, *eval_scene(sid, n, image_size), question_first)
            else:
                scene, image = eval_scene(sid, n, image_size)
                qa = pick_question(rng, scene, qtype)
                s = scene_qa_sample(tok, image_tokens, scene, qa, image, question_first) if qa else None
                if s is not None and ground_grid and qa.refs:
                    s.ground_cells = sb.token_labels(scene, qa.refs, ground_grid)
            if s is not None:
                out.append(s)
                got += 1
    return out


def final_answer(kind: str, text: str) -> str:
    """What is scored: position answers reason first ("column 1 vs column 3: left"), their last word is the answer."""
    return text.rsplit(": ", 1)[-1].strip() if kind == "qa:position" else text.strip()


def max_new_tokens(s: Sample) -> int:
    return 8 * s.n + 16 if s.kind in ("qa:list", "caption") else 16 if s.kind == "qa:position" else SHORT_ANSWER_TOKENS


@torch.no_grad()
def answer_samples(vlm: VLM, tok, samples: list[Sample], batch_size: int = 64) -> list[str]:
    """Greedy answers, batched among samples of the same kind."""
    from omnigpt.infer.sampling import SamplingParams
    from omnigpt.train.vlm import autocast_for, model_device

    device = model_device(vlm)
    vlm.eval()
    answers: list[str | None] = [None] * len(samples)
    by_kind: dict[tuple[str, int], list[int]] = {}
    for i, s in enumerate(samples):
        by_kind.setdefault((s.kind, s.n), []).append(i)
    chunks = [idx[k: k + batch_size] for idx in by_kind.values() for k in range(0, len(idx), batch_size)]
    for idx in chunks:  # one kind per batch: short answers never wait for a long caption
        batch = [samples[i] for i in idx]
        prompts = [s.ids[: s.prompt_len] for s in batch]
        limit = vlm.cfg.text.max_seq_len - max(map(len, prompts))
        params = SamplingParams(temperature=0.0, max_new_tokens=max(1, min(limit, max(map(max_new_tokens, batch)))))
        images = [im for s in batch for im in s.images]
        pixels = normalize(torch.from_numpy(np.stack(images)).to(device), vlm.cfg.vision) if images else None
        with autocast_for(device):
            gens = generate_vlm(vlm, prompts, pixels, params, eos_ids=(tok.im_end_id, tok.eot_id), decode=tok.decode,
                                vocab_size=tok.vocab_size)  # never the embedding table's padding ids
        for i, g in zip(idx, gens):
            answers[i] = g.text.strip()
    return answers


def eval_vqa(vlm: VLM, tok, n_values=(1, 2, 4, 8, 12, 16), per_type: int = 50, types=EVAL_TYPES,
             batch_size: int = 64, seed: int = 0, log=print) -> dict:
    """{"by_n": {N: {type: accuracy}}, "examples": [...a few wrong answers of each (N, type)...]}."""
    return score_vqa(lambda samples: answer_samples(vlm, tok, samples, batch_size), tok, vlm.cfg.image_tokens,
                     vlm.cfg.vision.image_size, n_values, per_type, types, seed, log, question_first=not vlm.cfg.image_first)


@torch.no_grad()
def eval_pointer(vlm: VLM, tok, n_values, per_type: int = 50, types=("color", "position", "where"), batch_size: int = 64,
                 seed: int = 0, log=print) -> dict:
    """Cross fusion with a grounded block (VLMConfig.ground_layer): what each look's pointer heads find
    (VLM.pointer_report), by N and question type, on the same held-out questions as eval_vqa with their answers
    given (teacher forcing). {N: {type: {"hit": [per look: share of questions whose head's strongest latent is on
    the named object], "mass": [per look: mean share of its attention there], "right": share answered right,
    "missed": share where some look missed, "right_if_hit", "right_if_missed": the share right among each (None if
    there are none)}}}. A wrong answer after a hit is the right object misread; after a miss, the wrong one found."""
    from omnigpt.data.vision_samples import collate
    from omnigpt.train.vlm import autocast_for, model_device

    vlm.require_pointer()  # before any sample: a model without a grounded block has no cells to label them with
    device = model_device(vlm)
    vlm.eval()
    by_n = {}
    for n in n_values:
        by_n[n] = {}
        for qtype in types:
            samples = [s for s in eval_samples(tok, vlm.cfg.image_tokens, n, per_type, vlm.cfg.vision.image_size, (qtype,),
                                               seed, not vlm.cfg.image_first, ground_grid=vlm.cfg.ground_grid)
                       if s.ground_cells]
            rows = []  # per batch: (hit_LB, mass_LB, right_B) over the rows with a pointer target
            for k in range(0, len(samples), batch_size):
                batch = collate(samples[k: k + batch_size], tok.pad_id, vlm.cfg.vision.image_size).to(device)
                with autocast_for(device):
                    rep = vlm.pointer_report(batch.inputs, normalize(batch.images, vlm.cfg.vision), batch.ground, batch.targets)
                tried = rep["looks"][0][2]
                rows.append((torch.stack([h[tried] for h, _, _ in rep["looks"]]),
                             torch.stack([m[tried] for _, m, _ in rep["looks"]]), rep["right_B"][tried]))
            if not rows:
                continue
            hit_LB, mass_LB, right_B = (torch.cat(t, dim=-1).cpu() for t in zip(*rows))
            if not right_B.numel():
                continue
            all_hit = hit_LB.all(0)
            share = lambda x: float(x.float().mean()) if x.numel() else None  # noqa: E731
            by_n[n][qtype] = {"hit": [share(h) for h in hit_LB], "mass": [float(m.mean()) for m in mass_LB],
                              "right": share(right_B), "missed": share(~all_hit),
                              "right_if_hit": share(right_B[all_hit]), "right_if_missed": share(right_B[~all_hit])}
        log(f"[pointer] N={n}: " + "  ".join(f"{t} {pointer_line(r)}" for t, r in by_n[n].items()))
    return by_n


def pointer_line(r: dict) -> str:
    """One eval_pointer cell in a line: hit and mass per look (wide/narrow with two_hop), then how often the answer
    is right after all looks hit, and after a miss (with the share of misses)."""
    pct = lambda x: "-" if x is None else f"{100 * x:.0f}"  # noqa: E731
    return (f"hit {'/'.join(pct(h) for h in r['hit'])} mass {'/'.join(pct(m) for m in r['mass'])} "
            f"right {pct(r['right'])} (after hits {pct(r['right_if_hit'])}, after misses {pct(r['right_if_missed'])} "
            f"of {pct(r['missed'])})")


def score_vqa(answer, tok, image_tokens: int, image_size: int, n_values, per_type: int, types=EVAL_TYPES,
              seed: int = 0, log=print, question_first: bool = True, wrong_per_cell: int = 5) -> dict:
    """The held-out questions for each N, answered by `answer(samples) -> texts`, scored by exact match. "examples"
    keeps the first `wrong_per_cell` wrong answers of each (N, type): enough to see whether a cell's misses lean
    one way (e.g. a column read one to the right), as the first 20 overall, all from the first cells, were not."""
    by_n, wrong, kept = {}, [], {}
    for n in n_values:
        samples = eval_samples(tok, image_tokens, n, per_type, image_size, types, seed, question_first)
        answers = answer(samples)
        scores: dict[str, list[int]] = {}
        for s, a in zip(samples, answers):
            t = s.kind.removeprefix("qa:")
            ok = final_answer(s.kind, a) == final_answer(s.kind, s.answer)
            scores.setdefault(t, []).append(int(ok))
            if not ok and kept.get((n, t), 0) < wrong_per_cell:
                kept[(n, t)] = kept.get((n, t), 0) + 1
                wrong.append({"n": n, "type": t, "prompt": user_text(tok, s), "answer": s.answer, "got": a})
        by_n[n] = {t: sum(v) / len(v) for t, v in scores.items()}
        log(f"[eval] N={n}: " + "  ".join(f"{t} {100 * a:.1f}" for t, a in by_n[n].items()))
    return {"by_n": by_n, "per_type": per_type, "examples": wrong}


def user_text(tok, s: Sample) -> str:
    """The question of a sample's (single) user turn: its text, without the image placeholders (before or after it)."""
    turn = tok.decode(s.ids[: s.prompt_len]).split("<|im_start|>user\n", 1)[-1].split("<|im_end|>", 1)[0]
    return re.sub(r"<\|image_start\|>.*?<\|image_end\|>", "", turn, flags=re.S)


def api_answers(lm, tok, samples: list[Sample]) -> list[str]:
    """Ask an OpenAI-compatible server (omnigpt.evals.lm.ApiLM) each question with its images as PNG data URLs,
    text first as in training; greedy."""
    import base64
    import io

    from PIL import Image

    def data_url(image: np.ndarray) -> str:
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, "PNG")  # (H, W, 3) uint8, as rendered
        return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()

    out = []
    for s in samples:
        content = [{"type": "text", "text": user_text(tok, s)}] + [{"type": "image_url", "image_url": {"url": data_url(im)}}
                                                                  for im in s.images]
        out.append(lm.generate([content], max_tokens=max_new_tokens(s), temperature=0.0)[0].strip())
    return out


def api_vqa(lm, n_values=(1, 2, 4), per_type: int = 20, image_size: int = 128, types=EVAL_TYPES, seed: int = 0,
            log=print) -> dict:
    from omnigpt.data.vision_samples import shapebind_tokenizer

    tok = shapebind_tokenizer()  # builds the question samples; the server tokenizes the text its own way
    return score_vqa(lambda samples: api_answers(lm, tok, samples), tok, 1, image_size, n_values, per_type, types, seed, log)


def vqa_summary(res: dict) -> dict:
    """Flat figures for a report card: overall accuracy, and per type at the smallest and largest N."""
    cells = [a for row in res["by_n"].values() for a in row.values()]
    out = {"acc": sum(cells) / len(cells) if cells else 0.0}
    for n in (min(res["by_n"]), max(res["by_n"])):
        out.update({f"{t}@N={n}": a for t, a in res["by_n"][n].items()})
    examples = [{**e, "expected": e["answer"]} for e in res["examples"][:20]]  # the report card's wording
    return {**out, **res, "examples": examples}


def format_table(results: dict[str, dict], extra: dict[str, dict] | None = None) -> str:
    """One table for several models (e.g. {"inline": ..., "cross": ...}): rows (mode, N), columns question types."""
    types = [t for t in EVAL_TYPES if any(t in r for res in results.values() for r in res["by_n"].values())]
    head = f"{'mode':<8} {'N':>3}  " + "  ".join(f"{t:>8}" for t in types)
    lines = [head, "-" * len(head)]
    for mode, res in results.items():
        for n, row in res["by_n"].items():
            lines.append(f"{mode:<8} {n:>3}  " + "  ".join(f"{100 * row[t]:>8.1f}" if t in row else f"{'-':>8}" for t in types))
    if extra:
        lines.append("")
        for mode, info in extra.items():
            lines.append(f"{mode:<8} " + ", ".join(f"{k} {v}" for k, v in info.items()))
    return "\n".join(lines)


def target_met(res: dict, max_n: int = 4, threshold: float = 0.95, types=("color", "position")) -> bool:
    return all(res["by_n"][n][t] >= threshold for n in res["by_n"] if n <= max_n for t in types if t in res["by_n"][n])
