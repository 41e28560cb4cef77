"""Cost of one α/β grid point: live (`set_scales` on one patched model) vs re-merge + reload.

On a Llama-shaped bf16 pair from `make_checkpoints.py` (base, instruct, LoRA r=16), both ways
answer the same greedy prompts (fixed token ids: the pair has no tokenizer):

- live: the base is loaded and patched once (Δ from a full RE-Adapter `extract`ed once, Ψ the
  LoRA; both one-time costs, reported apart); a point = `set_scales` + generation;
- re-merge (what mergekit-evolve does per candidate): a point = `merge` to disk +
  `from_pretrained` of the merged model + generation.

Rows (switch_s, generate_s, point_s per provider, and point-cost ratio) go to bench/out/eval.{csv,json}.

    python bench/bench_eval.py --preset 1b [--prompts 2 --new-tokens 4]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402
import make_checkpoints  # noqa: E402

from stream_readapt import extract, merge, patch_model, set_scales  # noqa: E402

ALPHA, BETA = 0.3, 0.7  # the point switched to (the model starts at 0.5, 0.5)


def _timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def load(folder: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()


@torch.no_grad()
def generate(model, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    outs = []
    for ids in prompts:
        x = torch.tensor([ids])
        out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), do_sample=False,
                             max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0)
        outs.append(out[0, len(ids):].tolist())
    return outs


def live_point(dirs: dict, readapter: Path, prompts, new_tokens: int) -> dict:
    model, load_s = _timed(lambda: load(dirs["base"]))
    _, patch_s = _timed(lambda: patch_model(model, readapter=readapter, knowledge=dirs["lora"]))
    _, switch_s = _timed(lambda: set_scales(model, ALPHA, BETA))
    tokens, gen_s = _timed(lambda: generate(model, prompts, new_tokens))
    return {"once_s": load_s + patch_s, "switch_s": switch_s, "generate_s": gen_s, "tokens": tokens}


def remerge_point(dirs: dict, scratch: Path, prompts, new_tokens: int) -> dict:
    out = scratch / "merged"
    _, merge_s = _timed(lambda: merge(dirs["base"], out, instruct=dirs["instruct"], knowledge=dirs["lora"],
                                      alpha=ALPHA, beta=BETA, device="cpu"))
    model, load_s = _timed(lambda: load(out))
    tokens, gen_s = _timed(lambda: generate(model, prompts, new_tokens))
    return {"merge_s": merge_s, "load_s": load_s, "switch_s": merge_s + load_s, "generate_s": gen_s, "tokens": tokens}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="1b", choices=sorted(make_checkpoints.PRESETS))
    p.add_argument("--workdir", default=make_checkpoints.DEFAULT_WORKDIR, help="where the pair is (built if missing)")
    p.add_argument("--prompts", type=int, default=2, help="prompts answered per point")
    p.add_argument("--new-tokens", type=int, default=4, help="greedy tokens per prompt")
    p.add_argument("--readapter", choices=["full", "lore"], default="full",
                   help="live Δ: the full RE-Adapter or a LoRE-Adapter (τ = 0.5)")
    p.add_argument("--out", default="bench/out")
    args = p.parse_args(argv)
    dirs, build_s = _timed(lambda: make_checkpoints.build(args.preset, args.workdir))
    gen = torch.Generator().manual_seed(0)
    vocab = make_checkpoints.PRESETS[args.preset].vocab
    prompts = [torch.randint(4, vocab, (16,), generator=gen).tolist() for _ in range(args.prompts)]
    scratch = Path(tempfile.mkdtemp(prefix="bench-eval-", dir=args.workdir))
    try:
        lore = {"energy": 0.5} if args.readapter == "lore" else {}
        _, extract_s = _timed(lambda: extract(dirs["base"], dirs["instruct"], scratch / "readapter", device="cpu", **lore))
        live = live_point(dirs, scratch / "readapter", prompts, args.new_tokens)
        remerged = remerge_point(dirs, scratch, prompts, args.new_tokens)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    report(args, live, remerged, extract_s, build_s)
    return 0


def report(args, live: dict, remerged: dict, extract_s: float, build_s: float) -> None:
    ctx = harness.run_context()
    shape = f"{args.preset}, {args.readapter} delta, {args.prompts}x{args.new_tokens} tokens"
    live["point_s"] = live["switch_s"] + live["generate_s"]
    remerged["point_s"] = remerged["switch_s"] + remerged["generate_s"]
    agree = sum(a == b for a, b in zip(live["tokens"], remerged["tokens"]))
    rows = [harness.make_row("eval_point", prov, shape, args.prompts, "", metric, r[metric], ctx)
            for prov, r in (("live", live), ("remerge", remerged))
            for metric in ("switch_s", "generate_s", "point_s") + (("merge_s", "load_s") if prov == "remerge" else ("once_s",))]
    rows.append(harness.make_row("eval_point", "live", shape, args.prompts, "", "extract_once_s", extract_s, ctx))
    ratio = remerged["point_s"] / live["point_s"]
    rows.append(harness.make_row("eval_point", "remerge/live", shape, args.prompts, "", "point_ratio", ratio, ctx))
    rows.append(harness.make_row("eval_point", "remerge/live", shape, args.prompts, "", "switch_ratio",
                                 remerged["switch_s"] / max(live["switch_s"], 1e-9), ctx))
    rows.append(harness.make_row("eval_point", "live", shape, args.prompts, "", "greedy_prompts_agreeing", agree, ctx))
    per_prompt = (live["generate_s"] - remerged["generate_s"]) / args.prompts
    if per_prompt > 0:  # live generation is slower (CPU reference path): past this many prompts re-merging wins
        even = (remerged["switch_s"] - live["switch_s"]) / per_prompt
        rows.append(harness.make_row("eval_point", "remerge/live", shape, args.prompts, "", "break_even_prompts", even, ctx))
    harness.write_rows(rows, args.out, "eval")
    for r in rows:
        print(f"{r['provider']:>13} {r['metric']:>24} {r['value']:10.3f}")
    print(f"one point, re-merge + reload vs live: {ratio:.1f}x ({shape}; pair built/found in {build_s:.0f} s)")


if __name__ == "__main__":
    sys.exit(main())
