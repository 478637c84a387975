"""DPO: the loss against its formula and TRL's DPOTrainer, the pair data, the reference, and the loop's guarantees."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO, run_train_cli, whole_poem_records

from minillm.data.jsonl import DataError
from minillm.data.preference import PreferenceDataset, render_pair
from minillm.model.lora import adapters_disabled, apply_lora
from minillm.model.model import MiniLLM
from minillm.train.config import TrainConfig
from minillm.train.distributed import DistEnv
from minillm.train.dpo import DPO, DPO_METRICS, dpo_loss, sequence_logps
from minillm.train.trainer import train, train_step

LN2_F32 = torch.tensor(math.log(2), dtype=torch.float32).item()


def sft_records(n: int, start: int = 0) -> list[list[dict]]:
    """The shipped SFT conversations tiny_sft_dir is fitted to (whole poems), n of them from start."""
    return [c for _, c in whole_poem_records()[start:start + n]]


def write_pairs(path, n: int = 24) -> None:
    """n conversational pairs: the shipped reply is chosen, the reply to another request rejected."""
    convs = sft_records(n + 1)
    rows = [{"prompt": c[:-1], "chosen": c[-1:], "rejected": convs[i + 1][-1:]} for i, c in enumerate(convs[:n])]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    write_pairs(path)
    return path


def rows(out_dir) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


# --- the loss ---------------------------------------------------------------------------------------------------

def test_loss_equals_the_formula_transcribed():
    g = torch.Generator().manual_seed(0)
    pi_w, pi_l, ref_w, ref_l = (torch.randn(6, generator=g, dtype=torch.float64) * 5 for _ in range(4))
    for beta in (0.1, 0.5):
        loss, r_w, r_l = dpo_loss(pi_w, pi_l, ref_w, ref_l, beta)
        for i in range(6):
            z = beta * ((pi_w[i] - ref_w[i]) - (pi_l[i] - ref_l[i])).item()
            assert loss[i].item() == pytest.approx(-math.log(1 / (1 + math.exp(-z))), rel=1e-12)
            assert r_w[i].item() == pytest.approx(beta * (pi_w[i] - ref_w[i]).item(), rel=1e-12)
            assert r_l[i].item() == pytest.approx(beta * (pi_l[i] - ref_l[i]).item(), rel=1e-12)


def test_sequence_logps_sum_the_masked_tokens_in_float32():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 7, 11, generator=g).to(torch.bfloat16)
    labels = torch.randint(0, 11, (3, 7), generator=g)
    mask = torch.tensor([[0, 0, 1, 1, 1, 0, 0], [1] * 7, [0, 0, 0, 0, 0, 0, 1]], dtype=torch.float32)
    got = sequence_logps(logits, labels, mask)
    assert got.dtype == torch.float32
    for b in range(3):
        want = sum(math.log(torch.softmax(logits[b, t].double(), -1)[labels[b, t]].item())
                   for t in range(7) if mask[b, t])
        assert got[b].item() == pytest.approx(want, rel=1e-5)  # a sum, not a mean over the tokens


# --- the pairs ------------------------------------------------------------------------------------------------------

def test_prompt_ids_are_a_prefix_of_prompt_and_response_on_the_shipped_bpe(tokenizer):
    """Whole-string encoding of the rendered text (what transformers and TRL do) agrees with render_pair."""
    for conv in sft_records(200):
        prompt, reply = conv[:-1], conv[-1:]
        prompt_ids = tokenizer.encode(tokenizer.apply_chat_template(prompt, add_generation_prompt=True),
                                      allow_special=True)
        whole = tokenizer.encode(tokenizer.apply_chat_template(prompt + reply), allow_special=True)
        assert whole[:len(prompt_ids)] == prompt_ids
        n, (ids, learn), _ = render_pair(tokenizer, prompt, reply, reply)
        assert n == len(prompt_ids) and ids == whole
        # learned: the reply and its <|im_end|>, not the newline after it
        assert [i for i, m in zip(ids, learn) if m] == whole[n:-1] and whole[-2] == tokenizer.im_end_id


def test_the_three_formats_render_alike(tmp_path, tokenizer):
    prompt = [{"role": "user", "content": "写一首关于月亮的诗"}]
    good, bad = [{"role": "assistant", "content": "明月照高楼"}], [{"role": "assistant", "content": "春风"}]
    lines = [{"prompt": prompt, "chosen": good, "rejected": bad},
             {"chosen": prompt + good, "rejected": prompt + bad},
             {"prompt": "天下", "chosen": "兴亡", "rejected": "太平"}]
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in lines), encoding="utf-8")
    data = PreferenceDataset(path, tokenizer, max_length=64)
    assert len(data) == 3 and data.dropped == 0
    for a, b in zip(data[0], data[1]):
        assert torch.equal(a, b) and a.shape == (2, 63)
    x, y, m = data[2]
    assert tokenizer.decode(y[0][m[0] > 0].tolist()) == "兴亡<|endoftext|>"
    assert tokenizer.decode(y[1][m[1] > 0].tolist()) == "太平<|endoftext|>"
    prompt_len = int(m[0].nonzero()[0]) + 1  # the first learned label follows the prompt's last token
    assert tokenizer.decode(x[0][:prompt_len].tolist()) == tokenizer.decode(x[1][:prompt_len].tolist()) == "天下"


def test_a_multi_turn_prompt_learns_only_the_compared_reply(tmp_path, tokenizer):
    """Issue 51: the prompt's own assistant turns were never checked to stay out of the DPO mask (single-turn
    pairs only). Mutation caught: the whole conversation's SFT mask used for the pair."""
    prompt = [{"role": "user", "content": "写一首关于月亮的诗"}, {"role": "assistant", "content": "明月照高楼"},
              {"role": "user", "content": "再写一首春天的"}]
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": prompt, "chosen": [{"role": "assistant", "content": "春风又绿江南岸"}],
                                "rejected": [{"role": "assistant", "content": "秋"}]}, ensure_ascii=False) + "\n",
                    encoding="utf-8")
    x, y, m = PreferenceDataset(path, tokenizer, max_length=96)[0]
    for row, reply in ((0, "春风又绿江南岸"), (1, "秋")):
        assert tokenizer.decode(y[row][m[row] > 0].tolist()) == reply + "<|im_end|>"
        start = len(tokenizer.render_conversation(prompt, add_generation_prompt=True)[0])  # the reply's first id
        assert int(m[row].nonzero()[0]) == start - 1  # labels are shifted by one


@pytest.mark.parametrize("line,message", [
    ({"prompt": [{"role": "user", "content": "a"}], "chosen": [{"role": "assistant", "content": "b"}]},
     '"chosen" and "rejected" must both be given'),
    ({"chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
      "rejected": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "c"}]},
     "must share every turn but the last"),
    ({"prompt": [{"role": "user", "content": "a"}], "chosen": [{"role": "user", "content": "b"}],
      "rejected": [{"role": "assistant", "content": "c"}]}, '"chosen" must be one assistant message'),
    ({"prompt": "a", "chosen": [{"role": "assistant", "content": "b"}], "rejected": "c"}, "plain-text pair"),
    ({"prompt": [{"role": "user", "content": "a"}], "chosen": [{"role": "assistant", "content": 3}],
      "rejected": [{"role": "assistant", "content": "c"}]}, r"chosen\[0\]"),
], ids=["no_rejected", "prompts_differ", "chosen_not_assistant", "mixed_text", "content_not_string"])
def test_a_malformed_line_names_file_and_line(tmp_path, tokenizer, line, message):
    ok = {"prompt": "a", "chosen": "b", "rejected": "c"}
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps(ok) + "\n" + json.dumps(line) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=message) as e:
        PreferenceDataset(path, tokenizer, max_length=64)
    assert f"{path}:2" in str(e.value)


def test_pairs_without_room_are_dropped_and_counted(tmp_path, tokenizer, pairs, capsys, tiny_sft_dir):
    long = {"prompt": [{"role": "user", "content": "月" * 80}], "chosen": [{"role": "assistant", "content": "是"}],
            "rejected": [{"role": "assistant", "content": "否"}]}
    path = tmp_path / "p.jsonl"
    path.write_text(pairs.read_text(encoding="utf-8") + json.dumps(long, ensure_ascii=False) + "\n", encoding="utf-8")
    data = PreferenceDataset(path, tokenizer, max_length=64)
    assert (len(data), data.dropped) == (24, 1)
    assert data.line_of[-1] == 23  # the kept pairs keep their lines
    only_long = tmp_path / "long.jsonl"
    only_long.write_text(json.dumps(long) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match="leaving no response"):
        PreferenceDataset(only_long, tokenizer, max_length=64)
    code, out, err = run_train_cli("dpo", "--init_from", tiny_sft_dir, "--data_path", path, "--out_dir",
                                   tmp_path / "o", "--max_length", "64", "--max_steps", "1", "--eval_data", "",
                                   capsys=capsys)
    assert code == 0, err
    assert "dropped 1 of 25 pairs" in out


def test_a_bad_line_is_one_line_from_the_cli(tmp_path, tiny_sft_dir, capsys):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a"\n', encoding="utf-8")
    code, out, err = run_train_cli("dpo", "--init_from", tiny_sft_dir, "--data_path", path, "--out_dir",
                                   tmp_path / "o", capsys=capsys)
    assert code == 1 and err.startswith("error: ") and f"{path}:2" in err and "Traceback" not in err
    assert not (tmp_path / "o" / "metrics.jsonl").exists()


# --- against TRL ---------------------------------------------------------------------------------------------------

TRL_ROWS = [
    {"prompt": [{"role": "user", "content": "写一首关于月亮的诗"}],
     "chosen": [{"role": "assistant", "content": "明月照高楼，流光正徘徊。"}],
     "rejected": [{"role": "assistant", "content": "春风又绿江南岸。"}]},
    {"prompt": [{"role": "system", "content": "你是诗人"}, {"role": "user", "content": "写一句诗"}],
     "chosen": [{"role": "assistant", "content": "床前明月光"}],
     "rejected": [{"role": "assistant", "content": "你好，我不会"}]},
    {"prompt": [{"role": "user", "content": "以《江城子》为题写一首词"}],
     "chosen": [{"role": "assistant", "content": "十年生死两茫茫"}],
     "rejected": [{"role": "assistant", "content": "江城子"}]},
]


@pytest.fixture(scope="module")
def hf_pair(tmp_path_factory, tokenizer):
    """A tiny transformers Llama policy and a different reference, with the shipped tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    dirs = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        config = LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=160,
                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                             max_position_embeddings=256, tie_word_embeddings=False, initializer_range=0.1,
                             bos_token_id=0, eos_token_id=0, pad_token_id=0)
        d = tmp_path_factory.mktemp(f"hf_{seed}")
        LlamaForCausalLM(config).save_pretrained(d)
        tokenizer.save_pretrained(d)
        dirs.append(d)
    return dirs


def test_loss_gradient_and_metrics_equal_trl(tmp_path, tokenizer, hf_pair):
    pytest.importorskip("trl")
    from datasets import Dataset
    from transformers import AutoTokenizer, LlamaForCausalLM
    from trl import DPOConfig, DPOTrainer

    policy_dir, ref_dir = hf_pair
    args = DPOConfig(output_dir=str(tmp_path / "trl"), learning_rate=0.0, max_steps=1, logging_steps=1,
                     per_device_train_batch_size=len(TRL_ROWS), report_to=[], use_cpu=True, bf16=False,
                     fp16=False, beta=0.1, max_length=128, save_strategy="no", seed=0)
    trainer = DPOTrainer(model=LlamaForCausalLM.from_pretrained(policy_dir, dtype=torch.float32),
                         ref_model=LlamaForCausalLM.from_pretrained(ref_dir, dtype=torch.float32), args=args,
                         train_dataset=Dataset.from_list(TRL_ROWS),
                         processing_class=AutoTokenizer.from_pretrained(policy_dir))
    trainer.train()
    trl_log = trainer.state.log_history[0]

    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in TRL_ROWS), encoding="utf-8")
    data = PreferenceDataset(path, tokenizer, max_length=128)
    x, y, mask = (torch.stack(t) for t in zip(*(data[i] for i in range(len(data)))))
    # The same token ids as TRL's tokenization (whole-string apply_chat_template, then the common prefix).
    for i, row in enumerate(trainer.train_dataset):
        for r, key in enumerate(("chosen_ids", "rejected_ids")):
            ids = row["prompt_ids"] + row[key]
            assert x[i, r, :len(ids) - 1].tolist() == ids[:-1]
            # TRL learns its completion: ours and the newline its template writes after <|im_end|>.
            learned = mask[i, r].nonzero().flatten().tolist()
            assert learned == list(range(len(row["prompt_ids"]) - 1, len(ids) - 2))
    trl_mask = mask.clone()
    for i in range(len(data)):
        for r in range(2):
            trl_mask[i, r, int(mask[i, r].nonzero()[-1]) + 1] = 1

    policy = MiniLLM.from_pretrained(policy_dir, dtype=torch.float32).train()
    dpo = DPO(0.1, reference=MiniLLM.from_pretrained(ref_dir, dtype=torch.float32))
    dpo.prepare(policy, data, torch.device("cpu"), torch.float32)

    def step(m):
        optimizer = torch.optim.AdamW(policy.parameters(), lr=0.0)
        return train_step(policy, list(policy.parameters()), optimizer, torch.amp.GradScaler("cpu", enabled=False),
                          [(x, y, m)], torch.float32, DistEnv(device=torch.device("cpu")), 1.0, False, objective=dpo)

    theirs = step(trl_mask)
    assert theirs.loss == pytest.approx(trl_log["loss"], rel=1e-5)
    assert theirs.grad_norm == pytest.approx(trl_log["grad_norm"], rel=1e-5)
    for name in DPO_METRICS:
        assert theirs.metrics[name] == pytest.approx(trl_log[name], rel=1e-5, abs=1e-7), name

    # minillm's own mask differs from TRL's by exactly log p("\n" | ... <|im_end|>) per sequence.
    ours = step(mask)
    newline = []
    for model in (policy, dpo.reference.model):
        with torch.no_grad():
            logp = torch.log_softmax(model(x.flatten(0, 1)).logits.double(), -1)
        extra = trl_mask.flatten(0, 1) - mask.flatten(0, 1)
        newline.append((logp.gather(-1, y.flatten(0, 1)[..., None])[..., 0] * extra).sum(-1).view(-1, 2))
    assert ours.metrics["logps/chosen"] == pytest.approx(trl_log["logps/chosen"] - newline[0][:, 0].mean().item(),
                                                         rel=1e-5)
    rewards = 0.1 * (newline[0] - newline[1])
    assert ours.metrics["rewards/rejected"] == pytest.approx(trl_log["rewards/rejected"] - rewards[:, 1].mean().item(),
                                                             rel=1e-4, abs=1e-6)
    # The loss follows from those rewards: -mean log sigmoid(margin), recomputed from TRL's margins minus the newline.
    margins = torch.tensor(trl_log["rewards/margins"]) - (rewards[:, 0] - rewards[:, 1]).mean()
    assert abs(ours.loss - theirs.loss) > 1e-4 * abs(theirs.loss)  # the newline moves it measurably
    assert ours.metrics["rewards/margins"] == pytest.approx(margins.item(), rel=1e-4, abs=1e-6)


# --- the reference and the loop -------------------------------------------------------------------------------------

def dpo_cli(tmp_path, name, init, pairs, *extra, capsys):
    return run_train_cli("dpo", "--init_from", init, "--data_path", pairs, "--out_dir", tmp_path / name,
                         "--max_length", "96", "--batch_size", "4", "--log_every", "1", "--eval_data", "",
                         "--dtype", "float32", "--save_every", "0", *extra, capsys=capsys)


@pytest.mark.parametrize("extra", [[], ["--precompute_ref_logps"], ["--lora"]], ids=["copy", "precomputed", "lora"])
def test_first_step_sees_policy_equal_to_reference(tmp_path, tiny_sft_dir, pairs, capsys, extra):
    code, out, err = dpo_cli(tmp_path, "o", tiny_sft_dir, pairs, "--max_steps", "2", *extra, capsys=capsys)
    assert code == 0, err
    first, second = rows(tmp_path / "o")[:2]
    assert first["loss"] == LN2_F32  # ln 2 to the last bit: the same weights, the same numbers
    assert first["rewards/margins"] == first["rewards/chosen"] == first["rewards/accuracies"] == 0.0
    # The first update moved the policy measurably (step 2 scores other pairs, so either way).
    assert abs(second["loss"] - LN2_F32) > 1e-4 and abs(second["rewards/margins"]) > 1e-4


def test_beta_and_ref_model_reach_the_objective(tmp_path, tiny_sft_dir, pairs, hf_pair, capsys):
    runs = {"b01": [], "b05": ["--beta", "0.5"], "ref": ["--ref_model", hf_pair[1]]}
    for name, extra in runs.items():
        code, _, err = dpo_cli(tmp_path, name, tiny_sft_dir, pairs, "--max_steps", "2", *extra, capsys=capsys)
        assert code == 0, err
    b01, b05, ref = (rows(tmp_path / name) for name in runs)
    # Adam's first update does not depend on the gradient's scale: the same policy at step 2, rewards x 5.
    assert b05[1]["rewards/chosen"] == pytest.approx(5 * b01[1]["rewards/chosen"], rel=1e-3)
    assert b05[1]["rewards/chosen"] != pytest.approx(b01[1]["rewards/chosen"], rel=0.5)
    # Another reference: the policy's log-probs at step 1 are the same, its rewards are not zero.
    assert ref[0]["logps/chosen"] == b01[0]["logps/chosen"] and abs(ref[0]["loss"] - LN2_F32) > 1e-3
    assert abs(ref[0]["rewards/chosen"]) > 0.1


def test_dpo_learns_the_preference(tmp_path, tiny_sft_dir, tokenizer, pairs, capsys):
    """After 6 epochs the policy prefers the chosen replies over the whole set (at the start: ln 2, margins 0)."""
    code, out, err = dpo_cli(tmp_path, "o", tiny_sft_dir, pairs, "--epochs", "6", "--batch_size", "8",
                             "--learning_rate", "1e-3", capsys=capsys)
    assert code == 0, err
    assert len(rows(tmp_path / "o")) == 18 and rows(tmp_path / "o")[0]["loss"] == LN2_F32
    data = PreferenceDataset(pairs, tokenizer, max_length=96)
    everything = tuple(torch.stack(t) for t in zip(*(data[i] for i in range(len(data)))))
    dpo = DPO(0.1, reference=MiniLLM.from_pretrained(tiny_sft_dir, dtype=torch.float32))
    trained = MiniLLM.from_pretrained(tmp_path / "o", dtype=torch.float32).eval()
    dpo.prepare(trained, data, torch.device("cpu"), torch.float32)
    with torch.no_grad():
        after = dpo(trained, everything)
    # On the shipped SFT set of 2026-12-04 (its first whole poems; at the start: ln 2, no pair won, margins 0):
    # loss 0.460, 20 of 24 pairs preferred, margin 0.80 per pair.
    assert after.loss.item() < 0.6, after
    assert after.metrics["rewards/accuracies"].item() >= 0.75 * len(data), after
    assert after.metrics["rewards/margins"].item() > 0.25 * len(data), after


def test_precomputed_reference_gives_the_same_numbers(tmp_path, tiny_sft_dir, pairs, capsys):
    for name, extra in (("live", []), ("pre", ["--precompute_ref_logps"])):
        code, _, err = dpo_cli(tmp_path, name, tiny_sft_dir, pairs, "--max_steps", "6", "--learning_rate", "2e-3",
                               *extra, capsys=capsys)
        assert code == 0, err
    for a, b in zip(rows(tmp_path / "live"), rows(tmp_path / "pre"), strict=True):
        for key in ("loss", "grad_norm", *DPO_METRICS):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), key


def test_lora_reference_is_the_base_with_adapters_off(tiny_sft_dir, tokenizer, pairs):
    base = MiniLLM.from_pretrained(tiny_sft_dir, dtype=torch.float32)
    policy = apply_lora(MiniLLM.from_pretrained(tiny_sft_dir, dtype=torch.float32), r=4)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)  # adapters that change the function
    data = PreferenceDataset(pairs, tokenizer, max_length=96)
    x, y, m = (torch.stack(t) for t in zip(*(data[i] for i in range(4))))
    dpo = DPO(0.1)
    dpo.prepare(policy.train(), data, torch.device("cpu"), torch.float32)
    ref = dpo.reference_logps(x, y, m)
    with torch.no_grad():
        want = sequence_logps(base(x.flatten(0, 1)).logits, y.flatten(0, 1), m.flatten(0, 1)).view(-1, 2)
        adapted = sequence_logps(policy(x.flatten(0, 1)).logits, y.flatten(0, 1), m.flatten(0, 1)).view(-1, 2)
        with adapters_disabled(policy):
            off = sequence_logps(policy(x.flatten(0, 1)).logits, y.flatten(0, 1), m.flatten(0, 1)).view(-1, 2)
    assert torch.allclose(ref, want, rtol=1e-6) and torch.equal(ref, off)
    assert not torch.allclose(adapted, want, rtol=1e-3)  # outside the block the adapters are on again
    assert policy.training  # and the policy is back in training mode


def test_resume_is_exact(tmp_path, tiny_sft_dir, tokenizer, pairs):
    """Two epochs of 6 steps, cut at step 7 (past the epoch boundary), resumed from a different start."""
    data = PreferenceDataset(pairs, tokenizer, max_length=96)

    def run(name, start=tiny_sft_dir, **kw):
        cfg = TrainConfig(out_dir=str(tmp_path / name), epochs=2, batch_size=4, learning_rate=2e-3, dtype="float32",
                          log_every=1, eval_every=0, save_every=0, group_by_length=True, **kw)
        objective = DPO(0.1, reference=MiniLLM.from_pretrained(tiny_sft_dir, dtype=torch.float32))
        model = MiniLLM.from_pretrained(start, dtype=torch.float32).train()
        return train(model, data, cfg, objective=objective, should_stop=lambda step: name == "b" and step == 7
                     and not kw.get("resume"))

    straight = run("a")
    assert len(straight.losses) == 12
    cut = run("b")
    assert cut.interrupted and cut.losses == straight.losses[:7]
    resumed = run("b", start=tmp_path / "a", resume=True)  # other weights: they must come from the checkpoint
    assert cut.losses + resumed.losses == straight.losses
    a = MiniLLM.from_pretrained(tmp_path / "a").state_dict()
    b = MiniLLM.from_pretrained(tmp_path / "b").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["rewards/margins"] for r in rows(tmp_path / "b")] == [r["rewards/margins"] for r in rows(tmp_path / "a")]


def test_two_processes_and_accumulation_match_one_process(tmp_path, tiny_sft_dir, pairs):
    common = [str(REPO / "train_dpo.py"), "--init_from", str(tiny_sft_dir), "--data_path", str(pairs),
              "--max_length", "96", "--max_steps", "3", "--log_every", "1", "--eval_data", "", "--dtype", "float32",
              "--learning_rate", "2e-3", "--seed", "5", "--no-group_by_length"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    runs = {"one": [sys.executable, *common, "--batch_size", "4"],
            "accumulated": [sys.executable, *common, "--batch_size", "2", "--accumulation_steps", "2"],
            "two": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *common,
                    "--batch_size", "2"]}
    for name, cmd in runs.items():
        res = subprocess.run([*cmd, "--out_dir", str(tmp_path / name)], capture_output=True, text=True, timeout=300,
                             cwd=REPO, env=env)
        assert res.returncode == 0, res.stderr[-3000:]
    one = rows(tmp_path / "one")
    for name in ("accumulated", "two"):
        for a, b in zip(one, rows(tmp_path / name), strict=True):
            # A reward is beta (0.1) x the difference of two log-probabilities of ~300 nats: its float32 error
            # is set by theirs (rel 1e-5 of |logps|), not by its own size.
            logps = abs(a["logps/chosen"]) + abs(a["logps/rejected"])
            for key in ("loss", "grad_norm", *DPO_METRICS):
                tol = 0.1 * 1e-5 * logps if key in ("rewards/chosen", "rewards/rejected", "rewards/margins") else 1e-6
                assert b[key] == pytest.approx(a[key], rel=1e-5, abs=tol), (name, key)


# --- issue 44: numbers that cannot train, a reference of another vocabulary -----------------------------------

@pytest.mark.parametrize("beta", ["inf", "nan", "0", "-1"])
def test_a_beta_that_cannot_train_is_refused_as_the_flags_are_parsed(tmp_path, tiny_sft_dir, pairs, capsys, beta):
    """Issue 44, item 6: --beta inf ran to the end with every loss nan and exited 0."""
    code, _, err = dpo_cli(tmp_path, "o", tiny_sft_dir, pairs, "--max_steps", "2", "--beta", beta, capsys=capsys)
    assert code == 2 and f"--beta must be a finite number > 0, got {float(beta)!r}" in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()


def test_a_loss_that_goes_non_finite_stops_the_run_with_the_last_good_checkpoint(tmp_path, tiny_sft_dir, pairs,
                                                                                 capsys, monkeypatch):
    """Issue 44, item 6: a run whose DPO loss turns nan must stop with exit 1, its last checkpoint kept finite."""
    from minillm.train import dpo

    real = dpo.dpo_loss
    calls = []

    def poisoned(*args, **kwargs):  # from the fourth micro-batch on, the loss is nan
        calls.append(1)
        loss, *rest = real(*args, **kwargs)
        return (loss * float("nan") if len(calls) > 3 else loss, *rest)

    monkeypatch.setattr(dpo, "dpo_loss", poisoned)
    code, _, err = dpo_cli(tmp_path, "o", tiny_sft_dir, pairs, "--max_steps", "8", "--save_every", "2",
                           "--max_bad_steps", "2", capsys=capsys)
    assert code == 1 and "2 non-finite losses or gradient norms in a row" in err, err
    kept = sorted((tmp_path / "o" / "checkpoints").iterdir())
    # Step 4's nan gradient was not applied (its update is skipped), so its checkpoint holds step 3's weights.
    assert [p.name for p in kept] == ["step_00000002", "step_00000004"]
    for path in kept:
        assert all(torch.isfinite(t).all() for t in MiniLLM.from_pretrained(path).state_dict().values())
    assert not (tmp_path / "o" / "model.safetensors").exists()  # no final model from a diverged run


def test_a_reference_with_another_tokenizer_is_refused_naming_both(tmp_path, tiny_sft_dir, pairs, capsys):
    """Issue 44, item 7: --ref_model with another tokenizer was accepted and log-probs of other tokens compared."""
    import shutil

    from conftest import late_specials_backend

    from minillm.data.tokenizer import Tokenizer

    other = tmp_path / "other"
    shutil.copytree(tiny_sft_dir, other)
    backend = late_specials_backend(["白日依山尽", "黄河入海流"] * 20, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                    vocab_size=300)
    Tokenizer(backend).save_pretrained(other)  # same vocabulary size class, other tokens
    code, _, err = dpo_cli(tmp_path, "o", tiny_sft_dir, pairs, "--max_steps", "1", "--ref_model", other,
                           capsys=capsys)
    assert code == 1 and err.count("\n") == 1, err
    assert f"--ref_model {other} has another tokenizer" in err and str(tiny_sft_dir) in err
    assert "6,404 tokens" in err and "tokens," in err.split("than")[0]
