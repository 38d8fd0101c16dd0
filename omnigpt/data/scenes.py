"""ShapeBind scenes: procedural images of N coloured shapes, their scene graph, captions and questions.

A scene is drawn from a seed: N objects (shape x colour x size) in distinct cells of a G x G grid (G = ceil(sqrt(N)),
at least 2), each jittered inside its cell so that no two shapes overlap. Because every shape stays inside its own
cell, relations follow the grid exactly: A is left of B iff A's column < B's column (their boxes are then disjoint
horizontally), A is above B iff A's row < B's row. Questions are asked only about pairs whose relation is clear.

Sizes are fixed fractions of the image (not of the cell), so "small" and "large" mean the same thing at every N.

Everything here is a pure function of (seed, n, image_size): the scene graph, the rendered image (Pillow, 2x
supersampled), the caption (a small grammar) and the question-answer pairs (colour, shape, count, position, list).
Interleaved documents (text, image, text, ...) are built from the same pieces.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass, replace

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "diamond", "star", "cross")
COLORS = {
    "red": (220, 38, 38), "orange": (245, 135, 20), "yellow": (230, 200, 20), "green": (40, 160, 60),
    "cyan": (20, 190, 205), "blue": (40, 80, 225), "purple": (135, 55, 190), "gray": (120, 120, 120),
}
SIZES = ("small", "large")
LARGE_FRAC, SMALL_FRAC = 0.1875, 0.1  # shape diameter / image size
BACKGROUND = (245, 245, 240)
NUMBERS = ("no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
           "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen", "twenty")
QA_TYPES = ("color", "shape", "count", "position", "where", "list")
RELATIONS = ("left of", "right of", "above", "below")
ORDINALS = ("first", "second", "third", "fourth")


@dataclass(frozen=True)
class Obj:
    shape: str
    color: str
    size: str
    row: int
    col: int
    cx: float  # centre, pixels
    cy: float
    d: float  # diameter, pixels


@dataclass(frozen=True)
class Scene:
    seed: int | str
    image_size: int
    grid: int
    objects: tuple[Obj, ...]  # in reading order (row, then column)

    def to_dict(self) -> dict:
        return {"seed": self.seed, "image_size": self.image_size, "grid": self.grid, "objects": [asdict(o) for o in self.objects]}

    @classmethod
    def from_dict(cls, d: dict) -> Scene:
        return cls(d["seed"], d["image_size"], d["grid"], tuple(Obj(**o) for o in d["objects"]))


# ---- scene graph -----------------------------------------------------------------------------------------------
def grid_size(n: int) -> int:
    return max(2, math.ceil(math.sqrt(n)))


def max_objects(image_size: int) -> int:
    """The most objects a grid can hold with a large shape fitting in each cell."""
    g = int(1 / LARGE_FRAC)
    return g * g


def make_scene(seed: int | str, n: int, image_size: int = 128) -> Scene:
    """n objects with random attributes in distinct jittered grid cells; a pure function of its arguments."""
    if not 1 <= n <= max_objects(image_size):
        raise ValueError(f"n={n} objects must be in [1, {max_objects(image_size)}]")
    if not 32 <= image_size <= 512:
        raise ValueError(f"image_size={image_size} must be in [32, 512]")
    rng = random.Random(f"shapebind:{seed}:{n}:{image_size}")
    g = grid_size(n)
    cell = image_size / g
    objs = []
    for k in sorted(rng.sample(range(g * g), n)):
        row, col = divmod(k, g)
        size = rng.choice(SIZES)
        d = image_size * (LARGE_FRAC if size == "large" else SMALL_FRAC)
        slack = max(0.0, (cell - d) / 2 - 1)  # keep a 1 px margin inside the cell
        cx = (col + 0.5) * cell + rng.uniform(-slack, slack)
        cy = (row + 0.5) * cell + rng.uniform(-slack, slack)
        objs.append(Obj(rng.choice(SHAPES), rng.choice(list(COLORS)), size, row, col, round(cx, 2), round(cy, 2), round(d, 2)))
    return Scene(seed, image_size, g, tuple(objs))


def rebind(scene: Scene, seed: int | str) -> Scene | None:
    """The same objects on the same cells, but dealt to the cells in another order (each object re-jittered in its
    new cell): a hard negative that differs from `scene` only in which object is where. None when no reordering
    changes what is where (one object, or all alike)."""
    kinds = [(o.shape, o.color, o.size) for o in scene.objects]
    if len(set(kinds)) < 2:
        return None
    rng = random.Random(f"rebind:{scene.seed}:{len(kinds)}:{seed}")
    cells = [(o.row, o.col) for o in scene.objects]
    order = list(range(len(kinds)))
    while [kinds[i] for i in order] == kinds:
        rng.shuffle(order)
    cell = scene.image_size / scene.grid
    objs = []
    for (row, col), i in zip(cells, order):
        o = scene.objects[i]
        slack = max(0.0, (cell - o.d) / 2 - 1)
        cx = (col + 0.5) * cell + rng.uniform(-slack, slack)
        cy = (row + 0.5) * cell + rng.uniform(-slack, slack)
        objs.append(Obj(o.shape, o.color, o.size, row, col, round(cx, 2), round(cy, 2), o.d))
    return Scene(f"{scene.seed}~{seed}", scene.image_size, scene.grid, tuple(objs))


def change_shape(scene: Scene, seed: int | str) -> Scene:
    """The same scene with one object drawn as another shape (same colour, size and place): a hard negative whose
    caption differs in one word. CLIP on plain captions can tell a batch's scenes apart by their colours alone, and
    its ViT then hardly sees shape (benchmarks/vision_shape_probe.py); these pairs can only be told apart by it."""
    rng = random.Random(f"change_shape:{scene.seed}:{len(scene.objects)}:{seed}")
    k = rng.randrange(len(scene.objects))
    o = scene.objects[k]
    new = replace(o, shape=rng.choice([s for s in SHAPES if s != o.shape]))
    return Scene(f"{scene.seed}~shape{seed}", scene.image_size, scene.grid, scene.objects[:k] + (new,) + scene.objects[k + 1:])


def patch_shapes(scene: Scene, grid: int) -> np.ndarray:
    """(grid * grid,) int64, one label per patch of a grid x grid split in reading order: 1 + the index in SHAPES of
    the object whose disc (diameter o.d) holds the patch's centre, the nearest centre winning; 0 where none does.
    The target of CLIP's dense shape loss (CLIPTrainConfig.dense_shape)."""
    side = scene.image_size / grid
    centre = (np.arange(grid) + 0.5) * side
    py, px = np.meshgrid(centre, centre, indexing="ij")
    labels = np.zeros(grid * grid, dtype=np.int64)
    if not scene.objects:
        return labels
    d2 = np.stack([(px.ravel() - o.cx) ** 2 + (py.ravel() - o.cy) ** 2 for o in scene.objects])  # (N, P)
    nearest = d2.argmin(0)
    inside = d2[nearest, np.arange(grid * grid)] <= np.array([o.d / 2 for o in scene.objects])[nearest] ** 2
    shape_ids = np.array([1 + SHAPES.index(o.shape) for o in scene.objects])
    labels[inside] = shape_ids[nearest[inside]]
    return labels


def bbox(o: Obj) -> tuple[float, float, float, float]:
    r = o.d / 2
    return (o.cx - r, o.cy - r, o.cx + r, o.cy + r)


def relation_holds(a: Obj, rel: str, b: Obj) -> bool:
    return {"left of": a.col < b.col, "right of": a.col > b.col, "above": a.row < b.row, "below": a.row > b.row}[rel]


def relation_clear(a: Obj, rel: str, b: Obj) -> bool:
    """A question about `rel` has a clear answer when the two lie in different columns (rows)."""
    return a.col != b.col if rel in ("left of", "right of") else a.row != b.row


# ---- rendering -------------------------------------------------------------------------------------------------
def shape_polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
    """Vertices of a shape of radius r centred at (cx, cy); None for the circle."""
    def ring(k, radii, start):
        return [(cx + radii[i % len(radii)] * math.cos(start + 2 * math.pi * i / k),
                 cy + radii[i % len(radii)] * math.sin(start + 2 * math.pi * i / k)) for i in range(k)]

    if shape == "circle":
        return None
    if shape == "square":
        s = r * 0.85
        return [(cx - s, cy - s), (cx + s, cy - s), (cx + s, cy + s), (cx - s, cy + s)]
    if shape == "triangle":
        return ring(3, [r], -math.pi / 2)
    if shape == "diamond":
        return ring(4, [r], -math.pi / 2)
    if shape == "star":
        return ring(10, [r, r * 0.45], -math.pi / 2)
    if shape == "cross":
        w = r * 0.36
        return [(cx - w, cy - r), (cx + w, cy - r), (cx + w, cy - w), (cx + r, cy - w), (cx + r, cy + w), (cx + w, cy + w),
                (cx + w, cy + r), (cx - w, cy + r), (cx - w, cy + w), (cx - r, cy + w), (cx - r, cy - w), (cx - w, cy - w)]
    raise ValueError(f"unknown shape {shape!r}")


def render(scene: Scene, supersample: int = 2) -> Image.Image:
    """The scene as an RGB image (drawn at `supersample` x the size, then box-filtered down: anti-aliased)."""
    s = supersample
    im = Image.new("RGB", (scene.image_size * s, scene.image_size * s), BACKGROUND)
    draw = ImageDraw.Draw(im)
    for o in scene.objects:
        cx, cy, r = o.cx * s, o.cy * s, o.d * s / 2
        poly = shape_polygon(o.shape, cx, cy, r)
        if poly is None:
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=COLORS[o.color])
        else:
            draw.polygon(poly, fill=COLORS[o.color])
    return im.reduce(s) if s > 1 else im


def render_array(scene: Scene) -> np.ndarray:
    """(H, W, 3) uint8."""
    return np.asarray(render(scene))


# ---- language --------------------------------------------------------------------------------------------------
def plural(shape: str) -> str:
    return shape + ("es" if shape.endswith("s") else "s")


def noun_phrase(count: int, size: str | None, color: str | None, shape: str | None) -> str:
    """noun_phrase(2, "small", "blue", "star") -> "two small blue stars"; missing attributes are left out."""
    noun = shape or "object"
    words = [w for w in (size, color, plural(noun) if count != 1 else noun) if w]
    return " ".join(["a" if count == 1 else NUMBERS[count]] + words)


def describe(o: Obj) -> str:
    return noun_phrase(1, o.size, o.color, o.shape)


def groups(scene: Scene) -> list[list[Obj]]:
    """Objects grouped by (size, colour, shape), in reading order of each group's first member."""
    out: dict[tuple, list[Obj]] = {}
    for o in scene.objects:
        out.setdefault((o.size, o.color, o.shape), []).append(o)
    return list(out.values())


def caption(scene: Scene) -> str:
    """A deterministic sentence: "a large red circle left of two small blue stars" (two groups in a clear
    relation), or the groups listed in reading order ("a small red circle, two large green crosses and a ...")."""
    gs = groups(scene)
    phrases = [noun_phrase(len(g), g[0].size, g[0].color, g[0].shape) for g in gs]
    if len(gs) == 1:
        return phrases[0]
    if len(gs) == 2:
        for rel in RELATIONS:
            if all(relation_holds(a, rel, b) for a in gs[0] for b in gs[1]):
                return f"{phrases[0]} {rel} {phrases[1]}"
        return f"{phrases[0]} and {phrases[1]}"
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def located_caption(scene: Scene) -> str:
    """Every object with its grid cell, in reading order: "a small red circle in row 1, column 2, a large blue star
    in row 2, column 1". Plain captions name where things are only through their order and the odd "left of";
    a CLIP tower trained on these must bind each object to its place in the pooled embedding."""
    return ", ".join(f"{describe(o)} in row {o.row + 1}, column {o.col + 1}" for o in scene.objects)


def list_answer(scene: Scene) -> str:
    return ", ".join(describe(o) for o in scene.objects)


# ---- questions -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class QA:
    type: str  # one of QA_TYPES
    question: str
    answer: str
    detail: str = ""  # e.g. the relation of a position question
    refs: tuple[int, ...] = ()  # indices in scene.objects of the objects the question names, in order
    mentions: tuple[int, ...] = ()  # per named object, where its phrase ends in `question` (a character offset)


def ends_of(question: str, phrases: list[str]) -> tuple[int, ...]:
    """Where each phrase ends in the question, found in order ("... the red star relative to the star?")."""
    ends, at = [], 0
    for p in phrases:
        at = question.index(f"the {p}", at) + len(f"the {p}")
        ends.append(at)
    return tuple(ends)


def matches(o: Obj, attrs: dict) -> bool:
    return all(getattr(o, k) == v for k, v in attrs.items())


def referent(scene: Scene, o: Obj, choices: list[tuple[str, ...]]) -> str | None:
    """The shortest description from `choices` (attribute-name tuples) that picks out `o` alone, e.g. "red star"."""
    for names in choices:
        key = tuple(getattr(o, k) for k in names)
        if sum(tuple(getattr(x, k) for k in names) == key for x in scene.objects) == 1:
            words = [getattr(o, k) for k in ("size", "color", "shape") if k in names]
            return " ".join(words if "shape" in names else words + ["object"])
    return None


COLOR_REFS = [("shape",), ("size", "shape")]
SHAPE_REFS = [("color",), ("size", "color")]
OBJECT_REFS = [("shape",), ("color", "shape"), ("size", "color", "shape")]


def color_questions(scene: Scene) -> list[QA]:
    out = []
    for i, o in enumerate(scene.objects):
        if ref := referent(scene, o, COLOR_REFS):
            q = f"what color is the {ref}?"
            out.append(QA("color", q, o.color, refs=(i,), mentions=ends_of(q, [ref])))
    return out


def shape_questions(scene: Scene) -> list[QA]:
    out = []
    for i, o in enumerate(scene.objects):
        if ref := referent(scene, o, SHAPE_REFS):
            q = f"what shape is the {ref}?"
            out.append(QA("shape", q, o.shape, refs=(i,), mentions=ends_of(q, [ref])))
    return out


def count_questions(scene: Scene, rng: random.Random) -> list[QA]:
    """How many objects of a colour, a shape, or both; a few zero counts included."""
    kinds = [{"color": rng.choice(list(COLORS))}, {"shape": rng.choice(SHAPES)},
             {"color": rng.choice(list(COLORS)), "shape": rng.choice(SHAPES)}]
    for o in rng.sample(scene.objects, min(3, len(scene.objects))):  # present ones too, so counts are not all 0
        kinds.append(rng.choice([{"color": o.color}, {"shape": o.shape}, {"color": o.color, "shape": o.shape}]))
    out, seen = [], set()
    for attrs in kinds:
        key = tuple(sorted(attrs.items()))
        if key in seen:
            continue
        seen.add(key)
        what = plural(attrs["shape"]) if "shape" in attrs else "objects"
        if "color" in attrs:
            what = f"{attrs['color']} {what}"
        out.append(QA("count", f"how many {what} are there?", str(sum(matches(o, attrs) for o in scene.objects))))
    return out


AXES = {"horizontally": ("left of", "right of"), "vertically": ("above", "below")}


def position_questions(scene: Scene, rng: random.Random, max_pairs: int = 8, reasoning: bool = True) -> list[QA]:
    """"horizontally, where is the red star relative to the circle?" -> "column 1 vs column 3: left" ("vertically,
    ..." -> "row 2 vs row 1: below"), for pairs in different columns (rows); the relation alone is in `detail`.

    The answer reasons first (each object's column, then the comparison): a one-word answer must locate two
    objects and compare them in one step, which small models learn only after a long plateau; located objects
    are a skill of its own ("where" questions) and comparing two digits just written is easy. The relation words
    are not in the question (a model would first learn to copy them); both orders of each pair occur, so the
    relations are balanced."""
    refs = {o: referent(scene, o, OBJECT_REFS) for o in scene.objects}
    named = [o for o in scene.objects if refs[o]]
    pairs = [(a, b) for a in named for b in named if a is not b]
    rng.shuffle(pairs)
    out = []
    for a, b in pairs[:max_pairs]:
        axes = [ax for ax, (r, _) in AXES.items() if relation_clear(a, r, b)]
        if not axes:
            continue
        axis = rng.choice(axes)
        first, second = AXES[axis]
        answer = (first if relation_holds(a, first, b) else second).removesuffix(" of")
        unit, ia, ib = ("column", a.col, b.col) if axis == "horizontally" else ("row", a.row, b.row)
        steps = f"{unit} {ia + 1} vs {unit} {ib + 1}: " if reasoning else ""
        q = f"{axis}, where is the {refs[a]} relative to the {refs[b]}?"
        out.append(QA("position", q, steps + answer, answer, (scene.objects.index(a), scene.objects.index(b)),
                      ends_of(q, [refs[a], refs[b]])))
    return out


def where_questions(scene: Scene) -> list[QA]:
    """"where is the red star?" -> "row 1, column 2" (grid cell, 1-based): locating by description, the stepping
    stone to left/right/above/below."""
    out = []
    for i, o in enumerate(scene.objects):
        if ref := referent(scene, o, OBJECT_REFS):
            q = f"where is the {ref}?"
            out.append(QA("where", q, f"row {o.row + 1}, column {o.col + 1}", refs=(i,), mentions=ends_of(q, [ref])))
    return out


def token_labels(scene: Scene, refs: tuple[int, ...], grid: int) -> list[int]:
    """Per image token on a grid x grid layout (reading order): k + 1 where the token shows the question's k-th
    named object (it holds the object's centre, or a quarter of it is covered by the object's box), else 0. The
    target of the grounding loss (`Recipe.ground_weight`): which image tokens a question is about."""
    side = scene.image_size / grid
    labels = [0] * (grid * grid)
    for k, i in reversed(list(enumerate(refs))):  # the first named object wins a shared token
        o = scene.objects[i]
        x0, y0, x1, y1 = bbox(o)
        for r in range(grid):
            for c in range(grid):
                w = max(0.0, min(x1, (c + 1) * side) - max(x0, c * side))
                h = max(0.0, min(y1, (r + 1) * side) - max(y0, r * side))
                if w * h >= 0.25 * side * side or (int(o.cy // side), int(o.cx // side)) == (r, c):
                    labels[r * grid + c] = k + 1
    return labels


def list_questions(scene: Scene) -> list[QA]:
    return [QA("list", "list all objects.", list_answer(scene))]


def questions(scene: Scene, seed: int | str = 0, types: tuple[str, ...] = QA_TYPES) -> list[QA]:
    """The questions of the given types about a scene (deterministic in the scene and seed)."""
    rng = random.Random(f"qa:{scene.seed}:{len(scene.objects)}:{seed}")
    makers = {"color": lambda: color_questions(scene), "shape": lambda: shape_questions(scene),
              "count": lambda: count_questions(scene, rng), "position": lambda: position_questions(scene, rng),
              "where": lambda: where_questions(scene), "list": lambda: list_questions(scene)}
    return [qa for t in types for qa in makers[t]()]


def answer_is_correct(scene: Scene, qa: QA) -> bool:
    """Re-derive the answer from the scene graph by parsing the question (an independent check of the generator)."""
    q = qa.question
    words = q.rstrip("?.").split()
    if qa.type == "list":
        return qa.answer == ", ".join(describe(o) for o in sorted(scene.objects, key=lambda o: (o.row, o.col)))

    def find(desc: list[str]) -> list[Obj]:
        attrs = {}
        for w in desc:
            if w in SIZES:
                attrs["size"] = w
            elif w in COLORS:
                attrs["color"] = w
            elif w in SHAPES:
                attrs["shape"] = w
        return [o for o in scene.objects if matches(o, attrs)]

    if qa.type == "where":
        hits = find(words[3:])  # "where is the ..."
        return len(hits) == 1 and qa.answer == f"row {hits[0].row + 1}, column {hits[0].col + 1}"
    if qa.type in ("color", "shape"):
        hits = find(words[4:])  # "what color is the ..."
        return len(hits) == 1 and getattr(hits[0], qa.type) == qa.answer
    if qa.type == "count":
        singular = {plural(s): s for s in SHAPES}
        attrs = {}
        for w in words[2:-2]:  # "how many ... are there"
            if w in COLORS:
                attrs["color"] = w
            elif w in singular:
                attrs["shape"] = singular[w]
        return str(sum(matches(o, attrs) for o in scene.objects)) == qa.answer
    if qa.type == "position":
        axis, _, rest = q.partition(", where is the ")
        left, _, right = rest[:-1].partition(" relative to the ")
        a, b = find(left.split()), find(right.split())
        if axis not in AXES or len(a) != 1 or len(b) != 1 or not relation_clear(a[0], AXES[axis][0], b[0]):
            return False
        first, second = AXES[axis]
        return qa.answer.split(": ")[-1] == (first if relation_holds(a[0], first, b[0]) else second).removesuffix(" of")
    raise ValueError(f"unknown question type {qa.type!r}")


# ---- interleaved documents -------------------------------------------------------------------------------------
INTRO = ("Here is a picture:", "Look at this scene.", "An image:", "Consider the following drawing.", "Next,")
OUTRO = ("It shows {c}.", "In it we see {c}.", "This picture has {c}.", "The scene contains {c}.")


def interleave(rng: random.Random, items: list) -> list:
    """[(scene, image), ...] -> ["Here is a picture:", image, "It shows <caption>.", "Next,", image, ...]."""
    doc = []
    for scene, image in items:
        doc += [rng.choice(INTRO), image, rng.choice(OUTRO).format(c=caption(scene))]
    return doc


def interleaved_document(seed: int | str, n_images: int = 2, n_range: tuple[int, int] = (1, 4),
                         image_size: int = 128) -> list[str | Scene]:
    """Text and scenes alternating: ["Here is a picture:", Scene, "It shows a red circle.", "Next,", Scene, ...]."""
    rng = random.Random(f"doc:{seed}")
    scenes = [make_scene(f"{seed}.{i}", rng.randint(*n_range), image_size) for i in range(n_images)]
    return interleave(rng, [(sc, sc) for sc in scenes])


def scene_texts(n_scenes: int = 2000, n_range: tuple[int, int] = (1, 16), seed: int = 0) -> list[str]:
    """Captions, questions and answers of many scenes as plain text: tokenizer training material."""
    out = []
    for i in range(n_scenes):
        scene = make_scene(f"text{seed}.{i}", 1 + i % (n_range[1] - n_range[0] + 1) + n_range[0] - 1, 128)
        out.append(caption(scene))
        for qa in questions(scene):
            out += [f"{qa.question} {qa.answer}", qa.answer]
    out += list(INTRO) + [o.format(c="") for o in OUTRO] + ["user", "assistant", "system"]
    out += [f"in the {w} image, what" for w in ORDINALS] + ["describe the image."] + list(NUMBERS)
    return out
