"""Alignment math and data against hand computations and reference loops (no training here)."""

import json
import math

import pytest
import torch

from omnigpt.align.data import (
    IGNORE, Conversation, DataError, batch_indices, comparison_batch, encode_answer, encode_comparisons, encode_sft,
    eval_shards, load_comparisons, load_conversations, load_prompts, make_batch, pack,
)
from omnigpt.align.dpo import dpo_loss
from omnigpt.align.grpo import group_advantages
from omnigpt.align.modeling import response_logprobs
from omnigpt.align.ppo import KLController, gae, kl_penalized_rewards, ppo_losses
from omnigpt.align.reward import preference_loss, ranking_pairs
from omnigpt.data import chat_tasks as ct
from omnigpt.data import scenes as sb
from omnigpt.tokenizer.text import train_bpe


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "text.txt"
    path.write_text("\n".join(ct.pretrain_text(200, 0)) + "\nWhat is the answer? Reply in JSON with keys a and b.\n")
    return train_bpe([str(path)], 320)


# ---- preference losses -----------------------------------------------------------------------------------------
def test_dpo_loss_matches_hand_computation():
    # beta * ((-5 - -6) - (-7 - -6)) = 0.1 * 2 = 0.2;  -log sigmoid(0.2) = log(1 + e^-0.2)
    pairs = ranking_pairs([2])
    loss, correct, margin = dpo_loss(torch.tensor([-5.0, -7.0]), torch.tensor([-6.0, -6.0]), pairs, beta=0.1)
    assert loss.item() == pytest.approx(0.5981388693815918, abs=1e-6)
    assert margin.item() == pytest.approx(0.2) and correct.item() == 1.0
    # a K=3 ranking: the mean over its 3 pairs
    logps, refs = torch.tensor([-1.0, -2.0, -4.0]), torch.zeros(3)
    loss, _, _ = dpo_loss(logps, refs, ranking_pairs([3]), beta=0.5)
    by_hand = sum(math.log1p(math.exp(-0.5 * (logps[i] - logps[j]).item())) for i, j in ((0, 1), (0, 2), (1, 2))) / 3
    assert loss.item() == pytest.approx(by_hand, abs=1e-6)


def test_soft_labels_and_ties():
    pairs = ranking_pairs([2], p_chosen=[0.75])
    loss, correct, _ = preference_loss(torch.tensor([1.0, 0.0]), pairs)
    expected = -(0.75 * math.log(1 / (1 + math.exp(-1))) + 0.25 * math.log(1 / (1 + math.exp(1))))
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert preference_loss(torch.zeros(2), pairs)[1].item() == 0.5  # a tie is half right


def test_k_way_ranking_expands_to_all_pairs_in_one_element(tok, tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"prompt": [{"role": "user", "content": "Q"}], "ranking": ["a", "b", "c", "d"]}) + "\n"
                    + json.dumps({"prompt": "Q2", "chosen": "x", "rejected": "y"}) + "\n")
    comps = load_comparisons(path)
    assert [len(c.answers) for c in comps] == [4, 2]
    items, skipped = encode_comparisons(tok, comps, 256)
    batch, sizes, p = comparison_batch(items, tok.pad_id)
    assert sizes == [4, 2] and batch.ids.shape[0] == 6 and not skipped
    pairs = ranking_pairs(sizes, p)
    got = sorted(zip(pairs.better.tolist(), pairs.worse.tolist()))
    assert got == [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3), (4, 5)]  # best first: every earlier beats every later
    w = dict(zip(zip(pairs.better.tolist(), pairs.worse.tolist()), pairs.weight.tolist()))
    assert w[(0, 1)] == pytest.approx(1 / 12) and w[(4, 5)] == pytest.approx(1 / 2)  # each element weighs 1/2 in all
    assert pairs.weight.sum().item() == pytest.approx(1.0)
    # scores that follow the ranking give a lower loss than reversed ones, and accuracy 1
    good = torch.tensor([3.0, 2.0, 1.0, 0.0, 1.0, 0.0])
    assert preference_loss(good, pairs)[0] < preference_loss(-good, pairs)[0]
    assert preference_loss(good, pairs)[1].mean().item() == 1.0


# ---- PPO pieces --------------------------------------------------------------------------------------------------
def test_gae_matches_reference_loop():
    torch.manual_seed(0)
    B, R, gamma, lam = 4, 7, 0.97, 0.9
    lengths = [7, 3, 1, 5]
    mask = torch.tensor([[1.0] * n + [0.0] * (R - n) for n in lengths])
    rewards, values = torch.randn(B, R), torch.randn(B, R)
    adv, ret = gae(rewards, values, mask, gamma, lam)
    for b, n in enumerate(lengths):
        for t in range(n):  # the textbook sum: A_t = sum_l (gamma lam)^l delta_{t+l}
            a = 0.0
            for k in range(t, n):
                v_next = values[b, k + 1].item() if k + 1 < n else 0.0
                delta = rewards[b, k].item() + gamma * v_next - values[b, k].item()
                a += (gamma * lam) ** (k - t) * delta
            assert adv[b, t].item() == pytest.approx(a, abs=1e-5)
            assert ret[b, t].item() == pytest.approx(a + values[b, t].item(), abs=1e-5)
        assert adv[b, n:].abs().sum() == 0


def test_kl_penalty_and_adaptive_controller():
    logp = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -1.0, 0.0]])
    ref = torch.tensor([[-1.5, -2.0, -1.0], [-1.0, -0.5, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    rewards, kl = kl_penalized_rewards(torch.tensor([2.0, -1.0]), logp, ref, mask, beta=0.1)
    torch.testing.assert_close(kl, torch.tensor([[0.5, 0.0, -2.0], [0.5, -0.5, 0.0]]))
    # -beta * kl per token, the score added on each row's last response token
    torch.testing.assert_close(rewards, torch.tensor([[-0.05, 0.0, 0.2 + 2.0], [-0.05, 0.05 - 1.0, 0.0]]))
    fixed = KLController(0.1)
    assert fixed.update(100.0, 64) == 0.1
    ctl = KLController(0.1, target=6.0, horizon=10000)
    assert ctl.update(9.0, 100) == pytest.approx(0.1 * (1 + 0.2 * 100 / 10000))  # error clipped at +0.2
    assert ctl.update(5.4, 100) == pytest.approx(0.1 * (1 + 0.2 * 0.01) * (1 - 0.1 * 0.01))


def test_ppo_losses_clip():
    mask = torch.ones(1, 3)
    old = torch.zeros(1, 3)
    logp = torch.log(torch.tensor([[1.5, 1.0, 0.5]]))  # ratios 1.5, 1.0, 0.5
    adv = torch.tensor([[1.0, 1.0, -1.0]])
    out = ppo_losses(logp, old, adv, torch.zeros(1, 3), torch.zeros(1, 3), torch.zeros(1, 3), mask, 0.2, 0.2)
    # token 0: max(-1.5, -1.2) = -1.2; token 1: -1; token 2: max(0.5, 0.8) = 0.8
    assert out["pg_loss"].item() == pytest.approx((-1.2 - 1.0 + 0.8) / 3)
    assert out["clipfrac"].item() == pytest.approx(2 / 3)
    values, old_v, ret = torch.tensor([[1.0, 0, 0]]), torch.zeros(1, 3), torch.tensor([[2.0, 0, 0]])
    out = ppo_losses(old, old, adv, values, old_v, ret, mask, 0.2, 0.2)
    assert out["vf_loss"].item() == pytest.approx(0.5 * max(1.0, 1.8 ** 2) / 3)  # the clipped value is further off


def test_group_advantages():
    adv = group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0]), 4)
    r = torch.tensor([1.0, 0.0, 0.0, 1.0])
    torch.testing.assert_close(adv[:4], (r - 0.5) / (r.std() + 1e-4))
    assert adv[4:].abs().sum() == 0  # a group where every answer is equal teaches nothing


# ---- data ------------------------------------------------------------------------------------------------------
def test_bad_input_is_reported_with_line_numbers(tmp_path):
    sft = tmp_path / "sft.jsonl"
    sft.write_text("\n".join([
        json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}),
        "",
        '{"messages": [',  # line 3: broken JSON
        json.dumps({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}]}),  # line 4
        json.dumps({"messages": [{"role": "robot", "content": "x"}]}),  # line 5
    ]) + "\n")
    with pytest.raises(DataError) as e:
        load_conversations(sft)
    msg = str(e.value)
    assert "3 bad line(s)" in msg and "line 3: not valid JSON" in msg
    assert "line 4: conversation has no assistant turn" in msg and "line 5:" in msg and "line 1" not in msg

    comp = tmp_path / "comp.jsonl"
    comp.write_text("\n".join([
        json.dumps({"prompt": "q", "chosen": "same", "rejected": "same"}),
        json.dumps({"prompt": "q", "ranking": ["a", "b", "a"]}),
        json.dumps({"prompt": "q", "chosen": "a"}),
        json.dumps({"prompt": "q", "chosen": "a", "rejected": [{"role": "user", "content": "b"}]}),
    ]) + "\n")
    with pytest.raises(DataError) as e:
        load_comparisons(comp)
    msg = str(e.value)
    assert "line 1: chosen and rejected answers are identical" in msg
    assert "line 2: ranking[0] and ranking[2] are identical" in msg
    assert 'line 3: a comparison needs "chosen" and "rejected"' in msg
    assert "line 4: rejected must end with an assistant message" in msg

    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(DataError, match="no records"):
        load_conversations(empty)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"messages": [{"role": "user", "content": "q"}]}) + "\n")
    with pytest.raises(DataError, match="line 1 has no \"task\" spec"):
        load_prompts(prompts, need_task=True)


def test_sft_targets_only_assistant_tokens_and_packing(tok):
    conv = Conversation([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 2?"},
                         {"role": "assistant", "content": "4."}])
    ex, cut = encode_sft(tok, conv, 256)
    learned = [t for t in ex.targets if t != IGNORE]
    assert not cut and tok.decode(learned) == "4.<|im_end|>"
    rows = pack([ex, ex, ex], seq_len=2 * len(ex.inputs) + 1)
    assert rows["inputs"].shape[0] == 2  # two fit in the first row, the third starts a new one
    assert rows["doc_ids"][0].tolist().count(1) == len(ex.inputs) and rows["pos"][0, len(ex.inputs)] == 0
    assert rows["targets"][0, -1] == IGNORE and rows["doc_ids"][0, -1] == -1


def test_answer_tokens_line_up_with_generation_prompt(tok):
    prompt = [{"role": "user", "content": "What color is snow?"}]
    p, a, m = encode_answer(tok, prompt, [{"role": "assistant", "content": "White."}])
    assert a[-1] == tok.im_end_id and all(m) and tok.decode(a) == "White.<|im_end|>"
    # make_batch + response_logprobs == log-probs read off a forward pass over the whole row
    from omnigpt.config import tiny
    from omnigpt.model.transformer import Transformer

    torch.manual_seed(0)
    model = Transformer(tiny(vocab_size=tok.padded_vocab_size(), d_model=32, n_layers=1))
    short = p[:-3]
    batch = make_batch([p, short], [a, a[:2]], pad_id=tok.pad_id)
    lp = response_logprobs(model, batch)
    full = torch.log_softmax(model(torch.tensor([p + a])).logits[0], -1)
    manual = torch.stack([full[len(p) - 1 + j, a[j]] for j in range(len(a))])
    torch.testing.assert_close(lp[0], manual, atol=1e-5, rtol=0)
    assert batch.mask[1].tolist() == [1.0, 1.0] + [0.0] * (len(a) - 2) and lp[1, 2:].abs().sum() == 0


def test_batch_order_is_a_function_of_the_step():
    one = batch_indices(10, 3, 4, seed=1)
    two = batch_indices(10, 3, 2, 0, 2, seed=1) + batch_indices(10, 3, 2, 1, 2, seed=1)
    assert one == two and len(set(batch_indices(10, 0, 10))) == 10
    shards = [list(eval_shards(5, 2, r, 2)) for r in range(2)]
    assert [len(s) for s in shards] == [2, 2]  # the same number of batches on every rank
    seen = sorted(i for s in shards for idx, w in s for i, x in zip(idx, w) if x)
    assert seen == [0, 1, 2, 3, 4]


# ---- synthetic tasks -------------------------------------------------------------------------------------------
def test_chat_tasks_checker_accepts_references_and_rejects_flaws(tmp_path):
    for split in ("train", "heldout"):
        for t in ct.sample_tasks(300, seed=3, split=split):
            assert ct.check(t.spec, t.reference), (t.messages, t.reference)
            for reply, _ in t.flawed:
                assert not ct.check(t.spec, reply), (t.messages, reply)
    assert ct.check({"kind": "json", "a": 7, "b": "blue"}, ' {"b": "Blue", "a": 7} ')
    assert not ct.check({"kind": "json", "a": 7, "b": "blue"}, '{"a": 7, "b": "blue", "c": 1}')
    assert not ct.check({"kind": "one_word", "answer": "blue"}, "Blue sky.")
    # the held-out split shares no (kind, fact, rule) combination with the train split
    keys = lambda split: {json.dumps(t.spec, sort_keys=True) + t.messages[-1]["content"] for t in ct.sample_tasks(400, 5, split)}  # noqa: E731
    assert not keys("train") & keys("heldout")
    files = ct.write_task_files(tmp_path, n_sft=40, n_pairs=40, n_prompts=40, n_heldout=20, n_pretrain_docs=10)
    assert len(load_conversations(files["sft.jsonl"])) == 40
    comps = load_comparisons(files["comparisons.jsonl"])
    assert {len(c.answers) for c in comps} >= {2, 3}
    assert all(p.task for p in load_prompts(files["heldout.jsonl"], need_task=True))


def test_shapebind_tasks_are_scenes_as_text_with_answers_the_scene_graph_gives():
    tasks = [t for split in ("train", "heldout") for t in ct.sample_tasks(120, 7, split, kinds=("shapebind",))]
    assert {t.spec["type"] for t in tasks} == set(ct.SCENE_QA_TYPES)
    for t in tasks:
        seed, n = t.spec["scene"]
        scene = sb.make_scene(seed, n)  # the scenes.py generator's own scene, also renderable to pixels
        text, _, question = t.messages[-1]["content"].partition(". ")
        # the text carries the whole scene graph: every object's size, colour, shape and grid cell
        assert ct.parse_scene_text(text) == [(o.size, o.color, o.shape, o.row, o.col) for o in scene.objects]
        # the answer, re-derived from the scene graph by scenes.py's independent question parser
        answer = {"position": lambda: f"{t.spec['unit']} {t.spec['steps'][0]} vs {t.spec['unit']} {t.spec['steps'][1]}: "
                                      f"{t.spec['answer']}"}.get(t.spec["type"], lambda: str(t.spec["answer"]))()
        assert sb.answer_is_correct(scene, sb.QA(t.spec["type"], question[:1].lower() + question[1:], answer)), t.messages
        assert ct.check(t.spec, t.reference)
        assert not any(ct.check(t.spec, r) for r, _ in t.flawed)
        assert {k for _, k in t.flawed} == {1, 2}  # K=3 rankings: correct > one flaw > two flaws
    # held-out prompts ask about scenes that no train prompt shows
    scenes = lambda split: {t.spec["scene"][0] for t in ct.sample_tasks(300, 5, split, kinds=("shapebind",))}  # noqa: E731
    assert not scenes("train") & scenes("heldout")
    # the checker: hedges, unstated or misread cells and spelled-out numbers fail; a terse right answer passes
    color = {"kind": "shapebind", "type": "color", "answer": "red"}
    assert ct.check(color, "Red.") and ct.check(color, "The small star is RED.")
    assert not ct.check(color, "The star is red or blue.") and not ct.check(color, "I cannot tell.")
    shape = {"kind": "shapebind", "type": "shape", "answer": "cross"}
    assert ct.check(shape, "The red object is a cross.") and not ct.check(shape, "Two crosses and a star.")
    count = {"kind": "shapebind", "type": "count", "answer": 2}
    assert ct.check(count, "There are 2.") and not ct.check(count, "There are two.") and not ct.check(count, "2 or 3")
    pos = {"kind": "shapebind", "type": "position", "answer": "left", "unit": "column", "steps": [1, 2]}
    assert ct.check(pos, "Column 1 vs column 2: left.") and ct.check(pos, "Left.")
    assert not ct.check(pos, "Column 2 vs column 1: left.") and not ct.check(pos, "left or right")


def test_task_files_with_and_without_shapebind(tmp_path):
    files = ct.write_task_files(tmp_path / "a", n_sft=50, n_pairs=20, n_prompts=20, n_heldout=20, n_pretrain_docs=200)
    kinds = [p.task["kind"] for p in load_prompts(files["heldout.jsonl"], need_task=True)]
    assert kinds.count("shapebind") == 4  # kinds in turn
    prose = files["pretrain.txt"].read_text().splitlines()
    scene_docs = [d for d in prose if d.startswith("Scene: ")]
    assert 20 < len(scene_docs) < 80  # scene_frac 0.2 of 200
    held = [p for p in load_prompts(files["heldout.jsonl"]) if p.task["kind"] == "shapebind"]
    assert all(ct.split_of(f"shapebind|{p.task['scene'][0]}") == "heldout" for p in held)
    # no held-out scene appears in the pretraining prose (its scenes come from the train split)
    pretrain_scenes = {d.split(". ")[0] for d in scene_docs}
    assert all(ct.parse_scene_text(s + ".") for s in pretrain_scenes)
    assert not pretrain_scenes & {p.messages[-1]["content"].split(". ")[0] for p in held}
    # without the kind: no scenes in the prose, and the four older kinds only
    old = ct.write_task_files(tmp_path / "b", n_sft=10, n_pairs=10, n_prompts=10, n_heldout=10, n_pretrain_docs=50,
                              kinds=("arith", "one_word", "json", "system"))
    assert not any(d.startswith("Scene: ") for d in old["pretrain.txt"].read_text().splitlines())
    assert {p.task["kind"] for p in load_prompts(old["prompts.jsonl"])} <= {"arith", "one_word", "json", "system"}
