"""ShapeBind scenes, captions, questions, interleaved documents, real image-caption pairs, chat with images."""

import json
import random
from dataclasses import replace

import numpy as np
import pytest

from omnigpt.data import scenes as sb
from omnigpt.data.image_captions import emoji_available, emoji_pairs, openclipart_pairs, render_emoji
from omnigpt.data.vision_samples import Mix, ScenePool, collate, document_sample, random_sample, shapebind_tokenizer
from omnigpt.tokenizer.chat import image_urls, render_chat


@pytest.fixture(scope="module")
def tok():
    return shapebind_tokenizer(n_scenes=150)


def test_attribute_space():
    assert len(sb.SHAPES) >= 6 and len(sb.COLORS) >= 8 and len(sb.SIZES) == 2
    seen = set()
    for i in range(300):
        seen |= {(o.shape, o.color, o.size) for o in sb.make_scene(i, 8, 128).objects}
    assert len(seen) == len(sb.SHAPES) * len(sb.COLORS) * len(sb.SIZES)  # every combination occurs


def test_scene_determinism():
    for n in (1, 4, 16):
        a, b = sb.make_scene(7, n, 128), sb.make_scene(7, n, 128)
        assert a == b and np.array_equal(sb.render_array(a), sb.render_array(b))
        assert sb.Scene.from_dict(json.loads(json.dumps(a.to_dict()))) == a  # the scene graph round-trips as JSON
        assert sb.questions(a, 3) == sb.questions(b, 3)
    assert sb.make_scene(7, 8, 128) != sb.make_scene(8, 8, 128)


@pytest.mark.parametrize("size", [64, 128, 256])
def test_no_overlap_and_inside(size):
    for seed in range(40):
        scene = sb.make_scene(seed, 1 + seed % 16, size)
        boxes = [sb.bbox(o) for o in scene.objects]
        assert len({(o.row, o.col) for o in scene.objects}) == len(scene.objects)
        for i, (x0, y0, x1, y1) in enumerate(boxes):
            assert 0 <= x0 and 0 <= y0 and x1 <= size and y1 <= size
            for u0, v0, u1, v1 in boxes[i + 1:]:
                assert x1 <= u0 or u1 <= x0 or y1 <= v0 or v1 <= y0, f"overlap in scene {seed}"


def test_render_matches_graph():
    """The pixel at each object's centre has the object's colour (shapes are solid there, even stars and crosses)."""
    for seed in range(10):
        scene = sb.make_scene(seed, 9, 256)
        im = sb.render_array(scene).astype(int)
        for o in scene.objects:
            px = im[int(o.cy), int(o.cx)]
            assert np.abs(px - np.array(sb.COLORS[o.color])).max() <= 40, (o, px)


def test_questions_agree_with_scene_graph():
    counts = {t: 0 for t in sb.QA_TYPES}
    for seed in range(120):
        scene = sb.make_scene(seed, 1 + seed % 16, 128)
        for qa in sb.questions(scene, seed):
            assert sb.answer_is_correct(scene, qa), (scene, qa)
            counts[qa.type] += 1
    assert all(counts[t] > 20 for t in sb.QA_TYPES), counts
    scene = sb.make_scene(0, 4, 128)
    qa = next(q for q in sb.questions(scene) if q.type == "color")
    assert not sb.answer_is_correct(scene, sb.QA("color", qa.question, "no such color"))


def test_position_answers_balanced_and_relations():
    qas = [qa for s in range(200) for qa in sb.questions(sb.make_scene(s, 6, 128), s, ("position",))]
    for axis, (a, b) in (("horizontally", ("left", "right")), ("vertically", ("above", "below"))):
        answers = [qa.detail for qa in qas if qa.question.startswith(axis)]  # the relation; the answer reasons first
        assert set(answers) == {a, b} and 0.4 < answers.count(a) / len(answers) < 0.6
        assert not any(a in qa.question or b in qa.question for qa in qas if qa.question.startswith(axis))  # nothing to copy
    a = sb.Obj("circle", "red", "small", 0, 0, 10, 10, 5)
    b = sb.Obj("star", "blue", "large", 1, 2, 90, 50, 10)
    assert sb.relation_holds(a, "left of", b) and sb.relation_holds(a, "above", b) and sb.relation_holds(b, "below", a)


def test_caption_grammar():
    one = sb.Scene(0, 128, 2, (sb.Obj("circle", "red", "large", 0, 0, 30, 30, 24),))
    assert sb.caption(one) == "a large red circle"
    two = sb.Scene(0, 128, 2, (sb.Obj("circle", "red", "large", 0, 0, 30, 30, 24), sb.Obj("star", "blue", "small", 0, 1, 90, 30, 12),
                               sb.Obj("star", "blue", "small", 1, 1, 90, 90, 12)))
    assert sb.caption(two) == "a large red circle left of two small blue stars"
    assert sb.list_answer(two) == "a large red circle, a small blue star, a small blue star"
    three = sb.make_scene(3, 12, 128)
    assert " and " in sb.caption(three) and sb.caption(three) == sb.caption(sb.make_scene(3, 12, 128))
    assert sb.located_caption(two) == ("a large red circle in row 1, column 1, a small blue star in row 1, column 2, "
                                       "a small blue star in row 2, column 2")
    # a hard negative: the same objects on the same cells, dealt in another order
    twin = sb.rebind(three, 1)
    assert sorted((o.row, o.col) for o in twin.objects) == sorted((o.row, o.col) for o in three.objects)
    assert sorted(map(sb.describe, twin.objects)) == sorted(map(sb.describe, three.objects))
    assert sb.located_caption(twin) != sb.located_caption(three) and sb.rebind(one, 1) is None
    # a shape negative: one object drawn as another shape, everything else as it was
    other = sb.change_shape(three, 1)
    changed = [(a, b) for a, b in zip(three.objects, other.objects) if a != b]
    assert len(changed) == 1 and changed[0][0].shape != changed[0][1].shape
    assert replace(changed[0][1], shape=changed[0][0].shape) == changed[0][0]
    assert sb.caption(other) != sb.caption(three) and sb.change_shape(one, 1).objects[0].shape != "circle"
    # the dense shape labels: each 8 px patch whose centre lies in an object's disc names that object's shape
    labels = sb.patch_shapes(two, 16).reshape(16, 16)
    circle, star = 1 + sb.SHAPES.index("circle"), 1 + sb.SHAPES.index("star")
    assert labels[3, 3] == circle and labels[0, 0] == 0 and labels[3, 11] == star and labels[11, 11] == star
    assert (labels == circle).sum() == 3 * 3 - 1 and set(np.unique(labels)) == {0, circle, star}  # r = 12 px: 3 x 3 centres but a corner
    # every object of a crowded scene is named with the cell its "where" answer gives
    located = sb.located_caption(three)
    assert all(f"{sb.describe(o)} in {qa.answer}" in located for o in three.objects
               for qa in sb.where_questions(sb.Scene(0, 128, three.grid, (o,))))


def test_questions_name_their_objects_and_grounding_labels_mark_them(tok):
    scene, side = sb.make_scene(7, 4, 128), 128 / 8
    qas = sb.questions(scene, 0, ("color", "shape", "where", "position"))
    assert {qa.type for qa in qas} == {"color", "shape", "where", "position"}
    for qa in qas:
        named = [scene.objects[i] for i in qa.refs]
        o = named[0]
        assert len(named) == (2 if qa.type == "position" else 1)
        assert qa.answer == {"color": o.color, "shape": o.shape, "where": f"row {o.row + 1}, column {o.col + 1}"}.get(
            qa.type, qa.answer)
        if qa.type == "position":
            assert sb.relation_holds(o, qa.detail + (" of" if qa.detail in ("left", "right") else ""), named[1])
        labels = sb.token_labels(scene, qa.refs, 8)
        for k, x in enumerate(named):  # each named object's centre token carries its rank; nothing else is marked
            assert labels[int(x.cy // side) * 8 + int(x.cx // side)] == k + 1
        assert set(labels) == {0, *range(1, len(named) + 1)} and labels.count(0) >= 64 - 9 * len(named)
    # in a batch: grounded question samples carry their cells and the positions of their first answer, others nothing
    rng, mix = random.Random(0), Mix(qa=1.0, caption=1.0, ground=True, max_turns=2)
    samples = [random_sample(rng, tok, 64, mix, n_range=(2, 4), image_size=128, ground_grid=8) for _ in range(16)]
    batch = collate(samples, tok.pad_id, 128)
    grounded = [s.kind in ("qa:color", "qa:shape", "qa:where", "qa:position") for s in samples]
    assert any(grounded) and not all(grounded)
    for b, s in enumerate(samples):
        cells, answer = batch.ground.cells_BG[b], batch.ground.answer_BT[b]
        if grounded[b]:
            assert cells.max() >= 1 and cells.min() == 0 and len(cells) == 64
            learned = batch.targets[b] != -100
            assert answer.any() and bool(learned[answer].all())  # only learned positions ...
            first = tok.decode(batch.targets[b][answer].tolist())
            assert first.startswith(s.answer)  # ... of the first answer (its <|im_end|> too), not a later turn's
        else:
            assert (cells == -100).all() and not answer.any()
    with pytest.raises(ValueError, match="ground_grid"):
        random_sample(rng, tok, 64, mix)


def test_interleaved_document_and_sample(tok):
    doc = sb.interleaved_document(5, n_images=3)
    assert [type(x) for x in doc] == [str, sb.Scene, str] * 3
    s = document_sample(tok, 4, doc)
    assert len(s.images) == 3 and s.ids.count(tok.image_id) == 12
    learned = [i for i, m in zip(s.ids, s.mask) if m]
    assert tok.image_id not in learned and tok.image_start_id not in learned
    assert tok.decode([i for i in learned if i != tok.eot_id]).count("It shows") + tok.decode(learned).count("we see") \
        + tok.decode(learned).count("picture has") + tok.decode(learned).count("contains") == 3


def test_render_chat_with_images(tok):
    img = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    msgs = [{"role": "user", "content": [img, {"type": "text", "text": "and"}, {"type": "image_url", "image_url": "b.png"},
                                         {"type": "text", "text": " which is red?"}]},
            {"role": "assistant", "content": "the first"}]
    with pytest.raises(ValueError, match="image_url"):
        render_chat(tok, msgs)  # a text-only model refuses images
    ids, mask = render_chat(tok, msgs, image_tokens=3)
    assert ids.count(tok.image_id) == 6 and ids.count(tok.image_start_id) == 2 and ids.count(tok.image_end_id) == 2
    assert all(m == 0 for i, m in zip(ids, mask) if i in (tok.image_id, tok.image_start_id, tok.image_end_id))
    assert image_urls(msgs) == ["data:image/png;base64,AAAA", "b.png"]
    # a model trained with its images first gets them first, whatever order the client sends; images keep their order
    first, _ = render_chat(tok, msgs, image_tokens=1, images_first=True)
    run = "<|image_start|><|image|><|image_end|>"
    assert tok.decode(first).startswith(f"<|im_start|>user\n{run}{run}and which is red?<|im_end|>\n<|im_start|>assistant")
    text_only, _ = render_chat(tok, [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}])
    assert text_only == render_chat(tok, [{"role": "user", "content": "ab"}])[0]


@pytest.mark.parametrize("image_first", [False, True])
def test_grounded_questions_mark_where_they_name_each_object(tok, image_first):
    mix = Mix(qa=1.0, ground=True, image_first=image_first, qa_types=("color", "where", "position"), mentions=True)
    rng = random.Random(1)
    samples = [random_sample(rng, tok, 1, mix, n_range=(2, 4), image_size=64, ground_grid=4) for _ in range(24)]
    # a mix that does not ask for mentions (the default pointer learns at the answer) does not compute them
    rng = random.Random(1)
    plain = [random_sample(rng, tok, 1, replace(mix, mentions=False), n_range=(2, 4), image_size=64, ground_grid=4)
             for _ in range(24)]
    assert [s.ids for s in plain] == [s.ids for s in samples] and all(s.ground_mentions is None for s in plain)
    assert not bool(collate(plain, tok.pad_id, 64).ground.mention_BT.any())
    batch = collate(samples, tok.pad_id, 64)
    for b, s in enumerate(samples):
        image_at = s.ids.index(tok.image_id)
        question = tok.decode(s.ids[: s.prompt_len]).split("<|im_start|>user\n")[1].split("<|im_end|>")[0]
        question = question.replace("<|image_start|><|image|><|image_end|>", "")
        phrases = [p.removesuffix(" relative to").removesuffix("?") for p in question.split(" the ")[1:]]
        assert len(s.ground_mentions) == len(phrases) == (2 if s.kind == "qa:position" else 1)
        for k, (t, phrase) in enumerate(zip(s.ground_mentions, phrases)):
            # the marked token is the phrase's last word, in the user's question (after the image when it comes first)
            assert tok.decode(s.ids[: t + 1]).endswith(" " + phrase) and (t > image_at) == image_first
            assert int(batch.ground.mention_BT[b, t]) == k + 1
        assert int((batch.ground.mention_BT[b] > 0).sum()) == len(phrases)


def test_samples_batches_and_pool(tok):
    pool = ScenePool(40, (1, 4), 64)
    assert pool.images.shape == (40, 64, 64, 3) and np.array_equal(pool.images[5], sb.render_array(pool.scenes[5]))
    rng = random.Random(0)
    mix = Mix(qa=1, caption=1, multi=1, doc=1, pair=1, text=1)
    samples = [random_sample(rng, tok, 4, mix, n_range=(1, 4), image_size=64, pool=pool) for _ in range(30)]
    batch = collate(samples, tok.pad_id, 64)
    assert batch.images.shape[0] == sum(len(s.images) for s in samples) == int((batch.inputs == tok.image_id).sum()) // 4
    assert not (batch.targets == tok.image_id).any()  # image placeholders are never targets
    for s in samples:
        if s.kind.startswith("qa:"):
            assert tok.decode(s.ids[s.prompt_len:]).startswith(s.answer + "<|im_end|>")


def test_emoji_and_clipart_pairs():
    if not emoji_available():
        pytest.skip("fonts-noto-color-emoji is not installed")
    pairs = emoji_pairs()
    assert len(pairs) > 1000
    camel = next(p for p in pairs if p.key == "\U0001F42B")
    assert camel.caption == "bactrian camel"
    im = np.asarray(render_emoji(camel.key, 64))
    assert im.shape == (64, 64, 3) and im.std() > 10
    clip = openclipart_pairs()
    if clip:
        assert all(p.caption for p in clip[:50])
