"""Token sequences with images for vision-language training and evaluation, and their batches.

A `Sample` is token ids, a loss mask (1 = learn this token) and its images (H x W x 3 uint8) in the order of their
placeholders. Kinds:
- qa / caption / multi: a chat turn (user: image(s) + question, assistant: answer), learned on the answer only;
- doc: an interleaved document (text, image, text, ...), learned on all text;
- pair: an image then its caption (scene, emoji or clip-art), learned on the caption;
- text: text alone (language-model warm-up).
Training draws samples from a seeded stream (`SampleStream`, a DataLoader-friendly iterable of batches); held-out
evaluation uses another seed namespace, so no evaluation scene is a training scene.
"""

from __future__ import annotations

import os
import random
import tempfile
from dataclasses import dataclass, field

import numpy as np
import torch

from omnigpt.data import scenes as sb
from omnigpt.tokenizer.chat import render_chat

IGNORE = -100


@dataclass
class Sample:
    ids: list[int]
    mask: list[int]
    images: list[np.ndarray]
    kind: str  # "qa:<type>", "caption", "multi", "doc", "pair", "text"
    answer: str = ""
    n: int = 0  # objects per scene
    prompt_len: int = 0  # chat samples: ids[:prompt_len] is the generation prompt
    ground_cells: list[int] | None = None  # qa: sb.token_labels of the first question's objects in its image's grid
    ground_mentions: list[int] | None = None  # qa: the token position where the first question names each object


def shapebind_tokenizer(vocab_size: int = 512, n_scenes: int = 1000):
    """A small byte-level BPE trained on ShapeBind text (captions, questions, answers): whole words are tokens."""
    from omnigpt.tokenizer.text import train_bpe

    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "shapebind.txt")
        with open(path, "w") as f:
            f.write("\n".join(sb.scene_texts(n_scenes)))
        return train_bpe([path], vocab_size)


# ---- samples ---------------------------------------------------------------------------------------------------
def image_part() -> dict:
    return {"type": "image_url", "image_url": {"url": "shapebind:"}}


def chat_sample(tok, image_tokens: int, images: list[np.ndarray], question: str, answer: str, kind: str, n: int = 0,
                more: list[tuple[str, str]] = (), question_first: bool = True) -> Sample:
    """user: question + images (as in an OpenAI request: text part, then image_url parts); assistant: answer
    (learned, with its <|im_end|>); then the `more` (question, answer) turns about the same images.
    ids[:prompt_len] is the first turn's generation prompt (a prefix of the render).

    Question first: in a causal LM the image tokens then see the question, so each can tell whether it is the
    object asked about, and the answer only has to read the one that says so (image first, the answer token
    must carry the question to the image itself: two hops, learned much more slowly)."""
    text, pictures = [{"type": "text", "text": question}], [image_part() for _ in images]
    user = {"role": "user", "content": text + pictures if question_first else pictures + text}
    prompt, mask = render_chat(tok, [user], add_generation_prompt=True, image_tokens=image_tokens)
    ids, mask = list(prompt), list(mask)
    for q, a in [(None, answer), *more]:
        if q is not None:
            turn, _ = render_chat(tok, [{"role": "user", "content": q}], add_generation_prompt=True)
            ids += turn
            mask += [0] * len(turn)
        reply = tok.encode(a) + [tok.im_end_id] + tok.encode("\n")
        ids += reply
        mask += [1] * (len(reply) - 1) + [0]
    return Sample(ids, mask, images, kind, answer, n, len(prompt))


def image_run(tok, image_tokens: int) -> list[int]:
    return [tok.image_start_id] + [tok.image_id] * image_tokens + [tok.image_end_id]


def document_sample(tok, image_tokens: int, segments: list, kind: str = "doc") -> Sample:
    """Text segments are learned, images are not; the document ends with <|endoftext|>."""
    ids, mask, images = [tok.eot_id], [0], []
    for i, seg in enumerate(segments):
        if isinstance(seg, str):
            new = tok.encode((" " if i and isinstance(segments[i - 1], str) else "") + seg)
            ids += new
            mask += [1] * len(new)
        else:
            images.append(seg if isinstance(seg, np.ndarray) else sb.render_array(seg))
            run = image_run(tok, image_tokens)
            ids += run
            mask += [0] * len(run)
    return Sample(ids + [tok.eot_id], mask + [1], images, kind)


def text_sample(tok, text: str) -> Sample:
    ids = [tok.eot_id] + tok.encode(text) + [tok.eot_id]
    return Sample(ids, [0] + [1] * (len(ids) - 1), [], "text")


def scene_qa_sample(tok, image_tokens: int, scene: sb.Scene, qa: sb.QA, image: np.ndarray | None = None,
                    question_first: bool = True) -> Sample:
    image = sb.render_array(scene) if image is None else image
    return chat_sample(tok, image_tokens, [image], qa.question, qa.answer, f"qa:{qa.type}", len(scene.objects),
                       question_first=question_first)


def caption_sample(tok, image_tokens: int, scene: sb.Scene, image: np.ndarray | None = None,
                   question_first: bool = True) -> Sample:
    image = sb.render_array(scene) if image is None else image
    return chat_sample(tok, image_tokens, [image], "describe the image.", sb.caption(scene), "caption", len(scene.objects),
                       question_first=question_first)


def mention_positions(tok, ids: list[int], question: str, ends: tuple[int, ...]) -> list[int] | None:
    """The positions in `ids` of the last token of each phrase that names an object (`sb.QA.mentions`), in the
    first place the question's tokens occur; None when they do not occur, or a phrase does not end on a token
    boundary."""
    q = tok.encode(question)
    start = next((i for i in range(len(ids) - len(q) + 1) if ids[i: i + len(q)] == q), None)
    if start is None:
        return None
    out = []
    for end in ends:
        head = tok.encode(question[:end])
        if head != q[: len(head)]:
            return None
        out.append(start + len(head) - 1)
    return out


def pick_question(rng: random.Random, scene: sb.Scene, qtype: str) -> sb.QA | None:
    qs = sb.questions(scene, rng.randrange(1 << 30), (qtype,))
    return rng.choice(qs) if qs else None


def multi_sample(tok, image_tokens: int, rng: random.Random, pair: list[tuple[sb.Scene, np.ndarray]],
                 question_first: bool = True) -> Sample | None:
    """Two images in one turn; a colour or count question about one of them ("in the second image, ...")."""
    which = rng.randrange(len(pair))
    scene = pair[which][0]
    qa = pick_question(rng, scene, rng.choice(("color", "count")))
    if qa is None:
        return None
    question = f"in the {sb.ORDINALS[which]} image, {qa.question}"
    return chat_sample(tok, image_tokens, [im for _, im in pair], question, qa.answer, "multi", len(scene.objects),
                       question_first=question_first)


# ---- scenes: drawn fresh, or from a pool rendered once --------------------------------------------------------
def _render_many(args) -> np.ndarray:
    seeds, ns, image_size = args
    return np.stack([sb.render_array(sb.make_scene(s, n, image_size)) for s, n in zip(seeds, ns)])


class ScenePool:
    """Scenes rendered once (in parallel) and reused across steps: rendering is then off the training path.
    Scene i has seed "<ns>:<i>" and n cycling through n_range, so every N is equally represented."""

    def __init__(self, n_scenes: int, n_range: tuple[int, int], image_size: int, seed_ns: str = "pool", workers: int = 0):
        lo, hi = n_range
        seeds = [f"{seed_ns}:{i}" for i in range(n_scenes)]
        ns = [lo + i % (hi - lo + 1) for i in range(n_scenes)]
        self.scenes = [sb.make_scene(s, n, image_size) for s, n in zip(seeds, ns)]
        chunks = [(seeds[i: i + 500], ns[i: i + 500], image_size) for i in range(0, n_scenes, 500)]
        if workers > 0:
            import multiprocessing as mp

            with mp.get_context("fork").Pool(workers) as pool:
                parts = pool.map(_render_many, chunks)
        else:
            parts = [_render_many(c) for c in chunks]
        self.images = np.concatenate(parts)  # (n_scenes, H, W, 3) uint8
        self.n_range, self.image_size = n_range, image_size
        self.by_n: dict[int, list[int]] = {}
        for i, n in enumerate(ns):
            self.by_n.setdefault(n, []).append(i)

    def draw(self, rng: random.Random, n_range: tuple[int, int]) -> tuple[sb.Scene, np.ndarray]:
        i = rng.choice(self.by_n[rng.randint(max(n_range[0], self.n_range[0]), min(n_range[1], self.n_range[1]))])
        return self.scenes[i], self.images[i]


def draw_scene(rng: random.Random, n_range: tuple[int, int], image_size: int, seed_ns: str,
               pool: ScenePool | None = None) -> tuple[sb.Scene, np.ndarray]:
    if pool is not None:
        return pool.draw(rng, n_range)
    scene = sb.make_scene(f"{seed_ns}:{rng.randrange(1 << 62)}", rng.randint(*n_range), image_size)
    return scene, sb.render_array(scene)


# ---- mixtures --------------------------------------------------------------------------------------------------
@dataclass
class Mix:
    """Relative weights of sample kinds; qa_types are drawn uniformly within qa."""

    qa: float = 1.0
    caption: float = 0.0
    multi: float = 0.0
    doc: float = 0.0
    pair: float = 0.0  # scene captions as plain documents (alignment)
    real: float = 0.0  # emoji / clip-art captions (needs the Debian packages)
    text: float = 0.0  # text without images (LM warm-up)
    qa_types: tuple[str, ...] = sb.QA_TYPES
    max_turns: int = 1  # qa: up to this many questions about the same image, one chat turn each
    ground: bool = False  # qa: label the image's grid cells with the objects the first question names (Sample.ground_cells)
    image_first: bool = False  # chat samples: the images before the question text in the user turn (Flamingo's layout)
    mentions: bool = False  # with ground: also where the question names each object (Sample.ground_mentions)

    def kinds(self) -> tuple[list[str], list[float]]:
        names = ["qa", "caption", "multi", "doc", "pair", "real", "text"]
        return [k for k in names if getattr(self, k) > 0], [getattr(self, k) for k in names if getattr(self, k) > 0]


def random_sample(rng: random.Random, tok, image_tokens: int, mix: Mix, *, n_range=(1, 16), image_size: int = 128,
                  seed_ns: str = "train", pool: ScenePool | None = None, real_pairs=None, max_len: int | None = None,
                  ground_grid: int = 0) -> Sample:
    """One sample of a kind drawn from `mix`; with mix.ground, question samples carry their grounding labels on a
    ground_grid x ground_grid layout (the VLM's VLMConfig.ground_grid)."""
    names, weights = mix.kinds()
    if mix.ground and ground_grid < 1:
        raise ValueError("mix.ground needs the grounding grid (ground_grid >= 1: VLMConfig.ground_grid)")

    def scene():
        return draw_scene(rng, n_range, image_size, seed_ns, pool)

    while True:
        kind = rng.choices(names, weights)[0]
        if kind == "real" and real_pairs:
            from omnigpt.data.image_captions import load_pair_image

            pair = rng.choice(real_pairs)
            return document_sample(tok, image_tokens, [np.asarray(load_pair_image(pair, image_size)), pair.caption], "real")
        if kind == "multi":
            if s := multi_sample(tok, image_tokens, rng, [scene(), scene()], not mix.image_first):
                return s
            continue
        if kind == "doc":
            return document_sample(tok, image_tokens, sb.interleave(rng, [scene() for _ in range(rng.randint(1, 3))]))
        sc, image = scene()
        if kind == "text":  # scene descriptions only: no question-answer priors before the LM sees images
            return text_sample(tok, rng.choice(sb.OUTRO).format(c=sb.caption(sc)))
        if kind == "pair":
            return document_sample(tok, image_tokens, [image, sb.caption(sc)], "pair")
        if kind == "caption":
            return caption_sample(tok, image_tokens, sc, image, not mix.image_first)
        qas = [q for q in (pick_question(rng, sc, rng.choice(mix.qa_types)) for _ in range(rng.randint(1, mix.max_turns))) if q]
        while qas:
            more = [(q.question, q.answer) for q in qas[1:]]
            s = chat_sample(tok, image_tokens, [image], qas[0].question, qas[0].answer, f"qa:{qas[0].type}", len(sc.objects),
                            more, question_first=not mix.image_first)
            if max_len is None or len(s.ids) <= max_len or len(qas) == 1:
                if mix.ground and qas[0].refs:
                    s.ground_cells = sb.token_labels(sc, qas[0].refs, ground_grid)
                    if mix.mentions:  # only a pointer at the question's words needs them (VLMConfig.pointer)
                        s.ground_mentions = mention_positions(tok, s.ids, qas[0].question, qas[0].mentions)
                return s
            qas.pop()  # too long: fewer turns


# ---- batches ---------------------------------------------------------------------------------------------------
@dataclass
class Grounding:
    """What a batch's question samples are about, for the grounding loss (VLM.forward's `ground`)."""

    cells_BG: torch.Tensor  # (B, g*g) long: Sample.ground_cells of each row's first image; IGNORE in rows without
    answer_BT: torch.Tensor  # (B, T) bool: the positions that predict the first answer of a grounded row
    mention_BT: torch.Tensor  # (B, T) long: k + 1 at the last token of the phrase naming the k-th object, else 0

    def to(self, device) -> Grounding:
        return Grounding(*(t.to(device, non_blocking=True) for t in (self.cells_BG, self.answer_BT, self.mention_BT)))


def first_answer(mask: list[int]) -> list[int]:
    """Input positions t (predicting ids[t + 1]) of the first learned run of a sample's mask: its first answer."""
    learn = mask[1:]
    start = learn.index(1) if 1 in learn else len(learn)
    end = start
    while end < len(learn) and learn[end]:
        end += 1
    return list(range(start, end))


@dataclass
class VLBatch:
    inputs: torch.Tensor  # (B, T) token ids, right-padded
    targets: torch.Tensor  # (B, T) next tokens, IGNORE where not learned
    images: torch.Tensor  # (N, H, W, 3) uint8, all rows' images in order
    kinds: list[str] = field(default_factory=list)
    ground: Grounding | None = None  # when a row has Sample.ground_cells

    def to(self, device) -> VLBatch:
        return VLBatch(self.inputs.to(device, non_blocking=True), self.targets.to(device, non_blocking=True),
                       self.images.to(device, non_blocking=True), self.kinds,
                       None if self.ground is None else self.ground.to(device))


def collate(samples: list[Sample], pad_id: int, image_size: int) -> VLBatch:
    T = max(len(s.ids) for s in samples) - 1
    inputs = torch.full((len(samples), T), pad_id, dtype=torch.long)
    targets = torch.full((len(samples), T), IGNORE, dtype=torch.long)
    for b, s in enumerate(samples):
        ids, learn = torch.tensor(s.ids), torch.tensor(s.mask, dtype=torch.bool)
        inputs[b, : len(ids) - 1] = ids[:-1]
        targets[b, : len(ids) - 1] = ids[1:].masked_fill(~learn[1:], IGNORE)
    ground = None
    if any(s.ground_cells for s in samples):
        G = max(len(s.ground_cells) for s in samples if s.ground_cells)
        ground = Grounding(torch.full((len(samples), G), IGNORE, dtype=torch.long), torch.zeros(len(samples), T, dtype=torch.bool),
                           torch.zeros(len(samples), T, dtype=torch.long))
        for b, s in enumerate(samples):
            if s.ground_cells:
                ground.cells_BG[b] = torch.tensor(s.ground_cells)
                ground.answer_BT[b, first_answer(s.mask)] = True
                for k, t in enumerate(s.ground_mentions or []):
                    ground.mention_BT[b, t] = k + 1
    images = [im for s in samples for im in s.images]
    images_t = torch.from_numpy(np.stack(images)) if images else torch.zeros(0, image_size, image_size, 3, dtype=torch.uint8)
    return VLBatch(inputs, targets, images_t, [s.kind for s in samples], ground)


class SampleStream(torch.utils.data.IterableDataset):
    """An endless stream of collated batches; each DataLoader worker draws from its own seed."""

    def __init__(self, tok, image_tokens: int, mix: Mix, batch_size: int, *, seed: int = 0, n_range=(1, 16),
                 image_size: int = 128, pool: ScenePool | None = None, real_pairs=None, max_len: int | None = None,
                 ground_grid: int = 0):
        self.tok, self.image_tokens, self.mix, self.batch_size = tok, image_tokens, mix, batch_size
        self.seed, self.n_range, self.image_size, self.max_len = seed, n_range, image_size, max_len
        self.ground_grid = ground_grid
        self.pool, self.real_pairs = pool, real_pairs

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else 0
        rng = random.Random(f"stream:{self.seed}:{worker}")
        while True:
            batch = []
            while len(batch) < self.batch_size:
                s = random_sample(rng, self.tok, self.image_tokens, self.mix, n_range=self.n_range,
                                  image_size=self.image_size, seed_ns=f"train{self.seed}.{worker}", pool=self.pool,
                                  real_pairs=self.real_pairs, max_len=self.max_len, ground_grid=self.ground_grid)
                if self.max_len is None or len(s.ids) <= self.max_len:
                    batch.append(s)
            yield collate(batch, self.tok.pad_id, self.image_size)


def batches(stream: SampleStream, workers: int = 0):
    """Iterate a stream, in `workers` background processes when > 0."""
    if workers <= 0:
        return iter(stream)
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=workers, prefetch_factor=4,
                                         persistent_workers=False, pin_memory=torch.cuda.is_available())
    return iter(loader)
