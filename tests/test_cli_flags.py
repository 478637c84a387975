"""Flags that no other test passed through the command line (issue 32, item 10): each check fails if the flag
were parsed and then ignored."""

from __future__ import annotations

import json

import torch
from conftest import load_script, run_train_cli, tiny_pretrain

from minillm.train.checkpoint import latest_checkpoint


def rows(out) -> list[dict]:
    """metrics.jsonl of a run."""
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_accumulation_epochs_and_dtype(tmp_path, corpus, capsys):
    one = tmp_path / "one"
    assert tiny_pretrain(one, corpus, "--max_steps", "2", capsys=capsys)[0] == 0
    two = tmp_path / "two"
    code, out, err = tiny_pretrain(two, corpus, "--max_steps", "2", "--accumulation_steps", "2", "--dtype",
                                   "bfloat16", capsys=capsys)
    assert code == 0, err
    assert rows(two)[0]["tokens"] == 2 * rows(one)[0]["tokens"]  # two micro-batches per step
    assert "compute dtype bfloat16 (--dtype)" in out
    small = tmp_path / "small.jsonl"
    small.write_text("".join(corpus.read_text(encoding="utf-8").splitlines(keepends=True)[:8]), encoding="utf-8")
    epochs = tmp_path / "epochs"
    code, _, err = run_train_cli("pretrain", "--data_path", small, "--eval_data", "", "--out_dir", epochs,
                                 "--no-packed", "--max_length", "32", "--batch_size", "2", "--log_every", "1",
                                 "--epochs", "3", "--hidden_size", "64", "--num_hidden_layers", "2",
                                 "--num_attention_heads", "4", "--num_key_value_heads", "2", capsys=capsys)
    assert code == 0, err
    assert [r["step"] for r in rows(epochs) if "loss" in r] == list(range(1, 13))  # 3 epochs of 8 / 2 rows


def test_max_minutes_ends_the_run_by_time(tmp_path, corpus, capsys):
    out = tmp_path / "timed"
    code, _, err = tiny_pretrain(out, corpus, "--max_steps", "100000", "--max_minutes", "0.02", capsys=capsys)
    assert code == 0, err
    steps = [r["step"] for r in rows(out) if "loss" in r]
    assert 1 <= len(steps) < 100000 and (out / "model.safetensors").is_file()


def test_matrix_lr_and_lora_flags_reach_what_is_saved(tmp_path, corpus, capsys):
    muon = tmp_path / "muon"
    code, _, err = tiny_pretrain(muon, corpus, "--max_steps", "1", "--optimizer", "muon", "--learning_rate", "1e-3",
                                 "--matrix_lr", "7e-3", capsys=capsys)
    assert code == 0, err
    state = torch.load(latest_checkpoint(muon) / "state.pt", weights_only=True)["optimizer"]
    assert {g["peak_lr"] for g in state["muon"]["param_groups"]} == {7e-3}
    assert {g["peak_lr"] for g in state["adamw"]["param_groups"]} == {1e-3}
    lora = tmp_path / "lora"
    code, _, err = tiny_pretrain(lora, corpus, "--init_from", muon, "--max_steps", "1", "--lora", "--lora_r", "4",
                                 "--lora_alpha", "12", "--lora_dropout", "0.25", capsys=capsys)
    assert code == 0, err
    adapter = json.loads((lora / "adapter_config.json").read_text())
    assert (adapter["r"], adapter["lora_alpha"], adapter["lora_dropout"]) == (4, 12.0, 0.25)


def test_eval_and_generate_flags(tiny_sft_dir, tmp_path, capsys):
    eval_ppl = load_script("eval_ppl.py")
    report = tmp_path / "ppl.json"
    assert eval_ppl.main(["--model", str(tiny_sft_dir), "--device", "cpu", "--max_length", "32",
                          "--json", str(report)]) == 0
    assert json.loads(report.read_text())["device"] == "cpu"
    eval_tasks = load_script("eval_tasks.py")
    tasks = tmp_path / "tasks.json"
    assert eval_tasks.main(["--model", str(tiny_sft_dir), "--tasks", "cloze", "--json", str(tasks)]) == 0
    result = json.loads(tasks.read_text())
    assert "cloze" in result and "requests" not in result  # a chat model's default would run both
    generate = load_script("generate.py")
    capsys.readouterr()
    texts = {}
    for name, flags in {"top_k_1": ["--temperature", "1.5", "--top_k", "1", "--seed", "4"],
                        "greedy": ["--temperature", "0"]}.items():
        assert generate.main(["--model", str(tiny_sft_dir), "--prompt", "春", "--max_new_tokens", "12",
                              "--top_p", "1", *flags]) == 0
        texts[name] = capsys.readouterr().out
    assert texts["top_k_1"] == texts["greedy"]  # top_k 1 leaves only the argmax, whatever the temperature
