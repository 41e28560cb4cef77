"""`evaluate` / `stream-readapt eval`: metrics against rouge-score, BM25, bad data, and a live grid
point against the merged checkpoint evaluated from disk."""

from __future__ import annotations

import json

import pytest

from stream_readapt import evaluate, extract, merge
from stream_readapt.cli import main
from stream_readapt.eval.data import Passage, Question, load_questions
from stream_readapt.eval.metrics import exact_match, normalize_answer, rouge_l_recall
from stream_readapt.eval.retrieval import retrieve

rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")

# (prediction, references, hand-counted ROUGE-L recall: LCS tokens / reference tokens, best reference)
ROUGE_CASES = [
    ("the cat sat on the mat", ["cat on mat"], 1.0),
    ("a cat", ["the black cat sat"], 1 / 4),
    ("Paris, France!", ["paris", "lyon france"], 1.0),
    ("nothing in common", ["zebra"], 0.0),
    ("b a c", ["a b c"], 2 / 3),
    ("running dogs", ["run dog"], 0.0),  # no stemming
]


@pytest.mark.parametrize("prediction, answers, expected", ROUGE_CASES)
def test_rouge_l_recall_is_rouge_scores(prediction, answers, expected):
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    reference = max(scorer.score(a, prediction)["rougeL"].recall for a in answers)
    assert rouge_l_recall(prediction, answers) == pytest.approx(reference, abs=1e-12)
    assert rouge_l_recall(prediction, answers) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("prediction, answers, expected", [
    ("It is Paris.", ["paris"], 1.0),
    ("The answer: The Eiffel Tower", ["eiffel tower"], 1.0),
    ("year 2010", ["201"], 0.0),  # whole tokens only
    ("in 1999", ["2000", "1999"], 1.0),
    ("blue", ["red"], 0.0),
    ("", ["red"], 0.0),
])
def test_exact_match_is_normalized_containment(prediction, answers, expected):
    assert exact_match(prediction, answers) == expected


def test_normalize_answer_is_squads():
    assert normalize_answer("  The  Cat's (big) HAT, an apple ") == "cats big hat apple"


def test_bm25_top1_finds_the_one_passage_with_the_answer():
    passages = [Passage("p0", "The weather in spring is mild and rainy."),
                Passage("p1", "Marie Curie discovered polonium and radium in Paris."),
                Passage("p2", "Volcanoes erupt molten rock called lava."),
                Passage("p3", "Chess is played on a board of sixty-four squares.")]
    questions = [Question("q0", "Which elements did Marie Curie discover?", ("polonium",), "p1"),
                 Question("q1", "What do volcanoes erupt?", ("lava",), "p0"),  # gold label deliberately wrong
                 Question("q2", "How many squares on a chess board?", ("64",))]
    got = retrieve(questions, passages, "bm25")
    assert [got.passages[q.id].id for q in questions] == ["p1", "p2", "p3"]
    assert (got.recall_at_1, got.n_gold) == (0.5, 2)
    oracle = retrieve(questions[:2], passages, "oracle")
    assert oracle.passages["q1"].id == "p0" and oracle.recall_at_1 == 1.0


# ----------------------------------------------------------------------------- bad data

def _write(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


GOOD = '{"id": "a", "question": "w5 w6", "answers": ["w7"], "passage_id": "p1"}'
BAD_QA = {
    "invalid JSON": ([GOOD, "", '{"id": "b", "question": '], "qa.jsonl:3: invalid JSON"),
    "not an object": ([GOOD, "[1, 2]"], "qa.jsonl:2: expected a JSON object"),
    "no answers": ([GOOD, '{"id": "b", "question": "q"}'], "qa.jsonl:2: 'answers'"),
    "answers not strings": ([GOOD, '{"id": "b", "question": "q", "answers": [3]}'], "qa.jsonl:2: 'answers'"),
    "empty question": ([GOOD, '{"id": "b", "question": " ", "answers": ["x"]}'], "qa.jsonl:2: 'question'"),
    "duplicate id": ([GOOD, GOOD], "qa.jsonl:2: duplicate id 'a' (first on line 1)"),
    "empty file": ([""], "qa.jsonl: no questions"),
    "unknown passage": (['{"id": "a", "question": "q", "answers": ["x"], "passage_id": "p9"}'],
                        "qa.jsonl:1: passage_id 'p9' is not in the passages file"),
}


@pytest.mark.parametrize("case", list(BAD_QA))
def test_bad_qa_rows_are_one_line_errors_naming_file_and_line(llama_pair, tmp_path, capsys, case):
    lines, message = BAD_QA[case]
    qa = _write(tmp_path / "qa.jsonl", lines)
    passages = _write(tmp_path / "p.jsonl", ['{"id": "p1", "text": "w1 w2"}'])
    out = tmp_path / "out"
    rc = main(["eval", str(llama_pair.base), "--data", str(qa), "--passages", str(passages), "-o", str(out)])
    err = capsys.readouterr().err
    assert rc == 1 and message in err and err.count("\n") == 1, err
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_bad_passages_and_options(llama_pair, tmp_path, capsys):
    qa = _write(tmp_path / "qa.jsonl", ['{"id": "a", "question": "q", "answers": ["x"]}'])
    bad = _write(tmp_path / "p.jsonl", ['{"id": "p1", "text": "ok"}', '{"id": "p2"}'])
    cases = [
        (["--passages", str(bad), "--retrieval", "bm25"], "p.jsonl:2: 'text' must be a non-empty string"),
        (["--retrieval", "bm25"], "needs a passages file"),
        (["--passages", str(_write(tmp_path / "g.jsonl", ['{"id": "p1", "text": "w1"}'])), "--retrieval", "oracle"],
         "qa.jsonl:1: no 'passage_id'"),
        (["--alpha", "0,1"], "alpha/beta need an adapter"),
        (["--readapter", str(tmp_path / "nope")], "no such readapter folder"),
        (["--data", str(tmp_path / "missing.jsonl")], "missing.jsonl: no such data file"),
    ]
    for extra, message in cases:
        rc = main(["eval", str(llama_pair.base), "--data", str(qa), "-o", str(tmp_path / "out"), *extra])
        err = capsys.readouterr().err
        assert rc == 1 and message in err and err.count("\n") == 1, (extra, err)
    assert not (tmp_path / "out").exists()


def test_numeric_ids_are_text(tmp_path):
    qa = _write(tmp_path / "qa.jsonl", ['{"id": 7, "question": "q", "answers": "x", "passage_id": 3}'])
    assert load_questions(qa)[0] == Question("7", "q", ("x",), "3")


# ----------------------------------------------------------------------------- the grid

WORDS = [f"w{i}" for i in range(10, 250, 7)]


@pytest.fixture(scope="module")
def qa_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("qa")
    passages = [{"id": f"p{i}", "text": " ".join(WORDS[i:i + 5])} for i in range(0, 30, 5)]
    rows = [{"id": f"q{i}", "question": " ".join(WORDS[i + 1:i + 3]), "answers": [WORDS[i + 3], WORDS[i + 4]],
             "passage_id": f"p{i}"} for i in range(0, 30, 5)]
    qa = _write(root / "qa.jsonl", [json.dumps(r) for r in rows])
    return qa, _write(root / "p.jsonl", [json.dumps(p) for p in passages])


@pytest.fixture(scope="module")
def lore(llama_pair, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval_lore") / "lore"
    extract(llama_pair.base, llama_pair.instruct, out, energy=0.5, device="cpu")
    return out


def _by_point(out) -> dict:
    rows = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    points: dict = {}
    for r in rows:
        points.setdefault((r["alpha"], r["beta"]), {})[r["id"]] = r
    return points


@pytest.mark.parametrize("retrieval", ["none", "oracle"])
def test_grid_point_equals_eval_of_merged_checkpoint(llama_pair, lore, lora_adapter, qa_files, tmp_path, retrieval):
    qa, passages = qa_files
    kw = dict(passages=passages, retrieval=retrieval, max_new_tokens=6, dtype="float32", device="cpu")
    live = evaluate(llama_pair.base, qa, tmp_path / "live", readapter=lore, knowledge=lora_adapter,
                    alphas=[0.0, 0.5], betas=[0.5, 1.0], **kw)
    grid = _by_point(tmp_path / "live")
    assert [(p["alpha"], p["beta"]) for p in live["points"]] == [(0.0, 0.5), (0.0, 1.0), (0.5, 0.5), (0.5, 1.0)]
    assert len({tuple(r["prediction"] for r in g.values()) for g in grid.values()}) > 1  # the scales are live
    for alpha, beta in ((0.5, 0.5), (0.0, 1.0)):
        merged = tmp_path / f"merged{alpha}{beta}"
        merge(llama_pair.base, merged, readapter=lore, knowledge=lora_adapter, alpha=alpha, beta=beta, device="cpu")
        ref = evaluate(merged, qa, tmp_path / f"ref{alpha}{beta}", **kw)
        assert ref["points"][0]["alpha"] is None
        want = _by_point(tmp_path / f"ref{alpha}{beta}")[(None, None)]
        assert {k: r["prediction"] for k, r in grid[(alpha, beta)].items()} == {k: r["prediction"] for k, r in want.items()}
        point = next(p for p in live["points"] if (p["alpha"], p["beta"]) == (alpha, beta))
        for key in ("rougeL_recall", "exact_match", "n"):
            assert point[key] == ref["points"][0][key]


def test_instruct_at_beta_one_is_the_instruct_model(llama_pair, qa_files, tmp_path):
    qa, _ = qa_files
    kw = dict(max_new_tokens=6, dtype="float32", device="cpu")
    live = evaluate(llama_pair.base, qa, tmp_path / "live", instruct=llama_pair.instruct, alphas=[0.0], betas=[0.0, 1.0], **kw)
    evaluate(llama_pair.instruct, qa, tmp_path / "ref", **kw)
    grid, want = _by_point(tmp_path / "live"), _by_point(tmp_path / "ref")[(None, None)]
    assert {k: r["prediction"] for k, r in grid[(0.0, 1.0)].items()} == {k: r["prediction"] for k, r in want.items()}
    assert live["settings"]["prompt"] == "chat" and "instruct" in live["inputs"]


def test_cli_writes_results_generations_heatmap_and_json(llama_pair, lore, qa_files, tmp_path, capsys):
    qa, passages = qa_files
    out = tmp_path / "out"
    rc = main(["eval", str(llama_pair.base), "--data", str(qa), "-o", str(out), "--readapter", str(lore),
               "--alpha", "0,1", "--beta", "0.5", "--passages", str(passages), "--retrieval", "bm25",
               "--max-new-tokens", "4", "--device", "cpu", "--json", "--quiet"])
    printed = json.loads(capsys.readouterr().out)
    results = json.loads((out / "results.json").read_text())
    assert rc == 0 and printed["points"] == results["points"]
    assert [(p["alpha"], p["beta"], p["n"]) for p in results["points"]] == [(0.0, 0.5, 6), (1.0, 0.5, 6)]
    assert results["retrieval"]["method"] == "bm25" and 0.0 <= results["retrieval"]["recall_at_1"] <= 1.0
    assert results["inputs"]["model"]["fingerprint"].startswith("sha256:")
    assert results["inputs"]["data"]["fingerprint"].startswith("sha256:")
    rows = (out / "generations.jsonl").read_text().splitlines()
    assert len(rows) == 12 and all("passage_id" in json.loads(r) for r in rows)
    assert (out / "heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plain_model_is_one_point_with_null_scales(llama_pair, qa_files, tmp_path, capsys):
    qa, _ = qa_files
    rc = main(["eval", str(llama_pair.instruct), "--data", str(qa), "-o", str(tmp_path / "out"),
               "--max-new-tokens", "3", "--device", "cpu"])
    table = capsys.readouterr().out
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert rc == 0 and len(results["points"]) == 1 and results["points"][0]["alpha"] is None
    assert "rougeL_recall" in table and not (tmp_path / "out" / "heatmap.png").exists()


# ----------------------------------------------------------------------------- lm-eval tasks

TASK_YAML = """task: sr_tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
"""


def test_lm_eval_tasks_run_on_the_patched_model_at_each_point(llama_pair, qa_files, tmp_path, monkeypatch):
    """lm-eval's log-likelihood accuracy at a live point equals lm-eval on the merged checkpoint."""
    pytest.importorskip("lm_eval")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rows = [{"question": f"w{i} w{i + 1}", "choices": [f"w{i + 2}", f"w{i + 30}", f"w{i + 60}"], "label": i % 3}
            for i in range(10, 70, 3)]
    data = _write(tmp_path / "mc.jsonl", [json.dumps(r) for r in rows])
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "sr_tiny_mc.yaml").write_text(TASK_YAML.format(data=data))
    qa, _ = qa_files
    kw = dict(max_new_tokens=2, dtype="float32", device="cpu", tasks=["sr_tiny_mc"], task_dir=tmp_path / "tasks")
    live = evaluate(llama_pair.base, qa, tmp_path / "live", instruct=llama_pair.instruct, alphas=[0.0],
                    betas=[0.0, 1.0], **kw)
    ref = evaluate(llama_pair.instruct, qa, tmp_path / "ref", **kw)
    at_base, at_instruct = (p["tasks"]["sr_tiny_mc"] for p in live["points"])
    assert 0.0 <= at_base["acc,none"] <= 1.0
    assert at_instruct == ref["points"][0]["tasks"]["sr_tiny_mc"] and "acc,none" in at_instruct
    with pytest.raises(ValueError, match="unknown lm-eval task"):
        evaluate(llama_pair.base, qa, tmp_path / "bad", **{**kw, "tasks": ["no_such_task_xyz"]})
