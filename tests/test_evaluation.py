import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import randomized

from minillm.data.datasets import DataError
from minillm.data.tokenizer import train_tokenizer
from minillm.eval.perplexity import PerplexityResult, evaluate_perplexity, read_documents, windows
from minillm.model.config import LMConfig
from minillm.model.model import MiniLLM

transformers = pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parents[1]
EVAL_JSONL = REPO / "dataset" / "eval.jsonl"


# --- windows -------------------------------------------------------------------------------------


def test_windows_follow_the_transformers_guide():
    # 10 (input, label) pairs, windows of 4 advancing by 2: each re-reads 2 tokens and scores 2 new ones.
    assert windows(10, 4, 2) == [(0, 4, 0), (2, 6, 4), (4, 8, 6), (6, 10, 8)]
    assert windows(10, 4, 4) == [(0, 4, 0), (4, 8, 4), (8, 10, 8)]
    assert windows(3, 4, 4) == [(0, 3, 0)]


@pytest.mark.parametrize("n", [1, 2, 7, 16, 17, 50])
@pytest.mark.parametrize("max_length,stride", [(8, 8), (8, 4), (8, 3), (8, 1), (1, 1)])
def test_windows_score_every_target_once(n, max_length, stride):
    ws = windows(n, max_length, stride)
    scored = [j for _, end, first in ws for j in range(first, end)]
    assert scored == list(range(n))
    for begin, end, first in ws:
        assert end - begin <= max_length
        assert begin <= first < end
        assert first - begin <= max_length - stride  # context re-read


# --- against transformers ------------------------------------------------------------------------


def hf_strided_nll(hf, stream: list[int], max_length: int, stride: int) -> tuple[float, int]:
    """The loop of the transformers guide "Perplexity of fixed-length models" on one token stream.

    The HF model shifts labels inside, so a window of max_length + 1 tokens holds max_length
    predictions, the same as minillm's window of max_length inputs.
    """
    ids = torch.tensor([stream])
    seq_len = ids.size(1)
    nll_sum, n_tokens, prev_end = 0.0, 0, 0
    for begin in range(0, seq_len, stride):
        end = min(begin + max_length + 1, seq_len)
        trg_len = end - prev_end
        input_ids = ids[:, begin:end]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            loss = hf(input_ids, labels=target_ids).loss
        n_valid = int((target_ids[:, 1:] != -100).sum())
        nll_sum += loss.item() * n_valid  # the mean over scored tokens, weighted back to a sum
        n_tokens += n_valid
        prev_end = end
        if end == seq_len:
            break
    return nll_sum, n_tokens


@pytest.fixture
def hf_twin(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path)
    return transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()


@pytest.mark.parametrize("stride", [16, 8])
def test_matches_transformers_strided_reference(tiny_model, hf_twin, stride):
    L = 16
    g = torch.Generator().manual_seed(1)
    # Shorter than one window, exactly one window (L - 1 tokens + closing eos = L targets), many windows.
    docs = [torch.randint(3, 97, (n,), generator=g).tolist() for n in (3, L - 1, 5 * L + 3, 0)]
    ours = evaluate_perplexity(tiny_model, docs, max_length=L, stride=stride, batch_size=8, eos_id=0)
    ref_nll, ref_tokens = 0.0, 0
    for doc in docs:
        nll, n = hf_strided_nll(hf_twin, [0, *doc, 0], L, stride)
        ref_nll += nll
        ref_tokens += n
    assert ours.tokens == ref_tokens == sum(len(d) + 1 for d in docs)
    assert ours.documents == 4
    assert abs(ours.nll_sum - ref_nll) / ref_nll <= 1e-5


def test_one_window_equals_a_plain_forward(tiny_model):
    # A document that fits one window: the score is the plain forward's summed cross-entropy.
    doc = list(range(3, 40))
    stream = torch.tensor([[0, *doc, 0]])
    logits = tiny_model(stream[:, :-1]).logits
    expected = torch.nn.functional.cross_entropy(logits[0], stream[0, 1:], reduction="sum").item()
    r = evaluate_perplexity(tiny_model, [doc], max_length=64)
    assert r.tokens == len(doc) + 1
    assert r.nll_sum == pytest.approx(expected, rel=1e-6)


def test_batch_size_and_training_flag(tiny_config):
    config = LMConfig(**{**tiny_config.to_dict(), "dropout": 0.3})
    torch.manual_seed(0)
    model = randomized(MiniLLM(config))
    g = torch.Generator().manual_seed(2)
    docs = [torch.randint(3, 97, (n,), generator=g).tolist() for n in (0, 4, 15, 16, 31, 70, 9, 100)]
    model.train()  # the trainer evaluates mid-training: dropout must be off, and the flag restored
    one = evaluate_perplexity(model, docs, max_length=16, stride=8, batch_size=1)
    assert model.training
    eight = evaluate_perplexity(model, docs, max_length=16, stride=8, batch_size=8)
    assert one.tokens == eight.tokens == sum(len(d) + 1 for d in docs)
    # Padding changes the matmul shapes, so equal up to float32 rounding, not bit for bit.
    assert eight.nll_sum == pytest.approx(one.nll_sum, rel=1e-6)


def test_bits_per_byte_hand_computed():
    # A zero LM head gives uniform predictions: every token costs ln 64 nats = 6 bits.
    config = LMConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                      max_position_embeddings=32, tie_word_embeddings=False)
    model = MiniLLM(config)
    torch.nn.init.zeros_(model.lm_head.weight)
    r = evaluate_perplexity(model, [[5, 6], [7, 8, 9]], max_length=8, n_bytes=21)
    assert (r.tokens, r.documents, r.bytes) == (7, 2, 21)  # 2 + 1 and 3 + 1 targets
    assert r.nll_sum == pytest.approx(7 * math.log(64), rel=1e-6)
    assert r.mean_nll == pytest.approx(math.log(64), rel=1e-6)
    assert r.perplexity == pytest.approx(64.0, rel=1e-6)
    assert r.bits_per_byte == pytest.approx(7 * 6 / 21, rel=1e-6)  # = 2.0


def test_result_metrics():
    r = PerplexityResult(nll_sum=20.0, tokens=10, documents=2, bytes=40, seconds=0.5)
    d = r.to_dict()
    assert d["mean_nll"] == 2.0
    assert d["perplexity"] == pytest.approx(math.exp(2.0))
    assert d["bits_per_byte"] == pytest.approx(20.0 / (40 * math.log(2)))
    assert d["tokens_per_second"] == 20.0
    assert math.isnan(PerplexityResult(0.0, 0, 0, 0, 0.0).perplexity)


def test_bad_window_arguments(tiny_model):
    with pytest.raises(ValueError, match="stride"):
        evaluate_perplexity(tiny_model, [[1, 2]], max_length=8, stride=9)
    with pytest.raises(ValueError, match="stride"):
        evaluate_perplexity(tiny_model, [[1, 2]], max_length=8, stride=0)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        evaluate_perplexity(tiny_model, [[1, 2]], max_length=129)


# --- read_documents ------------------------------------------------------------------------------


def test_read_documents(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_bytes(b'\xef\xbb\xbf{"text": "a"}\n\n  \n{"text": "\xe9\x9d\x92 b"}\n{"text": ""}')
    assert read_documents(f) == ["a", "青 b", ""]
    t = tmp_path / "d.txt"
    t.write_text("line one\n\nline two\n", encoding="utf-8")
    assert read_documents(t) == ["line one\n\nline two\n"]


@pytest.mark.parametrize("content,message", [
    ('{"text": "a"}\n\n{"text": 3}\n', r"d\.jsonl:3: field \"text\""),
    ('{"text": "a"}\nnot json\n', r"d\.jsonl:2: malformed JSON"),
    ('{"txt": "a"}\n', r"d\.jsonl:1: .*\"text\""),
    ("", r"d\.jsonl:1: .*empty"),
])
def test_read_documents_errors(tmp_path, content, message):
    f = tmp_path / "d.jsonl"
    f.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=message):
        read_documents(f)


# --- training lowers perplexity; the CLI ---------------------------------------------------------


@pytest.fixture(scope="module")
def eval_texts():
    return read_documents(EVAL_JSONL)


@pytest.fixture(scope="module")
def small_tokenizer(eval_texts, tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "train.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in eval_texts[:200]), encoding="utf-8")
    return train_tokenizer([path], vocab_size=400)


def small_model(vocab_size: int) -> MiniLLM:
    torch.manual_seed(0)
    return MiniLLM(LMConfig(vocab_size=vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, max_position_embeddings=128))


def test_a_few_training_steps_lower_perplexity(small_tokenizer, eval_texts):
    tok = small_tokenizer
    model = small_model(tok.vocab_size)
    train_docs = tok.encode_batch(eval_texts[:48])
    held_out = tok.encode_batch(eval_texts[-12:])
    before = evaluate_perplexity(model, held_out, max_length=64)
    stream = torch.tensor([t for doc in train_docs for t in [0, *doc]])
    blocks = stream[: len(stream) // 33 * 33].view(-1, 33)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for step in range(30):
        batch = blocks[(torch.arange(4) + 4 * step) % len(blocks)]
        loss = model(batch[:, :-1], labels=batch[:, 1:]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = evaluate_perplexity(model, held_out, max_length=64)
    assert model.training
    assert after.tokens == before.tokens
    assert before.perplexity > 0.8 * tok.vocab_size  # near-uniform at init
    assert after.perplexity < 0.5 * before.perplexity


@pytest.fixture(scope="module")
def cli_setup(small_tokenizer, eval_texts, tmp_path_factory):
    """Model dirs and data files for the CLI, and the subprocesses started at once (they run in parallel)."""
    root = tmp_path_factory.mktemp("cli")
    good = root / "good"
    small_model(small_tokenizer.vocab_size).save_pretrained(good, tokenizer=small_tokenizer)
    data = root / "eval.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in eval_texts[:20]), encoding="utf-8")
    no_tok = root / "no_tok"
    small_model(small_tokenizer.vocab_size).save_pretrained(no_tok)
    # One thread each: the processes run side by side, and spinning OpenMP threads would fight over cores.
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1"}
    common = ["--data", str(data), "--max_length", "32", "--stride", "16", "--batch_size", "4"]

    def start(*cmd):
        return subprocess.Popen([sys.executable, *cmd], cwd=REPO, env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    procs = {
        "happy": start("eval_ppl.py", "--model", str(good), *common, "--json", str(root / "one.json")),
        "torchrun": start("-m", "torch.distributed.run", "--nproc_per_node", "2", "eval_ppl.py",
                          "--model", str(good), *common, "--json", str(root / "two.json")),
        "no_tokenizer": start("eval_ppl.py", "--model", str(no_tok), *common),
    }
    results = {name: (p.communicate(timeout=300), p.returncode) for name, p in procs.items()}
    return {"root": root, "good": good, "data": data, "no_tok": no_tok, "common": common, "results": results}


def test_cli_happy_path(cli_setup, small_tokenizer, eval_texts):
    (out, err), rc = cli_setup["results"]["happy"]
    assert rc == 0, err
    for label in ("documents", "scored tokens", "mean NLL", "perplexity", "bits per byte", "tokens/s"):
        assert label in out
    got = json.loads((cli_setup["root"] / "one.json").read_text())
    texts = eval_texts[:20]
    model = MiniLLM.from_pretrained(cli_setup["good"])
    expected = evaluate_perplexity(model, small_tokenizer.encode_batch(texts), max_length=32, stride=16,
                                   n_bytes=sum(len(t.encode()) for t in texts))
    assert (got["documents"], got["tokens"], got["bytes"]) == (20, expected.tokens, expected.bytes)
    assert got["nll_sum"] == pytest.approx(expected.nll_sum, rel=1e-6)
    assert got["bits_per_byte"] == pytest.approx(expected.bits_per_byte, rel=1e-6)
    assert f"{got['perplexity']:.3f}" in out


def test_cli_torchrun_gives_the_same_totals(cli_setup):
    (out, err), rc = cli_setup["results"]["torchrun"]
    assert rc == 0, err
    assert out.count("perplexity") == 1  # only rank 0 prints
    one = json.loads((cli_setup["root"] / "one.json").read_text())
    two = json.loads((cli_setup["root"] / "two.json").read_text())
    assert two["world_size"] == 2
    assert (two["documents"], two["tokens"], two["bytes"]) == (one["documents"], one["tokens"], one["bytes"])
    assert two["nll_sum"] == pytest.approx(one["nll_sum"], rel=1e-6)


def test_cli_bad_input_in_a_real_process(cli_setup):
    (out, err), rc = cli_setup["results"]["no_tokenizer"]
    assert rc == 1
    assert "Traceback" not in err
    assert err.strip().splitlines() == [
        f"eval_ppl.py: error: {cli_setup['no_tok']} has no tokenizer.json beside the weights; pass "
        "--tokenizer DIR (or --tokenizer default for the tokenizer shipped with minillm)"]


def run_main(argv, capsys):
    sys.path.insert(0, str(REPO))
    try:
        import eval_ppl
    finally:
        sys.path.remove(str(REPO))
    rc = eval_ppl.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def test_cli_bad_inputs(cli_setup, small_tokenizer, tiny_model, capsys):
    root, good, common = cli_setup["root"], cli_setup["good"], cli_setup["common"]
    empty = root / "empty.jsonl"
    empty.write_text("\n\n", encoding="utf-8")
    bad_line = root / "bad.jsonl"
    bad_line.write_text('{"text": "a"}\n{"text": "b"\n', encoding="utf-8")
    small_vocab = root / "small_vocab"
    tiny_model.save_pretrained(small_vocab, tokenizer=small_tokenizer)  # 97 ids, tokenizer has 404 (400 + tools)
    cases = [
        (["--model", root / "missing", *common], f"model directory {root / 'missing'} does not exist"),
        (["--model", good, "--tokenizer", root / "missing"], "no tokenizer at"),
        (["--model", small_vocab, *common], "tokenizer has 404 tokens but the model's vocab_size is 97"),
        (["--model", good, "--data", empty], f"{empty}:2: reached the end after only blank lines"),
        (["--model", good, "--data", bad_line], f"{bad_line}:2: malformed JSON"),
        (["--model", good, "--data", root / "nope.jsonl"], "nope.jsonl: no such data file"),
        (["--model", good, "--data", cli_setup["data"], "--stride", "600"], "--stride must be in [1,"),
        (["--model", good, "--data", cli_setup["data"], "--stride", "0"], "--stride must be in [1,"),
        (["--model", good, "--data", cli_setup["data"], "--max_length", "0"], "--max_length must be in [1, 128]"),
    ]
    for argv, message in cases:
        rc, out, err = run_main(argv, capsys)
        assert rc == 1, argv
        assert out == ""
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("eval_ppl.py: error: "), err
        assert message in lines[0], (message, lines[0])


def test_cli_help_explains_every_flag(capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_main(["--help"], capsys)
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for flag, words in [("--model", "model directory"), ("--data", "eval.jsonl"), ("--tokenizer", "beside"),
                        ("--max_length", "max_position_embeddings"), ("--stride", "re-reads"),
                        ("--batch_size", "windows per forward"), ("--device", "cuda if available"),
                        ("--dtype", "bfloat16 on GPU"), ("--json", "JSON")]:
        assert flag in text and words in text, flag


def test_cli_scores_in_float32_whatever_the_cpu(cli_setup, small_tokenizer, eval_texts, capsys, monkeypatch):
    """A metric never depends on the machine: with native bf16 forced on, the default is still float32."""
    monkeypatch.setenv("MINILLM_NATIVE_BF16", "1")
    root, good = cli_setup["root"], cli_setup["good"]
    model = MiniLLM.from_pretrained(good)
    texts = eval_texts[:20]
    docs = small_tokenizer.encode_batch(texts)
    scores = {}
    for name, flags in {"default": [], "bf16": ["--dtype", "bfloat16"]}.items():
        rc, out, err = run_main(["--model", good, *cli_setup["common"], *flags, "--json", root / f"{name}.json"],
                                capsys)
        assert rc == 0, err
        scores[name] = json.loads((root / f"{name}.json").read_text())
    assert scores["default"]["dtype"] == "float32"
    f32 = evaluate_perplexity(model, docs, max_length=32, stride=16, batch_size=4)
    bf16 = evaluate_perplexity(model, docs, max_length=32, stride=16, batch_size=4, dtype=torch.bfloat16)
    assert scores["default"]["nll_sum"] == f32.nll_sum != bf16.nll_sum
    assert (scores["bf16"]["dtype"], scores["bf16"]["nll_sum"]) == ("bfloat16", bf16.nll_sum)
