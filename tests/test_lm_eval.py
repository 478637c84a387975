"""minillm's lm-eval-harness tasks (evals/lm_eval, issue 31 part 2): lm-eval run offline on a small trained model
gives eval_tasks.py's cloze choices and eval_ppl.py's bits per byte."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import REPO, load_script

from minillm.data.tokenizer import load_tokenizer
from minillm.eval.perplexity import read_documents
from minillm.eval.tasks import candidate_logprobs, cloze_items, parse_poem
from minillm.model.model import MiniLLM

lm_eval = pytest.importorskip("lm_eval")
TASKS = REPO / "evals" / "lm_eval"


def read_jsonl(path) -> list[dict]:
    """The records of a JSON lines file."""
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def run_lm_eval(model_dir, task: str, include_path, monkeypatch, **model_args) -> dict:
    """lm-eval's hf backend on a local directory, fully offline, from the repository root; its results dict."""
    from lm_eval.tasks import TaskManager

    monkeypatch.chdir(REPO)  # the task files name their data relative to the repository root
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    args = ",".join(f"{k}={v}" for k, v in {"pretrained": model_dir, "dtype": "float32", **model_args}.items())
    return lm_eval.simple_evaluate(model="hf", model_args=args, tasks=[task], device="cpu", batch_size=16,
                                   task_manager=TaskManager(include_path=str(include_path)), log_samples=True)


def test_shipped_task_data_is_what_the_builder_writes():
    texts = read_documents(REPO / "dataset" / "eval.jsonl")
    items = cloze_items([p for p in (parse_poem(t) for t in texts) if p is not None])
    assert read_jsonl(TASKS / "poetry_cloze.jsonl") == [
        {"context": i.context, "choices": i.candidates, "answer": i.answer} for i in items]
    assert read_jsonl(TASKS / "poetry_heldout.jsonl") == [{"text": t} for t in texts]
    idioms = read_jsonl(TASKS / "idioms.jsonl")
    assert len(idioms) == 1000 and len({d["context"] + d["choices"][d["answer"]] for d in idioms}) == 1000
    for d in idioms:
        assert len(d["context"]) == 2 and len(d["choices"]) == 4 and len(set(d["choices"])) == 4
        assert all(len(c) == 2 for c in d["choices"]) and 0 <= d["answer"] < 4


def test_idiom_items_are_deterministic_and_answerable():
    build = load_script("evals/lm_eval/build.py")
    pool = [f"{a}{b}{c}{d}" for a, b, c, d in zip("甲乙丙丁戊己庚辛壬癸" * 3, "子丑寅卯辰巳午未申酉" * 3,
                                                  "一二三四五六七八九十" * 3, "春夏秋冬东南西北上下下上" * 3)]
    first, again = build.idiom_items(pool, 8), build.idiom_items(pool, 8)
    assert first == again
    for item in first:
        assert item["context"] + item["choices"][item["answer"]] in pool


def test_lm_eval_cloze_chooses_as_eval_tasks_does(tiny_sft_dir, tokenizer, monkeypatch):
    results = run_lm_eval(tiny_sft_dir, "minillm_poetry_cloze", TASKS, monkeypatch)
    model = MiniLLM.from_pretrained(tiny_sft_dir).eval()
    ours, theirs = [], []
    for sample in sorted(results["samples"]["minillm_poetry_cloze"], key=lambda s: s["doc_id"]):
        doc = sample["doc"]
        scores = candidate_logprobs(model, tokenizer, doc["context"], doc["choices"])
        ours.append(max(range(4), key=scores.__getitem__))
        lls = [ll for ll, _ in (r[0] if isinstance(r[0], (list, tuple)) else r for r in sample["filtered_resps"])]
        theirs.append(max(range(4), key=lls.__getitem__))
        # lm-eval moves the context's closing newline into each continuation: a constant offset per item.
        offsets = [a - b for a, b in zip(lls, scores)]
        assert max(offsets) - min(offsets) < 1e-3, offsets
    assert len(ours) == 211 and ours == theirs
    task = results["results"]["minillm_poetry_cloze"]
    acc = sum(o == d["answer"] for o, d in zip(ours, read_jsonl(TASKS / "poetry_cloze.jsonl"))) / 211
    assert task["acc,none"] == pytest.approx(acc, abs=1e-12)
    assert task["acc_centered,none"] == pytest.approx((acc - 0.25) / 0.75, abs=1e-12)


def test_lm_eval_bits_per_byte_equal_eval_ppl_without_the_closing_eos(tiny_sft_dir, tmp_path, monkeypatch):
    """Poems shorter than the window: lm-eval scores each after <|endoftext|> as eval_ppl.py does, which also
    scores the closing <|endoftext|>; take that term out and the two sums agree."""
    tok = load_tokenizer(tiny_sft_dir)
    texts = [t for t in read_documents(REPO / "dataset" / "eval.jsonl") if len(tok.encode(t)) < 100][:30]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts),
                                         encoding="utf-8")
    spec = (TASKS / "minillm_poetry_bpb.yaml").read_text().replace("minillm_poetry_bpb", "short_poems_bpb")
    (tmp_path / "short.yaml").write_text(spec.replace("evals/lm_eval/poetry_heldout.jsonl", str(tmp_path / "docs.jsonl")))
    results = run_lm_eval(tiny_sft_dir, "short_poems_bpb", tmp_path, monkeypatch, max_length=128)
    theirs = results["results"]["short_poems_bpb"]["bits_per_byte,none"]

    report = tmp_path / "ppl.json"
    assert load_script("eval_ppl.py").main(["--model", str(tiny_sft_dir), "--data", str(tmp_path / "docs.jsonl"),
                                            "--max_length", "128", "--stride", "128", "--json", str(report)]) == 0
    ppl = json.loads(report.read_text())
    model = MiniLLM.from_pretrained(tiny_sft_dir).eval()
    closing = 0.0
    with torch.no_grad():
        for t in texts:
            ids = torch.tensor([[tok.eos_id, *tok.encode(t)]])
            closing -= F.log_softmax(model(ids).logits[0, -1].float(), dim=-1)[tok.eos_id].item()
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    assert ppl["bytes"] == n_bytes
    assert math.isclose(theirs, (ppl["nll_sum"] - closing) / (n_bytes * math.log(2)), rel_tol=1e-5)
    assert theirs < ppl["bits_per_byte"]
