"""Issue 29 through the command line: a model trained with --qk_norm is a Qwen3 checkpoint that every path runs."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import LiveServer, load_script, run_train_cli, tiny_pretrain

from minillm.model.model import MiniLLM

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def qwen3_pretrained(tmp_path_factory, corpus):
    """train_pretrain.py --qk_norm on the corpus fixture: 30 steps of a 2-layer model."""
    from conftest import TINY_ARGS, stage_defaults

    from minillm.cli import main

    out = tmp_path_factory.mktemp("qwen3_pretrain")
    assert main("pretrain", stage_defaults("pretrain"), [
        "--data_path", str(corpus), "--eval_data", "", "--out_dir", str(out), "--max_length", "32",
        "--batch_size", "4", "--log_every", "1", "--max_steps", "30", "--learning_rate", "3e-3", "--warmup_steps", "2",
        "--dtype", "float32",
        "--qk_norm", *TINY_ARGS]) == 0
    return out


def test_qk_norm_trains_and_saves_as_qwen3_that_transformers_runs(qwen3_pretrained):
    config = json.loads((qwen3_pretrained / "config.json").read_text())
    assert config["architectures"] == ["Qwen3ForCausalLM"] and config["model_type"] == "qwen3"
    losses = [json.loads(line)["loss"] for line in (qwen3_pretrained / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert len(losses) == 30 and sum(losses[-5:]) < sum(losses[:5]) - 5  # a nat lower per step on average
    model = MiniLLM.from_pretrained(qwen3_pretrained).eval()
    assert model.config.qk_norm and not torch.equal(model.layers[1].self_attn.k_norm.weight,
                                                    torch.ones(model.config.head_dim))  # the norms trained
    hf = transformers.AutoModelForCausalLM.from_pretrained(qwen3_pretrained, dtype=torch.float32).eval()
    assert type(hf).__name__ == "Qwen3ForCausalLM"
    ids = torch.randint(0, model.config.vocab_size, (2, 24))
    with torch.no_grad():
        assert (model(ids).logits - hf(ids).logits).abs().max().item() <= 1e-5


def test_sft_lora_generate_and_serve_a_qwen3_model(qwen3_pretrained, tmp_path, capsys):
    sft, lora = tmp_path / "sft", tmp_path / "lora"
    common = ["--eval_data", "", "--max_length", "64", "--batch_size", "4", "--max_steps", "4", "--dtype", "float32"]
    code, _, err = run_train_cli("sft", "--init_from", qwen3_pretrained, "--out_dir", sft, *common, capsys=capsys)
    assert code == 0, err
    assert json.loads((sft / "config.json").read_text())["model_type"] == "qwen3"
    code, _, err = run_train_cli("sft", "--init_from", qwen3_pretrained, "--no-qk_norm", "--out_dir", tmp_path / "x",
                                 *common, capsys=capsys)
    assert code == 1 and "--qk_norm False (the model has True)" in err  # a shape flag is checked, not ignored
    code, _, err = run_train_cli("sft", "--init_from", sft, "--lora", "--merge", "--out_dir", lora, *common,
                                 capsys=capsys)
    assert code == 0, err
    assert json.loads((lora / "merged" / "config.json").read_text())["model_type"] == "qwen3"

    generate = load_script("generate.py")
    question = [{"role": "user", "content": "写一首词"}]
    assert generate.main(["--model", str(sft), "--prompt", question[0]["content"], "--temperature", "0",
                          "--max_new_tokens", "12"]) == 0
    answer = capsys.readouterr().out.removesuffix("\n")
    import httpx

    with LiveServer(sft) as live:
        r = httpx.post(live.url + "/v1/chat/completions", timeout=60,
                       json={"messages": question, "max_tokens": 12, "temperature": 0})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == answer


def test_qk_norm_with_attention_bias_is_refused():
    from minillm.model.config import LMConfig

    with pytest.raises(ValueError, match="qk_norm with attention_bias is not supported"):
        LMConfig(qk_norm=True, attention_bias=True)


def test_tiny_pretrain_without_qk_norm_stays_llama(tmp_path, corpus, capsys):
    code, _, err = tiny_pretrain(tmp_path / "llama", corpus, "--max_steps", "1", capsys=capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "llama" / "config.json").read_text())["model_type"] == "llama"
