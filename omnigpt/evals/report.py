"""The Markdown report card of an evaluation results dict (see omnigpt.evals.harness.run_eval)."""

from __future__ import annotations

from omnigpt.evals.harness import headline

LABELS = {"loss": "loss (nats/token)", "bpb": "bits per byte", "acc": "accuracy", "acc_norm": "accuracy (per byte)",
          "logp_correct": "mean log p(correct)", "acc_pmi": "accuracy (calibrated)", "logp_norm": "mean log p(correct), per byte", "logp_pmi": "mean log p(correct), calibrated", "chance": "chance", "exact_match": "exact match"}


def _fmt(key: str, v: float) -> str:
    if key in ("acc", "acc_norm", "acc_pmi", "chance", "exact_match") or key.startswith("pass@"):
        return f"{100 * v:.1f}%"
    return f"{v:.4f}"


def render_report(res: dict) -> str:
    lines = [f"# Report card: {res.get('model', 'model')}", "", f"Evaluated {res.get('created', '')}.", "",
             "| task | metric | value | items | notes |", "|---|---|---|---|---|"]
    for task, out in res["tasks"].items():
        if "error" in out:
            lines.append(f"| {task} | error |  |  | {out['error']} |")
            continue
        n = out.get("n") or out.get("n_problems") or out.get("tokens") or ""
        notes = []
        if "acc_stderr" in out:
            notes.append(f"± {100 * out['acc_stderr']:.1f}% (1 s.e.)")
        if "source" in out:
            notes.append(str(out["source"]))
        if "n_samples" in out:
            notes.append(f"{out['n_samples']} sample(s)/problem, T={out['temperature']}, "
                         f"{'own network namespace' if out.get('network_namespace') else 'sockets blocked'}")
        for i, (k, v) in enumerate(headline(task, out)):
            if k == "chance":
                continue
            lines.append(f"| {task if i == 0 else ''} | {LABELS.get(k, k)} | {_fmt(k, v)} | {n if i == 0 else ''} | "
                         f"{'; '.join(notes) if i == 0 else ''} |")
        if "chance" in out:
            lines.append(f"|  | chance | {_fmt('chance', out['chance'])} |  |  |")
    per_source = {t: o["sources"] for t, o in res["tasks"].items() if isinstance(o.get("sources"), dict)}
    for task, srcs in per_source.items():
        lines += ["", f"## {task} by source", "", "| source | loss (nats/token) | bits per byte | tokens |", "|---|---|---|---|"]
        for name, m in srcs.items():
            loss = f"{m['loss']:.4f}" if "loss" in m else "-"
            lines.append(f"| {name} | {loss} | {m['bpb']:.4f} | {m.get('tokens', m.get('bytes', ''))} |")
    examples = {t: o["examples"] for t, o in res["tasks"].items() if o.get("examples")}
    for task, ex in examples.items():
        lines += ["", f"## {task}: first answers", ""]
        lines += [f"- expected `{e['expected']}`, got `{e['got']}`" for e in ex]
    return "\n".join(lines) + "\n"
