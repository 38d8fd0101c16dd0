"""`omnigpt vision scenes|train-clip|train-vlm|eval-vqa|ask`: ShapeBind data, CLIP and VLM training, VQA evaluation,
and questions about local images."""

from __future__ import annotations

import json
import time
from pathlib import Path


def add_commands(subparsers) -> None:
    p = subparsers.add_parser("vision", help="vision: ShapeBind scenes, CLIP and VLM training, VQA evaluation")
    sub = p.add_subparsers(dest="vision_command", metavar="ACTION")
    sub.required = True

    s = sub.add_parser("scenes", help="render ShapeBind scenes with their scene graph, caption and questions")
    s.add_argument("--out", required=True, help="folder for scene_<i>.png + scenes.jsonl")
    s.add_argument("--n", type=int, default=4, help="objects per scene")
    s.add_argument("--count", type=int, default=8)
    s.add_argument("--image-size", type=int, default=128)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--interleaved", action="store_true", help="also write one interleaved document (text, image, ...)")
    s.set_defaults(func=cmd_scenes)

    def recipe_args(q, quick_default=False):
        q.add_argument("--quick", action="store_true", default=quick_default, help="tiny CPU sizes (omnigpt.train.vlm.quick_recipe)")
        q.add_argument("--set", nargs="*", default=[], metavar="FIELD=JSON", help="override recipe fields, e.g. budget_joint_s=240")
        q.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")

    c = sub.add_parser("train-clip", help="CLIP pre-training of a ViT on ShapeBind captions (+ emoji / clip-art)")
    c.add_argument("--out", required=True)
    c.add_argument("--real-frac", type=float, default=0.0, help="share of emoji / clip-art pairs (Debian packages)")
    recipe_args(c)
    c.set_defaults(func=cmd_train_clip)

    v = sub.add_parser("train-vlm", help="train vision-language models on ShapeBind (LM warm-up, align, joint)")
    v.add_argument("--out", required=True, help="folder: one checkpoint per fusion mode in <out>/<mode>")
    v.add_argument("--fusion", default="inline", help="inline, cross, or both: inline,cross")
    v.add_argument("--vision", default=None, help="ViT weights: an `omnigpt vision train-clip` folder, or a local HF "
                                                  "CLIP/SigLIP (vision) folder; default: CLIP pre-training first")
    v.add_argument("--no-eval", action="store_true")
    recipe_args(v)
    v.set_defaults(func=cmd_train_vlm)

    e = sub.add_parser("eval-vqa", help="held-out ShapeBind VQA accuracy by question type and N (one table)")
    e.add_argument("checkpoints", nargs="+", help="VLM checkpoint folders (written by train-vlm)")
    e.add_argument("--n", default="1,2,3,4,6,8,12,16", help="objects per scene, comma-separated")
    e.add_argument("--per-type", type=int, default=100)
    e.add_argument("--device", default=None)
    e.add_argument("--json", default=None, help="also write the results here")
    e.set_defaults(func=cmd_eval_vqa)

    a = sub.add_parser("ask", help="ask a VLM checkpoint about local image files")
    a.add_argument("checkpoint")
    a.add_argument("--image", action="append", required=True, help="an image file (repeat for several)")
    a.add_argument("--question", required=True)
    a.add_argument("--max-new-tokens", type=int, default=64)
    a.add_argument("--device", default=None)
    a.set_defaults(func=cmd_ask)


def _device(name):
    import torch

    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def _recipe(args):
    from omnigpt.train.vlm import Recipe, quick_recipe

    return (quick_recipe() if args.quick else Recipe()).override(args.set)


def _log(t0):
    return lambda *m: print(f"{time.perf_counter() - t0:6.0f}s", *m, flush=True)


def cmd_scenes(args) -> None:
    from omnigpt.data import scenes as sb

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "scenes.jsonl", "w") as f:
        for i in range(args.count):
            scene = sb.make_scene(f"{args.seed}.{i}", args.n, args.image_size)
            sb.render(scene).save(out / f"scene_{i}.png")
            qas = [qa.__dict__ for qa in sb.questions(scene)]
            f.write(json.dumps({"image": f"scene_{i}.png", "caption": sb.caption(scene), "graph": scene.to_dict(), "questions": qas}) + "\n")
    if args.interleaved:
        doc = sb.interleaved_document(args.seed, 3, (1, args.n), args.image_size)
        parts = []
        for k, seg in enumerate(doc):
            if isinstance(seg, str):
                parts.append(seg)
            else:
                sb.render(seg).save(out / f"doc_image_{k}.png")
                parts.append(f"[doc_image_{k}.png]")
        (out / "document.txt").write_text(" ".join(parts) + "\n")
    print(f"wrote {args.count} scenes with {args.n} objects to {out}")


def cmd_train_clip(args) -> None:
    import torch

    from omnigpt.data.image_captions import image_caption_pairs
    from omnigpt.data.vision_samples import ScenePool, shapebind_tokenizer
    from omnigpt.model.vision import CLIP, CLIPConfig, TextTowerConfig, VisionConfig
    from omnigpt.train.clip import save_clip, train_clip
    from omnigpt.train.vlm import clip_train_config

    r, device, log = _recipe(args), _device(args.device), _log(time.perf_counter())
    tok = shapebind_tokenizer()
    real = image_caption_pairs() if args.real_frac > 0 else None
    if args.real_frac > 0 and not real:
        log("no emoji / clip-art pairs installed (apt-get install -y fonts-noto-color-emoji openclipart-png): scenes only")
    vcfg = VisionConfig(image_size=r.image_size, pool="mean", **r.vision)
    ttc = TextTowerConfig(vocab_size=tok.padded_vocab_size(), max_len=256, d_model=vcfg.d_model, n_layers=2,
                          n_heads=vcfg.n_heads, d_ff=vcfg.d_ff)
    torch.manual_seed(0)
    model = CLIP(CLIPConfig(vcfg, ttc, embed_dim=128)).to(device)
    pool = ScenePool(r.pool_scenes, r.n_train, r.image_size, "pool", workers=r.workers)
    tc = clip_train_config(r, real_frac=args.real_frac, log_every=50)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    res = train_clip(model, tok, tc, real_pairs=real, log=log, metrics_path=str(Path(args.out) / "metrics.jsonl"), pool=pool)
    save_clip(model, args.out, tok)
    print(json.dumps(res))


def load_vision(path: str):
    """A ViT from an omnigpt CLIP folder or a local HF CLIP/SigLIP folder."""
    from omnigpt.model.vision import vit_from_hf
    from omnigpt.train.clip import load_clip

    raw = json.loads((Path(path) / "config.json").read_text())
    return load_clip(path).vision if "omnigpt_clip" in raw else vit_from_hf(path)


def cmd_train_vlm(args) -> None:
    import torch

    from omnigpt.evals.vqa import format_table
    from omnigpt.train.vlm import run_recipe

    r, device, log = _recipe(args), _device(args.device), _log(time.perf_counter())
    torch.manual_seed(0)
    vision = load_vision(args.vision) if args.vision else None
    if vision is not None and vision.cfg.image_size != r.image_size:
        r.image_size = vision.cfg.image_size
        log(f"image size set to the vision tower's {r.image_size}px")
    s = run_recipe(r, args.fusion.split(","), args.out, device, log=log, vision=vision, evaluate=not args.no_eval)
    if s["results"]:
        print(format_table(s["results"], s["extra"]))


def cmd_eval_vqa(args) -> None:
    from omnigpt.evals.vqa import eval_vqa, format_table
    from omnigpt.model.multimodal import load_vlm
    from omnigpt.tokenizer.text import Tokenizer

    device, log = _device(args.device), _log(time.perf_counter())
    results, extra = {}, {}
    for ckpt in args.checkpoints:
        vlm = load_vlm(ckpt, device)
        tok = Tokenizer.load(str(Path(ckpt) / "tokenizer"))
        name = f"{vlm.cfg.fusion}" if vlm.cfg.fusion not in results else Path(ckpt).name
        results[name] = eval_vqa(vlm, tok, [int(n) for n in args.n.split(",")], args.per_type, log=log)
        extra[name] = {"checkpoint": ckpt}
    print(format_table(results, extra))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


def cmd_ask(args) -> None:
    from PIL import Image

    from omnigpt.infer.sampling import SamplingParams
    from omnigpt.model.multimodal import generate_vlm, load_vlm
    from omnigpt.model.vision import preprocess
    from omnigpt.tokenizer.chat import render_chat
    from omnigpt.tokenizer.text import Tokenizer

    device = _device(args.device)
    vlm = load_vlm(args.checkpoint, device).eval()
    tok = Tokenizer.load(str(Path(args.checkpoint) / "tokenizer"))
    images = []
    for path in args.image:
        with Image.open(path) as im:
            if im.width * im.height > 40_000_000:
                raise ValueError(f"{path}: {im.width}x{im.height} is too many pixels")
            images.append(im.convert("RGB"))
    # question first, as the web page and chat send it; a model trained with the images first gets them first
    content = [{"type": "text", "text": args.question}] + [{"type": "image_url", "image_url": {"url": p}} for p in args.image]
    prompt, _ = render_chat(tok, [{"role": "user", "content": content}], add_generation_prompt=True,
                            image_tokens=vlm.cfg.image_tokens, images_first=vlm.cfg.image_first)
    pixels = preprocess(images, vlm.cfg.vision).to(device)
    g = generate_vlm(vlm, [prompt], pixels, SamplingParams(temperature=0.0, max_new_tokens=args.max_new_tokens),
                     eos_ids=(tok.im_end_id, tok.eot_id), decode=tok.decode, vocab_size=tok.vocab_size)[0]
    print(g.text)
