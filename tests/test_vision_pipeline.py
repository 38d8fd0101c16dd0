"""The ShapeBind recipe end to end at toy size (CLIP, LM warm-up, align, joint, evaluation, checkpoints) and the
`omnigpt vision` commands."""

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from omnigpt import cli
from omnigpt.evals.vqa import format_table
from omnigpt.model.multimodal import load_vlm
from omnigpt.train.vlm import Clock, build_vlm, lr_at, quick_recipe, run_recipe, vlm_stages


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def toy_recipe():
    return quick_recipe().override([
        "image_size=32", "n_eval=[1,3]", "per_type=2", "pool_scenes=40", "batch_size=4", "clip_batch_size=8",
        'vision={"patch_size": 8, "d_model": 32, "n_layers": 1, "n_heads": 2, "d_ff": 64}',
        'text={"d_model": 32, "n_layers": 2, "n_heads": 2, "n_kv_heads": 1, "d_ff": 64, "max_seq_len": 192}',
        "steps_clip=3", "steps_lm=3", "steps_align=3", "steps_joint=4", "n_latents=4",
    ])


def test_schedule_and_clock():
    assert lr_at(0, 0.0, 10) == pytest.approx(0.1) and lr_at(10, 0.0, 10) == pytest.approx(1.0)
    assert lr_at(50, 1.0, 10) == pytest.approx(0.1) and lr_at(50, 0.5, 10) == pytest.approx(0.55)
    assert lr_at(4, 0.5, 10) == pytest.approx(0.5 * 0.55)  # a stage that starts mid-schedule ramps up to where it is
    clock = Clock(steps=100, budget_s=1e-9)
    assert clock.done(0) and clock.progress(0) >= 1.0  # a spent time budget ends the stage
    assert not Clock(steps=100).done(99) and Clock(steps=100).done(100)


def test_recipe_vlm_options_reach_the_model():
    from omnigpt.config import ModelConfig
    from omnigpt.data.vision_samples import shapebind_tokenizer
    from omnigpt.model.transformer import Transformer
    from omnigpt.model.vision import ViT, VisionConfig

    r = toy_recipe().override(['vision={"patch_size": 8, "d_model": 32, "n_layers": 3, "n_heads": 2, "d_ff": 64}',
                               "feature_layer=-2", "mrope=true", "pos2d_scale=0.5"])
    tok = shapebind_tokenizer()
    vision = ViT(VisionConfig(image_size=r.image_size, pool="mean", **r.vision))
    lm = Transformer(ModelConfig(vocab_size=tok.padded_vocab_size(), **r.text))
    inline, cross = build_vlm(r, "inline", tok, vision, lm), build_vlm(r, "cross", tok, vision, lm)
    assert (inline.cfg.feature_layer, inline.cfg.mrope, inline.cfg.pos2d_scale) == (-2, True, 0.5)
    assert cross.cfg.feature_layer == -2 and not cross.cfg.mrope  # M-RoPE is inline-only
    # the grounding loss on an LM layer, with labelled question samples in the joint stage; cross needs latents on a grid
    assert inline.cfg.ground_layer == cross.cfg.ground_layer == r.ground_layer and cross.cfg.resampler_grid
    (_, joint), (_, cross_joint) = vlm_stages(r, "inline"), vlm_stages(r, "cross")
    assert (joint.ground_weight, joint.mix.ground) == (cross_joint.ground_weight, cross_joint.mix.ground) == (r.ground_weight, True)
    align, joint = vlm_stages(r.override(["compile=true"]), "cross")
    assert joint.compile and not align.compile and not cross_joint.compile  # compile time is spent where the budget is
    assert build_vlm(r.override(["ground_weight=0"]), "inline", tok, vision, lm).cfg.ground_layer is None
    free = r.override(["resampler_grid=false"])
    assert build_vlm(free, "cross", tok, vision, lm).cfg.ground_layer is None and vlm_stages(free, "cross")[1].ground_weight == 0
    last = build_vlm(r.override(["feature_layer=-1"]), "inline", tok, vision, lm)
    pixels = torch.randn(1, 3, r.image_size, r.image_size)
    with torch.no_grad():
        assert not torch.allclose(inline.encode_images(pixels), last.encode_images(pixels))  # another block's tokens


def test_curriculum_trains_first_on_scenes_of_few_objects():
    from omnigpt.config import ModelConfig
    from omnigpt.data.vision_samples import ScenePool, shapebind_tokenizer
    from omnigpt.model.transformer import Transformer
    from omnigpt.model.vision import ViT, VisionConfig
    from omnigpt.train.vlm import DataConfig, train_stage

    r = toy_recipe().override(["curriculum_n=2", "curriculum_frac=0.25", "steps_joint=8", "budget_joint_s=40"])
    align, few, rest = vlm_stages(r, "cross")
    assert (few.name, few.n_range, few.steps, few.budget_s, few.schedule) == ("joint_few", (1, 2), 2, 10.0, (0.0, 0.25))
    assert (rest.name, rest.n_range, rest.steps, rest.budget_s, rest.schedule) == ("joint", None, 6, 30.0, (0.25, 1.0))
    assert few.ground_weight == rest.ground_weight == r.ground_weight and align.n_range is None
    for bad in (["curriculum_n=4"], ["curriculum_n=2", "curriculum_frac=1"]):  # n_train is (1, 4): nothing would follow
        with pytest.raises(ValueError, match="curriculum_n="):
            vlm_stages(r.override(bad), "cross")

    class CountingPool(ScenePool):  # the scenes the stages draw, by their number of objects
        seen: list[int] = []

        def draw(self, rng, n_range):
            scene, image = super().draw(rng, n_range)
            self.seen.append(len(scene.objects))
            return scene, image

    tok = shapebind_tokenizer()
    pool = CountingPool(r.pool_scenes, r.n_train, r.image_size, "pool")
    vision = ViT(VisionConfig(image_size=r.image_size, pool="mean", **r.vision))
    vlm = build_vlm(r, "cross", tok, vision, Transformer(ModelConfig(vocab_size=tok.padded_vocab_size(), **r.text)))
    data = DataConfig(batch_size=r.batch_size, n_range=r.n_train, image_size=r.image_size, max_len=r.text["max_seq_len"] + 1)
    first_lr = {}
    for stage, most in ((few, 2), (rest, 4)):
        pool.seen.clear()
        lines = []
        train_stage(vlm, replace(stage, budget_s=None), tok, data, image_tokens=vlm.cfg.image_tokens,
                    vision_cfg=vlm.cfg.vision, log=lines.append, log_every=1, pool=pool)
        assert pool.seen and max(pool.seen) == most
        first_lr[stage.name] = float(lines[0].split(" lr ")[1].split()[0])
    # the joint stage's learning rate goes on from a quarter into the cosine, not from its start
    assert first_lr["joint"] == pytest.approx(few.lr * lr_at(0, 0.25, 1), rel=1e-2) and first_lr["joint"] < 0.9 * few.lr


def test_recipe_end_to_end(tmp_path):
    s = run_recipe(toy_recipe(), ["inline", "cross"], tmp_path, torch.device("cpu"), log=lambda *a: None)
    for mode in ("inline", "cross"):
        assert [r["steps"] for r in s["train"][mode]] == [3, 4]
        res = s["results"][mode]
        assert set(res["by_n"]) == {1, 3} and all(0 <= a <= 1 for row in res["by_n"].values() for a in row.values())
        vlm = load_vlm(tmp_path / mode)
        assert vlm.cfg.fusion == mode
        assert json.loads((tmp_path / "summary.json").read_text())["results"][mode]["per_type"] == 2
    table = format_table(s["results"], s["extra"])
    assert "inline" in table and "cross" in table and "position" in table


def test_cli_scenes_and_ask(tmp_path, capsys):
    assert cli.main(["vision", "scenes", "--out", str(tmp_path / "s"), "--n", "3", "--count", "2", "--image-size", "64",
                     "--interleaved"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "s" / "scenes.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and len(rows[0]["graph"]["objects"]) == 3 and rows[0]["questions"]
    assert (tmp_path / "s" / "scene_1.png").is_file() and (tmp_path / "s" / "document.txt").is_file()
    run_recipe(toy_recipe(), ["cross"], tmp_path / "m", torch.device("cpu"), log=lambda *a: None, evaluate=False)
    capsys.readouterr()
    assert cli.main(["vision", "ask", str(tmp_path / "m" / "cross"), "--image", str(tmp_path / "s" / "scene_0.png"),
                     "--image", str(tmp_path / "s" / "scene_1.png"), "--question", "what color is the star?",
                     "--max-new-tokens", "3", "--device", "cpu"]) == 0


def test_clip_vit_cache_trains_once_per_setting(tmp_path):
    from omnigpt.data.vision_samples import ScenePool, shapebind_tokenizer
    from omnigpt.train.vlm import clip_vit

    r, tok, cpu = toy_recipe(), shapebind_tokenizer(), torch.device("cpu")
    pool = ScenePool(r.pool_scenes, r.n_train, r.image_size, "pool")
    lines = []
    torch.manual_seed(0)
    trained, res = clip_vit(r, tok, pool, cpu, log=lines.append, cache_dir=tmp_path)
    assert res["steps"] == 3 and len(list(tmp_path.glob("vit_*.safetensors"))) == 1
    loaded, again = clip_vit(r, tok, pool, cpu, log=lines.append, cache_dir=tmp_path)
    assert again["retrieval_top1"] == res["retrieval_top1"] and again["from"].endswith(".safetensors")
    for (name, a), (_, b) in zip(trained.state_dict().items(), loaded.state_dict().items()):  # kept in bf16
        assert b.dtype == torch.float32
        torch.testing.assert_close(b, a.to(torch.bfloat16).float(), rtol=0, atol=0, msg=name)
    # another CLIP setting is another ViT; a setting CLIP does not read (the LM's) shares it, as does the same
    # number spelled as an int (--set clip_hard_negatives=0 for the default 0.0)
    clip_vit(r.override(["steps_clip=2"]), tok, pool, cpu, log=lines.append, cache_dir=tmp_path)
    clip_vit(r.override(['text={"d_model": 64, "n_layers": 1, "n_heads": 2, "n_kv_heads": 1, "d_ff": 64, "max_seq_len": 192}',
                         "clip_hard_negatives=0"]), tok, pool, cpu, log=lines.append, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("vit_*.safetensors"))) == 2 and sum("CLIP-trained ViT from" in line for line in lines) == 2


def test_clip_dense_shape_loss_teaches_the_patches_their_objects_shape():
    from omnigpt.data import scenes as sb
    from omnigpt.data.vision_samples import ScenePool, shapebind_tokenizer
    from omnigpt.train.vlm import clip_vit

    r = toy_recipe().override(["image_size=64", "steps_clip=80", "clip_dense_shape=1.0", "n_train=[1,3]"])
    tok = shapebind_tokenizer()
    pool = ScenePool(200, r.n_train, r.image_size, "pool")
    lines = []
    torch.manual_seed(0)
    _, res = clip_vit(r, tok, pool, torch.device("cpu"), log=lines.append)
    dense = [float(line.split("dense shape ")[1].split(")")[0]) for line in lines if "dense shape" in line]
    # what a head that ignores the image can do: the entropy of the labels' marginal over these scenes
    labels = np.concatenate([sb.patch_shapes(sb.make_scene(f"m{i}", 1 + i % 3, 64), 8) for i in range(300)])
    p = np.bincount(labels) / len(labels)
    marginal = float(-(p[p > 0] * np.log(p[p > 0])).sum())
    assert res["steps"] == 80 and dense[0] > marginal > res["dense_loss"]
    assert 0.0 <= res["object_shape_top1"] <= 1.0 and "shape top-1 on object patches" in lines[-1]
