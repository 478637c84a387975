"""Distillation (minillm/train/distill.py, train_distill.py): the loss equals TRL GKDTrainer's generalized JSD on
the same logits and labels, and a student trained against a teacher moves toward it."""

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import REPO, TINY_ARGS, head_lines, randomized, run_train_cli
from safetensors.torch import load_file

from minillm.model.config import LMConfig
from minillm.model.model import MiniLLM
from minillm.train.distill import Distillation, generalized_jsd

gkd = pytest.importorskip("trl.experimental.gkd.gkd_trainer")


def logits_and_labels(seed: int = 0, V: int = 50):
    g = torch.Generator().manual_seed(seed)
    student = (torch.randn(3, 7, V, generator=g) * 2).requires_grad_(True)
    teacher = torch.randn(3, 7, V, generator=g) * 2
    labels = torch.randint(0, V, (3, 7), generator=g)
    labels[0, :3] = -100  # a prompt
    labels[2, 5:] = -100  # padding
    return student, teacher, labels


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0, 0.2])
@pytest.mark.parametrize("temperature", [0.7, 1.0, 2.0])
def test_generalized_jsd_equals_trls_loss_and_gradient(beta, temperature):
    student, teacher, labels = logits_and_labels()
    theirs = gkd.GKDTrainer.generalized_jsd_loss(student, teacher, labels=labels, beta=beta, temperature=temperature)
    (grad_theirs,) = torch.autograd.grad(theirs, student)
    learned = labels != -100
    ours = generalized_jsd(student[learned], teacher[learned], beta, temperature).mean()
    (grad_ours,) = torch.autograd.grad(ours, student)
    assert ours.item() == pytest.approx(theirs.item(), abs=1e-5) and ours.item() > 0.01
    torch.testing.assert_close(grad_ours, grad_theirs, atol=1e-6, rtol=1e-5)


def test_the_divergence_is_zero_for_the_same_distribution_and_the_kls_at_the_ends():
    student, teacher, _ = logits_and_labels(1)
    s, t = student.detach().flatten(0, 1), teacher.flatten(0, 1)
    assert generalized_jsd(t, t, 0.5, 1.3).abs().max() < 1e-6
    p, q = t.softmax(-1), s.softmax(-1)  # an independent computation of KL(p || q) and KL(q || p)
    torch.testing.assert_close(generalized_jsd(s, t, 0.0, 1.0), (p * (p.log() - q.log())).sum(-1))
    torch.testing.assert_close(generalized_jsd(s, t, 1.0, 1.0), (q * (q.log() - p.log())).sum(-1))


def tiny(seed: int, hidden: int, layers: int) -> MiniLLM:
    torch.manual_seed(seed)
    config = LMConfig(vocab_size=60, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64)
    return randomized(MiniLLM(config), scale=0.2, seed=seed).eval()


@pytest.mark.parametrize("alpha", [1.0, 0.3])
def test_the_objectives_loss_is_trls_gkd_loss_mixed_with_cross_entropy(alpha):
    """The first step's loss: alpha x TRL's generalized_jsd_loss on the same logits and labels + (1 - alpha) x CE."""
    student, teacher = tiny(0, 32, 1), tiny(1, 64, 2)
    g = torch.Generator().manual_seed(2)
    x = torch.randint(0, 60, (2, 12), generator=g)
    y = torch.randint(0, 60, (2, 12), generator=g)
    m = torch.ones(2, 12)
    m[0, :4] = 0
    objective = Distillation(teacher, alpha=alpha, beta=0.5, temperature=0.8)
    objective.prepare(student, None, torch.device("cpu"), torch.float32)
    out = objective(student, (x, y, m))
    labels = y.masked_fill(m == 0, -100)
    s_logits, t_logits = student(x).logits, teacher(x).logits.detach()
    trl_loss = gkd.GKDTrainer.generalized_jsd_loss(s_logits, t_logits, labels=labels, beta=0.5, temperature=0.8)
    ce = F.cross_entropy(s_logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
    assert out.loss.item() == pytest.approx((alpha * trl_loss + (1 - alpha) * ce).item(), abs=1e-5)
    n = int(m.sum())
    assert out.metrics["distill/divergence"].item() / n == pytest.approx(trl_loss.item(), abs=1e-5)
    assert out.metrics["distill/ce"].item() / n == pytest.approx(ce.item(), abs=1e-5)
    assert not any(p.requires_grad for p in teacher.parameters())


def test_train_distill_moves_the_student_toward_the_teacher_and_saves_only_the_student(tmp_path, tokenizer, capsys):
    teacher_dir, corpus = tmp_path / "teacher", tmp_path / "c.jsonl"
    torch.manual_seed(0)
    config = LMConfig(vocab_size=tokenizer.vocab_size, hidden_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64)
    randomized(MiniLLM(config), scale=0.05).save_pretrained(teacher_dir, tokenizer=tokenizer)
    corpus.write_text("".join(json.dumps({"text": f"第{k}首：春眠不觉晓，处处闻啼鸟。夜来风雨声，花落知多少。"},
                                         ensure_ascii=False) + "\n" for k in range(60)), encoding="utf-8")
    out = tmp_path / "student"
    code, stdout, err = run_train_cli(
        "distill", "--teacher_model", teacher_dir, "--data_path", corpus, "--eval_data", "", "--out_dir", out,
        "--max_length", "32", "--batch_size", "4", "--max_steps", "40", "--log_every", "1", "--alpha", "1",
        "--learning_rate", "3e-3", *TINY_ARGS, capsys=capsys)
    assert code == 0, err
    assert "chat template" not in stdout  # documents: no conversations rendered
    rows = [json.loads(line) for line in open(out / "metrics.jsonl", encoding="utf-8")]
    divergence = [r["distill/divergence"] for r in rows if "distill/divergence" in r]
    assert len(divergence) == 40
    assert sum(divergence[-5:]) < 0.75 * sum(divergence[:5])  # the student moved toward the teacher
    student = load_file(out / "model.safetensors")
    assert student["model.embed_tokens.weight"].shape[1] == 64  # the student's width (TINY_ARGS), not the teacher's
    results = json.loads((out / "train_results.json").read_text())
    assert results["stage"] == "distill" and results["teacher"] == str(teacher_dir)
    assert f"| teacher | `{teacher_dir}` |" in (out / "README.md").read_text()


def test_a_teacher_with_another_tokenizer_or_bad_flags_is_refused_in_one_line(tmp_path, tokenizer, capsys):
    from minillm.data.tokenizer import train_tokenizer

    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"别的词表 {i}"}, ensure_ascii=False) + "\n" for i in range(50)))
    other_tok = train_tokenizer([corpus], vocab_size=300)
    config = LMConfig(vocab_size=other_tok.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, max_position_embeddings=64)
    MiniLLM(config).save_pretrained(tmp_path / "teacher", tokenizer=other_tok)
    base = ["--data_path", corpus, "--eval_data", "", "--out_dir", tmp_path / "o", "--max_steps", "1", *TINY_ARGS]
    code, _, err = run_train_cli("distill", "--teacher_model", tmp_path / "teacher", *base, capsys=capsys)
    assert code != 0 and "--teacher_model" in err and "has another tokenizer" in err and "Traceback" not in err
    code, _, err = run_train_cli("distill", "--teacher_model", tmp_path / "teacher", "--beta", "1.5", *base,
                                 capsys=capsys)
    assert code == 2 and "--beta must be a finite number >= 0 and <= 1, got 1.5" in err
    # A teacher directory without a model or without weights: one line at parse time, nothing written.
    (tmp_path / "empty").mkdir()
    (tmp_path / "weightless").mkdir()
    (tmp_path / "weightless" / "config.json").write_text((tmp_path / "teacher" / "config.json").read_text())
    for directory, why in (("empty", "no model there (no config.json)"),
                           ("weightless", "no weights there (no model.safetensors)")):
        code, _, err = run_train_cli("distill", "--teacher_model", tmp_path / directory, *base, capsys=capsys)
        assert code == 2 and f"--teacher_model {tmp_path / directory}: {why}" in err and err.count("\n") == 1, err
    assert not (tmp_path / "o").exists()


def test_chats_are_distilled_on_their_assistant_turns(tiny_sft_dir, tmp_path, capsys):
    """A chat file (told apart from documents by its first record) trains like SFT: the student becomes a chat
    model, and the loss covers the assistant turns only (the SFT mask)."""
    data = head_lines(REPO / "dataset" / "sft.jsonl", 24, tmp_path / "chats.jsonl")
    out = tmp_path / "chat_student"
    code, stdout, err = run_train_cli("distill", "--teacher_model", tiny_sft_dir, "--data_path", data, "--eval_data", "",
                                      "--out_dir", out, "--max_length", "96", "--batch_size", "4", "--max_steps", "2",
                                      *TINY_ARGS, capsys=capsys)
    assert code == 0, err
    assert "chat template: minillm's ChatML" in stdout
    config = json.loads((out / "config.json").read_text())
    assert config["minillm"]["chat_trained"] is True and config["minillm"]["trained_context"] == 96


def test_an_on_policy_batch_is_the_students_answers_scored_by_the_teacher(monkeypatch):
    """lmbda 1: each row keeps its prompt (the tokens before its first learned one), the answer is what the engine
    samples from the student, and the loss is TRL's generalized JSD over the sampled tokens alone."""
    import minillm.train.distill as distill

    student, teacher = tiny(0, 32, 1), tiny(1, 64, 2)
    x = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 0], [12, 13, 14, 15, 16, 17, 18, 19]])
    y = torch.cat([x[:, 1:], torch.tensor([[0], [20]])], dim=1)
    m = torch.tensor([[0, 0, 1, 1, 1, 0, 0, 0], [0, 0, 0, 0, 1, 1, 1, 1]], dtype=torch.float32)
    seen = {}

    def fake_engine(model, prompts, n, max_new_tokens, temperature, stop_ids):
        seen.update(model=model, prompts=prompts, n=n, max_new_tokens=max_new_tokens)
        return [[40, 41, 42, 43], [44, 45]]

    monkeypatch.setattr(distill, "sample_groups", fake_engine)
    objective = Distillation(teacher, alpha=0.3, beta=0.5, temperature=0.8, lmbda=1.0, max_new_tokens=9)
    objective.prepare(student, None, torch.device("cpu"), torch.float32)
    batch = (x, y, m)
    objective.begin_step([batch])
    assert seen == {"model": student, "prompts": [[5, 6, 7], [12, 13, 14, 15, 16]], "n": 1, "max_new_tokens": 9}
    assert objective.units(batch).item() == 6  # the sampled tokens, not the 7 reference ones
    out = objective(student, batch)
    ids = torch.tensor([[5, 6, 7, 40, 41, 42, 43, 0], [12, 13, 14, 15, 16, 44, 45, 0]])
    labels = ids[:, 1:].clone()
    labels[0, :2], labels[0, 6:], labels[1, :4], labels[1, 6:] = -100, -100, -100, -100
    theirs = gkd.GKDTrainer.generalized_jsd_loss(student(ids[:, :-1]).logits, teacher(ids[:, :-1]).logits.detach(),
                                                 labels=labels, beta=0.5, temperature=0.8)
    assert out.loss.item() == pytest.approx(theirs.item(), abs=1e-5)  # alpha does not apply: no reference answer
    assert out.counters == {"on_policy_batches": 1.0}
    objective.lmbda = 0.0
    objective.begin_step([batch])
    assert objective(student, batch).counters == {"on_policy_batches": 0.0} and objective.units(batch).item() == 7


def test_on_policy_distillation_runs_on_chats_and_is_refused_on_documents(tiny_sft_dir, tmp_path, capsys):
    data = head_lines(REPO / "dataset" / "sft.jsonl", 16, tmp_path / "chats.jsonl")
    out = tmp_path / "gkd"
    code, _, err = run_train_cli("distill", "--teacher_model", tiny_sft_dir, "--init_from", tiny_sft_dir,
                                 "--data_path", data, "--eval_data", "", "--out_dir", out, "--max_length", "96",
                                 "--batch_size", "2", "--max_steps", "3", "--lmbda", "1", "--max_new_tokens", "8",
                                 "--log_every", "1", capsys=capsys)
    assert code == 0, err
    rows = [json.loads(line) for line in open(out / "metrics.jsonl", encoding="utf-8") if '"loss"' in line]
    assert [r["on_policy_batches"] for r in rows] == [1.0, 1.0, 1.0]
    docs = tmp_path / "docs.jsonl"
    docs.write_text(json.dumps({"text": "春眠不觉晓"}, ensure_ascii=False) + "\n")
    code, _, err = run_train_cli("distill", "--teacher_model", tiny_sft_dir, "--data_path", docs, "--eval_data", "",
                                 "--out_dir", tmp_path / "d", "--lmbda", "0.5", "--max_length", "8", *TINY_ARGS,
                                 capsys=capsys)
    assert code == 2 and "on-policy distillation samples answers to prompts" in err and err.count("\n") == 1
    assert not (tmp_path / "d").exists()  # refused before anything was built or written


@pytest.mark.parametrize("topk", [None, 8])
def test_a_resumed_distillation_is_the_straight_run_bit_for_bit(tiny_sft_dir, tokenizer, tmp_path, topk):
    """Issue 48: resume is exact, the on-policy draws included (lmbda 0.5: which micro-batches go on-policy, and
    what the student samples, come from the run's RNG, which checkpoints keep), with the teacher live or cached."""
    from minillm.data.datasets import SFTDataset
    from minillm.train.config import TrainConfig
    from minillm.train.trainer import train

    data = SFTDataset(head_lines(REPO / "dataset" / "sft.jsonl", 16, tmp_path / "chats.jsonl"), tokenizer,
                      max_length=96)
    teacher = randomized(MiniLLM.from_pretrained(tiny_sft_dir, dtype=torch.float32), scale=0.05, seed=3)

    def run(out, start, stop=None, resume=False):
        cfg = TrainConfig(out_dir=str(out), batch_size=2, accumulation_steps=2, max_steps=6, learning_rate=1e-3,
                          dtype="float32", eval_every=0, save_every=0, log_every=1, resume=resume)
        objective = Distillation(teacher, alpha=0.5, beta=0.5, temperature=0.9, lmbda=0.5, max_new_tokens=8,
                                 stop_ids=[tokenizer.im_end_id], topk=topk, cache_dir=tmp_path / "cache" if topk else None)
        return train(MiniLLM.from_pretrained(start, dtype=torch.float32).train(), data, cfg, objective=objective,
                     should_stop=(lambda step: step == stop) if stop else None)

    straight = run(tmp_path / "a", tiny_sft_dir)
    cut = run(tmp_path / "b", tiny_sft_dir, stop=3)
    resumed = run(tmp_path / "b", tmp_path / "a", resume=True)  # the weights come from the checkpoint
    assert cut.interrupted and cut.losses + resumed.losses == straight.losses
    on_policy = [json.loads(line).get("on_policy_batches") for line in open(tmp_path / "a" / "metrics.jsonl")]
    assert 0 < sum(x or 0 for x in on_policy)  # some micro-batches went on-policy
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --- the top-k teacher cache (minillm/train/teacher_cache.py) ------------------------------------------------------

def rows_of(n: int = 10, T: int = 12, seed: int = 4) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """A small dataset of (x, y, mask) rows: prompts unlearned, padding after the answer, two rows alike."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        x, y = torch.randint(0, 60, (T,), generator=g), torch.randint(0, 60, (T,), generator=g)
        m = torch.zeros(T)
        m[i % 4:T - i % 3] = 1
        rows.append((x, y, m))
    rows[7] = rows[2]
    return rows


def cached(teacher, folder, k, beta=0.5, temperature=0.8, alpha=0.7):
    student = tiny(0, 32, 1)
    objective = Distillation(teacher, alpha=alpha, beta=beta, temperature=temperature, topk=k, cache_dir=folder,
                             verbose=False)
    objective.prepare(student, rows_of(), torch.device("cpu"), torch.float32)
    return student, objective


def batch_of(rows, order, trim=None):
    """Rows stacked in another order (and cut after column `trim`, as the loop trims padding)."""
    x, y, m = (torch.stack([rows[i][j] for i in order]) for j in range(3))
    return (x[:, :trim], y[:, :trim], m[:, :trim]) if trim else (x, y, m)


def test_a_cache_of_the_whole_vocabulary_gives_the_live_loss_and_gradient(tmp_path):
    """Issue 48, the top-k cache: with k = V the cached distribution is the teacher's own, so the loss and the
    student's gradient equal the live teacher's, for rows in any order and trimmed padding."""
    teacher = tiny(1, 64, 2)
    student, objective = cached(teacher, tmp_path, k=60)
    live = Distillation(teacher, alpha=0.7, beta=0.5, temperature=0.8)
    live.prepare(student, None, torch.device("cpu"), torch.float32)
    batch = batch_of(rows_of(), [5, 2, 4, 8], trim=11)  # no row learns past column 10
    ours, theirs = objective(student, batch).loss, live(student, batch).loss
    (g_ours,) = torch.autograd.grad(ours, student.lm_head.weight)
    (g_theirs,) = torch.autograd.grad(theirs, student.lm_head.weight)
    assert ours.item() == pytest.approx(theirs.item(), abs=1e-5)
    torch.testing.assert_close(g_ours, g_theirs, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("beta", [0.0, 1.0])
def test_a_top_k_cache_keeps_k_ids_spreads_the_rest_and_never_runs_the_teacher(tmp_path, beta):
    """k = 5 of 60: each learned position keeps the teacher's 5 likeliest ids at their probabilities and spreads
    the rest evenly over the other 55; the loss is the divergence to that distribution (an independent KL here);
    after the cache is built the teacher never runs."""
    teacher = tiny(1, 64, 2)
    student, objective = cached(teacher, tmp_path, k=5, beta=beta, alpha=1.0)
    x, y, m = batch_of(rows_of(), [3, 7, 1])
    learned = m > 0
    with torch.no_grad():
        p_full = (teacher(x).logits[learned] / 0.8).softmax(-1)
    top, ids = p_full.topk(5, dim=-1)
    p = ((1 - top.sum(-1, keepdim=True)) / 55).expand_as(p_full).clone().scatter_(1, ids, top)
    teacher.forward = lambda *a, **kw: (_ for _ in ()).throw(AssertionError("the teacher ran"))
    q = (student(x).logits[learned] / 0.8).softmax(-1)
    kl = (p * (p.log() - q.log())).sum(-1) if beta == 0 else (q * (q.log() - p.log())).sum(-1)
    assert objective(student, (x, y, m)).loss.item() == pytest.approx(kl.mean().item(), rel=1e-4)


def test_a_corrupted_cache_is_rebuilt_and_another_teacher_gets_its_own(tmp_path, capsys):
    """A cache whose bytes no longer match its checksum is rebuilt (a note says so), never trained on; a cache of
    another teacher is another file."""
    teacher = tiny(1, 64, 2)
    student, objective = cached(teacher, tmp_path, k=5)
    batch = batch_of(rows_of(), [0, 4, 8])
    want = objective(student, batch).loss.item()
    (bin_path,) = tmp_path.glob("*.bin")
    data = bytearray(bin_path.read_bytes())
    data[len(data) // 2 + 3] ^= 0xFF
    bin_path.write_bytes(bytes(data))
    student, objective = cached(teacher, tmp_path, k=5)
    assert "does not match the checksum" in capsys.readouterr().err
    assert objective(student, batch).loss.item() == want
    cached(tiny(2, 64, 2), tmp_path, k=5)
    cached(teacher, tmp_path, k=6)
    assert len(list(tmp_path.glob("*.bin"))) == 3 and len(list(tmp_path.glob("*.json"))) == 3


def test_a_row_the_cache_does_not_hold_is_refused(tmp_path):
    teacher = tiny(1, 64, 2)
    student, objective = cached(teacher, tmp_path, k=5)
    x, y, m = batch_of(rows_of(), [0, 1])
    x[1, 2] = (x[1, 2] + 1) % 60
    with pytest.raises(KeyError, match="not in the teacher cache"):
        objective(student, (x, y, m))


def documents_and_teacher(tmp_path, capsys):
    """30 corpus documents and a tiny teacher pretrained on them for 3 steps."""
    corpus = head_lines(REPO / "dataset" / "pretrain.jsonl", 30, tmp_path / "docs.jsonl")
    teacher = tmp_path / "teacher"
    code, _, err = run_train_cli("pretrain", "--data_path", corpus, "--eval_data", "", "--out_dir", teacher,
                                 "--max_length", "32", "--batch_size", "4", "--max_steps", "3", *TINY_ARGS,
                                 capsys=capsys)
    assert code == 0, err
    return corpus, teacher


def test_train_distill_with_a_teacher_cache(tmp_path, tokenizer, capsys):
    """--teacher_topk builds the cache in --teacher_cache before training and trains from it; K < 1 is refused
    at parse time in one line."""
    corpus, teacher = documents_and_teacher(tmp_path, capsys)
    common = ["--teacher_model", teacher, "--data_path", corpus, "--eval_data", "", "--max_length", "32",
              "--batch_size", "4", "--max_steps", "4", "--log_every", "1", *TINY_ARGS]
    code, _, err = run_train_cli("distill", *common, "--out_dir", tmp_path / "s", "--teacher_topk", "8",
                                 "--teacher_cache", tmp_path / "cache", capsys=capsys)
    assert code == 0, err
    assert len(list((tmp_path / "cache").glob("teacher-*.bin"))) == 1
    rows = [json.loads(line) for line in open(tmp_path / "s" / "metrics.jsonl") if '"loss"' in line]
    assert len(rows) == 4 and all(r["distill/divergence"] > 0 for r in rows)
    code, _, err = run_train_cli("distill", *common, "--out_dir", tmp_path / "z", "--teacher_topk", "0",
                                 capsys=capsys)
    assert code == 2 and "--teacher_topk must be >= 1" in err and err.count("\n") == 1


def test_a_distillation_killed_with_sigkill_resumes_bit_identically(tmp_path, tokenizer, capsys):
    """Issue 48: resume after kill -9 is exact, with the top-k teacher cache reopened (and checked) on resume: one
    kill at a random step, one inside a checkpoint write."""
    import os
    import random
    import signal
    import subprocess
    import sys
    import time

    corpus, teacher = documents_and_teacher(tmp_path, capsys)
    args = ["--teacher_model", teacher, "--data_path", corpus, "--eval_data", "", "--max_length", "32",
            "--batch_size", "2", "--max_steps", "10", "--save_every", "1", "--keep_checkpoints", "2",
            "--log_every", "1", "--dtype", "float32", "--teacher_topk", "8", "--teacher_cache", tmp_path / "cache",
            *TINY_ARGS]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def run(out, *extra):
        return subprocess.run([sys.executable, str(REPO / "train_distill.py"), *map(str, args), "--out_dir", str(out),
                               *extra], capture_output=True, text=True, timeout=300, cwd=REPO, env=env)

    straight = run(tmp_path / "ref")
    assert straight.returncode == 0, straight.stderr
    expected = load_file(tmp_path / "ref" / "model.safetensors")
    rng = random.Random(1)
    for trial in range(2):
        out = tmp_path / f"t{trial}"
        proc = subprocess.Popen([sys.executable, str(REPO / "train_distill.py"), *map(str, args), "--out_dir",
                                 str(out)], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        while not (out / "metrics.jsonl").exists() and proc.poll() is None:
            time.sleep(0.001)
        if trial:  # inside a checkpoint write
            deadline = time.time() + 60
            while not list((out / "checkpoints").glob("*.tmp")) and time.time() < deadline:
                time.sleep(0.0005)
        else:
            target = rng.randint(2, 7)
            while proc.poll() is None and len((out / "metrics.jsonl").read_bytes().splitlines()) < target:
                time.sleep(0.0005)
        assert proc.poll() is None, f"trial {trial}: the run had already ended; the kill tested nothing"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        done = run(out, "--resume")
        assert done.returncode == 0, done.stderr
        got = load_file(out / "model.safetensors")
        assert all(torch.equal(expected[k], got[k]) for k in expected), f"trial {trial}"
        steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()
                 if '"loss"' in line]
        assert steps == list(range(1, 11)), f"trial {trial}: {steps}"
    assert len(list((tmp_path / "cache").glob("teacher-*.bin"))) == 1  # built once, reopened by every run
