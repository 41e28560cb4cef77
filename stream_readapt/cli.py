"""`stream-readapt`: each subcommand parses its arguments and calls one library function."""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys

from . import __version__
from .io import signals
from .optional import extra_for_error
from .serving.consumers import DEFAULT, PROFILES

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str) -> int:
    """'5GB' -> 5_000_000_000, '512MiB' -> 536_870_912, '1000' -> 1000."""
    m = _SIZE.match(text)
    unit = (m.group(2) or "").upper() if m else None
    if unit is not None and unit and not unit.endswith("B"):
        unit += "B"
    if m is None or unit not in _UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 5GB, 500MiB)")
    return int(float(m.group(1)) * _UNITS[unit])


def parse_seed(text: str) -> int:
    seed = int(text)
    if not 0 <= seed < 2**63:
        raise argparse.ArgumentTypeError(f"seed must be in [0, 2**63), got {text}")
    return seed


class OneLineParser(argparse.ArgumentParser):
    """Usage errors as one line (the project's rule for every failure), exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _common(p: argparse.ArgumentParser, *, device=True) -> None:
    if device:
        p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, or cuda[:N]")
        p.add_argument("--revision", help="Hub revision (branch, tag or commit) for Hub ids")
    p.add_argument("--json", action="store_true", help="print one machine-readable JSON summary on stdout")
    p.add_argument("--quiet", action="store_true", help="no progress bars or log messages")


def _output_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("-o", "--output", required=True, help="output folder (created; must be empty)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16", "float64"], help="output dtype")
    p.add_argument("--max-shard-size", type=parse_size, help="e.g. 5GB (default: the base model's shard layout)")
    p.add_argument("--resume", action="store_true",
                   help="continue a killed or stopped run into this -o from its finished (verified) shards")


def _extract_parser(sub) -> None:
    p = sub.add_parser("extract", help="RE-Adapter Δ = instruct − base (full, or LoRE with --energy/--rank)")
    p.add_argument("base", help="pretrained base model: folder or Hub id")
    p.add_argument("instruct", help="instruction-tuned model: folder or Hub id")
    _output_options(p)
    low = p.add_mutually_exclusive_group()
    low.add_argument("--energy", type=float, help="LoRE: keep the fewest singular directions explaining this share τ (paper: 0.5)")
    low.add_argument("--rank", type=int, help="LoRE: fixed rank per matrix")
    low.add_argument("--max-error", type=float, help="LoRE: relative Frobenius error target per matrix")
    p.add_argument("--max-rank", type=int, help="LoRE: cap on any module's rank")
    p.add_argument("--embeddings", choices=["full", "lora"], help="LoRE: embeddings/lm_head as full tensors or low-rank "
                   "(default: full for --profile peft, else lora)")
    p.add_argument("--profile", choices=list(PROFILES), default=DEFAULT,
                   help="LoRE: who serves the adapter (default peft: full fidelity; portable: loads in all)")
    p.add_argument("--seed", type=parse_seed, default=0, help="LoRE: seed of the randomized SVD")
    p.add_argument("--include", action="append", metavar="REGEX", help="only tensors matching (repeatable)")
    p.add_argument("--exclude", action="append", metavar="REGEX", help="skip tensors matching (repeatable)")
    _common(p)


def _merge_parser(sub) -> None:
    p = sub.add_parser("merge", help="readapted model Ω = base + α·knowledge + β·Δ")
    p.add_argument("base", help="pretrained base model: folder or Hub id")
    _output_options(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--instruct", help="instruction-tuned model (Δ computed on the fly)")
    src.add_argument("--readapter", help="folder written by `extract` (full or LoRE)")
    p.add_argument("--knowledge", help="PEFT LoRA/rsLoRA/DoRA adapter folder trained on the base")
    p.add_argument("--alpha", type=float, default=0.5, help="weight of the knowledge adapter (default 0.5)")
    p.add_argument("--beta", type=float, default=0.5, help="weight of the RE-Adapter (default 0.5)")
    p.add_argument("--ignore-base-mismatch", action="store_true", help="merge even if the RE-Adapter was made from another base")
    _common(p)


def _inspect_parser(sub) -> None:
    p = sub.add_parser("inspect", help="what a checkpoint, adapter or RE-Adapter holds")
    p.add_argument("paths", nargs="+", metavar="PATH")
    p.add_argument("--tensors", action="store_true", help="list every tensor")
    p.add_argument("--plot", metavar="FILE.png", help="LoRE: draw explained-variance curves and chosen ranks")
    p.add_argument("--check", choices=["vllm", "sglang", "llama.cpp"], help="would this adapter load there, applied as PEFT applies it")
    _common(p, device=False)


def parse_floats(text: str) -> list[float]:
    """'0,0.5,1' -> [0.0, 0.5, 1.0] (a grid axis)."""
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of numbers: {text!r} (e.g. 0,0.5,1)") from None
    if len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"repeated value in {text!r}")
    return values


def _eval_parser(sub) -> None:
    p = sub.add_parser("eval", help="closed-book / RAG QA (ROUGE-L recall, EM) over a live α × β grid")
    p.add_argument("model", help="model to load (the pretrained base when adapters are given): folder or Hub id")
    p.add_argument("--data", required=True, help="QA JSON Lines: id, question, answers, optional passage_id")
    p.add_argument("-o", "--output", required=True, help="folder for results.json, generations.jsonl, heatmap.png")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--readapter", help="Δ: a folder written by `extract` (full or LoRE)")
    src.add_argument("--instruct", help="Δ: the instruction-tuned model (Δ = instruct − model, extracted once)")
    p.add_argument("--knowledge", help="Ψ: PEFT LoRA/DoRA adapter folder trained on the base")
    p.add_argument("--alpha", type=parse_floats, help="knowledge weights of the grid, e.g. 0,0.5,1 (default 0.5)")
    p.add_argument("--beta", type=parse_floats, help="RE-Adapter weights of the grid, e.g. 0,0.5,1 (default 0.5)")
    p.add_argument("--passages", help="passage JSON Lines: id, text")
    p.add_argument("--retrieval", choices=["none", "bm25", "oracle"], default="none", help="context passage per question")
    p.add_argument("--max-new-tokens", type=int, default=32, help="greedy answer length cap (default 32)")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="load dtype (default: the checkpoint's)")
    p.add_argument("--tasks", type=lambda t: [x for x in t.split(",") if x], help="lm-evaluation-harness tasks, comma-separated")
    p.add_argument("--task-dir", help="folder of lm-eval task YAMLs (local data files) to add to the task list")
    p.add_argument("--task-limit", type=int, help="lm-eval: at most this many examples per task")
    p.add_argument("--ignore-base-mismatch", action="store_true", help="patch even if the RE-Adapter was made from another base")
    _common(p)


def _demo_parser(sub) -> None:
    p = sub.add_parser("demo", help="the whole pipeline on a tiny generated model pair, offline")
    p.add_argument("--dir", help="work folder (default: a temporary folder, removed afterwards)")
    _common(p, device=False)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="stream-readapt", description=__doc__)
    parser.add_argument("--version", action="version", version=f"stream-readapt {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_extract_parser, _merge_parser, _inspect_parser, _eval_parser, _demo_parser):
        add(sub)
    return parser


def _run(args) -> dict | str:
    if args.command == "extract":
        from .engine.extract import extract

        lore = {"max_rank": args.max_rank, "embeddings": args.embeddings, "seed": args.seed, "profile": args.profile}
        low_rank = args.energy is not None or args.rank is not None or args.max_error is not None
        if PROFILES[args.profile].rewrites and not low_rank:
            raise ValueError(f"--profile {args.profile} shapes a LoRE-Adapter: add --energy, --rank or --max-error")
        return extract(
            args.base, args.instruct, args.output, energy=args.energy, rank=args.rank, max_error=args.max_error,
            dtype=args.dtype, device=args.device, include=args.include, exclude=args.exclude,
            max_shard_size=args.max_shard_size, revision=args.revision, overwrite=args.overwrite,
            quiet=args.quiet, resume=args.resume, **(lore if low_rank else {}),
        )
    if args.command == "merge":
        from .engine.merge import merge

        return merge(
            args.base, args.output, instruct=args.instruct, readapter=args.readapter, knowledge=args.knowledge,
            alpha=args.alpha, beta=args.beta, dtype=args.dtype, device=args.device,
            max_shard_size=args.max_shard_size, revision=args.revision, overwrite=args.overwrite,
            ignore_base_mismatch=args.ignore_base_mismatch, quiet=args.quiet, resume=args.resume,
        )
    if args.command == "inspect" and args.check:
        from .serving.check import check_report

        return check_report(args.paths, args.check)
    if args.command == "eval":
        from .eval.evaluate import evaluate

        return evaluate(
            args.model, args.data, args.output, readapter=args.readapter, instruct=args.instruct,
            knowledge=args.knowledge, alphas=args.alpha, betas=args.beta, passages=args.passages,
            retrieval=args.retrieval, max_new_tokens=args.max_new_tokens, tasks=args.tasks, task_dir=args.task_dir,
            task_limit=args.task_limit, dtype=args.dtype, device=args.device, revision=args.revision,
            overwrite=args.overwrite, ignore_base_mismatch=args.ignore_base_mismatch, quiet=args.quiet,
        )
    if args.command == "inspect":
        from .describe import inspect_paths

        return inspect_paths(args.paths, tensors=args.tensors, plot=args.plot)
    from .demo import run_demo

    return run_demo(args.dir)


def main(argv: list[str] | None = None) -> int:
    try:
        with signals.installed():
            return _main(argv)
    except KeyboardInterrupt as e:  # Ctrl-C, SIGTERM, SIGHUP: at start-up too
        what, code = signals.describe(e)
        kept = getattr(e, "kept_partial", None)
        tail = f"; finished shards kept in {kept}: rerun with --resume to continue" if kept else ""
        print(f"stream-readapt: {what}: no output written{tail}", file=sys.stderr)
        return code


def _main(argv: list[str] | None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # usage error (one line, status 2), --help or --version (0)
        return e.code if isinstance(e.code, int) else 2
    logging.basicConfig(level=logging.ERROR if args.quiet else logging.WARNING, format="%(levelname)s: %(message)s")
    try:
        result = _run(args)
    except (ValueError, TypeError, OSError, FloatingPointError, RuntimeError, KeyError, MemoryError) as e:
        message = str(e).splitlines()[0] if str(e) else e.__class__.__name__
        if isinstance(e, OSError) and e.errno is not None and e.filename is None and getattr(args, "output", None):
            message += f" (writing {args.output})"  # e.g. a full disk: say where
        print(f"stream-readapt {args.command}: error: {message}", file=sys.stderr)
        return 1
    except ImportError as e:  # an optional extra not installed: say which (anything else is a bug of ours)
        message = extra_for_error(e)
        if message is None:
            return _internal_error(args, e)
        print(f"stream-readapt {args.command}: error: {message}", file=sys.stderr)
        return 1
    except Exception as e:
        return _internal_error(args, e)
    if args.json:
        print(json.dumps(result if isinstance(result, dict) else {"text": result}, indent=2, default=str))
    elif isinstance(result, dict):
        print(summary(args.command, result))
    else:
        print(result)
    return 0


def _internal_error(args, e: Exception) -> int:
    """A bug of ours: still one line, and the way to see more."""
    if os.environ.get("STREAM_READAPT_DEBUG"):
        raise e
    print(f"stream-readapt {args.command}: internal error: {e.__class__.__name__}: {str(e)[:300]} "
          "(set STREAM_READAPT_DEBUG=1 for the traceback, and please report it)", file=sys.stderr)
    return 1


def summary(command: str, manifest: dict) -> str:
    """A few human lines about a finished extract / merge."""
    if "text" in manifest:
        return manifest["text"]
    if command == "eval":
        from .eval.report import format_table

        return format_table(manifest)
    kind = manifest.get("kind")
    n = len(manifest.get("tensors") or manifest.get("modules") or {})
    line = f"{command}: wrote {kind} with {n} {'modules' if 'modules' in manifest else 'tensors'} to {manifest.get('output')}"
    if kind == "merged":
        line += f" (alpha={manifest['alpha']}, beta={manifest['beta']})"
    return line


if __name__ == "__main__":
    sys.exit(main())
