"""Synthetic chat tasks whose answers a program can check: the verifiable part of the alignment demonstration.

A *fact* is a question with a one-token-ish answer from a tiny closed world: sums and differences of small
numbers, colours of things, animal sounds, opposites. A *task* wraps a fact in a chat prompt with a demand:

    arith     "What is 3 + 4?"                                    -> the last number in the reply is 7
    one_word  "What color is the sky? Answer in one word."        -> exactly one word, and it is "blue"
    json      "Reply in JSON with keys a and b: a is 3 + 4, b is  -> a JSON object with exactly the keys a and b,
               the color of the sky."                                a == 7 and b == "blue"
    system    a system message sets a rule the reply must obey   -> rule obeyed and the fact right:
               caps ("Always reply in capital letters."), prefix ("Start every reply with 'OK:'"), suffix
               ("End every reply with 'Bye!'"), colors_only (off-topic questions get "I only talk about colors.")
    shapebind a scene of omnigpt.data.scenes (its own generator   -> the answer the scene graph gives: colour or
               and questions) as text, then one of its               shape named alone, the count as the last
               questions: "Scene: a small red circle in row 1,       number, the relation word alone (and rows /
               column 1; a large blue star in row 2, column 2.       columns, if stated, the true ones)
               What color is the star?"

Every task carries a JSON `spec`; `check(spec, reply)` is the verifier. `flawed_answers` gives answers with one
or two flaws (wrong fact, broken format, ignored system rule), so preference pairs (correct vs flawed) and K-way
rankings (correct > one flaw > two flaws) come for free. `pretrain_text` writes prose over the same facts (no
chat format): what the demonstration's base model is pretrained on.

Held-out prompts: each (kind, fact, rule) combination is assigned to "train" or "heldout" by a hash, so held-out
prompts are unseen combinations (their facts do appear in the pretraining prose). ShapeBind tasks are split by scene:
a held-out one asks about a scene no train task shows (the pretraining prose has scenes of its own, QA included).

Why ShapeBind questions as text and not pixels: the alignment trainers (SFT, reward model, PPO, DPO, GRPO) and the
engine's rollouts work on token ids only; a VLM policy would need image features spliced into every rollout, reward,
reference and value pass. The scene as text keeps what the question tests (binding colour, shape and place of
several objects, and relations between them) on a stack that trains on CPU; the same scene graph renders to the
pixels that the VLMs (omnigpt.train.vlm, omnigpt.evals.vqa) answer about.
"""

from __future__ import annotations

import json
import random
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from omnigpt.data import scenes as sb

COLORS = {"the sky": "blue", "grass": "green", "a banana": "yellow", "snow": "white", "coal": "black",
          "a tomato": "red", "an orange": "orange", "a lemon": "yellow", "milk": "white", "a leaf": "green",
          "blood": "red", "the sea": "blue", "chocolate": "brown", "a plum": "purple", "a crow": "black"}
SOUNDS = {"a cow": "moo", "a dog": "woof", "a cat": "meow", "a duck": "quack", "a sheep": "baa", "a lion": "roar",
          "a pig": "oink", "an owl": "hoot", "a bee": "buzz", "a snake": "hiss", "a horse": "neigh", "a frog": "croak"}
OPPOSITES = {"hot": "cold", "big": "small", "up": "down", "fast": "slow", "happy": "sad", "light": "dark",
             "old": "new", "open": "closed", "early": "late", "full": "empty", "wet": "dry", "loud": "quiet"}
VOCAB = {"color": sorted(set(COLORS.values())), "sound": sorted(set(SOUNDS.values())),
         "opposite": sorted(set(OPPOSITES.values()) | set(OPPOSITES))}
KINDS = ("arith", "one_word", "json", "system", "shapebind")
RULES = {
    "caps": "Always reply in capital letters.",
    "prefix": "Start every reply with 'OK:'.",
    "suffix": "End every reply with 'Bye!'",
    "colors_only": "You only talk about colors. If a question is not about colors, reply exactly: I only talk about colors.",
}
REFUSAL = "I only talk about colors."
MAX_OPERAND = 6


# ---- facts -----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Fact:
    category: str  # arith | color | sound | opposite
    key: str  # "3+4", "the sky", ...
    question: str  # "What is 3 + 4?"
    noun: str  # "3 + 4", "the color of the sky" (for the json task)
    sentence: str  # "3 + 4 = 7." -- a correct prose answer
    answer: int | str

    def wrong(self, rng: random.Random) -> int | str:
        if self.category == "arith":
            return int(self.answer) + rng.choice([d for d in (-2, -1, 1, 2) if int(self.answer) + d >= 0])
        return rng.choice([w for w in VOCAB[self.category] if w != self.answer])

    def sentence_with(self, answer) -> str:
        return self.sentence.replace(f" {self.answer}.", f" {answer}.")


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def all_facts(max_operand: int = MAX_OPERAND) -> list[Fact]:
    facts = []
    for a in range(max_operand + 1):
        for b in range(max_operand + 1):
            facts.append(Fact("arith", f"{a}+{b}", f"What is {a} + {b}?", f"{a} + {b}", f"{a} + {b} = {a + b}.", a + b))
            if a >= b:
                facts.append(Fact("arith", f"{a}-{b}", f"What is {a} - {b}?", f"{a} - {b}", f"{a} - {b} = {a - b}.", a - b))
    for thing, c in COLORS.items():
        facts.append(Fact("color", thing, f"What color is {thing}?", f"the color of {thing}", f"{_cap(thing)} is {c}.", c))
    for animal, s in SOUNDS.items():
        facts.append(Fact("sound", animal, f"What sound does {animal} make?", f"the sound {animal} makes", f"{_cap(animal)} says {s}.", s))
    for w, o in OPPOSITES.items():
        facts.append(Fact("opposite", w, f"What is the opposite of {w}?", f"the opposite of {w}", f"The opposite of {w} is {o}.", o))
    return facts


# ---- tasks -----------------------------------------------------------------------------------------------------
@dataclass
class Task:
    messages: list[dict]  # the prompt: optional system message, then the user turn
    spec: dict  # what check() needs
    reference: str  # a correct reply
    flawed: list[tuple[str, int]] = field(default_factory=list)  # (reply, number of flaws >= 1)

    def record(self) -> dict:
        return {"messages": self.messages, "task": self.spec}


def split_of(key: str, heldout_frac: float = 0.15) -> str:
    return "heldout" if zlib.crc32(key.encode()) % 1000 < heldout_frac * 1000 else "train"


def _word_reply(fact: Fact, answer) -> str:
    return f"{_cap(str(answer))}."


def make_task(kind: str, fact: Fact, rng: random.Random, rule: str | None = None, number: Fact | None = None) -> Task:
    wrong = fact.wrong(rng)
    if kind == "arith":
        spec = {"kind": "arith", "answer": fact.answer}
        return Task([{"role": "user", "content": fact.question}], spec, fact.sentence, [(fact.sentence_with(wrong), 1)])
    if kind == "one_word":
        spec = {"kind": "one_word", "answer": fact.answer}
        prompt = [{"role": "user", "content": f"{fact.question} Answer in one word."}]
        return Task(prompt, spec, _word_reply(fact, fact.answer),
                    [(_word_reply(fact, wrong), 1), (fact.sentence, 1), (fact.sentence_with(wrong), 2)])
    if kind == "json":
        assert number is not None and number.category == "arith"
        a, b = number.answer, fact.answer
        spec = {"kind": "json", "a": a, "b": b}
        prompt = [{"role": "user", "content": f"Reply in JSON with keys a and b: a is {number.noun}, b is {fact.noun}."}]
        ref = json.dumps({"a": a, "b": b})
        return Task(prompt, spec, ref, [
            (json.dumps({"a": a, "b": wrong}), 1), (json.dumps({"a": number.wrong(rng), "b": b}), 1),
            (json.dumps({"a": a}), 1), (f"a is {a} and b is {b}.", 1), (f"a is {a} and b is {wrong}.", 2)])
    if kind == "system":
        assert rule in RULES
        on_topic = rule != "colors_only" or fact.category == "color"
        spec = {"kind": "system", "rule": rule, "category": fact.category, "answer": fact.answer, "on_topic": on_topic}
        prompt = [{"role": "system", "content": RULES[rule]}, {"role": "user", "content": fact.question}]
        plain, bad = fact.sentence, fact.sentence_with(wrong)
        if rule == "caps":
            return Task(prompt, spec, plain.upper(), [(plain, 1), (bad.upper(), 1), (bad, 2)])
        if rule == "prefix":
            return Task(prompt, spec, f"OK: {plain}", [(plain, 1), (f"OK: {bad}", 1), (bad, 2)])
        if rule == "suffix":
            return Task(prompt, spec, f"{plain} Bye!", [(plain, 1), (f"{bad} Bye!", 1), (bad, 2)])
        if on_topic:  # colors_only, a colour question: answer it
            return Task(prompt, spec, plain, [(REFUSAL, 1), (bad, 1)])
        return Task(prompt, spec, REFUSAL, [(plain, 1), (bad, 2)])
    raise ValueError(f"unknown task kind {kind!r}; choose from {', '.join(KINDS)}")


# ---- ShapeBind questions on a scene described in text -----------------------------------------------------------
SCENE_QA_TYPES = ("color", "shape", "count", "position")
SCENE_OBJECTS = (2, 4)  # objects per scene: a 2 x 2 grid, prompts short enough for the demo's 256-token window
_RELATION_WORDS = ("left", "right", "above", "below")


def scene_text(scene: sb.Scene) -> str:
    """"Scene: a small red circle in row 1, column 1; a large blue star in row 2, column 2." (reading order)."""
    return "Scene: " + "; ".join(f"{sb.describe(o)} in row {o.row + 1}, column {o.col + 1}" for o in scene.objects) + "."


def parse_scene_text(text: str) -> list[tuple[str, str, str, int, int]]:
    """(size, color, shape, row, col) per object (0-based cells) read back from `scene_text`: what a reader of the
    prompt can know, used by the tests to show that the text carries the whole scene graph."""
    body = text.removeprefix("Scene: ").rstrip(".")
    out = []
    for part in body.split("; "):
        m = re.fullmatch(r"an? (\w+) (\w+) (\w+) in row (\d+), column (\d+)", part)
        if not m:
            raise ValueError(f"not an object of a scene text: {part!r}")
        out.append((m[1], m[2], m[3], int(m[4]) - 1, int(m[5]) - 1))
    return out


def _scene_reply(qtype: str, ref: str, answer, steps: tuple[int, int] | None = None, unit: str = "") -> str:
    """The reply's wording: "The star is red.", "The red object is a star.", "There are 2.",
    "Column 1 vs column 2: left." (answer: a word or list of words (a hedge), a count or list of counts)."""
    words = answer if isinstance(answer, list) else [answer]
    if qtype == "color":
        return f"The {ref} is {' or '.join(words)}."
    if qtype == "shape":
        return f"The {ref} is {' or '.join(('an ' if w[0] in 'aeiou' else 'a ') + w for w in words)}."
    if qtype == "count":
        return f"There {'is' if words == [1] else 'are'} {' or '.join(str(w) for w in words)}."
    a, b = steps
    return f"{unit.capitalize()} {a} vs {unit} {b}: {words[0]}."


def make_scene_task(scene: sb.Scene, qa: sb.QA, rng: random.Random) -> Task:
    """A ShapeBind question (from scenes.questions) about `scene`, given as text. Flaws: a wrong answer (for colours
    and shapes another object's, when the scene has one: the binding error), a hedge naming the right answer and a
    wrong one, both (two flaws); for relations, the wrong relation, misread rows / columns, or both."""
    prompt = [{"role": "user", "content": f"{scene_text(scene)} {_cap(qa.question)}"}]
    spec = {"kind": "shapebind", "type": qa.type, "scene": [scene.seed, len(scene.objects)]}
    if qa.type in ("color", "shape"):
        ref = qa.question.rstrip("?").split(" is the ", 1)[1]
        pool = list(sb.COLORS) if qa.type == "color" else list(sb.SHAPES)
        seen = [getattr(o, qa.type) for o in scene.objects if getattr(o, qa.type) != qa.answer]
        wrong = rng.choice(seen) if seen else rng.choice([w for w in pool if w != qa.answer])
        other = rng.choice([w for w in pool if w not in (qa.answer, wrong)])
        spec["answer"] = qa.answer
        reply = lambda a: _scene_reply(qa.type, ref, a)  # noqa: E731
        return Task(prompt, spec, reply(qa.answer), [(reply(wrong), 1), (reply([qa.answer, wrong]), 1),
                                                     (reply([wrong, other]), 2)])
    if qa.type == "count":
        n = int(qa.answer)
        wrong = n + rng.choice([d for d in (-1, 1) if n + d >= 0])
        other = wrong + 1 if wrong + 1 != n else wrong + 2
        spec["answer"] = n
        reply = lambda a: _scene_reply("count", "", a)  # noqa: E731
        return Task(prompt, spec, reply(n), [(reply(wrong), 1), (reply([n, wrong]), 1), (reply([wrong, other]), 2)])
    if qa.type == "position":
        unit_steps, rel = qa.answer.split(": ")
        unit = unit_steps.split()[0]
        a, b = (int(x) for x in re.findall(r"\d+", unit_steps))
        flip = {"left": "right", "right": "left", "above": "below", "below": "above"}
        spec.update(answer=rel, unit=unit, steps=[a, b])
        reply = lambda s, r: _scene_reply("position", "", r, s, unit)  # noqa: E731
        return Task(prompt, spec, reply((a, b), rel), [(reply((a, b), flip[rel]), 1), (reply((b, a), rel), 1),
                                                       (reply((b, a), flip[rel]), 2)])
    raise ValueError(f"ShapeBind question type {qa.type!r} is not a chat task; choose from {', '.join(SCENE_QA_TYPES)}")


def sample_scene_task(rng: random.Random, split: str, qtype: str | None = None) -> Task:
    """A scene (2-4 objects) whose hash falls in `split`, and one of its questions of `qtype` (random if None)."""
    for _ in range(10000):
        seed = f"align{rng.randrange(10 ** 9)}"
        if split_of(f"shapebind|{seed}") != split:
            continue
        scene = sb.make_scene(seed, rng.randint(*SCENE_OBJECTS))
        qas = sb.questions(scene, seed=0, types=(qtype or rng.choice(SCENE_QA_TYPES),))
        if qas:
            return make_scene_task(scene, rng.choice(qas), rng)
    raise RuntimeError("no ShapeBind question found")  # unreachable: every scene has a count question


def task_key(kind: str, fact: Fact, rule: str | None, number: Fact | None) -> str:
    return "|".join([kind, fact.key, rule or "", number.key if number else ""])


def sample_tasks(n: int, seed: int, split: str = "train", kinds: tuple[str, ...] = KINDS,
                 max_operand: int = MAX_OPERAND) -> list[Task]:
    """n tasks of the given split, kinds in turn; deterministic in seed."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be train or heldout, got {split!r}")
    rng = random.Random(seed)
    by_cat: dict[str, list[Fact]] = {}
    for f in all_facts(max_operand):
        by_cat.setdefault(f.category, []).append(f)

    def pick(cats):  # a category uniformly, then a fact of it
        return rng.choice(by_cat[rng.choice(cats)])

    words = ("color", "sound", "opposite")
    out: list[Task] = []
    while len(out) < n:
        kind = kinds[len(out) % len(kinds)]
        if kind == "shapebind":
            out.append(sample_scene_task(rng, split))
            continue
        if kind not in KINDS:
            raise ValueError(f"unknown task kind {kind!r}; choose from {', '.join(KINDS)}")
        for _ in range(1000):  # draw until the combination falls in the requested split
            rule = number = None
            if kind == "arith":
                fact = pick(("arith",))
            elif kind == "one_word":
                fact = pick(words)
            elif kind == "json":
                fact, number = pick(words), pick(("arith",))
            else:
                rule = rng.choice(sorted(RULES))
                fact = pick(words if rule == "caps" else words + ("arith",))  # capitals change no digit
            if split_of(task_key(kind, fact, rule, number)) == split:
                break
        out.append(make_task(kind, fact, rng, rule, number))
    return out


# ---- the verifier ----------------------------------------------------------------------------------------------
_INT = re.compile(r"-?\d+")
_WORD = re.compile(r"[a-z]+")


def _fact_right(category: str, answer, reply: str) -> bool:
    """The reply states the fact: the last number is the answer (arith), or the only word of the answer's
    category in the reply is the answer (colors, sounds, opposites; the question's own word excepted)."""
    if category == "arith":
        nums = _INT.findall(reply)
        return bool(nums) and int(nums[-1]) == int(answer)
    words = _WORD.findall(reply.lower())
    hits = [w for w in words if w in VOCAB[category]]
    if category == "opposite":  # "The opposite of hot is cold": the answer is the last such word
        return bool(hits) and hits[-1] == answer
    return bool(hits) and set(hits) == {answer}


def check(spec: dict, reply: str) -> bool:
    """True when `reply` does what the task asked. Pure and total: any string gives True or False."""
    kind, text = spec.get("kind"), reply.strip()
    if kind == "arith":
        return _fact_right("arith", spec["answer"], text)
    if kind == "one_word":
        word = text[:-1] if text.endswith(".") else text
        return bool(re.fullmatch(r"[A-Za-z]+", word)) and word.lower() == str(spec["answer"]).lower()
    if kind == "json":
        try:
            obj = json.loads(text)
        except ValueError:
            return False
        return (isinstance(obj, dict) and set(obj) == {"a", "b"} and isinstance(obj["a"], int)
                and obj["a"] == spec["a"] and isinstance(obj["b"], str) and obj["b"].lower() == spec["b"])
    if kind == "system":
        rule, cat, ans = spec["rule"], spec["category"], spec["answer"]
        if rule == "caps":
            return text == text.upper() and _fact_right(cat, ans, text)
        if rule == "prefix":
            return text.startswith("OK:") and _fact_right(cat, ans, text[3:])
        if rule == "suffix":
            return text.endswith("Bye!") and _fact_right(cat, ans, text[: -len("Bye!")])
        if rule == "colors_only":
            return _fact_right(cat, ans, text) and REFUSAL not in text if spec["on_topic"] else text == REFUSAL
    if kind == "shapebind":
        return _scene_answer_right(spec, text)
    raise ValueError(f"unknown task spec {spec!r}")


_SCENE_WORDS = {"color": {c: c for c in sb.COLORS},
                "shape": {**{s: s for s in sb.SHAPES}, **{sb.plural(s): s for s in sb.SHAPES}}}


def _scene_answer_right(spec: dict, text: str) -> bool:
    """colour / shape: the only colour (shape) word in the reply is the answer (so a hedge fails); count: the last
    number is the answer; position: the only relation word is the answer, and the rows / columns the reply states,
    if any, are the two objects' true ones in the question's order."""
    qtype, answer, lower = spec["type"], spec["answer"], text.lower()
    if qtype in ("color", "shape"):
        hits = {_SCENE_WORDS[qtype][w] for w in _WORD.findall(lower) if w in _SCENE_WORDS[qtype]}
        return hits == {answer}
    if qtype == "count":
        nums = _INT.findall(text)
        return bool(nums) and int(nums[-1]) == int(answer)
    if qtype == "position":
        rels = {w for w in _WORD.findall(lower) if w in _RELATION_WORDS}
        nums = [int(x) for x in _INT.findall(text)]
        return rels == {answer} and (not nums or nums == list(spec["steps"]))
    raise ValueError(f"unknown ShapeBind question type in {spec!r}")


# ---- data files ------------------------------------------------------------------------------------------------
def sft_record(task: Task, rng: random.Random, flawed_frac: float = 0.0) -> dict:
    """A demonstration: the reference answer, or with probability flawed_frac a one-flaw answer (demonstrations
    of mixed quality, as human ones are: what preference training then corrects)."""
    one_flaw = [r for r, n in task.flawed if n == 1]
    reply = rng.choice(one_flaw) if one_flaw and rng.random() < flawed_frac else task.reference
    return {"messages": task.messages + [{"role": "assistant", "content": reply}], "task": task.spec}


def comparison_record(task: Task, rng: random.Random, k: int = 2) -> dict:
    """{"prompt", "chosen", "rejected"} (k=2) or {"prompt", "ranking": [best..worst]} with one answer per flaw
    level (correct > one flaw > two flaws), as long as the task has those levels."""
    if k == 2:
        return {"prompt": task.messages, "chosen": task.reference, "rejected": rng.choice(task.flawed)[0], "task": task.spec}
    levels = {}
    for reply, n in rng.sample(task.flawed, len(task.flawed)):
        levels.setdefault(n, reply)
    ranking = [task.reference] + [levels[n] for n in sorted(levels)][: k - 1]
    return {"prompt": task.messages, "ranking": ranking, "task": task.spec}


def pretrain_text(n_docs: int, seed: int, max_operand: int = MAX_OPERAND, scene_frac: float = 0.0) -> list[str]:
    """Prose over every fact of the world (no chat format): questions followed by their answers, sentences,
    "plus"/"minus" phrasings, JSON records, capitalised lines. The demonstration's base model learns the facts here.
    A fraction `scene_frac` of the documents are ShapeBind scenes of the train split as text, each followed by a
    few of its questions and their answers."""
    rng = random.Random(seed)
    scene_rng = random.Random(f"scenes:{seed}")

    def scene_doc() -> str:
        task = sample_scene_task(scene_rng, "train", "count")
        scene = sb.make_scene(task.spec["scene"][0], task.spec["scene"][1])
        qas = sb.questions(scene, seed=1, types=SCENE_QA_TYPES)
        parts = [task.messages[-1]["content"], task.reference]
        for qa in scene_rng.sample(qas, min(len(qas), scene_rng.randint(1, 3))):
            t = make_scene_task(scene, qa, scene_rng)
            parts += [_cap(qa.question), t.reference]
        return " ".join(parts)
    facts = all_facts(max_operand)
    arith = [f for f in facts if f.category == "arith"]

    def sentence(f: Fact) -> str:
        r = rng.random()
        if r < 0.4:  # questions followed by their answers, as on the web
            return f"{f.question} {f.sentence}"
        if f.category == "arith" and r < 0.5:
            a, op, b = f.noun.split()
            return f"{a} {'plus' if op == '+' else 'minus'} {b} is {f.answer}."
        if r < 0.6:
            return f"{_cap(f.noun)} is {f.answer}."
        if r < 0.65:
            return f.sentence.upper()
        if r < 0.7 and f.category != "arith":
            n = rng.choice(arith)
            return f'Record: {json.dumps({"a": n.answer, "b": f.answer})} where a is {n.noun} and b is {f.noun}.'
        return f.sentence

    return [scene_doc() if scene_frac and scene_rng.random() < scene_frac else
            " ".join(sentence(rng.choice(facts)) for _ in range(rng.randint(3, 10))) for _ in range(n_docs)]


def write_jsonl(path: str | Path, records: list[dict]) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def write_task_files(out_dir: str | Path, *, n_sft: int = 2000, n_pairs: int = 2000, n_prompts: int = 2000,
                     n_heldout: int = 200, n_pretrain_docs: int = 4000, flawed_frac: float = 0.3, ranking_k: int = 3,
                     seed: int = 0, max_operand: int = MAX_OPERAND, kinds: tuple[str, ...] = KINDS,
                     scene_frac: float = 0.2) -> dict[str, Path]:
    """Every file the alignment stages read, for this world:
        pretrain.txt                  prose, one document per line (base model / PPO-ptx data)
        sft.jsonl, sft_val.jsonl      demonstrations ({"messages"}, mixed quality: flawed_frac)
        comparisons.jsonl             half chosen/rejected pairs, half K-way rankings (train prompts)
        comparisons_val.jsonl         chosen/rejected pairs on held-out prompts (reward model accuracy)
        prompts.jsonl                 train prompts with their task spec (PPO / GRPO)
        heldout.jsonl                 held-out prompts with their task spec (the verified score)
    Task kinds come in turn (`kinds`); with shapebind among them, `scene_frac` of the prose documents are scenes.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    kinds = tuple(kinds)
    train = lambda n, s: sample_tasks(n, seed * 1000 + s, "train", kinds, max_operand)  # noqa: E731
    held = sample_tasks(n_heldout + 500, seed * 1000 + 9, "heldout", kinds, max_operand)
    files = {name: out / name for name in ("pretrain.txt", "sft.jsonl", "sft_val.jsonl", "comparisons.jsonl",
                                           "comparisons_val.jsonl", "prompts.jsonl", "heldout.jsonl")}
    scene_frac = scene_frac if "shapebind" in kinds else 0.0
    files["pretrain.txt"].write_text("\n".join(pretrain_text(n_pretrain_docs, seed, max_operand, scene_frac)) + "\n")
    write_jsonl(files["sft.jsonl"], [sft_record(t, rng, flawed_frac) for t in train(n_sft, 1)])
    write_jsonl(files["sft_val.jsonl"], [sft_record(t, rng, 0.0) for t in held[n_heldout:n_heldout + 200]])
    write_jsonl(files["comparisons.jsonl"], [comparison_record(t, rng, 2 if i % 2 else ranking_k)
                                             for i, t in enumerate(train(n_pairs, 2))])
    write_jsonl(files["comparisons_val.jsonl"], [comparison_record(t, rng, 2) for t in held[n_heldout:]])
    write_jsonl(files["prompts.jsonl"], [t.record() for t in train(n_prompts, 3)])
    write_jsonl(files["heldout.jsonl"], [t.record() for t in held[:n_heldout]])
    return files
