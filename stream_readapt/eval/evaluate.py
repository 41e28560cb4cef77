"""`evaluate`: closed-book / retrieval-augmented QA over a live α × β grid on one loaded model.

The model is loaded once with transformers; adapters are attached with `patch_model`, and each
grid point is one `set_scales` call (no re-merge, no reload), then greedy answers are scored by
ROUGE-L recall and exact match (see `eval_metrics`), optionally with lm-evaluation-harness tasks.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from ..deltas.sources import open_readapter
from ..engine.manifest import input_record, new_manifest
from ..engine.streaming import check_scales, resolve_device, resolve_dtype
from ..io.checkpoint import Checkpoint
from ..io.writer import OutputFolder
from ..optional import require
from ..terms.peft_adapter import PeftAdapter
from .data import Question, check_gold, file_fingerprint, load_passages, load_questions
from .generate import Generator, eos_ids
from .metrics import exact_match, rouge_l_recall
from .report import write_heatmap, write_json
from .retrieval import Retrieved, retrieve

logger = logging.getLogger(__name__)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


@dataclass(frozen=True)
class Sources:
    """Where the model and its adapters come from (at most one of readapter / instruct)."""

    model: str
    readapter: str | None = None
    instruct: str | None = None
    knowledge: str | None = None

    @property
    def adapted(self) -> bool:
        return any((self.readapter, self.instruct, self.knowledge))

    def tokenizer_source(self) -> str:
        """The instruct side speaks the chat format: instruct, else the readapter's copy of its files."""
        for folder in (self.instruct, self.readapter):
            if folder and any((Path(folder) / n).is_file() for n in TOKENIZER_FILES):
                return folder
        return self.model


def scale_grid(alphas, betas, adapted: bool) -> list[tuple[float | None, float | None]]:
    """(α, β) points, α-major; a plain model is the one point (None, None)."""
    if not adapted:
        if alphas is not None or betas is not None:
            raise ValueError("alpha/beta need an adapter: give --readapter, --instruct or --knowledge")
        return [(None, None)]
    alphas, betas = list(alphas or [0.5]), list(betas or [0.5])
    for a in alphas:
        check_scales(alpha=a)
    for b in betas:
        check_scales(beta=b)
    return [(a, b) for a in alphas for b in betas]


def _check_sources(sources: Sources) -> None:
    if sources.readapter and sources.instruct:
        raise ValueError("give at most one of readapter= / instruct= (where Δ comes from)")
    for name in ("readapter", "instruct", "knowledge"):
        path = getattr(sources, name)
        if path and not Path(path).is_dir():
            raise FileNotFoundError(f"{path}: no such {name} folder")


def _load_model(sources: Sources, scratch: Path, dtype, device, revision, ignore_base_mismatch, quiet):
    """The model on `device`, patched with Δ (a readapter, or one extracted from instruct) and Ψ."""
    from transformers import AutoModelForCausalLM

    with Checkpoint.open(sources.model, revision=revision) as ckpt:  # safetensors only, checked up front
        folder = ckpt.folder
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=resolve_dtype(dtype) or "auto", use_safetensors=True)
    model = model.to(resolve_device(device)).eval()
    readapter = sources.readapter
    if sources.instruct:  # Δ = Θ − Φ once, into a scratch folder that lives as long as the run
        from ..engine.extract import extract

        readapter = scratch / "readapter"
        extract(folder, sources.instruct, readapter, device=device, quiet=quiet)
    if sources.adapted:
        from ..live.patch import patch_model

        patch_model(model, readapter, sources.knowledge, ignore_base_mismatch=ignore_base_mismatch)
    return model


def _inputs(sources: Sources, data, passages, revision) -> dict:
    with Checkpoint.open(sources.model, revision=revision) as ckpt:
        out = {"model": input_record(ckpt)}
    if sources.readapter:
        delta = open_readapter(sources.readapter)
        try:
            out["readapter"] = delta.record()
        finally:
            delta.close()
    if sources.instruct:
        with Checkpoint.open(sources.instruct) as ckpt:
            out["instruct"] = input_record(ckpt)
    if sources.knowledge:
        psi = PeftAdapter(sources.knowledge)
        try:
            out["knowledge"] = {"source": str(sources.knowledge), "fingerprint": psi.fingerprint()}
        finally:
            psi.close()
    out["data"] = {"source": str(data), "fingerprint": file_fingerprint(data)}
    if passages:
        out["passages"] = {"source": str(passages), "fingerprint": file_fingerprint(passages)}
    return out


def _score_point(gen: Generator, questions: list[Question], context: Retrieved, point, rows, quiet) -> dict:
    """Answer every question at the current scales; one generations.jsonl row each."""
    alpha, beta = point
    rouge = em = 0.0
    start = time.perf_counter()
    for q in tqdm(questions, desc=f"α={alpha} β={beta}", file=sys.stderr, disable=quiet, leave=False):
        passage = context.passages[q.id]
        prediction = gen.answer(gen.prompt_ids(q, passage))
        r, e = rouge_l_recall(prediction, q.answers), exact_match(prediction, q.answers)
        rouge, em = rouge + r, em + e
        row = {"alpha": alpha, "beta": beta, "id": q.id, "prediction": prediction, "rougeL_recall": r, "exact_match": e}
        if passage is not None:
            row["passage_id"] = passage.id
        rows.write(json.dumps(row, ensure_ascii=False) + "\n")
    n = len(questions)
    return {"alpha": alpha, "beta": beta, "rougeL_recall": rouge / n, "exact_match": em / n, "n": n,
            "seconds": round(time.perf_counter() - start, 3)}


def evaluate(
    model: str | os.PathLike,
    data: str | os.PathLike,
    output: str | os.PathLike,
    *,
    readapter: str | os.PathLike | None = None,
    instruct: str | os.PathLike | None = None,
    knowledge: str | os.PathLike | None = None,
    alphas=None,
    betas=None,
    passages: str | os.PathLike | None = None,
    retrieval: str = "none",
    max_new_tokens: int = 32,
    tasks: list[str] | None = None,
    task_dir: str | os.PathLike | None = None,
    task_limit: int | None = None,
    dtype: str | None = None,
    device: str = "auto",
    revision: str | None = None,
    overwrite: bool = False,
    ignore_base_mismatch: bool = False,
    quiet: bool = True,
) -> dict:
    """Score greedy answers to `data` at every (α, β) of the grid; write `output`; return results.json.

    Args:
        model: the model to load (the pretrained base when adapters are given): folder or Hub id.
        data: QA JSON Lines ({"id", "question", "answers", optional "passage_id"}).
        output: folder for results.json, generations.jsonl and heatmap.png (must be empty unless `overwrite`).
        readapter / instruct: Δ from an `extract` folder, or computed once from the instruct model.
        knowledge: a PEFT LoRA/DoRA adapter trained on the base (Ψ).
        alphas, betas: the grid (default 0.5 each); a model without adapters is one point (None, None).
        passages, retrieval: passage JSON Lines ({"id", "text"}) and "none", "bm25" (top-1) or "oracle".
        tasks, task_dir, task_limit: lm-evaluation-harness tasks run at every point (task YAMLs in task_dir).

    Example:
        >>> evaluate("base", "qa.jsonl", "out", readapter="lore", knowledge="lora", alphas=[0, 0.5, 1], betas=[0.5])
    """
    sources = Sources(*(str(p) if p else None for p in (model, readapter, instruct, knowledge)))
    _check_sources(sources)
    _check_extras(sources, retrieval, tasks)
    grid = scale_grid(alphas, betas, sources.adapted)
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    questions, context = _questions_and_context(data, passages, retrieval)
    out_folder = OutputFolder(output, overwrite=overwrite, inputs=(model, data, passages, readapter, instruct, knowledge))
    results = new_manifest("eval", inputs=_inputs(sources, data, passages, revision))
    with tempfile.TemporaryDirectory(prefix="stream-readapt-eval-") as scratch:
        loaded = _load_model(sources, Path(scratch), dtype, device, revision, ignore_base_mismatch, quiet)
        gen = _generator(loaded, sources, max_new_tokens)
        results["settings"] = {"retrieval": retrieval, "max_new_tokens": max_new_tokens, "prompt": gen.prompt_style,
                               "dtype": str(next(loaded.parameters()).dtype).replace("torch.", ""),
                               "device": str(next(loaded.parameters()).device), "tokenizer": sources.tokenizer_source()}
        if context.method != "none":
            results["retrieval"] = context.record()
        with out_folder as tmp:
            results["points"] = _run_grid(gen, questions, context, grid, tmp, tasks, task_dir, task_limit, quiet)
            results["heatmap"] = "heatmap.png" if write_heatmap(tmp / "heatmap.png", results["points"]) else None
            write_json(tmp / "results.json", results)
    results["output"] = str(output)
    return results


def _check_extras(sources: Sources, retrieval: str, tasks) -> None:
    """Every optional package this run will import, checked before anything is loaded."""
    require("transformers", "eval", extra="eval-qa")
    require("rouge_score", "eval's ROUGE-L scoring", extra="eval-qa")
    if sources.adapted:  # a grid: heatmap.png
        require("matplotlib", "eval's heatmap", extra="eval-qa")
    if retrieval == "bm25":
        require("bm25s", "--retrieval bm25", extra="eval-qa")
    if tasks:
        require("lm_eval", "--tasks (lm-evaluation-harness)", extra="eval")


def _questions_and_context(data, passages, retrieval: str):
    """Data read and checked, and the retrieval done, before any model is loaded (fail fast)."""
    questions = load_questions(data)
    if passages is None and retrieval != "none":
        raise ValueError(f"retrieval {retrieval!r} needs a passages file (--passages P.jsonl)")
    corpus = load_passages(passages) if passages is not None else None
    if corpus is not None:
        check_gold(questions, corpus, data, required=retrieval == "oracle")
    return questions, retrieve(questions, corpus, retrieval)


def _generator(model, sources: Sources, max_new_tokens: int) -> Generator:
    from transformers import AutoTokenizer

    source = sources.tokenizer_source()
    return Generator(model, AutoTokenizer.from_pretrained(source), eos_ids(source, model), max_new_tokens)


def _run_grid(gen, questions, context, grid, tmp: Path, tasks, task_dir, task_limit, quiet) -> list[dict]:
    points = []
    with open(tmp / "generations.jsonl", "w", encoding="utf-8") as rows:
        for point in tqdm(grid, desc="grid", file=sys.stderr, disable=quiet or len(grid) == 1):
            if point[0] is not None:
                from ..live.patch import set_scales

                set_scales(gen.model, *point)
            record = _score_point(gen, questions, context, point, rows, quiet)
            if tasks:
                from .tasks import run_tasks

                record["tasks"] = run_tasks(gen.model, gen.tokenizer, tasks, task_dir, limit=task_limit)
            points.append(record)
            logger.info("α=%s β=%s: ROUGE-L recall %.4f, EM %.4f", *point, record["rougeL_recall"], record["exact_match"])
    return points
