"""ViT (HF CLIP / SigLIP parity), CLIP objective, VLM fusion (inline splice, gated cross-attention), generation,
save/load, and a tiny VLM that learns a handful of ShapeBind questions."""

import copy

import pytest
import torch

from omnigpt.config import tiny
from omnigpt.data import scenes as sb
from omnigpt.data.vision_samples import collate, scene_qa_sample, shapebind_tokenizer
from omnigpt.evals.vqa import answer_samples
from omnigpt.model.multimodal import VLM, VLMConfig, generate_vlm, load_vlm, pixel_shuffle, save_vlm, splice
from omnigpt.model.vision import CLIP, CLIPConfig, TextTowerConfig, ViT, VisionConfig, normalize, softmax_loss, vit_from_hf
from omnigpt.infer.sampling import SamplingParams


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tok():
    return shapebind_tokenizer(n_scenes=150)


VC = VisionConfig(image_size=64, patch_size=16, d_model=32, n_layers=2, n_heads=2, d_ff=64)


def make_vlm(tok, fusion, **kw):
    torch.manual_seed(0)
    text = tiny(vocab_size=tok.padded_vocab_size(), d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=64, max_seq_len=96)
    cfg = VLMConfig(VC, text, image_id=tok.image_id, fusion=fusion, n_latents=4, resampler_layers=1, resampler_heads=2, **kw)
    return VLM(cfg)


def qa_batch(tok, image_tokens, n_samples=6, qtype="color", n=2):
    samples, i = [], 0
    while len(samples) < n_samples:
        scene = sb.make_scene(f"t{i}", n, VC.image_size)
        i += 1
        qs = sb.questions(scene, 0, (qtype,))
        if qs:
            samples.append(scene_qa_sample(tok, image_tokens, scene, qs[0]))
    return samples, collate(samples, tok.pad_id, VC.image_size)


# ---- HF parity ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_hf_vision_parity(kind, tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    kw = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8)
    if kind == "clip":
        hf = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**kw)).eval()
    else:
        hf = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**kw)).eval()
    with torch.no_grad():  # HF inits some tensors to constants: randomise all so parity means something
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    ours = vit_from_hf(hf).eval()
    for size in (32, 48):  # 48: position embeddings interpolated to a 6x6 grid
        x = torch.randn(2, 3, size, size)
        with torch.no_grad():
            ref = hf(pixel_values=x, interpolate_pos_encoding=size != 32, output_hidden_states=True)
            out = ours(x)
            mid, _ = ours.patch_tokens(x, layer=0)
        assert (ref.last_hidden_state - out.tokens).abs().max() <= 1e-4
        assert (ref.pooler_output - out.pooled).abs().max() <= 1e-4
        first = ref.hidden_states[1][:, 1:] if kind == "clip" else ref.hidden_states[1]
        assert (first - mid).abs().max() <= 1e-4
    hf.save_pretrained(tmp_path)  # and from a local folder (safetensors + config.json)
    again = vit_from_hf(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(again(x).tokens, ours(x).tokens)


def test_clip_objective_and_duplicates():
    logits = torch.tensor([[0.0, 0.0, 5.0], [0.0, 5.0, 0.0], [5.0, 0.0, 0.0]])  # images 0 and 2 pick each other's caption
    same = torch.tensor([[1, 0, 1], [0, 1, 0], [1, 0, 1]], dtype=torch.bool)
    assert softmax_loss(logits, same) < softmax_loss(logits, torch.eye(3, dtype=torch.bool))  # duplicates are positives
    torch.manual_seed(0)
    clip = CLIP(CLIPConfig(VC, TextTowerConfig(vocab_size=50, max_len=16, d_model=32, n_layers=1, n_heads=2, d_ff=64), 16))
    ids, lengths = torch.randint(0, 50, (4, 10)), torch.tensor([3, 10, 5, 7])
    loss, logits = clip(torch.randn(4, 3, 32, 32), ids, lengths)
    assert logits.shape == (4, 4) and torch.isfinite(loss)
    ids2 = ids.clone()
    ids2[0, 3:] = 0  # tokens after a caption's end do not change its embedding (causal, pooled at the last token)
    assert torch.allclose(clip.encode_text(ids, lengths)[0], clip.encode_text(ids2, lengths)[0])


def test_pixel_shuffle_and_grid_sizes():
    x = torch.arange(16).float().view(1, 16, 1)  # a 4x4 grid, value = row*4 + col
    y = pixel_shuffle(x, (4, 4), 2)
    assert y.shape == (1, 4, 4) and y[0, 0].tolist() == [0, 1, 4, 5] and y[0, 3].tolist() == [10, 11, 14, 15]
    vit = ViT(VC)
    tokens, grid = vit.patch_tokens(torch.randn(1, 3, 48, 64))  # another resolution: interpolated positions
    assert grid == (3, 4) and tokens.shape == (1, 12, 32)


# ---- fusion ---------------------------------------------------------------------------------------------------
def test_inline_splice_positions_and_text_only_loss(tok):
    vlm = make_vlm(tok, "inline", pixel_shuffle=2)
    L = vlm.cfg.image_tokens
    assert L == 4
    samples, batch = qa_batch(tok, L, 3)
    feats = vlm.encode_images(normalize(batch.images, VC))
    x = splice(vlm.lm.embed(batch.inputs), batch.inputs, feats, tok.image_id)
    for b in range(3):
        pos = (batch.inputs[b] == tok.image_id).nonzero().squeeze(1)
        assert torch.equal(x[b, pos], feats[b])  # image b's L vectors, in order, at its placeholders
        other = batch.inputs[b] != tok.image_id
        assert torch.equal(x[b, other], vlm.lm.embed(batch.inputs[b, other]))
    # loss on text only: image targets are ignored even when the caller asks for them
    targets = batch.inputs.roll(-1, 1)
    out = vlm(batch.inputs, targets, normalize(batch.images, VC))
    masked = targets.masked_fill(targets == tok.image_id, -100)
    ref = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), masked.flatten(), ignore_index=-100)
    assert torch.allclose(out.loss, ref)
    with pytest.raises(ValueError, match="placeholders"):
        vlm(batch.inputs, None, normalize(batch.images[:2], VC))


def test_cross_attention_zero_gates_leave_lm_unchanged(tok):
    vlm = make_vlm(tok, "cross", cross_every=1)
    lm = copy.deepcopy(vlm.lm)
    for block in lm.layers:  # a plain copy, without the hooks
        block._forward_pre_hooks.clear()
    samples, batch = qa_batch(tok, vlm.cfg.image_tokens, 3)
    pixels = normalize(batch.images, VC)
    with torch.no_grad():
        assert torch.equal(vlm(batch.inputs, None, pixels).logits, lm(batch.inputs).logits)
        for block in vlm.xattn.values():
            block.attn_gate.fill_(0.5)
        changed = vlm(batch.inputs, None, pixels).logits
        other_images = vlm(batch.inputs, None, pixels.flip(-1)).logits
    assert not torch.allclose(changed, lm(batch.inputs).logits)
    twin = copy.deepcopy(vlm)  # hooks follow the copy: same outputs, and its gates are its own
    with torch.no_grad():
        assert torch.equal(twin(batch.inputs, None, pixels).logits, changed)
        for block in twin.xattn.values():
            block.attn_gate.zero_()
        assert torch.equal(vlm(batch.inputs, None, pixels).logits, changed)
    img_pos = int((batch.inputs[0] == tok.image_id).nonzero()[0])
    # a token sees only images at or before it: logits before the image do not depend on the image
    assert torch.allclose(changed[0, :img_pos], other_images[0, :img_pos])
    assert not torch.allclose(changed[0, img_pos:], other_images[0, img_pos:])


@pytest.mark.parametrize("fusion", ["inline", "cross"])
def test_generation_with_images_matches_full_forward(tok, fusion):
    vlm = make_vlm(tok, fusion).eval()
    if fusion == "cross":
        for block in vlm.xattn.values():
            block.attn_gate.data.fill_(1.0)
            block.mlp_gate.data.fill_(1.0)
    samples, batch = qa_batch(tok, vlm.cfg.image_tokens, 2)
    # two prompts of different lengths, the second with two images in one turn
    prompts = [samples[0].ids[: samples[0].prompt_len], samples[1].ids[: samples[1].prompt_len]]
    prompts[1] = prompts[1][:2] + [tok.image_start_id] + [tok.image_id] * vlm.cfg.image_tokens + [tok.image_end_id] + prompts[1][2:]
    images = torch.stack([batch.images[0], batch.images[1], batch.images[0]])
    pixels = normalize(images, VC)
    gens = generate_vlm(vlm, prompts, pixels, SamplingParams(temperature=0.0, max_new_tokens=6))
    with torch.no_grad():
        for b, (p, px) in enumerate(zip(prompts, (pixels[:1], pixels[1:]))):
            seq = list(p)
            for _ in range(6):
                logits = vlm(torch.tensor([seq]), None, px).logits[0, -1]
                seq.append(int(logits.argmax()))
            assert gens[b].tokens == seq[len(p):]


def test_save_load_round_trip(tok, tmp_path):
    for fusion in ("inline", "cross"):
        vlm = make_vlm(tok, fusion)
        with torch.no_grad():
            for p in vlm.parameters():
                p.add_(torch.randn_like(p) * 0.01)  # gates included
        samples, batch = qa_batch(tok, vlm.cfg.image_tokens, 2)
        save_vlm(vlm, tmp_path / fusion, tok)
        again = load_vlm(tmp_path / fusion)
        assert again.cfg == vlm.cfg
        px = normalize(batch.images, VC)
        with torch.no_grad():
            assert torch.equal(again(batch.inputs, None, px).logits, vlm(batch.inputs, None, px).logits)
        assert (tmp_path / fusion / "tokenizer").is_dir()


# ---- learning -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fusion", ["inline", "cross"])
def test_tiny_vlm_learns_scene_questions(tok, fusion):
    """A tiny VLM fits a handful of colour questions (every answer needs the image) and answers them by generation."""
    vlm = make_vlm(tok, fusion)
    vlm.set_trainable(("connector", "lm"))  # a random ViT trained through the LM from scratch drifts: keep it fixed
    samples, batch = qa_batch(tok, vlm.cfg.image_tokens, 6)
    assert len({s.answer for s in samples}) > 2  # not one answer for all
    pixels = normalize(batch.images, VC)
    opt = torch.optim.AdamW([p for p in vlm.parameters() if p.requires_grad], lr=5e-3, weight_decay=0.0)
    for _ in range(350):
        loss = vlm(batch.inputs, batch.targets, pixels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert loss.item() < 0.05
    assert answer_samples(vlm, tok, samples) == [s.answer for s in samples]
