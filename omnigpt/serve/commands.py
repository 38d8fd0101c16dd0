"""`omnigpt serve [CHECKPOINT]` (the OpenAI-compatible server and web page) and `omnigpt chat` (a terminal client)."""

from __future__ import annotations

import dataclasses
import os


def add_commands(sub) -> None:
    p = sub.add_parser("serve", help="serve a checkpoint over an OpenAI-compatible HTTP API, with a web chat page at /")
    p.add_argument("checkpoint", nargs="?", metavar="CHECKPOINT",
                   help="checkpoint folder (model + tokenizer/); default $OMNIGPT_CHECKPOINT or runs/speedrun/latest")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("OMNIGPT_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1/* (default $OMNIGPT_API_KEY; none: open)")
    p.add_argument("--model-name", action="append", dest="model_names", metavar="NAME",
                   help="id clients pass as `model` (repeat for aliases, e.g. gpt-4o); default the checkpoint's name")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="weights and KV cache (default bfloat16 on GPU, float32 on CPU)")
    p.add_argument("--max-batch-size", type=int, default=None, help="sequences decoding at once (KV cache rows)")
    p.add_argument("--kv-cache-gb", type=float, default=None, help="size the KV cache rows to this memory instead")
    p.add_argument("--max-seq-len", type=int, default=None, help="context per sequence (default the model's)")
    p.add_argument("--max-queue", type=int, default=256, help="waiting requests beyond which the server answers 429")
    p.add_argument("--max-body-mb", type=float, default=16, help="larger request bodies are answered 413")
    p.add_argument("--max-image-mb", type=float, default=None,
                   help="larger images are answered 400 (default 10; omnigpt.serve.images.ImageLimits)")
    p.add_argument("--max-image-pixels", type=int, default=None,
                   help="images of more pixels (width x height) are answered 400 (default 25,000,000)")
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step's kernels (GPU; ~90 s warm-up at 1B)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for the model (default torch's; 1 is fastest for tiny models or busy machines)")
    p.set_defaults(func=cmd_serve)

    c = sub.add_parser("chat", help="chat with an omnigpt (or any OpenAI-compatible) server in the terminal")
    c.add_argument("--base-url", default=os.environ.get("OMNIGPT_BASE_URL", "http://127.0.0.1:8000/v1"))
    c.add_argument("--model", default=None, help="model id (default: the server's first)")
    c.add_argument("--api-key", default=os.environ.get("OMNIGPT_API_KEY") or os.environ.get("OPENAI_API_KEY"))
    c.add_argument("--system", default=None, help="system prompt")
    c.add_argument("--temperature", type=float, default=None)
    c.add_argument("--max-tokens", type=int, default=None)
    c.add_argument("--seed", type=int, default=None)
    c.add_argument("--image", action="append", default=[], metavar="PATH",
                   help="attach a local image file to the first message (repeat for several; /image PATH in the chat)")
    c.set_defaults(func=cmd_chat)


def cmd_serve(args) -> int:
    from omnigpt.cli import CommandError
    from omnigpt.serve.checkpoint import ENV_CHECKPOINT, default_checkpoint

    path = args.checkpoint or default_checkpoint()
    if path is None:
        raise CommandError(
            f"no checkpoint to serve: none given, ${ENV_CHECKPOINT} is unset and runs/speedrun/latest does not exist.\n"
            "  Train one in a few minutes on this machine with:  omnigpt speedrun --preset cpu\n"
            "  then run `omnigpt serve` again (or pass a checkpoint folder: omnigpt serve PATH)")

    import torch
    import uvicorn

    from omnigpt.infer.engine import EngineConfig
    from omnigpt.serve.app import create_app
    from omnigpt.serve.checkpoint import load_for_serving

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype_name = args.dtype or ("bfloat16" if str(device).startswith("cuda") else "float32")
    dtype = getattr(torch, dtype_name)
    served = load_for_serving(path, device=device, dtype=dtype)
    config = EngineConfig(max_seq_len=args.max_seq_len, max_queue=args.max_queue, compile_decode=args.compile,
                          cpu_threads=args.threads)
    if args.kv_cache_gb:
        config.max_batch_size = EngineConfig.rows_for_budget(int(args.kv_cache_gb * 2**30), served.model.cfg, dtype,
                                                             args.max_seq_len)
    if args.max_batch_size:
        config.max_batch_size = args.max_batch_size
    app = create_app(served, config, api_key=args.api_key, model_names=args.model_names,
                     max_body_bytes=int(args.max_body_mb * 2**20),
                     image_limits=image_limits(args))
    names = ", ".join(app.state.serving.names)
    kv_mb = config.kv_cache_bytes(served.model.cfg, dtype) / 2**20
    print(f"omnigpt serve: {served.path} as {names} on {device} ({dtype_name}); {config.max_batch_size} rows x "
          f"{app.state.serving.engine.max_seq_len} tokens of KV cache ({kv_mb:.0f} MiB)")
    if served.vlm is not None:
        vc = served.vlm.cfg
        print(f"  reads images ({vc.fusion} fusion, {vc.vision.image_size}px): {vc.image_tokens + 2} prompt tokens each")
    print(f"  web chat: http://{args.host}:{args.port}/   API: http://{args.host}:{args.port}/v1"
          + ("   (API key required)" if args.api_key else ""))
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0


def image_limits(args):
    from omnigpt.serve.images import ImageLimits

    limits = ImageLimits()
    if args.max_image_mb is not None:
        limits = dataclasses.replace(limits, max_bytes=int(args.max_image_mb * 2**20))
    if args.max_image_pixels is not None:
        limits = dataclasses.replace(limits, max_pixels=args.max_image_pixels)
    return limits


def cmd_chat(args) -> int:
    from omnigpt.serve.chat_client import run_chat

    return run_chat(args.base_url, args.model, args.api_key, system=args.system, temperature=args.temperature,
                    max_tokens=args.max_tokens, seed=args.seed, images=args.image)
