"""Mixture of Experts (issue 29): the Qwen3-MoE layout against transformers, and in the training loop."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO, TINY_ARGS, randomized, reference_greedy, run_train_cli, saved_randomized

from minillm.data.datasets import PretrainDataset
from minillm.infer.generation import generate
from minillm.model.config import LMConfig
from minillm.model.model import MiniLLM
from minillm.model.moe import expert_load, load_balancing_loss
from minillm.train.config import TrainConfig
from minillm.train.trainer import train

transformers = pytest.importorskip("transformers")

MOE = dict(qk_norm=True, rms_norm_eps=1e-6, max_position_embeddings=64)
CONFIGS = {  # shapes no other test uses: sparse everywhere or every other layer, top-1 and top-2, tied or not
    "every_layer_top2_untied": LMConfig(vocab_size=97, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                        num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
                                        moe_intermediate_size=16, tie_word_embeddings=False, **MOE),
    "every_other_top1_tied_unnormed": LMConfig(vocab_size=83, hidden_size=48, num_hidden_layers=4,
                                               num_attention_heads=4, num_key_value_heads=1, head_dim=16,
                                               num_experts=8, num_experts_per_tok=1, moe_intermediate_size=32,
                                               decoder_sparse_step=2, norm_topk_prob=False, **MOE),
    "dense_first_layer_gqa": LMConfig(vocab_size=71, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                      num_key_value_heads=2, num_experts=3, num_experts_per_tok=2,
                                      moe_intermediate_size=24, mlp_only_layers=[0], router_aux_loss_coef=0.02,
                                      **MOE),
}


def hf_model(directory):
    """transformers' model of a directory, returning router logits (and so its aux loss)."""
    return transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32,
                                                             output_router_logits=True).eval()


@pytest.mark.parametrize("name", CONFIGS)
def test_minillm_moe_equals_transformers_logits_router_and_aux_loss(name, tmp_path):
    config = CONFIGS[name]
    model = saved_randomized(config, tmp_path, seed=1, scale=0.2)
    hf = hf_model(tmp_path)
    assert type(hf).__name__ == "Qwen3MoeForCausalLM"
    ids = torch.randint(0, config.vocab_size, (3, 17))
    with torch.no_grad():
        theirs = hf(ids, labels=ids)
        ours = model(ids)
        assert (ours.logits - theirs.logits).abs().max().item() <= 1e-5
        stats = model.router_stats()
        assert len(stats) == len(theirs.router_logits) == len(config.sparse_layers())
        for s, logits in zip(stats, theirs.router_logits):
            assert (s.logits_NE - logits).abs().max().item() <= 1e-5
        aux = load_balancing_loss(stats, config.num_experts)
        assert aux.item() == pytest.approx(theirs.aux_loss.item(), rel=1e-6)
        # Training loss: cross-entropy plus router_aux_loss_coef x aux, as transformers adds it. minillm takes
        # shifted inputs (one position fewer), so each side's own aux is taken off to compare the cross-entropy.
        loss = model(ids[:, :-1], labels=ids[:, 1:]).loss
        own_aux = load_balancing_loss(model.router_stats(), config.num_experts)
    coef = config.router_aux_loss_coef
    assert (loss - coef * own_aux).item() == pytest.approx((theirs.loss - coef * theirs.aux_loss).item(), abs=1e-5)


@pytest.mark.parametrize("name", CONFIGS)
def test_transformers_moe_loads_into_minillm_and_decodes_the_same(name, tmp_path):
    config = CONFIGS[name]
    hf_dict = {k: v for k, v in config.to_hf_dict().items() if k not in ("architectures", "model_type", "minillm")}
    torch.manual_seed(2)
    hf = randomized(transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(**hf_dict)), scale=0.2).eval()
    hf.save_pretrained(tmp_path)
    model = MiniLLM.from_pretrained(tmp_path)
    assert model.config == config
    ids = torch.randint(0, config.vocab_size, (2, 15))
    with torch.no_grad():
        assert (model(ids).logits - hf(ids).logits).abs().max().item() <= 1e-5
    prompt = ids[:1, :5]
    ours = generate(model, prompt, max_new_tokens=20, temperature=0)  # KV cache
    assert torch.equal(ours, reference_greedy(hf, prompt, 20))  # transformers' model, a full forward per token


def tiny_moe(tokenizer, seed: int = 0, **kw) -> MiniLLM:
    torch.manual_seed(seed)
    return MiniLLM(LMConfig(vocab_size=tokenizer.vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, max_position_embeddings=128, qk_norm=True, num_experts=4,
                            num_experts_per_tok=2, moe_intermediate_size=64, **kw))


def config(out, **kw) -> TrainConfig:
    return TrainConfig(**{**dict(out_dir=str(out), batch_size=4, max_steps=6, learning_rate=3e-3, log_every=1,
                                 eval_every=0, save_every=0, seed=5, dtype="float32"), **kw})


def rows(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]


def by_hand(router_logits: list[torch.Tensor], num_experts: int, top_k: int) -> tuple[float, float, torch.Tensor]:
    """(load-balancing loss, z loss, share of routing slots per expert) from the router logits of every sparse
    layer, computed here as transformers' load_balancing_loss_func and ST-MoE define them, not with minillm's."""
    logits = torch.cat(router_logits).double()  # pooled over the layers, as transformers concatenates them
    probs = logits.softmax(dim=-1)
    chosen = probs.topk(top_k, dim=-1).indices
    one_hot = torch.nn.functional.one_hot(chosen, num_experts).double()  # [N, k, E]
    aux = num_experts * (one_hot.mean(dim=0) * probs.mean(dim=0)[None]).sum()
    z = (torch.logsumexp(logits, dim=-1) ** 2).mean()
    share = one_hot.sum(dim=(0, 1)) / (logits.shape[0] * top_k)
    return aux.item(), z.item(), share


def test_aux_and_z_losses_equal_their_definitions(tokenizer, corpus):
    """Issue 51: the aux loss was checked against minillm's own function; here against the definitions. Mutations
    caught: counts not pooled over layers, probabilities averaged per layer, z loss without the square."""
    from minillm.model.moe import router_z_loss

    data = PretrainDataset(corpus, tokenizer, max_length=32)
    x, y, m = (torch.stack(t) for t in zip(*(data[i] for i in range(3))))
    model = randomized(tiny_moe(tokenizer, router_aux_loss_coef=0.3, router_z_loss_coef=0.01), scale=0.5)
    with torch.no_grad():
        out = model(x, labels=y, loss_mask=m)
        stats = model.router_stats()
        aux, z, share = by_hand([s.logits_NE for s in stats], 4, 2)
        assert load_balancing_loss(stats, 4).item() == pytest.approx(aux, rel=1e-6)
        assert router_z_loss(stats).item() == pytest.approx(z, rel=1e-6)
        assert torch.allclose(expert_load(stats).double(), share, atol=1e-7)
        ce = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1).double(), y.flatten(), reduction="none")
        ce = (ce * m.flatten()).sum() / m.sum()
        assert out.loss.item() == pytest.approx(ce.item() + 0.3 * aux + 0.01 * z, rel=1e-5)
    assert share.max() > share.min()  # a router that sends every token alike would not test the shares


def test_aux_loss_is_added_once_per_step_whatever_the_accumulation(tmp_path, tokenizer, corpus):
    """Step 1 of --accumulation_steps 2: the logged loss is the token-mean cross-entropy plus coef x the
    token-weighted mean of each micro-batch's aux loss, not their sum; the aux loss and the expert loads are
    computed here from the router logits (by_hand), not by minillm's functions. Mutation caught (issue 51):
    loads normalised by their own sum (they summed to 1 whatever they were)."""
    data = PretrainDataset(corpus, tokenizer, max_length=32)
    coef = 0.5
    run = train(tiny_moe(tokenizer, router_aux_loss_coef=coef), data,
                config(tmp_path / "acc", max_steps=1, batch_size=2, accumulation_steps=2))
    model = tiny_moe(tokenizer, router_aux_loss_coef=coef)  # the same initial weights
    from minillm.train.distributed import DistEnv
    from minillm.train.trainer import StepBatches

    micro = StepBatches(data, config(tmp_path / "x", batch_size=2, accumulation_steps=2), DistEnv()).get(0)
    ce, aux, tokens, loads = 0.0, 0.0, 0, torch.zeros(4, dtype=torch.float64)
    with torch.no_grad():
        for x, y, m in micro:
            out = model(x, labels=y, loss_mask=m)
            a, _, share = by_hand([s.logits_NE for s in model.router_stats()], 4, 2)
            n = int(m.sum())
            ce, aux, tokens, loads = ce + (out.loss.item() - coef * a) * n, aux + a * n, tokens + n, loads + share * n
    assert run.losses[0] == pytest.approx(ce / tokens + coef * aux / tokens, rel=1e-5)
    logged = rows(tmp_path / "acc")[0]
    assert logged["moe/aux_loss"] == pytest.approx(aux / tokens, rel=1e-5)
    assert [logged[f"moe/load_{e}"] for e in range(4)] == pytest.approx((loads / tokens).tolist(), abs=1e-6)


def test_moe_activation_checkpointing_same_gradients_and_exact_resume(tmp_path, tokenizer, corpus):
    data = PretrainDataset(corpus, tokenizer, max_length=32)
    x, y, m = (torch.stack(t) for t in zip(*(data[i] for i in range(4))))
    grads = []
    for recompute in (False, True):
        model = tiny_moe(tokenizer).train()
        model.activation_checkpointing = recompute
        model(x, labels=y, loss_mask=m).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name in grads[0]:  # the router's gradient comes through the aux loss, recomputed in backward
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-6), name
    assert grads[0]["layers.0.mlp.gate.weight"].abs().sum() > 0
    straight = train(tiny_moe(tokenizer, dropout=0.1), data, config(tmp_path / "a"))
    cut = train(tiny_moe(tokenizer, dropout=0.1), data, config(tmp_path / "b"), should_stop=lambda s: s == 3)
    resumed = train(tiny_moe(tokenizer, dropout=0.1, seed=9), data, config(tmp_path / "b", resume=True))
    assert cut.losses + resumed.losses == straight.losses
    assert straight.losses[-1] < straight.losses[0]


@pytest.mark.exactness
def test_moe_under_ddp_and_fsdp_equals_one_process(tmp_path, corpus):
    """2 processes x batch 2 (DDP, and FSDP with the experts sharded) against 1 process x 2 micro-batches of 2.
    DistributedSampler deals rows 0, 2 to one process and 1, 3 to the other, where one process reads 0, 1 then
    2, 3: other micro-batches, so other load-balancing losses (not linear in the batch). With the aux weight at
    0 the step is a sum over tokens, and all three runs must agree."""
    args = ["--data_path", str(corpus), "--eval_data", "", "--max_length", "32", "--max_steps", "4", "--log_every",
            "1", "--seed", "3", "--dtype", "float32", "--batch_size", "2", "--num_experts", "4",
            "--num_experts_per_tok", "2", "--router_aux_loss_coef", "0", *TINY_ARGS]
    losses = {}
    for name, launcher, extra in (("one", [], ["--accumulation_steps", "2"]),
                                  ("ddp", ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"], []),
                                  ("fsdp", ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"],
                                   ["--fsdp"])):
        res = subprocess.run([sys.executable, *launcher, str(REPO / "train_pretrain.py"), *args, *extra,
                              "--out_dir", str(tmp_path / name)], capture_output=True, text=True, timeout=300,
                             cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert res.returncode == 0, res.stderr[-3000:]
        losses[name] = [(r["loss"], r["grad_norm"]) for r in rows(tmp_path / name)]
    assert len(losses["one"]) == 4
    for name in ("ddp", "fsdp"):
        for a, b in zip(losses[name], losses["one"]):
            assert a == pytest.approx(b, rel=2e-4), name


def test_moe_cli_pretrain_sft_lora_and_expert_load(tmp_path, corpus, capsys):
    pre, sft = tmp_path / "pre", tmp_path / "sft"
    code, out, err = run_train_cli("pretrain", "--data_path", corpus, "--eval_data", "", "--out_dir", pre,
                                   "--max_length", "32", "--batch_size", "4", "--log_every", "1", "--max_steps", "3",
                                   "--num_experts", "4", "--num_experts_per_tok", "2", *TINY_ARGS, capsys=capsys)
    assert code == 0, err
    config = json.loads((pre / "config.json").read_text())
    assert config["architectures"] == ["Qwen3MoeForCausalLM"] and config["num_experts"] == 4
    assert all(abs(sum(r[f"moe/load_{e}"] for e in range(4)) - 1) < 1e-6 for r in rows(pre))  # (shares)
    assert any(max(r[f"moe/load_{e}"] for e in range(4)) > 0.25 + 1e-3 for r in rows(pre))  # and not uniform
    common = ["--eval_data", "", "--max_length", "64", "--batch_size", "2", "--max_steps", "2"]
    code, _, err = run_train_cli("sft", "--init_from", pre, "--out_dir", sft, *common, capsys=capsys)
    assert code == 0, err
    code, _, err = run_train_cli("sft", "--init_from", sft, "--lora", "--merge", "--out_dir", tmp_path / "lora",
                                 *common, capsys=capsys)
    assert code == 0, err
    merged = MiniLLM.from_pretrained(tmp_path / "lora" / "merged")
    assert merged.config.num_experts == 4
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "lora" / "merged", dtype=torch.float32).eval()
    ids = torch.randint(0, merged.config.vocab_size, (1, 12))
    with torch.no_grad():
        assert (merged.eval()(ids).logits - hf(ids).logits).abs().max().item() <= 1e-5
    stats = merged.router_stats()
    _, _, share = by_hand([s.logits_NE for s in stats], 4, 2)
    assert torch.allclose(expert_load(stats).double(), share, atol=1e-7)


def test_moe_serving_batched_answers_equal_each_alone(tmp_path, tokenizer):
    """The batched server's decode step groups different sequences' tokens by expert: each answer must still be
    the one it gets alone (and greedy equals generate())."""
    import threading

    import httpx
    from conftest import LiveServer

    model = randomized(tiny_moe(tokenizer), scale=0.3).eval()
    model.config.chat_trained = True
    model.save_pretrained(tmp_path, tokenizer=tokenizer)
    prompts = ["春" * (1 + 2 * i) + "风" for i in range(8)]

    def ask(url, i):
        r = httpx.post(url + "/v1/completions", timeout=120,
                       json={"prompt": prompts[i], "temperature": 0, "max_tokens": 16 + 3 * i})
        return r.json()["choices"][0]["text"]

    with LiveServer(tmp_path) as live:
        alone = [ask(live.url, i) for i in range(8)]
        live.scheduler.max_running = 0
        together: list = [None] * 8
        threads = [threading.Thread(target=lambda i=i: together.__setitem__(i, ask(live.url, i))) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert live.scheduler.max_running >= 3
    assert together == alone
    ids = tokenizer.encode(prompts[2])
    out = generate(model, ids, max_new_tokens=22, temperature=0, eos_token_id=[tokenizer.eos_id, tokenizer.im_end_id])
    assert tokenizer.decode(out[0, len(ids):].tolist()).split("<|")[0] == alone[2]


@pytest.mark.parametrize("script", ["generate.py", "serve.py", "eval_tasks.py"])
def test_int8_of_a_moe_model_is_refused_in_one_line_at_load(tmp_path, tokenizer, script):
    """Issue 44, item 5: --quantize int8 crashed a Mixture-of-Experts model (Int8Linear has no weight, which the
    router reads): generate failed, serve answered 500 to every request, eval crashed. Refused at load instead."""
    import subprocess
    import sys

    from conftest import REPO

    from minillm.model.linear import quantize_int8

    model = tiny_moe(tokenizer)
    model.config.chat_trained = True
    with pytest.raises(ValueError, match="--quantize int8 supports dense models only"):
        quantize_int8(model)
    model.save_pretrained(tmp_path / "moe", tokenizer=tokenizer)
    extra = {"generate.py": ["--prompt", "春风"], "serve.py": ["--port", "0"], "eval_tasks.py": ["--limit", "1"]}
    done = subprocess.run([sys.executable, str(REPO / script), "--model", str(tmp_path / "moe"), "--quantize", "int8",
                           *extra[script]], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 1 and "Traceback" not in done.stderr and done.stderr.count("\n") == 1, done.stderr
    assert "--quantize int8 supports dense models only" in done.stderr
