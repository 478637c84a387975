"""Flags that no other test passed through the command line (issue 32, item 10): each check fails if the flag
were parsed and then ignored."""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import REPO, TINY_ARGS, load_script, run_train_cli, stage_defaults, tiny_pretrain

from minillm.model.linear import Int8Linear
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


def test_a_time_budget_gives_the_bar_its_total_once_the_horizon_is_fixed(tmp_path, corpus, capsys):
    """Issue 50: under --max_minutes alone the bar had no total, so no ETA."""
    import re

    code, _, err = tiny_pretrain(tmp_path / "timed", corpus, "--max_minutes", "0.1", "--warmup_steps", "1",
                                 capsys=capsys)
    assert code == 0, err
    horizon = int(re.search(r"budget holds about (\d+) steps", err).group(1))
    totals = {int(t) for t in re.findall(r"\| *\d+/(\d+) \[", err)}
    assert totals == {horizon}


def test_report_to_tensorboard_writes_every_metrics_row_as_scalars(tmp_path, corpus, capsys):
    """Issue 50, item 4: --report_to tensorboard sends metrics.jsonl's rows to TensorBoard (train/<name>, eval/loss);
    metrics.jsonl stays as it was."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "tb"
    code, _, err = tiny_pretrain(out, corpus, "--max_steps", "4", "--report_to", "tensorboard", "--eval_data", corpus,
                                 "--eval_every", "2", capsys=capsys)
    assert code == 0, err
    events = EventAccumulator(str(out / "runs"))
    events.Reload()
    logged = rows(out)
    for name in ("loss", "lr", "grad_norm", "tokens_per_s"):
        got = [(e.step, e.value) for e in events.Scalars(f"train/{name}")]
        assert got == [(r["step"], pytest.approx(r[name], rel=1e-6)) for r in logged if name in r] and len(got) == 4
    held = [(r["step"], r["eval_loss"]) for r in logged if "eval_loss" in r]
    assert [(e.step, pytest.approx(e.value, rel=1e-6)) for e in events.Scalars("eval/loss")] == held and len(held) == 2
    code, _, err = tiny_pretrain(tmp_path / "x", corpus, "--report_to", "wandb", capsys=capsys)
    assert code == 2 and "report_to must be one of none, tensorboard, got 'wandb'" in err


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


def test_every_loop_flag_reaches_train_config(tmp_path, corpus, capsys, monkeypatch):
    """Each TrainConfig field is a flag (generated from the dataclass): a non-default value typed on the command
    line arrives in the config train() gets. A field added without a value here fails the test."""
    from dataclasses import fields

    import minillm.cli.training as training
    from minillm.train.config import TrainConfig, TrainResult

    typed = {"out_dir": str(tmp_path / "o"), "epochs": 3, "max_steps": 7, "max_minutes": 2.5, "batch_size": 3,
             "accumulation_steps": 2, "learning_rate": 1e-3, "warmup_steps": 4, "weight_decay": 0.05,
             "optimizer": "muon", "matrix_lr": 0.02, "grad_clip": 0.5, "dtype": "float16", "eval_dtype": "bfloat16",
             "device": "cpu", "compile": True, "fsdp": True, "activation_checkpointing": True, "loss_chunk": 16,
             "seed": 7, "num_workers": 2, "group_by_length": True, "log_every": 3, "eval_every": 9,
             "save_every": 11, "keep_checkpoints": 4, "resume": True, "overwrite": True, "max_bad_steps": 2,
             "report_to": "tensorboard"}
    assert set(typed) == {f.name for f in fields(TrainConfig)}
    assert all(typed[f.name] != f.default for f in fields(TrainConfig))
    seen = {}
    monkeypatch.setattr(training, "train", lambda model, data, cfg, **kw: seen.setdefault("cfg", cfg) and TrainResult())
    argv = [a for name, v in typed.items() for a in ([f"--{name}"] if v is True else [f"--{name}", str(v)])]
    code, _, err = run_train_cli("pretrain", "--data_path", corpus, "--eval_data", "", "--max_length", "32",
                                 *TINY_ARGS, *argv, capsys=capsys)
    assert code == 0, err
    assert {name: getattr(seen["cfg"], name) for name in typed} == typed


def test_max_bad_steps_stops_a_diverging_run(tmp_path, corpus, capsys):
    # A learning rate of 1e30 takes the weights to ~1e30 in one step: every later loss is non-finite.
    code, _, err = tiny_pretrain(tmp_path / "bad", corpus, "--max_steps", "20", "--learning_rate", "1e30",
                                 "--warmup_steps", "0", "--max_bad_steps", "2", capsys=capsys)
    assert code == 1 and "2 non-finite losses or gradient norms in a row" in err


def test_compile_and_num_workers_reach_the_loop(tmp_path, corpus, capsys, monkeypatch):
    """--compile hands the model to torch.compile, --num_workers sets the DataLoader's workers (spied: the
    numerics of both are checked in test_trainer.py)."""
    import minillm.train.trainer as trainer

    compiled, loaders = [], []
    monkeypatch.setattr(trainer.torch, "compile", lambda model, **kw: compiled.append(model) or model)
    real_loader = trainer.DataLoader
    monkeypatch.setattr(trainer, "DataLoader",
                        lambda *a, **kw: loaders.append(kw["num_workers"]) or real_loader(*a, **kw))
    code, _, err = tiny_pretrain(tmp_path / "a", corpus, "--max_steps", "2", "--compile", "--num_workers", "2",
                                 capsys=capsys)
    assert code == 0, err
    assert len(compiled) == 1 and loaders and set(loaders) == {2}


@pytest.fixture(scope="module")
def adapter(tiny_sft_dir, tmp_path_factory):
    """A LoRA adapter trained hard enough on tiny_sft_dir (lr 1e-2) to change its greedy answers; merged too."""
    from minillm.cli import main

    out = tmp_path_factory.mktemp("adapter")
    assert main("sft", stage_defaults("sft"), [
        "--init_from", str(tiny_sft_dir), "--lora", "--merge", "--learning_rate", "1e-2", "--max_steps", "12",
        "--batch_size", "4", "--max_length", "96", "--eval_data", "", "--dtype", "float32", "--out_dir", str(out)]) == 0
    return out


def test_eval_tasks_adapter_and_data(tiny_sft_dir, adapter, tmp_path, capsys):
    """--adapter answers as the merged model and not as the base; --data is the file the cloze is built from."""
    from minillm.eval.perplexity import read_documents
    from minillm.eval.tasks import cloze_items, parse_poem

    eval_tasks = load_script("eval_tasks.py")
    answers = {}
    for name, flags in {"base": ["--model", tiny_sft_dir], "adapter": ["--model", tiny_sft_dir, "--adapter", adapter],
                        "merged": ["--model", adapter / "merged"]}.items():
        report = tmp_path / f"{name}.json"
        assert eval_tasks.main([*map(str, flags), "--tasks", "requests", "--limit", "4", "--max_new_tokens", "16",
                                "--json", str(report)]) == 0
        answers[name] = json.loads(report.read_text())["requests"]["answers"]
    assert answers["adapter"] == answers["merged"] != answers["base"]
    few = tmp_path / "few.jsonl"
    few.write_text("".join((REPO / "dataset" / "eval.jsonl").read_text(encoding="utf-8").splitlines(True)[:40]),
                   encoding="utf-8")
    report = tmp_path / "cloze.json"
    assert eval_tasks.main(["--model", str(tiny_sft_dir), "--tasks", "cloze", "--data", str(few),
                            "--json", str(report)]) == 0
    capsys.readouterr()
    expected = len(cloze_items([p for p in map(parse_poem, read_documents(few)) if p is not None]))
    assert 0 < json.loads(report.read_text())["cloze"]["n"] == expected < 40


def test_generate_dtype_and_compile(tiny_sft_dir, capsys, monkeypatch):
    """--dtype sets the weights' dtype; --compile hands the decode steps to torch.compile (spied)."""
    import minillm.cli.generate as generate
    import minillm.infer.generation as generation

    dtypes, compiled = [], []
    real_load = generate.load_trained

    def spy_load(*a, **kw):
        model, tokenizer, directory = real_load(*a, **kw)
        dtypes.append(model.embed_tokens.weight.dtype)
        return model, tokenizer, directory

    monkeypatch.setattr(generate, "load_trained", spy_load)
    monkeypatch.setattr(generation.torch, "compile", lambda model, **kw: compiled.append(model) or model)
    for flags in (["--dtype", "bfloat16"], ["--compile"], ["--quantize", "int8"]):
        assert generate.main(["--model", str(tiny_sft_dir), "--prompt", "江", "--temperature", "0",
                              "--max_new_tokens", "4", *flags]) == 0
    capsys.readouterr()
    assert dtypes == [torch.bfloat16, torch.float32, torch.float32]
    assert len(compiled) == 2  # --quantize int8 decodes through the compiled path
    assert any(isinstance(m, Int8Linear) for m in compiled[1].modules())


def test_eval_tasks_quantize_int8(tiny_sft_dir, tmp_path, capsys):
    """--quantize int8: the rates are recorded as int8's in --json, and the model card is left alone."""
    import shutil

    model_dir = tmp_path / "m"
    shutil.copytree(tiny_sft_dir, model_dir)
    eval_tasks = load_script("eval_tasks.py")
    report = tmp_path / "r.json"
    assert eval_tasks.main(["--model", str(model_dir), "--tasks", "cloze", "--quantize", "int8",
                            "--json", str(report)]) == 0
    out = capsys.readouterr().out
    assert "quantized to int8" in out and "model card updated" not in out
    assert json.loads(report.read_text())["quantize"] == "int8"
    assert not (model_dir / "eval_results.json").exists()


def test_serve_flags_reach_the_server(tiny_sft_dir, adapter, monkeypatch, capsys):
    """--host, --threads, --compile, --api_key and --adapter of serve.py's main (the socket is bound, the app built,
    then inspected in-process instead of served)."""
    from starlette.testclient import TestClient

    import minillm.infer.serving as serving

    serve = load_script("serve.py")
    seen = {}
    monkeypatch.setattr(serve, "run_server", lambda app, sock, **kw: seen.update(app=app, host=sock.getsockname()[0]))
    real_scheduler = serving.Scheduler
    monkeypatch.setattr(serving, "Scheduler", lambda model, *a, **kw: seen.setdefault("model", model) and
                        real_scheduler(model, *a, **kw))
    compiled = []  # spied: a real compile would make the greedy answer depend on inductor's rounding
    monkeypatch.setattr(torch.nn.Module, "compile", lambda module, **kw: compiled.append(module))
    threads = torch.get_num_threads()
    wanted = max(1, (os.cpu_count() or 1) - 1) + 1  # one more than serve.py's default
    try:
        assert serve.main(["--model", str(tiny_sft_dir), "--adapter", str(adapter), "--host", "127.0.0.2",
                           "--port", "0", "--threads", str(wanted), "--compile", "--api_key", "sesame"]) == 0
        assert torch.get_num_threads() == wanted
    finally:
        torch.set_num_threads(threads)
    assert seen["host"] == "127.0.0.2"
    assert compiled == [block.mlp for block in seen["model"].layers]
    body = {"messages": [{"role": "user", "content": "写一首词"}], "max_tokens": 12, "temperature": 0}
    with TestClient(seen["app"], base_url="http://127.0.0.2") as client:
        assert client.post("/v1/chat/completions", json=body).status_code == 401
        reply = client.post("/v1/chat/completions", json=body, headers={"Authorization": "Bearer sesame"})
    assert reply.status_code == 200
    generate = load_script("generate.py")
    capsys.readouterr()
    texts = {}
    for name, flags in {"adapter": ["--adapter", str(adapter)], "base": []}.items():
        assert generate.main(["--model", str(tiny_sft_dir), *flags, "--prompt", "写一首词", "--temperature", "0",
                              "--max_new_tokens", "12"]) == 0
        texts[name] = capsys.readouterr().out.removesuffix("\n")
    assert reply.json()["choices"][0]["message"]["content"] == texts["adapter"] != texts["base"]


def test_export_tokenizer_flag(tiny_sft_dir, tmp_path, capsys):
    """A model directory without its tokenizer exports only with --tokenizer pointing at one."""
    import gguf

    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        (bare / name).write_bytes((tiny_sft_dir / name).read_bytes())
    export = load_script("export_gguf.py")
    assert export.main(["--model", str(bare), "--out", str(tmp_path / "no.gguf")]) == 1
    assert "tokenizer" in capsys.readouterr().err
    assert export.main(["--model", str(bare), "--tokenizer", str(tiny_sft_dir), "--dtype", "f32",
                        "--out", str(tmp_path / "m.gguf")]) == 0
    tokens = gguf.GGUFReader(tmp_path / "m.gguf").fields["tokenizer.ggml.tokens"]
    assert len(tokens.data) == json.loads((tiny_sft_dir / "config.json").read_text())["vocab_size"]
