"""`omnigpt eval TASK... --model CKPT | --api URL`: run evaluations, write results JSON and a Markdown report card.

    omnigpt eval val-loss dict-def arithmetic --model runs/tiny --data corpus/ --out evals/tiny
    omnigpt eval mc:my_task.jsonl humaneval --api http://localhost:8000 --api-model omnigpt --limit 20
    omnigpt eval vqa --model runs/vlm/inline --vqa-n 1,2,4,8,16 --limit 100   # ShapeBind VQA (or --api a vision server)
"""

from __future__ import annotations

import json
from pathlib import Path


def add_commands(subparsers) -> None:
    from omnigpt.evals.harness import TASKS

    p = subparsers.add_parser("eval", help="evaluate a checkpoint or a served model; results JSON + report card",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("tasks", nargs="+", metavar="TASK", help=f"one or more of: {', '.join(TASKS)}")
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument("--model", metavar="CKPT", help="checkpoint folder (config.json + model.safetensors), or a training run folder")
    who.add_argument("--api", metavar="URL", help="OpenAI-compatible server (e.g. http://localhost:8000)")
    p.add_argument("--tokenizer", help="tokenizer spec or folder (default: the checkpoint's tokenizer/ folder)")
    p.add_argument("--api-model", help="model name sent to the server")
    p.add_argument("--api-key", help="bearer token for the server")
    p.add_argument("--completions", action="store_true", help="generate with /v1/completions instead of chat completions")
    p.add_argument("--data", metavar="CORPUS", help="corpus directory (val-loss, dict-def)")
    p.add_argument("--limit", type=int, help="items per task (problems for humaneval)")
    p.add_argument("--samples", type=int, default=1, help="humaneval: completions per problem")
    p.add_argument("--k", default="1", help="humaneval: comma-separated k of pass@k (each <= --samples)")
    p.add_argument("--temperature", type=float, help="humaneval sampling temperature (default 0 for 1 sample, else 0.8)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vqa-n", default="1,2,4", help="vqa: objects per scene, comma-separated")
    p.add_argument("--image-size", type=int, default=128, help="vqa with --api: scene size sent (a checkpoint uses its own)")
    p.add_argument("--device", choices=("cpu", "cuda"))
    p.add_argument("--out", default="evals", metavar="DIR", help="writes DIR/results.json and DIR/report.md")
    p.set_defaults(func=cmd_eval)


def cmd_eval(args) -> int:
    from omnigpt.cli import CommandError
    from omnigpt.evals.harness import EvalSettings, check_tasks, run_eval
    from omnigpt.evals.lm import ApiLM, LocalLM
    from omnigpt.evals.report import render_report

    try:
        ks = tuple(int(k) for k in args.k.split(","))
    except ValueError:
        raise CommandError(f"--k {args.k!r}: expected comma-separated integers") from None
    if any(k > args.samples for k in ks):
        raise CommandError(f"--k {args.k}: pass@k needs k <= --samples ({args.samples})")
    check_tasks(args.tasks)
    lm = (ApiLM(args.api, args.api_model, args.api_key, chat=not args.completions) if args.api
          else LocalLM.load(args.model, args.tokenizer, device=args.device))
    try:
        vqa_n = tuple(int(n) for n in args.vqa_n.split(","))
    except ValueError:
        raise CommandError(f"--vqa-n {args.vqa_n!r}: expected comma-separated integers") from None
    s = EvalSettings(data=args.data, limit=args.limit, seed=args.seed, n_samples=args.samples, ks=ks, temperature=args.temperature,
                     extra={"vqa_n": vqa_n, "image_size": args.image_size})
    res = run_eval(lm, args.tasks, s)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(res, indent=2) + "\n")
    (out / "report.md").write_text(render_report(res))
    print(f"results: {out / 'results.json'}; report card: {out / 'report.md'}")
    failed = [t for t, o in res["tasks"].items() if "error" in o]
    if failed:
        raise CommandError(f"task(s) failed: {', '.join(failed)} (see {out / 'report.md'})")
    return 0
