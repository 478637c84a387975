"""The shared training loop: loss falls, exact resume, crash safety, DDP equivalence, float16, SFT."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import needs_compiler
from torch.utils.data import Dataset

from minillm.data.datasets import PretrainDataset, SFTDataset
from minillm.eval.perplexity import read_documents
from minillm.model.config import LMConfig
from minillm.model.model import MiniLLM
from minillm.train.checkpoint import latest_checkpoint, list_checkpoints, save_checkpoint
from minillm.train.config import TrainConfig
from minillm.train.trainer import train

REPO = Path(__file__).resolve().parent.parent
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
TINY_FLAGS = [f"--{k}={v}" for k, v in TINY.items()]


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory) -> Path:
    """The first 400 poems of the shipped corpus."""
    path = tmp_path_factory.mktemp("corpus") / "train.jsonl"
    with open(REPO / "dataset" / "pretrain.jsonl", encoding="utf-8") as f:
        path.write_text("".join(next(f) for _ in range(400)), encoding="utf-8")
    return path


def tiny_model(tokenizer, dropout=0.0, seed=0) -> MiniLLM:
    torch.manual_seed(seed)
    return MiniLLM(LMConfig(vocab_size=tokenizer.vocab_size, dropout=dropout, max_position_embeddings=128, **TINY))


def config(tmp_path, **kw) -> TrainConfig:
    base = dict(out_dir=str(tmp_path), batch_size=4, max_steps=8, learning_rate=3e-3, log_every=1, eval_every=0,
                save_every=0, seed=5)
    base.update(kw)
    return TrainConfig(**base)


def test_config_validation():
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        TrainConfig(batch_size=0)
    with pytest.raises(ValueError, match="dtype must be"):
        TrainConfig(dtype="fp8")


def test_loss_falls_on_the_shipped_corpus(tmp_path, tokenizer, small_corpus):
    dataset = PretrainDataset(small_corpus, tokenizer, max_length=64)
    docs = tokenizer.encode_batch(read_documents(REPO / "dataset" / "eval.jsonl")[:40])
    result = train(tiny_model(tokenizer), dataset, config(tmp_path, max_steps=40, batch_size=8, warmup_steps=4),
                   eval_documents=docs, tokenizer=tokenizer)
    first, last = sum(result.losses[:5]) / 5, sum(result.losses[-5:]) / 5
    assert len(result.losses) == 40 and not result.interrupted
    assert last < first - 1.0, (first, last)
    assert result.eval_loss < 8.0  # ln(6400) = 8.76 at random init
    # The output directory is a model that loads, with the tokenizer beside it.
    loaded = MiniLLM.from_pretrained(tmp_path)
    assert (tmp_path / "tokenizer.json").is_file()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 41))
    assert rows[-1]["eval_loss"] == pytest.approx(result.eval_loss)
    assert {"loss", "lr", "grad_norm", "tokens", "tokens_per_s"} <= set(rows[0])
    assert all(torch.isfinite(p).all() for p in loaded.parameters())


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_resume_is_exact(tmp_path, tokenizer, small_corpus, optimizer):
    # Dropout makes the run depend on the RNG state, which the checkpoint must restore too. Two epochs of
    # 6 steps: the resume lands mid-epoch and the run crosses an epoch boundary after it. Muon's momentum
    # and AdamW's moments are both in the checkpoint.
    kw = dict(max_steps=0, epochs=2, accumulation_steps=2, batch_size=4, optimizer=optimizer)
    lines = small_corpus.read_text(encoding="utf-8").splitlines(keepends=True)[:48]
    (tmp_path / "48.jsonl").write_text("".join(lines), encoding="utf-8")
    small = PretrainDataset(tmp_path / "48.jsonl", tokenizer, max_length=48)
    straight = train(tiny_model(tokenizer, dropout=0.1), small, config(tmp_path / "a", **kw))
    assert len(straight.losses) == 2 * 48 // 8 == 12
    first = train(tiny_model(tokenizer, dropout=0.1), small, config(tmp_path / "b", **kw),
                  should_stop=lambda step: step == 5)
    assert first.interrupted and first.losses == straight.losses[:5]
    assert latest_checkpoint(tmp_path / "b").name == "step_00000005"
    # A different init proves the weights come from the checkpoint.
    resumed = train(tiny_model(tokenizer, dropout=0.1, seed=99), small, config(tmp_path / "b", resume=True, **kw))
    assert resumed.losses == straight.losses[5:]
    a = MiniLLM.from_pretrained(tmp_path / "a").state_dict()
    b = MiniLLM.from_pretrained(tmp_path / "b").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(line)["step"] for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 13))


@pytest.mark.exactness
@needs_compiler
def test_compiled_training_matches_eager(tmp_path, tokenizer, small_corpus):
    """TrainConfig.compile (--compile): same losses as eager, and the checkpoint holds plain weight names."""
    dataset = PretrainDataset(small_corpus, tokenizer, max_length=32)
    eager = train(tiny_model(tokenizer), dataset, config(tmp_path / "eager", max_steps=4, save_every=2,
                                                         dtype="float32"))
    compiled = train(tiny_model(tokenizer), dataset, config(tmp_path / "compiled", max_steps=4, save_every=2,
                                                            compile=True, dtype="float32"))
    assert compiled.losses == pytest.approx(eager.losses, rel=1e-4)
    a = MiniLLM.from_pretrained(tmp_path / "eager").state_dict()
    b = MiniLLM.from_pretrained(tmp_path / "compiled").state_dict()
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-4) for k in a)
    # A compiled run stopped at step 2 resumes from the checkpoint it wrote and continues the same curve.
    cut = train(tiny_model(tokenizer), dataset, config(tmp_path / "cut", max_steps=4, compile=True,
                                                       dtype="float32"), should_stop=lambda step: step == 2)
    resumed = train(tiny_model(tokenizer, seed=9), dataset, config(tmp_path / "cut", max_steps=4, compile=True,
                                                                   dtype="float32", resume=True))
    assert cut.losses + resumed.losses == pytest.approx(eager.losses, rel=1e-4) and len(resumed.losses) == 2


def test_resume_with_other_batch_layout_is_refused(tmp_path, tokenizer, small_corpus):
    dataset = PretrainDataset(small_corpus, tokenizer, max_length=32)
    train(tiny_model(tokenizer), dataset, config(tmp_path, max_steps=2))
    with pytest.raises(ValueError, match="resume with the same values"):
        train(tiny_model(tokenizer), dataset, config(tmp_path, max_steps=4, batch_size=2, resume=True))


def test_bf16_training_falls_near_float32_and_resumes_exactly(tmp_path, tokenizer, small_corpus, monkeypatch):
    """What bf16 autocast can promise, forced on whatever the CPU (the override --dtype auto reads)."""
    monkeypatch.setenv("MINILLM_NATIVE_BF16", "1")
    dataset = PretrainDataset(small_corpus, tokenizer, max_length=32)
    docs = tokenizer.encode_batch(read_documents(REPO / "dataset" / "eval.jsonl")[:8])
    kw = dict(max_steps=8, batch_size=8, save_every=4)
    f32 = train(tiny_model(tokenizer), dataset, config(tmp_path / "f32", dtype="float32", **kw))
    bf16 = train(tiny_model(tokenizer), dataset, config(tmp_path / "bf16", **kw), eval_documents=docs)
    assert all(math.isfinite(x) for x in bf16.losses) and bf16.losses[-1] < bf16.losses[0] - 0.5
    assert bf16.losses != f32.losses  # auto really trained in bf16 here
    # bf16 keeps 8 bits of mantissa: each loss within 1% of float32's over these 8 steps.
    assert bf16.losses == pytest.approx(f32.losses, rel=1e-2)
    # The held-out loss is computed in float32 (TrainConfig.eval_dtype), not in the training dtype.
    model = MiniLLM.from_pretrained(tmp_path / "bf16")
    from minillm.eval.perplexity import evaluate_perplexity

    want = evaluate_perplexity(model, docs, max_length=32, batch_size=8, eos_id=model.config.eos_token_id)
    bf16_eval = evaluate_perplexity(model, docs, max_length=32, batch_size=8, eos_id=model.config.eos_token_id,
                                    dtype=torch.bfloat16)
    assert bf16.eval_loss == want.mean_nll != bf16_eval.mean_nll
    # Exact resume within bf16 itself: the same losses to the bit.
    cut = train(tiny_model(tokenizer), dataset, config(tmp_path / "cut", **kw), should_stop=lambda step: step == 4)
    resumed = train(tiny_model(tokenizer, seed=9), dataset, config(tmp_path / "cut", resume=True, **kw))
    assert cut.losses + resumed.losses == bf16.losses


class NaNOnce(Dataset):
    """Wraps a dataset; example `bad` carries a NaN mask, which makes its step's loss NaN."""

    def __init__(self, base, bad):
        self.base, self.bad, self.max_length, self.vocab_size = base, bad, base.max_length, base.vocab_size

    def __len__(self):
        return 16

    def __getitem__(self, i):
        x, y, m = self.base[i]
        return (x, y, torch.full_like(m, float("nan"))) if i == self.bad else (x, y, m)


def test_non_finite_step_is_skipped_and_repeated_ones_stop(tmp_path, tokenizer, small_corpus):
    base = PretrainDataset(small_corpus, tokenizer, max_length=32)
    result = train(tiny_model(tokenizer), NaNOnce(base, bad=3), config(tmp_path / "a", batch_size=1, max_steps=16))
    assert result.skipped_steps == 1 and sum(math.isnan(x) for x in result.losses) == 1
    model = MiniLLM.from_pretrained(tmp_path / "a")
    assert all(torch.isfinite(p).all() for p in model.parameters())

    broken = tiny_model(tokenizer)
    with torch.no_grad():
        broken.layers[0].mlp.down_proj.weight[0, 0] = float("nan")
    with pytest.raises(RuntimeError, match="3 non-finite losses or gradient norms in a row"):
        train(broken, base, config(tmp_path / "b", max_steps=6, max_bad_steps=3))
    with pytest.raises(RuntimeError, match="non-finite weights"):
        save_checkpoint(tmp_path / "c", 1, broken, {})


def test_float16_autocast_with_grad_scaler(tmp_path, tokenizer, small_corpus):
    dataset = PretrainDataset(small_corpus, tokenizer, max_length=48)
    result = train(tiny_model(tokenizer), dataset, config(tmp_path, dtype="float16", max_steps=12, batch_size=8))
    assert all(math.isfinite(x) for x in result.losses[-4:])
    assert sum(result.losses[-3:]) < sum(result.losses[:3])
    state = torch.load(latest_checkpoint(tmp_path) / "state.pt", weights_only=True)
    assert state["scaler"]["scale"] > 0 and "_growth_tracker" in state["scaler"]  # the scaler really ran


def test_float16_overflow_skips_the_step_lowers_the_scale_and_training_goes_on(tmp_path, tokenizer, small_corpus,
                                                                              monkeypatch):
    """Issue 32, item 3: GradScaler's overflow path, forced by a huge initial scale."""
    class HugeScale(torch.amp.GradScaler):
        def __init__(self, device, enabled=True):
            super().__init__(device, init_scale=2.0 ** 40, enabled=enabled)

    monkeypatch.setattr(torch.amp, "GradScaler", HugeScale)
    dataset = PretrainDataset(small_corpus, tokenizer, max_length=48)
    model = tiny_model(tokenizer)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    first = train(model, dataset, config(tmp_path / "one", dtype="float16", max_steps=40, batch_size=8),
                  should_stop=lambda step: step == 1)
    assert first.skipped_steps == 1 and first.losses and math.isfinite(first.losses[0])
    after = MiniLLM.from_pretrained(tmp_path / "one" / "checkpoints" / "step_00000001").state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before)  # the overflowed step changed nothing
    state = torch.load(latest_checkpoint(tmp_path / "one") / "state.pt", weights_only=True)
    assert state["scaler"]["scale"] == 2.0 ** 39  # backed off by half
    result = train(tiny_model(tokenizer), dataset, config(tmp_path / "all", dtype="float16", max_steps=40,
                                                         batch_size=8))
    assert len(result.losses) == 40 and not result.interrupted  # not stopped as diverging
    assert 1 <= result.skipped_steps < 40
    assert all(math.isfinite(x) for x in result.losses)  # the loss itself never overflowed, only gradients
    assert sum(result.losses[-3:]) < sum(result.losses[:3])  # training went on once the scale fitted
    final = torch.load(latest_checkpoint(tmp_path / "all") / "state.pt", weights_only=True)["scaler"]["scale"]
    assert final == 2.0 ** (40 - result.skipped_steps)  # one halving per skipped step (growth needs 2000 steps)


def test_keep_last_checkpoints_and_ignore_partial(tmp_path, tokenizer, small_corpus):
    dataset = PretrainDataset(small_corpus, tokenizer, max_length=32)
    train(tiny_model(tokenizer), dataset, config(tmp_path, max_steps=7, save_every=2, keep_checkpoints=2))
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000006", "step_00000007"]
    (tmp_path / "checkpoints" / "step_00000009.tmp").mkdir()  # what a crash mid-write leaves
    (tmp_path / "checkpoints" / "step_00000010").mkdir()      # a directory without state.pt
    assert latest_checkpoint(tmp_path).name == "step_00000007"


def run_script(script, *args, env=None, timeout=300):
    return subprocess.run([sys.executable, str(REPO / script), *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})}, cwd=REPO)


def test_sigkill_mid_run_resumes_from_last_complete_checkpoint(tmp_path, small_corpus):
    out = tmp_path / "run"
    args = ["--data_path", str(small_corpus), "--eval_data", "", "--out_dir", str(out), "--max_length", "32",
            "--batch_size", "2", "--max_steps", "400", "--save_every", "3", "--log_every", "1", *TINY_FLAGS]
    proc = subprocess.Popen([sys.executable, str(REPO / "train_pretrain.py"), *args], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(list_checkpoints(out)) < 2:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert len(list_checkpoints(out)) >= 2, "no checkpoints were written before the deadline"
    last = latest_checkpoint(out)
    step = int(last.name.split("_")[1])
    MiniLLM.from_pretrained(last)  # the newest complete checkpoint loads
    done = run_script("train_pretrain.py", *[a if a != "400" else str(step + 3) for a in args], "--resume")
    assert done.returncode == 0, done.stderr
    assert f"resumed from {last}" in done.stdout
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, step + 4))


def test_sigterm_saves_and_says_how_to_resume(tmp_path, small_corpus):
    out = tmp_path / "run"
    args = ["--data_path", str(small_corpus), "--eval_data", "", "--out_dir", str(out), "--max_length", "32",
            "--batch_size", "2", "--max_steps", "100000", "--save_every", "0", *TINY_FLAGS]
    proc = subprocess.Popen([sys.executable, str(REPO / "train_pretrain.py"), *args], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "metrics.jsonl").exists():
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 3, stderr  # interrupted, checkpoint saved: `a && b` stops here
    ckpt = latest_checkpoint(out)
    assert "--resume" in stderr and f"Checkpoint: {ckpt}" in stderr and "Traceback" not in stderr
    assert "model in" not in stdout + stderr  # no final model was written, so none is announced
    # The checkpoint is a complete model directory (weights, config, tokenizer).
    assert MiniLLM.from_pretrained(ckpt) is not None and (ckpt / "tokenizer.json").is_file()


@pytest.mark.exactness
def test_torchrun_two_processes_match_one_process(tmp_path, small_corpus):
    common = ["--data_path", str(small_corpus), "--eval_data", str(REPO / "dataset" / "eval.jsonl"),
              "--max_length", "40", "--max_steps", "6", "--log_every", "1", "--eval_every", "0",
              "--save_every", "3", "--seed", "3", "--dtype", "float32", *TINY_FLAGS]
    single = run_script("train_pretrain.py", *common, "--batch_size", "4", "--out_dir", str(tmp_path / "one"))
    assert single.returncode == 0, single.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(REPO / "train_pretrain.py"), *common, "--batch_size", "2",
                          "--out_dir", str(tmp_path / "two")], capture_output=True, text=True, timeout=300,
                         cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert two.returncode == 0, two.stderr[-3000:]
    assert "2 process(es)" in two.stdout and two.stdout.count("2 process(es)") == 1  # rank 0 alone prints

    def rows(name):
        return [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]

    one_rows, two_rows = rows("one"), rows("two")
    assert [r["step"] for r in two_rows] == [r["step"] for r in one_rows]  # each line written once
    for a, b in zip(one_rows, two_rows):
        for key in ("loss", "eval_loss"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-4), (key, a, b)
    w1 = MiniLLM.from_pretrained(tmp_path / "one").state_dict()
    w2 = MiniLLM.from_pretrained(tmp_path / "two").state_dict()
    assert max((w1[k] - w2[k]).abs().max().item() for k in w1) < 1e-4
    assert [p.name for p in list_checkpoints(tmp_path / "two")] == ["step_00000003", "step_00000006"]


def test_sft_from_pretrained_dir_learns_only_assistant_tokens(tmp_path, tokenizer, small_corpus):
    transformers = pytest.importorskip("transformers")
    pre = tmp_path / "pre"
    tiny_model(tokenizer).save_pretrained(pre, tokenizer=tokenizer)
    sft_data = tmp_path / "sft.jsonl"
    with open(REPO / "dataset" / "sft.jsonl", encoding="utf-8") as f:
        sft_data.write_text("".join(next(f) for _ in range(64)), encoding="utf-8")
    dataset = SFTDataset(sft_data, tokenizer, max_length=128)
    x, y, mask = dataset[0]
    messages = dataset.messages(0)
    learned = tokenizer.decode(y[mask.bool()].tolist())
    assert learned == messages[-1]["content"] + "<|im_end|>"
    out = tmp_path / "sft"
    res = run_script("train_sft.py", "--init_from", str(pre), "--data_path", str(sft_data), "--out_dir", str(out),
                     "--max_length", "128", "--batch_size", "4", "--max_steps", "6", "--eval_data", "", "--log_every", "1")
    assert res.returncode == 0, res.stderr
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert metrics and all(r["loss"] == r["loss"] for r in metrics if "loss" in r)
    # The loss counts the assistant's tokens only: an independent masked cross-entropy, not the full mean.
    model = MiniLLM.from_pretrained(pre)
    X, Y, M = (torch.stack(t) for t in zip(*(dataset[i] for i in range(4))))
    with torch.no_grad():
        out_ = model(X, labels=Y, loss_mask=M)
        keep = M.bool()
        masked = torch.nn.functional.cross_entropy(out_.logits[keep].float(), Y[keep])
        everything = torch.nn.functional.cross_entropy(out_.logits.flatten(0, 1).float(), Y.flatten())
    assert out_.loss.item() == pytest.approx(masked.item(), rel=1e-6)
    assert 0 < keep.sum() < keep.numel() and abs(everything.item() - masked.item()) > 1e-3
    ours = MiniLLM.from_pretrained(out)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ids = torch.tensor([tokenizer.encode(tokenizer.apply_chat_template(messages[:1], add_generation_prompt=True), allow_special=True)])
    with torch.no_grad():
        assert (ours(ids).logits - hf(ids).logits).abs().max().item() < 1e-4


def test_cli_bad_input_is_one_clear_message(tmp_path):
    res = run_script("train_sft.py", "--init_from", str(tmp_path / "missing"), "--max_steps", "1")
    assert res.returncode != 0
    assert "no model there" in res.stderr and "Traceback" not in res.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": 3}\n', encoding="utf-8")
    res = run_script("train_pretrain.py", "--data_path", str(bad), "--max_steps", "1", "--batch_size", "1",
                     "--eval_data", "", "--out_dir", str(tmp_path / "o"), *TINY_FLAGS)
    assert res.returncode != 0 and "Traceback" not in res.stderr
    assert f"{bad}:2" in res.stderr


@pytest.mark.parametrize("kw", [dict(group_by_length=True), dict(dtype="float16"), dict(num_workers=2)],
                         ids=["sft_group_by_length", "float16_scaler", "two_workers"])
def test_sft_resume_is_exact_in_each_configuration(tmp_path, tokenizer, kw):
    """Issue 32, item 7: exact resume beyond the one pretraining configuration."""
    data = tmp_path / "sft.jsonl"
    with open(REPO / "dataset" / "sft.jsonl", encoding="utf-8") as f:
        data.write_text("".join(next(f) for _ in range(48)), encoding="utf-8")
    dataset = SFTDataset(data, tokenizer, max_length=96)
    run = dict(max_steps=0, epochs=2, batch_size=4, accumulation_steps=2, **kw)
    straight = train(tiny_model(tokenizer, dropout=0.1), dataset, config(tmp_path / "a", **run))
    assert len(straight.losses) == 12
    cut = train(tiny_model(tokenizer, dropout=0.1), dataset, config(tmp_path / "b", **run),
                should_stop=lambda step: step == 7)  # past the first epoch's 6 steps
    resumed = train(tiny_model(tokenizer, dropout=0.1, seed=99), dataset, config(tmp_path / "b", resume=True, **run))
    assert cut.losses + resumed.losses == straight.losses
    a = MiniLLM.from_pretrained(tmp_path / "a").state_dict()
    b = MiniLLM.from_pretrained(tmp_path / "b").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    if kw.get("group_by_length"):  # batches are grouped by length: another split of the same global batch
        with pytest.raises(ValueError, match="resume with the same values"):  # would change the order
            train(tiny_model(tokenizer), dataset, config(tmp_path / "b", **{**run, "batch_size": 8,
                                                                              "accumulation_steps": 1}, resume=True))


def test_float16_under_fsdp_is_refused_in_one_line(tmp_path, corpus, capsys):
    from conftest import tiny_pretrain

    code, _, err = tiny_pretrain(tmp_path / "run", corpus, "--fsdp", "--dtype", "float16", "--max_steps", "1",
                                 capsys=capsys)
    assert code == 1 and "--fsdp computes in bfloat16 or float32" in err and "Traceback" not in err
