"""The paper's comparison in miniature (RE-Adapt, Fleshman & Van Durme 2024, Tables 1-2), offline, CPU.

A synthetic world of people with a city, a job and a pet:

1. base Φ: a small Llama pretrained (next-token loss) on documents stating the facts of the
   "old" people, each fact in several paraphrases;
2. instruct Θ: Φ fine-tuned on chat-formatted QA about half the old people, closed-book and
   with the fact sheet as context (the format `stream_readapt.eval.evaluate` prompts with);
3. knowledge Ψ: a PEFT LoRA trained on Φ (not Θ) with documents about "new" people;
4. RE-Adapter Δ = Θ − Φ (`extract`), LoRE-Adapter (`extract --energy 0.5`).

Then `stream_readapt.eval.evaluate` scores QA about the new people, closed-book and with the oracle
passage, for Instruct, Instruct + knowledge (Θ + Ψ), RE-Adapt and LoRE-Adapt (α = β = 0.5), and
draws the α × β heatmap of RE-Adapt. Everything is built here; nothing is downloaded.

    python bench/paper_miniature.py [--workdir /tmp/miniature] [--quick]
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from stream_readapt import evaluate, extract
from stream_readapt.eval.data import Passage, Question
from stream_readapt.eval.generate import Generator

CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }} {{ m['content'] }}</s>{% endfor %}"
                 "{% if add_generation_prompt %}<s>assistant{% endif %}")
SPECIALS = ("<unk>", "<s>", "</s>", "<pad>")
ATTRS = {  # attribute: (fact paraphrases, question)
    "city": (["{p} lives in {v} .", "the home of {p} is {v} .", "{p} has a house in {v} ."], "where does {p} live ?"),
    "job": (["{p} works as a {v} .", "the job of {p} is {v} .", "{p} earns a living as a {v} ."], "what is the job of {p} ?"),
    "pet": (["{p} owns a {v} .", "the pet of {p} is a {v} .", "{p} takes care of a {v} ."], "which pet does {p} have ?"),
}


@dataclass(frozen=True)
class Size:
    old: int = 120  # people in pretraining (half of them in instruction tuning)
    new: int = 24  # people only the knowledge adapter sees
    hidden: int = 96
    layers: int = 3
    pretrain_steps: int = 800
    instruct_steps: int = 300
    lora_steps: int = 400
    batch: int = 32


QUICK = Size(old=40, new=12, hidden=64, layers=2, pretrain_steps=60, instruct_steps=30, lora_steps=30, batch=16)


# ----------------------------------------------------------------------------- the world

def make_world(size: Size, seed: int = 0) -> dict[str, dict[str, str]]:
    """{person: {attr: value}}; values are shared words, a job is two words (graded ROUGE-L)."""
    rng = random.Random(seed)
    cities = [f"city{i}" for i in range(12)]
    jobs = [f"{a} {b}" for a in ("senior", "junior", "chief") for b in ("baker", "pilot", "tailor", "miner")]
    pets = [f"pet{i}" for i in range(8)]
    return {f"person{i}": {"city": rng.choice(cities), "job": rng.choice(jobs), "pet": rng.choice(pets)}
            for i in range(size.old + size.new)}


def documents(person: str, facts: dict[str, str], rng: random.Random) -> str:
    """One document: every fact of `person`, each in a random paraphrase, in random order."""
    lines = [rng.choice(ATTRS[a][0]).format(p=person, v=v) for a, v in facts.items()]
    rng.shuffle(lines)
    return " ".join(lines)


def fact_sheet(person: str, facts: dict[str, str]) -> str:
    return " ".join(ATTRS[a][0][0].format(p=person, v=v) for a, v in facts.items())


def qa_rows(people: list[str], world: dict) -> tuple[list[Question], list[Passage]]:
    questions, passages = [], []
    for p in people:
        passages.append(Passage(f"doc-{p}", fact_sheet(p, world[p])))
        for a, v in world[p].items():
            questions.append(Question(f"{p}-{a}", ATTRS[a][1].format(p=p), (v,), f"doc-{p}"))
    return questions, passages


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ----------------------------------------------------------------------------- models

def build_tokenizer(texts: list[str]):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for t in texts for w in re.findall(r"\w+|[^\w\s]", t)} - set(SPECIALS))
    vocab = {w: i for i, w in enumerate(list(SPECIALS) + words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")
    return fast


def new_model(vocab: int, size: Size):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab, hidden_size=size.hidden, intermediate_size=2 * size.hidden,
                         num_hidden_layers=size.layers, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=256, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                         pad_token_id=3)
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def train(model, examples: list[tuple[list[int], list[int]]], steps: int, batch: int, lr: float, seed: int):
    """AdamW on (input ids, labels) examples, right-padded batches; labels -100 are not scored."""
    rng = random.Random(seed)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 50) * max(0.05, 1 - s / steps))
    model.train()
    for step in range(steps):
        chunk = rng.sample(examples, min(batch, len(examples)))
        width = max(len(ids) for ids, _ in chunk)
        ids = torch.tensor([x + [3] * (width - len(x)) for x, _ in chunk])
        labels = torch.tensor([y + [-100] * (width - len(y)) for _, y in chunk])
        loss = model(input_ids=ids, attention_mask=ids != 3, labels=labels).loss
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % max(1, steps // 5) == 0 or step == steps - 1:
            print(f"  step {step:5d}/{steps}: loss {loss.item():.3f}", file=sys.stderr)
    return model.eval()


def lm_examples(tok, texts: list[str]) -> list[tuple[list[int], list[int]]]:
    out = []
    for t in texts:
        ids = tok(t)["input_ids"] + [tok.eos_token_id]
        out.append((ids, ids))
    return out


def qa_examples(tok, questions: list[Question], passages: dict[str, Passage], rng: random.Random):
    """Chat QA, closed-book and with the gold passage, prompted exactly as `evaluate` prompts."""
    gen = Generator(model=None, tokenizer=tok, eos_token_id=tok.eos_token_id)
    out = []
    for q in questions:
        for passage in (None, passages[q.passage_id]):
            prompt = gen.prompt_ids(q, passage)
            answer = tok(" " + q.answers[0], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            out.append((prompt + answer, [-100] * len(prompt) + answer))
    rng.shuffle(out)
    return out


def save(model, tok, folder: Path, chat: bool) -> Path:
    model.save_pretrained(folder, safe_serialization=True)
    tok = copy.deepcopy(tok)
    tok.chat_template = CHAT_TEMPLATE if chat else None
    tok.save_pretrained(folder)
    return folder


# ----------------------------------------------------------------------------- the run

def build(work: Path, size: Size) -> dict:
    world = make_world(size)
    people = list(world)
    old, new = people[:size.old], people[size.old:]
    rng = random.Random(1)
    corpus = [documents(p, world[p], rng) for _ in range(6) for p in old]
    new_docs = [documents(p, world[p], rng) for _ in range(6) for p in new]
    questions, passages = qa_rows(people, world)
    prompts = [q.question for q in questions] + [p.text for p in passages] + ["Context : Question : user assistant"]
    tok = build_tokenizer(corpus + new_docs + prompts)
    tok.chat_template = CHAT_TEMPLATE
    timings = {}

    t = time.perf_counter()
    base = train(new_model(len(tok), size), lm_examples(tok, corpus), size.pretrain_steps, size.batch, 3e-3, 0)
    save(base, tok, work / "base", chat=False)
    timings["pretrain_s"] = time.perf_counter() - t

    t = time.perf_counter()
    tuned = [q for q in questions if q.id.split("-")[0] in set(old[: size.old // 2])]
    by_id = {p.id: p for p in passages}
    instruct = train(copy.deepcopy(base), qa_examples(tok, tuned, by_id, rng), size.instruct_steps, size.batch, 1e-3, 1)
    save(instruct, tok, work / "instruct", chat=True)
    timings["instruct_s"] = time.perf_counter() - t

    t = time.perf_counter()
    build_knowledge_lora(work, tok, new_docs, size)
    timings["knowledge_lora_s"] = time.perf_counter() - t

    new_q = [q for q in questions if q.id.split("-")[0] in set(new)]
    new_p = [p for p in passages if p.id[4:] in set(new)]
    write_jsonl(work / "qa_new.jsonl", [{"id": q.id, "question": q.question, "answers": list(q.answers),
                                         "passage_id": q.passage_id} for q in new_q])
    write_jsonl(work / "passages.jsonl", [{"id": p.id, "text": p.text} for p in new_p])
    return timings


def build_knowledge_lora(work: Path, tok, docs: list[str], size: Size) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(work / "base", dtype=torch.float32)
    config = LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                             "up_proj", "down_proj"])
    model = get_peft_model(base, config)
    train(model, lm_examples(tok, docs), size.lora_steps, size.batch, 3e-3, 2)
    model.save_pretrained(work / "knowledge", safe_serialization=True)


SYSTEMS = {  # name: (model, evaluate kwargs)
    "Instruct": ("instruct", {}),
    "Instruct + knowledge": ("instruct", {"knowledge": "knowledge", "alphas": [1.0], "betas": [0.0]}),
    "RE-Adapt": ("base", {"readapter": "readapter", "knowledge": "knowledge", "alphas": [0.5], "betas": [0.5]}),
    "LoRE-Adapt": ("base", {"readapter": "lore", "knowledge": "knowledge", "alphas": [0.5], "betas": [0.5]}),
}


def score(work: Path) -> list[dict]:
    rows = []
    for name, (model, kw) in SYSTEMS.items():
        kw = {k: (work / v if isinstance(v, str) else v) for k, v in kw.items()}
        for retrieval in ("none", "oracle"):
            out = work / "eval" / f"{name.replace(' ', '').replace('+', '_')}-{retrieval}"
            r = evaluate(work / model, work / "qa_new.jsonl", out, passages=work / "passages.jsonl",
                         retrieval=retrieval, max_new_tokens=6, dtype="float32", device="cpu", overwrite=True, **kw)
            p = r["points"][0]
            rows.append({"system": name, "retrieval": "closed-book" if retrieval == "none" else "oracle",
                         "rougeL_recall": p["rougeL_recall"], "exact_match": p["exact_match"], "n": p["n"]})
            print(f"{name:22s} {rows[-1]['retrieval']:12s} ROUGE-L {p['rougeL_recall']:.3f}  EM {p['exact_match']:.3f}",
                  file=sys.stderr)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="/tmp/paper-miniature", help="scratch folder (replaced)")
    ap.add_argument("--out", default="bench/out", help="where paper_miniature.json and the heatmap go")
    ap.add_argument("--quick", action="store_true", help="a smoke run: tiny world, a few steps (numbers meaningless)")
    args = ap.parse_args(argv)
    size = QUICK if args.quick else Size()
    work, out = Path(args.workdir), Path(args.out)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    torch.set_num_threads(1)  # tiny matmuls: more threads only spin on a shared 2-core box
    start = time.perf_counter()
    timings = build(work, size)
    extract(work / "base", work / "instruct", work / "readapter", device="cpu")
    extract(work / "base", work / "instruct", work / "lore", energy=0.5, device="cpu")
    rows = score(work)
    t = time.perf_counter()
    grid = [0.0, 0.5, 1.0]
    heat = evaluate(work / "base", work / "qa_new.jsonl", work / "eval" / "heatmap", readapter=work / "readapter",
                    knowledge=work / "knowledge", alphas=grid, betas=grid, max_new_tokens=6, dtype="float32",
                    device="cpu", overwrite=True)
    timings["heatmap_s"] = time.perf_counter() - t
    shutil.copy(work / "eval" / "heatmap" / "heatmap.png", out / "paper_miniature_heatmap.png")
    timings["total_s"] = time.perf_counter() - start
    result = {"size": size.__dict__, "table": rows, "grid": heat["points"], "timings": timings}
    (out / "paper_miniature.json").write_text(json.dumps(result, indent=2))
    print(json.dumps({"table": rows, "timings": timings}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
