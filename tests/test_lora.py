"""LoRA and continued pretraining: exact init, frozen base, merge, PEFT parity, CLI, exact resume."""

import copy
import json
import random
import sys
from pathlib import Path

import pytest
import torch
from conftest import late_specials_backend, needs_compiler, randomized, stage_defaults

from minillm.cli import main as cli_main
from minillm.data.datasets import PretrainDataset
from minillm.data.tokenizer import SPECIAL_TOKENS, Tokenizer
from minillm.model.config import LMConfig
from minillm.model.lora import (
    LoRALinear,
    apply_lora,
    load_adapter,
    lora_state_dict,
    merge_lora,
    parameter_counts,
    parse_targets,
    save_adapter,
)
from minillm.model.model import MiniLLM
from minillm.train.checkpoint import latest_checkpoint
from minillm.train.config import TrainConfig
from minillm.train.trainer import train

REPO = Path(__file__).resolve().parent.parent
TINY = dict(vocab_size=97, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=128)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models on a machine shared with other jobs: two intra-op threads only wait for each other."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def base_model(seed=0, **kw) -> MiniLLM:
    torch.manual_seed(seed)
    return randomized(MiniLLM(LMConfig(**{**TINY, **kw})), seed=seed).eval()


def with_random_adapters(model, seed=1, **lora_kw):
    """Apply LoRA and give B random values, so the adapters change the function."""
    apply_lora(model, **lora_kw)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


IDS = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("targets", ["q,k,v,o,gate,up,down", "q,v,up", "k_proj,down"])
def test_adapted_model_equals_base_at_init(targets):
    model = base_model()
    with torch.no_grad():
        before = model(IDS).logits
    apply_lora(model, r=4, alpha=8, targets=targets)
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, before)
    # Trainable = r * (in + out) for each adapted slice; nothing else.
    D, C = model.config.head_dim, model.config.hidden_size
    rows = {"q": 4 * D, "k": 2 * D, "v": 2 * D, "o": C, "gate": 192, "up": 192, "down": C}
    cols = {t: (192 if t == "down" else C) for t in rows}
    expected = 2 * sum(4 * (cols[t] + rows[t]) for t in parse_targets(targets))
    trainable, total = parameter_counts(model)
    assert trainable == expected
    assert total == base_model().num_parameters() + expected
    assert [n for n, p in model.named_parameters() if p.requires_grad] == \
        [n for n in dict(model.named_parameters()) if ".lora_" in n]


def test_bad_lora_arguments():
    with pytest.raises(ValueError, match="unknown LoRA target 'qq'"):
        apply_lora(base_model(), targets="q,qq")
    with pytest.raises(ValueError, match="rank r must be a positive integer"):
        apply_lora(base_model(), r=0)
    model = apply_lora(base_model())
    with pytest.raises(ValueError, match="already has LoRA"):
        apply_lora(model)


def test_unsupported_adapters_are_refused_by_name(tmp_path):
    model = with_random_adapters(base_model(), targets="q")
    save_adapter(model, tmp_path)
    good = json.loads((tmp_path / "adapter_config.json").read_text())
    cases = [({"use_dora": True}, "use_dora=True is not supported"),
             ({"target_modules": ["q_proj", "lm_head"]}, "target_modules: unknown LoRA target 'lm_head'"),
             ({"target_modules": ".*proj"}, "target_modules must be a list"),
             ({"peft_type": "IA3"}, "only LORA adapters")]
    for change, message in cases:
        (tmp_path / "adapter_config.json").write_text(json.dumps({**good, **change}))
        with pytest.raises(ValueError, match=message) as info:
            load_adapter(base_model(), tmp_path)
        assert str(tmp_path / "adapter_config.json") in str(info.value)
    (tmp_path / "adapter_config.json").write_text(json.dumps(good))
    (tmp_path / "adapter_model.safetensors").rename(tmp_path / "adapter_model.bin")
    with pytest.raises(ValueError, match="safetensors only"):
        load_adapter(base_model(), tmp_path)


@pytest.mark.parametrize("kw", [dict(), dict(attention_bias=True, tie_word_embeddings=False)])
def test_merged_weights_match_base_plus_adapter(kw):
    model = with_random_adapters(base_model(**kw), targets="q,v,o,gate,down")
    with torch.no_grad():
        adapted = model(IDS).logits
        # The reference: the adapted layer's output is base + alpha/r * B A x for each slice.
        layer = model.layers[0].self_attn.qkv_proj
        x = torch.randn(3, 64)
        ref = x @ layer.weight.T + (layer.bias if layer.bias is not None else 0)
        q_rows = 4 * 16
        ref[:, :q_rows] += 2.0 * x @ layer.lora_A["q_proj"].T @ layer.lora_B["q_proj"].T
        ref[:, q_rows + 32:] += 2.0 * x @ layer.lora_A["v_proj"].T @ layer.lora_B["v_proj"].T
        assert torch.allclose(layer(x), ref, atol=1e-5)
    merged = merge_lora(copy.deepcopy(model))
    assert not any(isinstance(m, LoRALinear) for m in merged.modules())
    assert not hasattr(merged, "lora_config") and all(p.requires_grad for p in merged.parameters())
    with torch.no_grad():
        assert (merged(IDS).logits - adapted).abs().max().item() < 1e-5
        assert not torch.allclose(merged(IDS).logits, base_model(**kw)(IDS).logits, atol=1e-3)


def test_adapter_round_trip_and_peft_parity(tmp_path):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    base_model().save_pretrained(tmp_path / "base")
    model = with_random_adapters(MiniLLM.from_pretrained(tmp_path / "base"), targets="q,k,v,o,gate,up,down")
    save_adapter(model, tmp_path / "adapter", base_model_path=tmp_path / "base")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 8 and config["lora_alpha"] == 16
    assert config["target_modules"] == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert "base_model.model.model.layers.1.self_attn.k_proj.lora_B.weight" in lora_state_dict(model)
    with torch.no_grad():
        ours = model(IDS).logits
        # load_adapter on a fresh base rebuilds the same model.
        again = load_adapter(MiniLLM.from_pretrained(tmp_path / "base"), tmp_path / "adapter")
        assert torch.equal(again(IDS).logits, ours)
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32)
        peft_model = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
        assert (peft_model(IDS).logits - ours).abs().max().item() <= 1e-4


def test_adapter_written_by_peft_loads_into_minillm(tmp_path):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    base_model(tie_word_embeddings=False).save_pretrained(tmp_path / "base")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32)
    config = peft.LoraConfig(r=4, lora_alpha=12, target_modules=["q_proj", "v_proj", "up_proj"], task_type="CAUSAL_LM")
    peft_model = peft.get_peft_model(hf, config)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    peft_model.save_pretrained(tmp_path / "adapter")
    ours = load_adapter(MiniLLM.from_pretrained(tmp_path / "base"), tmp_path / "adapter")
    assert ours.lora_config.targets == ("q", "v", "up") and ours.lora_config.scaling == 3.0
    with torch.no_grad():
        assert (peft_model.eval()(IDS).logits - ours(IDS).logits).abs().max().item() <= 1e-4


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "train.jsonl"
    with open(REPO / "dataset" / "pretrain.jsonl", encoding="utf-8") as f:
        path.write_text("".join(next(f) for _ in range(24)), encoding="utf-8")
    return path


def lora_model(tokenizer, seed, dropout=0.0, lora_dropout=0.0):
    """The same base every time (seed 0); `seed` only draws the adapters' A."""
    torch.manual_seed(0)
    model = MiniLLM(LMConfig(vocab_size=tokenizer.vocab_size, dropout=dropout, max_position_embeddings=64,
                             hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    torch.manual_seed(seed)
    return apply_lora(model, r=4, dropout=lora_dropout)


def train_config(out, **kw):
    base = dict(out_dir=str(out), batch_size=4, learning_rate=1e-2, log_every=1, eval_every=0, save_every=0,
                seed=5, max_steps=0, epochs=2, accumulation_steps=2)
    return TrainConfig(**{**base, **kw})


@pytest.mark.exactness
@needs_compiler
def test_compiled_lora_training_matches_eager(tmp_path, tokenizer, small_corpus):
    data = PretrainDataset(small_corpus, tokenizer, max_length=32)
    kw = dict(max_steps=3, epochs=1, accumulation_steps=1, dtype="float32")
    eager = train(lora_model(tokenizer, seed=1), data, train_config(tmp_path / "a", **kw))
    compiled = train(lora_model(tokenizer, seed=1), data, train_config(tmp_path / "b", compile=True, **kw))
    assert compiled.losses == pytest.approx(eager.losses, rel=1e-4)
    assert (tmp_path / "b" / "adapter_model.safetensors").is_file()


def test_training_changes_only_adapters_and_resume_is_exact(tmp_path, tokenizer, small_corpus):
    data = PretrainDataset(small_corpus, tokenizer, max_length=32)
    model = lora_model(tokenizer, seed=1, dropout=0.1, lora_dropout=0.1)
    frozen = {k: v.clone() for k, v in model.state_dict().items() if ".lora_" not in k}
    adapters = {k: v.clone() for k, v in lora_state_dict(model).items()}
    straight = train(model, data, train_config(tmp_path / "a"), tokenizer=tokenizer)
    assert len(straight.losses) == 6
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in frozen.items())  # the base, bitwise
    assert all(not torch.equal(lora_state_dict(model)[k], v) for k, v in adapters.items())
    out = sorted(p.name for p in (tmp_path / "a").iterdir() if p.is_file())
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= set(out)
    assert "model.safetensors" not in out
    # The checkpoint holds the adapters (no base weights), the training state, the tokenizer and the manifest.
    assert sorted(p.name for p in latest_checkpoint(tmp_path / "a").iterdir()) == \
        ["adapter_config.json", "adapter_model.safetensors", "manifest.json", "minillm_adapter.json",
         "special_tokens_map.json", "state.pt", "tokenizer.json", "tokenizer_config.json"]

    # Stopped after step 2 (mid-epoch), resumed with differently drawn adapters: the same losses and tensors.
    first = train(lora_model(tokenizer, seed=1, dropout=0.1, lora_dropout=0.1), data, train_config(tmp_path / "b"),
                  should_stop=lambda step: step == 2)
    assert first.interrupted and first.losses == straight.losses[:2]
    resumed_model = lora_model(tokenizer, seed=7, dropout=0.1, lora_dropout=0.1)
    resumed = train(resumed_model, data, train_config(tmp_path / "b", resume=True))
    assert resumed.losses == straight.losses[2:]
    ours, ref = lora_state_dict(resumed_model), lora_state_dict(model)
    assert all(torch.equal(ours[k], ref[k]) for k in ref)

    with pytest.raises(ValueError, match="holds a LoRA adapter only; resume with --lora"):
        train(MiniLLM(resumed_model.config), data, train_config(tmp_path / "b", resume=True))
    other = lora_model(tokenizer, seed=1)
    other.lora_config.alpha = 32.0
    with pytest.raises(ValueError, match="use the same --lora_\\* flags"):
        train(other, data, train_config(tmp_path / "b", resume=True))
    # Adapters that fit by shape but were trained on other base weights are refused too.
    other_base = lora_model(tokenizer, seed=1, dropout=0.1, lora_dropout=0.1)
    with torch.no_grad():
        other_base.layers[0].mlp.down_proj.weight.add_(1e-3)
    with pytest.raises(ValueError, match="adapters trained on another base model"):
        train(other_base, data, train_config(tmp_path / "b", resume=True))


# --- continued pretraining from a transformers-made checkpoint with its own tokenizer, via the CLI -------

WORDS = ("river stone lantern harbor meadow copper falcon willow ember quartz signal orchard canyon "
         "beacon marble thistle").split()


def domain_text(n_docs: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(f"the {rng.choice(WORDS)} near the {rng.choice(WORDS)} is {rng.choice(WORDS)}."
                     for _ in range(6)) for _ in range(n_docs)]


@pytest.fixture(scope="module")
def hf_checkpoint(tmp_path_factory):
    """A random Qwen2ForCausalLM saved by transformers, beside a Qwen2-like tokenizer trained on the new
    domain: its ChatML tokens sit at the end of the vocabulary, not at ids 0-2 as in minillm's own."""
    transformers = pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("cpt")
    data = root / "domain.jsonl"
    texts = domain_text(160, 0)
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    tok = Tokenizer(late_specials_backend(texts, SPECIAL_TOKENS))
    assert tok.eos_id == tok.vocab_size - 3
    config = transformers.Qwen2Config(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=128, bos_token_id=tok.eos_id,
                                      eos_token_id=tok.eos_id, pad_token_id=tok.eos_id, tie_word_embeddings=False)
    torch.manual_seed(0)
    transformers.Qwen2ForCausalLM(config).save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    return root / "base", data, tok


def run_cli(kind, *args, capsys):
    code = cli_main(kind, stage_defaults(kind), [*map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


def losses(out_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def test_continued_pretraining_from_transformers_checkpoint(tmp_path, hf_checkpoint, capsys):
    transformers = pytest.importorskip("transformers")
    base, data, tok = hf_checkpoint
    out = tmp_path / "cpt"
    code, stdout, err = run_cli("pretrain", "--init_from", base, "--data_path", data, "--eval_data", "",
                                "--out_dir", out, "--max_length", "64", "--batch_size", "8", "--max_steps", "30",
                                "--learning_rate", "3e-3", "--warmup_steps", "3", "--log_every", "1",
                                "--save_every", "0", capsys=capsys)
    assert code == 0, err
    curve = losses(out)
    assert sum(curve[-5:]) / 5 < sum(curve[:5]) / 5 - 1.0, curve
    # The tokenizer written out is the base's, and transformers loads the result with it.
    assert Tokenizer.from_pretrained(out).fingerprint() == tok.fingerprint()
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    text = domain_text(1, 99)[0]
    ids = torch.tensor([hf_tok(text)["input_ids"]])
    assert ids[0].tolist() == tok.encode(text)
    with torch.no_grad():
        assert (hf(ids).logits - MiniLLM.from_pretrained(out)(ids).logits).abs().max().item() < 1e-4


def test_lora_cli_with_merge(tmp_path, hf_checkpoint, capsys):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    base, data, tok = hf_checkpoint
    out = tmp_path / "lora"
    code, stdout, err = run_cli("pretrain", "--init_from", base, "--data_path", data, "--eval_data", "",
                                "--out_dir", out, "--max_length", "64", "--batch_size", "8", "--max_steps", "12",
                                "--learning_rate", "1e-2", "--log_every", "1", "--lora", "--lora_r", "4",
                                "--lora_targets", "q,v,down", "--merge", capsys=capsys)
    assert code == 0, err
    trainable = 2 * (4 * (64 + 64) + 4 * (64 + 32) + 4 * (128 + 64))
    total = MiniLLM.from_pretrained(base).num_parameters() + trainable
    assert f"{trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.2f}%)" in stdout
    curve = losses(out)
    assert sum(curve[-3:]) < sum(curve[:3])
    assert (out / "adapter_model.safetensors").is_file() and not (out / "model.safetensors").exists()
    hf = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    with_adapter = peft.PeftModel.from_pretrained(hf, out).eval()
    merged = transformers.AutoModelForCausalLM.from_pretrained(out / "merged", dtype=torch.float32)
    ids = torch.tensor([tok.encode(domain_text(1, 5)[0])])
    with torch.no_grad():
        assert (with_adapter(ids).logits - merged(ids).logits).abs().max().item() < 1e-4
    assert Tokenizer.from_pretrained(out / "merged").fingerprint() == tok.fingerprint()

    # eval_ppl.py --adapter scores base + adapter as the merged model scores.
    sys.path.insert(0, str(REPO))
    try:
        import eval_ppl
        import generate
    finally:
        sys.path.remove(str(REPO))
    scores = {}
    for name, flags in {"adapter": ["--model", base, "--adapter", out], "merged": ["--model", out / "merged"]}.items():
        assert eval_ppl.main([*map(str, flags), "--data", str(data), "--max_length", "64",
                              "--json", str(tmp_path / f"{name}.json")]) == 0
        scores[name] = json.loads((tmp_path / f"{name}.json").read_text())
    capsys.readouterr()
    assert scores["adapter"]["adapter"] == str(out) and scores["adapter"]["tokens"] == scores["merged"]["tokens"]
    assert scores["adapter"]["mean_nll"] == pytest.approx(scores["merged"]["mean_nll"], abs=1e-5)

    # generate.py --adapter answers as the merged model does (greedy); the tokenizer comes from the adapter dir.
    texts = {}
    for name, flags in {"adapter": ["--model", base, "--adapter", out], "merged": ["--model", out / "merged"]}.items():
        assert generate.main([*map(str, flags), "--raw", "--prompt", "the river near", "--temperature", "0",
                              "--max_new_tokens", "8", "--device", "cpu"]) == 0
        texts[name] = capsys.readouterr().out
    assert texts["adapter"] == texts["merged"] and texts["adapter"].strip()


def test_cli_refuses_tokenizer_that_does_not_fit(tmp_path, hf_checkpoint, capsys):
    base, data, tok = hf_checkpoint
    common = ["--data_path", data, "--eval_data", "", "--out_dir", tmp_path / "o", "--max_steps", "1"]
    code, _, err = run_cli("pretrain", "--init_from", base, "--tokenizer", REPO / "minillm" / "assets", *common,
                           capsys=capsys)
    assert code == 1
    assert f"has 6404 tokens but the model in {base} has vocab_size {tok.vocab_size}" in err
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        (bare / name).write_bytes((base / name).read_bytes())
    code, _, err = run_cli("pretrain", "--init_from", bare, *common, capsys=capsys)
    assert code == 1 and "has no tokenizer.json beside the weights" in err
    code, _, err = run_cli("pretrain", "--lora", *common, capsys=capsys)
    assert code == 1 and "--lora needs --init_from" in err
