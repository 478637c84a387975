"""GRPO: the loss against a transcription of the objective, the gradient against REINFORCE, the rewards against
eval_tasks.py's checks, the prompt data, and a tiny model that learns a verifiable reward."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import REPO, run_train_cli

from minillm.data.jsonl import DataError
from minillm.data.prompts import PromptDataset, prompt_requests, request_of
from minillm.eval.rewards import (
    build_rewards,
    composite,
    ended_reward,
    length_reward,
    poem_reward,
    request_reward,
)
from minillm.infer.generation import generate
from minillm.infer.tool_rollouts import Trajectory
from minillm.model.model import MiniLLM
from minillm.train.config import TrainConfig
from minillm.train.grpo import GRPO, group_advantages, sequence_losses, token_logps
from minillm.train.trainer import train


def rows(out_dir) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines() if '"reward"' in line]


# --- the objective ----------------------------------------------------------------------------------------------

def transcribed(logp, old, ref, adv, mask, eps, beta, loss_type, L, eps_high=None):
    """The GRPO objective of each loss type written out token by token, in float64."""
    high = eps_high if eps_high is not None else eps
    per_seq, all_terms = [], []
    for i in range(len(adv)):
        terms = []
        for t in range(len(mask[i])):
            if not mask[i][t]:
                continue
            ratio = math.exp(logp[i][t] - old[i][t])
            if loss_type == "cispo":
                term = -min(ratio, high) * adv[i] * logp[i][t]
            else:
                term = -min(ratio * adv[i], min(max(ratio, 1 - eps), 1 + high) * adv[i])
            if beta:
                d = ref[i][t] - logp[i][t]
                term += beta * (math.exp(d) - d - 1)
            terms.append(term)
        all_terms += terms
        per_seq.append(sum(terms) / len(terms) if loss_type == "grpo" else sum(terms) / L)
    if loss_type in ("bnpo", "dapo", "cispo"):  # one micro-batch: the step's tokens are these
        return sum(all_terms) / len(all_terms)
    return sum(per_seq) / len(per_seq)


@pytest.mark.parametrize("loss_type,eps_high", [("grpo", None), ("dr_grpo", None), ("grpo", 0.28), ("bnpo", 0.28),
                                                ("dapo", 0.28), ("cispo", 1.1)])
@pytest.mark.parametrize("kl_beta", [0.0, 0.04])
def test_loss_equals_the_objective_transcribed(loss_type, eps_high, kl_beta):
    g = torch.Generator().manual_seed(0)
    logp = -torch.rand(4, 6, generator=g, dtype=torch.float64) * 3
    old = logp + torch.randn(4, 6, generator=g, dtype=torch.float64) * 0.3  # ratios inside and outside the clip
    ref = logp + torch.randn(4, 6, generator=g, dtype=torch.float64) * 0.5
    adv = torch.tensor([1.5, -0.7, 0.0, 2.0], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1] * 6, [0, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0]], dtype=torch.float64)
    loss_N, _, clip_N = sequence_losses(logp, old, adv, mask, 0.2, loss_type, 8, ref, kl_beta, eps_high)
    want = transcribed(logp.tolist(), old.tolist(), ref.tolist(), adv.tolist(), mask.tolist(), 0.2, kl_beta,
                       loss_type, 8, eps_high)
    assert loss_N.mean().item() == pytest.approx(want, rel=1e-12)
    assert clip_N.max().item() > 0  # the clip was exercised


def test_the_step_token_mean_does_not_depend_on_how_the_step_is_split():
    """dapo over two micro-batches (each weighted by its completions, as the loop does) with the step's tokens per
    completion equals dapo over one; bnpo's micro-batch means differ when their token counts do."""
    g = torch.Generator().manual_seed(2)
    logp = -torch.rand(4, 5, generator=g, dtype=torch.float64)
    adv = torch.tensor([1.0, -0.5, 0.3, 2.0], dtype=torch.float64)
    mask = torch.tensor([[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.float64)
    whole = sequence_losses(logp, logp.detach(), adv, mask, 0.2, "dapo", 8)[0].mean()
    mean_tokens = mask.sum().item() / 4
    halves = [sequence_losses(logp[k], logp[k].detach(), adv[k], mask[k], 0.2, "dapo", 8, mean_tokens=mean_tokens)[0]
              .mean() * 0.5 for k in (slice(0, 2), slice(2, 4))]
    assert (halves[0] + halves[1]).item() == pytest.approx(whole.item(), rel=1e-12)
    assert whole.item() == pytest.approx(-(adv[:, None] * mask).sum().item() / mask.sum().item(), rel=1e-12)
    bnpo = [sequence_losses(logp[k], logp[k].detach(), adv[k], mask[k], 0.2, "bnpo", 8)[0].mean() * 0.5
            for k in (slice(0, 2), slice(2, 4))]
    assert abs((bnpo[0] + bnpo[1]).item() - whole.item()) > 1e-3


def test_scale_rewards_group_batch_and_none():
    r = torch.tensor([[1.0, 0.0, 0.5], [2.0, 2.0, 5.0]])
    centred = r - r.mean(dim=1, keepdim=True)
    assert torch.equal(group_advantages(r, "none"), centred)
    flat = r.flatten().tolist()
    mean = sum(flat) / 6
    std = math.sqrt(sum((x - mean) ** 2 for x in flat) / 5)  # unbiased, over the whole batch (TRL's nanstd)
    assert torch.allclose(group_advantages(r, "batch"), centred / (std + 1e-4))
    assert torch.allclose(group_advantages(r, "batch", torch.tensor(2.0)), centred / (2.0 + 1e-4))
    with pytest.raises(ValueError, match="scale_rewards"):
        group_advantages(r, "global")


def test_at_ratio_one_the_gradient_is_reinforce():
    """pi_old = pi detached, beta 0: the gradient is -mean_i A_i / |o_i| sum_t grad log pi (grpo), or / L."""
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 5, 7, generator=g, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 7, (3, 5), generator=g)
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [0, 1, 1, 1, 0]], dtype=torch.float64)
    adv = torch.tensor([0.8, -1.2, 0.4], dtype=torch.float64)
    for loss_type, scale in (("grpo", mask.sum(1)), ("dr_grpo", torch.full((3,), 5.0, dtype=torch.float64))):
        logp = token_logps(logits, targets, 1.0).double()
        loss_N, _, _ = sequence_losses(logp, logp.detach(), adv, mask, 0.2, loss_type, 5)
        (grad,) = torch.autograd.grad(loss_N.mean(), logits)
        logp = torch.log_softmax(logits, -1).gather(-1, targets[..., None])[..., 0]
        reinforce = -((adv / scale)[:, None] * logp * mask).sum() / 3
        (want,) = torch.autograd.grad(reinforce, logits)
        assert torch.allclose(grad, want, rtol=1e-5, atol=1e-7), loss_type


def test_advantages_standardise_within_each_group():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.5, 0.5, 0.5, 0.5], [0.0, 1.0, 2.0, 3.0]])
    adv = group_advantages(rewards)
    assert adv[0].tolist() == pytest.approx([x / (math.sqrt(1 / 3) + 1e-4) for x in (0.5, -0.5, -0.5, 0.5)])
    assert adv[1].tolist() == [0.0] * 4  # all equal: no gradient from this group
    std = math.sqrt(sum((x - 1.5) ** 2 for x in range(4)) / 3)  # unbiased, as TRL's default
    assert adv[2].tolist() == pytest.approx([(x - 1.5) / (std + 1e-4) for x in range(4)], rel=1e-6)


# --- rewards ------------------------------------------------------------------------------------------------------

def test_rewards_read_what_eval_tasks_checks():
    tune, form, words = "请以《浣溪沙》为词牌，填一首词。", "请写一首唐代的五言绝句。", "写一首诗，要用上“明月”和“故乡”这两个词。"
    poem5 = "静夜\n床前明月光，疑是地上霜。\n举头望山月，低头思故乡。<|im_end|>"
    assert request_reward(words, poem5) == 1.0 and request_reward(form, poem5) == 1.0
    assert request_reward(words, poem5.replace("故乡", "远方")) == 0.5  # one word of two: half
    assert request_reward(tune, poem5) == 0.0 and request_reward("你好", poem5) == 0.0
    assert request_reward(tune, "浣溪沙\n一曲新词酒一杯") == 1.0
    assert length_reward(form, poem5) == 1.0 and length_reward(form.replace("五", "七"), poem5) == 0.0
    assert ended_reward(words, poem5) == 1.0 and ended_reward(words, poem5.removesuffix("<|im_end|>")) == 0.0
    # The marker's text written inside an answer that ran out of budget does not end it (issue 51 mutation).
    assert ended_reward(words, poem5.replace("静夜", "静夜<|im_end|>").removesuffix("<|im_end|>")) == 0.0
    assert poem_reward(words, poem5) == 1.0 and poem_reward(words, "明月故乡") == 0.0
    # What a GRPO run learned to write for the words request with the first poem check: repetition is no poem.
    assert poem_reward(words, "忆\n忆忆忆忆忆忆忆，忆忆忆忆忆忆忆。\n忆忆忆忆忆忆，忆忆忆忆忆。") == 0.0
    assert poem_reward(words, "春城路\n芳草路。\n芳草路。\n芳草路。") == 0.0
    # A repeated line with enough distinct characters to pass the character check: the repeat alone refuses it.
    once = "登楼\n白日依山尽，黄河入海流。\n欲穷千里目，更上一层楼。"
    assert poem_reward(words, once) == 1.0
    assert poem_reward(words, "登楼\n白日依山尽，黄河入海流。\n白日依山尽，黄河入海流。") == 0.0


def test_a_repetitive_answer_that_uses_the_words_scores_below_a_plain_one(tmp_path):
    """Issue 45, item 3: after GRPO 9 of 20 greedy answers repeated a line or a phrase, and the reward paid. A
    repetitive answer (a phrase three times) or one that restates the request now earns nothing from
    composite, even when it holds both requested words. Mutation caught: the phrase or restatement check off."""
    from minillm.eval.rewards import restates

    train, sft = tmp_path / "train.jsonl", tmp_path / "sft.jsonl"
    train.write_text(json.dumps({"text": "旧\n某（唐）\n甲乙丙丁戊，己庚辛壬癸。"}, ensure_ascii=False) + "\n")
    sft.write_text(json.dumps({"conversations": [{"role": "user", "content": "q"},
                                                 {"role": "assistant", "content": "子丑寅卯"}]}) + "\n")
    reward = build_rewards("composite", train, sft)["composite"][0]
    words = "写一首诗，要用上“明月”和“故乡”这两个词。"
    plain = "静夜\n床前明月光，疑是地上霜。\n举头望山月，低头思故乡。<|im_end|>"
    # Distinct lines and characters enough for the older checks: only the phrase said three times refuses it.
    looping = "静夜\n天涯芳草路，山高水长流。\n天涯芳草路长，江南春色好。\n天涯芳草路远，明月照故乡。<|im_end|>"
    restating = "静夜\n写一首诗要用上明月，\n故乡这两个词何处寻。<|im_end|>"
    assert request_reward(words, looping) == 1.0 and request_reward(words, restating) == 1.0  # the words are there
    assert reward(words, plain) == 1.0 and reward(words, looping) == 0.0 and reward(words, restating) == 0.0
    assert reward(words, looping.replace("天涯芳草路远", "秋风落叶深")) > 0  # said twice: a poem may do that
    assert restates(words, restating) and not restates(words, plain)
    # A title is due: an answer that opens on its verse (the first line is taken for the title) earns nothing.
    untitled = "床前看月色，窗外听风声。\n举头望明月，低头思故乡。\n春风吹柳色，夜雨落花深。<|im_end|>"
    assert request_reward(words, untitled) == 1.0 and reward(words, untitled) == 0.0


def test_the_step_reward_is_the_weighted_sum_of_its_parts(tokenizer):
    """Issue 51: --reward weights were never checked to reach the total. Mutation caught: weights ignored."""
    objective = GRPO({"a": (lambda q, a: 1.0, 2.0), "b": (lambda q, a: 0.5, -0.25), "c": (lambda q, a: 0.0, 7.0)},
                     tokenizer, group_size=2)
    total, values = objective.score("q", Trajectory.single([1], tokenizer.encode("答") + [tokenizer.im_end_id]))
    assert values == [1.0, 0.5, 0.0] and total == 2.0 * 1.0 - 0.25 * 0.5


def test_composite_cannot_be_gamed_by_one_check(tmp_path):
    train = tmp_path / "train.jsonl"
    train.write_text(json.dumps({"text": "旧诗\n某（唐）\n春眠不觉晓，处处闻啼鸟。\n夜来风雨声，花落知多少。"},
                                ensure_ascii=False) + "\n", encoding="utf-8")
    sft = tmp_path / "sft.jsonl"
    sft.write_text(json.dumps({"conversations": [{"role": "user", "content": "q"}, {"role": "assistant",
                                                                                  "content": "一二三四五六七八九十"}]},
                              ensure_ascii=False) + "\n", encoding="utf-8")
    rewards = build_rewards("composite", train, sft)
    reward = rewards["composite"][0]
    words = "写一首诗，要用上“明月”和“故乡”这两个词。"
    good = "静夜\n床前明月光，疑是地上霜。\n举头望山月，低头思故乡。<|im_end|>"
    assert reward(words, good) == 1.0
    assert reward(words, good.removesuffix("<|im_end|>")) == pytest.approx(1 / 1.25)
    assert reward(words, "明月故乡<|im_end|>") == 0.0  # the words without a poem
    assert reward(words, "春晓\n春眠不觉晓，处处闻啼鸟。\n夜来风雨声，明月故乡少。<|im_end|>") > 0  # new verse
    copied = "春晓\n春眠不觉晓，处处闻啼鸟。\n夜来风雨声，花落知多少。<|im_end|>"
    assert reward(words, copied) == 0.0  # a memorised poem pays nothing
    assert composite(lambda q, a: 1.0)(words, good) == 1.0 and composite(lambda q, a: 0.0)(words, good) == 0.0
    with pytest.raises(ValueError, match="unknown reward 'moon'"):
        build_rewards("request:1,moon:2", train, sft)
    assert set(build_rewards("request:1,ended:0.25", train, sft)) == {"request", "ended"}


# --- prompts ------------------------------------------------------------------------------------------------------

def test_prompts_from_every_format(tmp_path, tokenizer):
    lines = [{"prompt": [{"role": "user", "content": "写一首诗"}]},
             {"prompt": [{"role": "user", "content": "写一首诗"}], "chosen": [{"role": "assistant", "content": "a"}],
              "rejected": [{"role": "assistant", "content": "b"}]},
             {"chosen": [{"role": "user", "content": "写一首诗"}, {"role": "assistant", "content": "a"}],
              "rejected": [{"role": "user", "content": "写一首诗"}, {"role": "assistant", "content": "b"}]},
             {"prompt": "天下"},
             {"prompt": [{"role": "user", "content": "月" * 200}]}]
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in lines), encoding="utf-8")
    data = PromptDataset(path, tokenizer, max_length=64)
    assert (len(data), data.dropped) == (4, 1)
    chat = tokenizer.render_conversation(lines[0]["prompt"], add_generation_prompt=True)[0]
    assert data.prompts[:3] == [chat] * 3 and data.prompts[3] == tokenizer.encode("天下")
    x, _, m = data[0]
    assert x[m > 0].tolist() == chat and m.sum() == len(chat)
    assert request_of(tokenizer.decode(chat)) == "写一首诗" and request_of("天下") == "天下"
    path.write_text(json.dumps({"text": "x"}) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=f'{path}:1: no "prompt" field'):
        PromptDataset(path, tokenizer)


# --- training --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    """Eight requests of the shipped DPO set, as prompt-only lines."""
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    with open(REPO / "dataset" / "dpo.jsonl", encoding="utf-8") as f:
        lines = [json.loads(next(f))["prompt"] for _ in range(8)]
    path.write_text("".join(json.dumps({"prompt": p}, ensure_ascii=False) + "\n" for p in lines), encoding="utf-8")
    return path


def moon(request: str, answer: str) -> float:
    return float("月" in answer)


def moon_rate(model, data, tokenizer) -> float:
    """The fraction of 16 sampled completions per prompt (12 tokens, seeded) that contain 月."""
    torch.manual_seed(0)
    hits = 0
    for p in data.prompts:
        out = generate(model, [p] * 16, max_new_tokens=12, temperature=1.0,
                       eos_token_id=[tokenizer.im_end_id, tokenizer.eos_id])
        hits += sum("月" in tokenizer.decode(row[len(p):]) for row in out.tolist())
    return hits / (16 * len(data))


def grpo_run(out_dir, start, data, tokenizer, **kw):
    stop, iterations = kw.pop("stop_at", None), kw.pop("num_iterations", 1)
    cfg = TrainConfig(out_dir=str(out_dir), batch_size=4, learning_rate=1e-2, dtype="float32", log_every=10,
                      eval_every=0, save_every=0, **kw)  # log_every 10: GRPO writes a row every step all the same
    objective = GRPO({"moon": (moon, 1.0)}, tokenizer, group_size=8, max_new_tokens=12, log_completions=True,
                     num_iterations=iterations)
    return train(MiniLLM.from_pretrained(start, dtype=torch.float32).train(), data, cfg, objective=objective,
                 should_stop=(lambda step: step == stop) if stop else None)


def test_a_tiny_model_learns_a_verifiable_reward(tmp_path, tiny_sft_dir, tokenizer, prompts):
    data = PromptDataset(prompts, tokenizer, max_length=64)
    # RL this short is seed-sensitive: with the batched engine's sampling (2026-12-07) seeds 0, 1, 2, 3, 5 and 42
    # reach a rate of 1.0 in 32 steps, and the loop's default seed 1337 stalls at 0.12 (0.19 after 48 steps).
    grpo_run(tmp_path / "o", tiny_sft_dir, data, tokenizer, max_steps=32, seed=0)
    before = moon_rate(MiniLLM.from_pretrained(tiny_sft_dir, dtype=torch.float32), data, tokenizer)
    after = moon_rate(MiniLLM.from_pretrained(tmp_path / "o", dtype=torch.float32), data, tokenizer)
    assert after >= before + 0.4, (before, after)  # 32 steps since the fixture fits whole poems (2026-12-04)
    r = rows(tmp_path / "o")
    assert [x["step"] for x in r] == list(range(1, 33))  # every step's rewards, not one step in --log_every
    assert sum(x["reward"] for x in r[-4:]) > sum(x["reward"] for x in r[:4]) + 0.8
    assert all(x["clip_ratio"] == 0.0 for x in r)  # one update per rollout: the ratio is exactly 1
    assert all(x["rollout_seconds"] > 0 and 0 < x["rollout_tokens"] <= 4 * 8 * 12 for x in r)


def test_resume_is_exact_including_the_sampling(tmp_path, tiny_sft_dir, tokenizer, prompts):
    data = PromptDataset(prompts, tokenizer, max_length=64)
    straight = grpo_run(tmp_path / "a", tiny_sft_dir, data, tokenizer, epochs=3)
    assert len(straight.losses) == 6
    cut = grpo_run(tmp_path / "b", tiny_sft_dir, data, tokenizer, epochs=3, stop_at=3)
    assert cut.interrupted
    resumed = grpo_run(tmp_path / "b", tmp_path / "a", data, tokenizer, epochs=3, resume=True)
    assert cut.losses + resumed.losses == straight.losses
    assert [x["reward"] for x in rows(tmp_path / "b")] == [x["reward"] for x in rows(tmp_path / "a")]
    # completions.jsonl: the resumed run's file is the straight run's (the cut run's rows past its checkpoint trimmed)
    logged = (tmp_path / "a" / "completions.jsonl").read_text(encoding="utf-8")
    assert (tmp_path / "b" / "completions.jsonl").read_text(encoding="utf-8") == logged
    samples = [json.loads(line) for line in logged.splitlines()]
    assert [r["step"] for r in samples] == [s for s in range(1, 7) for _ in range(4 * 8)]
    assert all(r["reward"] == float("月" in r["completion"]) == r["rewards"]["moon"] for r in samples)
    a = MiniLLM.from_pretrained(tmp_path / "a").state_dict()
    b = MiniLLM.from_pretrained(tmp_path / "b").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_between_the_updates_of_one_rollout_is_exact(tmp_path, tiny_sft_dir, tokenizer, prompts):
    """--num_iterations 2: steps 2, 4, 6 update on the rollouts of steps 1, 3, 5 (same prompts, nothing sampled); a
    run cut after step 3 keeps those rollouts in its checkpoint, and its resume is the straight run bit for bit."""
    data = PromptDataset(prompts, tokenizer, max_length=64)
    straight = grpo_run(tmp_path / "a", tiny_sft_dir, data, tokenizer, max_steps=6, num_iterations=2)
    cut = grpo_run(tmp_path / "b", tiny_sft_dir, data, tokenizer, max_steps=6, num_iterations=2, stop_at=3)
    assert cut.interrupted and len(cut.losses) == 3
    resumed = grpo_run(tmp_path / "b", tmp_path / "a", data, tokenizer, max_steps=6, num_iterations=2, resume=True)
    assert cut.losses + resumed.losses == straight.losses
    r = rows(tmp_path / "a")
    assert [x["rollout_tokens"] > 0 for x in r] == [True, False] * 3
    clockless = lambda x: {k: v for k, v in x.items() if "seconds" not in k and "_s" not in k}  # noqa: E731
    assert [clockless(x) for x in rows(tmp_path / "b")] == [clockless(x) for x in r]
    assert all(r[i]["reward"] == r[i + 1]["reward"] and r[i]["completions/max_length"] ==
               r[i + 1]["completions/max_length"] for i in (0, 2, 4))  # the same completions, updated on again
    assert all(r[i]["clip_ratio"] == 0.0 for i in (0, 2, 4)) and max(r[i]["clip_ratio"] for i in (1, 3, 5)) > 0
    logged = [json.loads(line) for line in (tmp_path / "a" / "completions.jsonl").read_text().splitlines()]
    assert sorted({x["step"] for x in logged}) == [1, 3, 5]  # what was sampled, once
    assert (tmp_path / "b" / "completions.jsonl").read_text() == (tmp_path / "a" / "completions.jsonl").read_text()
    a = MiniLLM.from_pretrained(tmp_path / "a").state_dict()
    b = MiniLLM.from_pretrained(tmp_path / "b").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="num_iterations 2 -> 1"):  # another N reads other batches: refused
        grpo_run(tmp_path / "b", tmp_path / "a", data, tokenizer, max_steps=8, resume=True)


def test_cli_runs_and_refuses_bad_flags_in_one_line(tmp_path, tiny_sft_dir, prompts, capsys):
    common = ["--init_from", tiny_sft_dir, "--data_path", prompts, "--eval_data", "", "--max_steps", "2",
              "--group_size", "4", "--max_new_tokens", "24", "--log_every", "1", "--batch_size", "2"]
    # The reference: a second copy, or adapters off; the second run also takes TRL's other options and two
    # micro-batches a step (sampled together before the first backward: cispo divides by the step's tokens).
    printed = {}
    for name, extra in (("o", ["--log_completions", "2"]), ("lora", ["--lora", "--loss_type", "cispo", "--epsilon_high", "4",
                                              "--scale_rewards", "batch", "--kl_correction", "--accumulation_steps",
                                              "2", "--batch_size", "1", "--log_completions"])):
        code, out, err = run_train_cli("grpo", *common, "--out_dir", tmp_path / name, "--kl_beta", "0.04",
                                       "--reward", "request:1,ended:0.5,poem:0.5", "--learning_rate", "1e-2", *extra,
                                       capsys=capsys)
        assert code == 0, err
        printed[name] = out
        r = rows(tmp_path / name)
        assert len(r) == 2 and {"rewards/request", "rewards/ended", "rewards/poem", "kl"} <= set(r[0])
        assert all(0 <= x["completions/repetitive"] <= 1 for x in r)  # issue 45: the degeneration measure logged
        assert r[0]["kl"] == 0.0  # the first rollout's policy is the reference
        if name == "o" or r[0]["frac_reward_zero_std"] < 1:  # weight decay moves the full model; adapters start
            assert r[1]["kl"] > 0                            # at B = 0 and move only on a reward that differs
    assert (tmp_path / "o" / "model.safetensors").is_file() and (tmp_path / "lora" / "adapter_model.safetensors").is_file()
    logged = [json.loads(line) for line in (tmp_path / "lora" / "completions.jsonl").read_text().splitlines()]
    assert [x["step"] for x in logged] == [1] * 8 + [2] * 8
    every_2 = [json.loads(line) for line in (tmp_path / "o" / "completions.jsonl").read_text().splitlines()]
    assert [x["step"] for x in every_2] == [2] * 8  # --log_completions 2: the second step's only
    for name in ("o", "lora"):  # the last logged step's completions, shown when the run ends
        assert "the last sampled completions (step 2, 8 of 8; all in" in printed[name], printed[name]
        assert printed[name].count("\n| ") >= 9 and "| reward | advantage | request | completion |" in printed[name]
    assert {"request", "completion", "reward", "rewards", "advantage"} <= set(logged[0])
    # The chat model's training context stays (GRPO's --max_length caps the prompts, not the context).
    start = tmp_path / "start"
    shutil.copytree(tiny_sft_dir, start)
    config = json.loads((start / "config.json").read_text())
    config["minillm"]["trained_context"] = 96
    (start / "config.json").write_text(json.dumps(config))
    code, _, err = run_train_cli("grpo", *common, "--init_from", start, "--out_dir", tmp_path / "ctx", capsys=capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "ctx" / "config.json").read_text())["minillm"]["trained_context"] == 96
    # Issue 44, item 6: flag values are checked as the flags are parsed (exit 2, nothing loaded or written).
    for flags, message in ((["--temperature", "0"], "--temperature must be a finite number > 0, got 0.0"),
                           (["--temperature", "nan"], "--temperature must be a finite number > 0, got nan"),
                           (["--reward", "moon"], "unknown reward 'moon'"),
                           (["--group_size", "1"], "group_size must be >= 2"),
                           (["--kl_beta", "nan"], "--kl_beta must be a finite number >= 0, got nan"),
                           (["--kl_beta", "inf"], "--kl_beta must be a finite number >= 0, got inf"),
                           (["--kl_beta", "-0.1"], "--kl_beta must be a finite number >= 0"),
                           (["--epsilon", "inf"], "--epsilon must be a finite number > 0 and <= 1"),
                           (["--epsilon_high", "0"], "--epsilon_high must be a finite number > 0, got 0.0"),
                           (["--epsilon_high", "inf"], "--epsilon_high must be a finite number > 0, got inf"),
                           (["--reward", "request:nan"], "the weight of request must be a finite number"),
                           (["--reward", "request:1,ended:-inf"], "the weight of ended must be a finite number"),
                           (["--reward", "request:1,ended:1,request:2"], "request is named twice"),
                           (["--max_new_tokens", "0"], "--max_new_tokens must be >= 1"),
                           (["--num_iterations", "0"], "--num_iterations must be in [1, 16], got 0"),
                           (["--log_completions", "-1"], "--log_completions must be >= 1 (0: off), got -1")):
        code, out, err = run_train_cli("grpo", *common, "--out_dir", tmp_path / "bad", *flags, capsys=capsys)
        assert code == 2 and message in err and "Traceback" not in err and err.count("\n") == 1, err
        assert not (tmp_path / "bad").exists()
    for flags, message in ((["--fsdp"], "--fsdp with GRPO is not supported"),
                           (["--max_new_tokens", "100000"], "--max_length 128 + --max_new_tokens 100000 exceeds the "
                                                            "model's context of 256 tokens")):
        code, out, err = run_train_cli("grpo", *common, "--out_dir", tmp_path / "bad", *flags, capsys=capsys)
        assert code == 1 and message in err and "Traceback" not in err, err


def test_an_empty_plain_text_prompt_is_refused_naming_its_line(tmp_path, tokenizer):
    """Issue 44, item 9: a prompt of no tokens reached the sampler."""
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "春风"}\n{"prompt": ""}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"p\.jsonl:2: field \"prompt\" is empty"):
        PromptDataset(path, tokenizer, max_length=64)


def test_two_processes_roll_out_their_own_prompts(tmp_path, tiny_sft_dir, prompts):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(REPO / "train_grpo.py"), "--init_from", str(tiny_sft_dir), "--data_path", str(prompts),
           "--eval_data", "", "--max_steps", "2", "--group_size", "4", "--max_new_tokens", "8", "--log_every", "1",
           "--batch_size", "2", "--out_dir", str(tmp_path / "two")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    r = rows(tmp_path / "two")
    assert [x["step"] for x in r] == [1, 2]  # rank 0 writes each step once
    assert all(0 <= x["frac_reward_zero_std"] <= 1 and x["completions/mean_length"] <= 8 for x in r)
    # Issue 51: the step's 4 prompts are split, 2 per process, each x 4 completions. rollout_tokens is rank 0's
    # own count and mean_length the mean over all 16 completions, so both halves hold 8 completions of 1 to 8
    # tokens: a process that sampled the whole batch (or none of it) breaks one bound or the other.
    for x in r:
        everyone = round(x["completions/mean_length"] * 16)
        assert 8 <= x["rollout_tokens"] <= 64 and 8 <= everyone - x["rollout_tokens"] <= 64, x


# --- issue 51: one whole GRPO step on fixed completions, its loss and gradient computed here -----------------

@pytest.mark.parametrize("loss_type, kl_beta", [("grpo", 0.0), ("grpo", 0.3), ("dr_grpo", 0.3)])
def test_a_step_on_stub_rollouts_equals_the_loss_and_gradient_computed_independently(
        tiny_sft_dir, tokenizer, prompts, monkeypatch, loss_type, kl_beta):
    """Fixed completions (no sampling) and fixed rewards through GRPO.__call__; the test recomputes, one sequence
    at a time without padding, each completion token's log-prob, the unbiased group std, the k3 KL to a reference
    and the mean, and compares the loss and every parameter's gradient. Mutations caught: the completion mask
    shifted by one position, the population std (or none) in the advantages, the stop token left out of the loss,
    the KL's sign, the grpo/dr_grpo normalisers swapped."""
    from conftest import randomized

    torch.manual_seed(0)
    policy = MiniLLM.from_pretrained(tiny_sft_dir, dtype=torch.float32).train()
    reference = randomized(MiniLLM.from_pretrained(tiny_sft_dir, dtype=torch.float32), scale=0.05).eval()
    data = PromptDataset(prompts, tokenizer, max_length=64)
    batch = [torch.stack(t) for t in zip(data[0], data[1])]
    G, end = 4, tokenizer.im_end_id
    rng = torch.Generator().manual_seed(3)
    fixed = [[torch.randint(3, 400, (n,), generator=rng).tolist() + ([end] if n % 2 else []) for n in (3, 6, 1, 5)],
             [torch.randint(3, 400, (n,), generator=rng).tolist() + ([end] if n % 3 else []) for n in (4, 2, 7, 5)]]
    calls = iter(fixed)
    monkeypatch.setattr(GRPO, "rollouts", lambda self, prompts: [[Trajectory.single(p, c) for c in next(calls)]
                                                                 for p in prompts])
    scores = {}

    def stub(request: str, answer: str) -> float:  # fixed rewards, by the answer's length
        return scores.setdefault(answer, [0.0, 1.0, 0.25, 2.0, 0.5, 1.5, 3.0, 0.0][len(scores) % 8])

    objective = GRPO({"stub": (stub, 1.0)}, tokenizer, group_size=G, max_new_tokens=8, loss_type=loss_type,
                     kl_beta=kl_beta, reference=reference if kl_beta else None)
    objective.prepare(policy, data, torch.device("cpu"), torch.float32)
    out = objective(policy, batch)
    got = torch.autograd.grad(out.loss, list(policy.parameters()))

    prompts_ids = [row[mask > 0].tolist() for row, mask in zip(batch[0], batch[2])]
    # The reward functions see the answer's text, and <|im_end|> after it when the completion ended its turn.
    rewards = torch.tensor([[stub("", tokenizer.decode(c[:-1]) + "<|im_end|>" if c[-1:] == [end] else
                                  tokenizer.decode(c)) for c in group] for group in fixed], dtype=torch.float64)
    assert len(scores) == 8  # the same eight answers the step scored: no new ones
    mean = rewards.mean(dim=1, keepdim=True)
    std = ((rewards - mean) ** 2).sum(dim=1, keepdim=True).div(G - 1).sqrt()
    advantages = ((rewards - mean) / (std + 1e-4)).flatten()
    terms = []
    for i, (prompt, completion) in enumerate((p, c) for p, group in zip(prompts_ids, fixed) for c in group):
        seq = torch.tensor([prompt + completion])
        logp = torch.log_softmax(policy(seq[:, :-1]).logits.double(), -1)[0, len(prompt) - 1:]
        logp = logp.gather(-1, torch.tensor(completion)[:, None])[:, 0]  # every completion token, stop included
        per_token = -advantages[i] * torch.exp(logp - logp.detach())
        if kl_beta:
            with torch.no_grad():
                ref = torch.log_softmax(reference(seq[:, :-1]).logits.double(), -1)[0, len(prompt) - 1:]
                ref = ref.gather(-1, torch.tensor(completion)[:, None])[:, 0]
            per_token = per_token + kl_beta * (torch.exp(ref - logp) - (ref - logp) - 1)
        terms.append(per_token.sum() / (len(completion) if loss_type == "grpo" else 8))
    want_loss = torch.stack(terms).mean()
    want = torch.autograd.grad(want_loss, list(policy.parameters()))
    assert out.loss.item() == pytest.approx(want_loss.item(), rel=1e-5, abs=1e-7)
    for (name, _), g, w in zip(policy.named_parameters(), got, want):
        scale = w.abs().max().item()  # float32 sums in a padded batch against one sequence at a time
        assert (g.double() - w.double()).abs().max().item() <= 1e-4 * scale + 1e-9, name
    assert max(w.abs().max().item() for w in want) > 1e-3  # a real gradient, not zero on both sides


def test_rewards_read_the_request_field_of_a_prompt_in_any_wording(tmp_path, tokenizer, capsys):
    """Issue 45: GRPO's prompts come in composed wordings that no pattern parses back; each line's "request" field
    says what it asks, and the rewards check that. A malformed field is refused, naming the file."""
    asked = "帮我作一首诗，先写「明月」，再写「故乡」"
    path = tmp_path / "p.jsonl"
    lines = [{"prompt": [{"role": "user", "content": asked}], "request": {"kind": "words", "w1": "明月", "w2": "故乡"}},
             {"prompt": [{"role": "user", "content": "五言绝句一首，唐代。"}], "request": {"kind": "form", "form": "五言绝句"}},
             {"prompt": [{"role": "user", "content": "请以《浣溪沙》为词牌，填一首词。"}]}]  # eval's own wording: parsed
    path.write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines), encoding="utf-8")
    dataset = PromptDataset(path, tokenizer, max_length=64)
    known = prompt_requests(dataset)
    assert known == {asked: lines[0]["request"], "五言绝句一首，唐代。": lines[1]["request"]}
    rewards = build_rewards("request:1,length:1", None, None, known=known)
    request, length = rewards["request"][0], rewards["length"][0]
    poem5 = "静夜\n床前明月光，疑是地上霜。\n举头望山月，低头思故乡。<|im_end|>"
    decoded = request_of(tokenizer.decode(dataset.prompts[0]))  # what the objective passes: the decoded prompt
    assert decoded == asked and request(decoded, poem5) == 1.0 and request(asked, poem5.replace("故乡", "远方")) == 0.5
    assert request_reward(asked, poem5) == 0.0  # without the field the wording says nothing to the parser
    assert request("五言绝句一首，唐代。", poem5) == 1.0 and length("五言绝句一首，唐代。", poem5) == 1.0
    assert request("五言绝句一首，唐代。", "春\n一曲新词酒一杯，去年天气旧亭台。") == 0.0
    assert request("请以《浣溪沙》为词牌，填一首词。", "浣溪沙\n一曲新词酒一杯") == 1.0
    for bad in ({"kind": "rhyme"}, {"kind": "words", "w1": "明月"}, {"kind": "tune", "tune": ""}):
        with pytest.raises(ValueError, match='"request" must be'):
            build_rewards("request", None, None, known={asked: bad})
    path.write_text(json.dumps({"prompt": "春风", "request": "words"}) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r'p\.jsonl:1: "request" must be an object'):
        prompt_requests(PromptDataset(path, tokenizer, max_length=64))


@pytest.mark.parametrize("loss_type,kl_correction", [("grpo", False), ("dr_grpo", False), ("bnpo", False),
                                                     ("dapo", True), ("cispo", True), ("grpo", True)])
def test_each_loss_type_equals_trl_on_the_same_completions(tmp_path, tokenizer, loss_type, kl_correction):
    """TRL's GRPOTrainer._compute_loss and ours on one batch of fixed completions, advantages, old-policy and
    reference log-probs (ratios away from 1, clip-higher, a KL): the same loss and the same gradient."""
    pytest.importorskip("trl")
    from datasets import Dataset
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    from trl import GRPOConfig, GRPOTrainer

    from minillm.model.hf import to_hf_state_dict

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         initializer_range=0.1, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    model_dir = tmp_path / "model"
    LlamaForCausalLM(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    high = 1.5 if loss_type == "cispo" else 0.28
    args = GRPOConfig(output_dir=str(tmp_path / "trl"), loss_type=loss_type, epsilon=0.2, epsilon_high=high, beta=0.04,
                      max_completion_length=8, num_generations=4, per_device_train_batch_size=4, report_to=[],
                      use_cpu=True, bf16=False, fp16=False, save_strategy="no", temperature=1.0,
                      use_bias_correction_kl=kl_correction)
    hf = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    trainer = GRPOTrainer(model=hf, reward_funcs=[lambda completions, **kw: [0.0] * len(completions)], args=args,
                          train_dataset=Dataset.from_list([{"prompt": "诗"}] * 4),
                          processing_class=AutoTokenizer.from_pretrained(model_dir))
    trainer.current_gradient_accumulation_steps = 1
    trainer.model.train()

    g = torch.Generator().manual_seed(4)
    prompt_ids = torch.randint(3, 400, (4, 5), generator=g)
    lengths = [3, 8, 1, 6]
    completion_ids = torch.randint(3, 400, (4, 8), generator=g)
    completion_mask = torch.tensor([[1] * n + [0] * (8 - n) for n in lengths])
    advantages = torch.tensor([1.2, -0.8, 0.4, -1.5])
    ids = torch.cat([prompt_ids, completion_ids], dim=1)
    with torch.no_grad():
        logp = token_logps(hf(ids[:, :-1]).logits, ids[:, 1:], 1.0)[:, 4:]
    old = logp + torch.randn(logp.shape, generator=g) * 0.4
    ref = logp + torch.randn(logp.shape, generator=g) * 0.3
    inputs = {"prompt_ids": prompt_ids, "prompt_mask": torch.ones_like(prompt_ids), "completion_ids": completion_ids,
              "completion_mask": completion_mask, "advantages": advantages, "old_per_token_logps": old,
              "ref_per_token_logps": ref, "num_items_in_batch": completion_mask.sum()}
    trl_loss = trainer._compute_loss(trainer.model, inputs)
    trl_grad = torch.autograd.grad(trl_loss, list(trainer.model.parameters()))

    policy = MiniLLM.from_pretrained(model_dir, dtype=torch.float32).train()
    mine = token_logps(policy(ids[:, :-1]).logits, ids[:, 1:], 1.0)[:, 4:]
    loss_N, _, _ = sequence_losses(mine, old, advantages, completion_mask, 0.2, loss_type, 8, ref, 0.04, high,
                                   kl_correction=kl_correction)
    loss = loss_N.mean()
    grad = torch.autograd.grad(loss, list(policy.parameters()))
    assert loss.item() == pytest.approx(trl_loss.item(), rel=1e-5, abs=1e-7)
    assert abs(loss.item()) > 1e-3
    # Our fused q|k|v and gate|up projections hold TRL's separate ones: compare the gradients as hf.py splits them.
    ours = to_hf_state_dict(dict(zip([n for n, _ in policy.named_parameters()], grad)), policy.config)
    theirs = dict(zip([n for n, _ in trainer.model.named_parameters()], trl_grad))
    for name, w in theirs.items():
        key = name if name in ours else name.replace("model.embed_tokens", "lm_head")
        assert torch.allclose(ours[key], w, rtol=1e-4, atol=1e-6 * w.abs().max().item() + 1e-9), name


def test_loss_png_shows_the_reward_per_step_below_the_loss():
    """Issue 47: a GRPO run's loss.png has a reward panel, the reward of every step in metrics.jsonl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from minillm.train.progress import metrics_figure

    rows = [{"step": s, "loss": 0.1 * s, "reward": 0.5 + 0.01 * s} for s in range(1, 6)] + [{"step": 5, "eval_loss": 3.0}]
    fig = metrics_figure(rows, plt)
    top, bottom = fig.axes
    assert [list(line.get_xydata()[:, 1]) for line in top.get_lines()] == [pytest.approx([0.1 * s for s in range(1, 6)]),
                                                                             [3.0]]
    assert list(bottom.get_lines()[0].get_xydata()[:, 1]) == pytest.approx([0.5 + 0.01 * s for s in range(1, 6)])
    assert len(metrics_figure([{"step": 1, "loss": 1.0}], plt).axes) == 1  # no reward: one panel
    plt.close("all")


@pytest.mark.parametrize("loss_type", ["grpo", "cispo"])
def test_a_second_iteration_takes_its_ratio_against_the_sampling_policy(tiny_sft_dir, tokenizer, prompts, monkeypatch,
                                                                       loss_type):
    """num_iterations 2 on fixed completions: the second step samples nothing (the stub holds one step's), and its
    loss is the objective of the moved policy against the log-probs of the policy that sampled, transcribed token
    by token here from one sequence at a time; the third step samples again."""
    torch.manual_seed(0)
    policy = MiniLLM.from_pretrained(tiny_sft_dir, dtype=torch.float32).train()
    data = PromptDataset(prompts, tokenizer, max_length=64)
    batch = [torch.stack(t) for t in zip(data[0], data[1])]
    G, end, rng = 4, tokenizer.im_end_id, torch.Generator().manual_seed(5)
    fixed = [[torch.randint(3, 400, (n,), generator=rng).tolist() + [end] for n in (3, 6, 1, 5)],
             [torch.randint(3, 400, (n,), generator=rng).tolist() for n in (4, 2, 7, 8)]]
    sampled = []

    def stub_rollouts(self, prompts):
        sampled.append(len(prompts))
        return [[Trajectory.single(p, c) for c in group] for p, group in zip(prompts, fixed)]

    monkeypatch.setattr(GRPO, "rollouts", stub_rollouts)
    reward = lambda request, answer: float(len(answer) % 5)  # noqa: E731
    objective = GRPO({"len": (reward, 1.0)}, tokenizer, group_size=G, max_new_tokens=8, loss_type=loss_type,
                     epsilon=0.1, epsilon_high=1.3 if loss_type == "cispo" else None, num_iterations=2)
    objective.prepare(policy, data, torch.device("cpu"), torch.float32)
    prompts_ids = [row[mask > 0].tolist() for row, mask in zip(batch[0], batch[2])]

    def logps() -> list[list[float]]:  # each completion token's log-prob, one sequence at a time, in float64
        out = []
        for prompt, completion in ((p, c) for p, group in zip(prompts_ids, fixed) for c in group):
            logits = policy(torch.tensor([prompt + completion])[:, :-1]).logits.double()[0, len(prompt) - 1:]
            out.append(torch.log_softmax(logits, -1).gather(-1, torch.tensor(completion)[:, None])[:, 0].tolist())
        return out

    objective.begin_step([batch])
    first = objective(policy, batch)
    old = logps()
    with torch.no_grad():  # an update, as the optimizer would make one
        for p in policy.parameters():
            p.add_(torch.randn(p.shape, generator=rng) * 0.05)
    objective.begin_step([batch])
    second = objective(policy, batch)
    assert sampled == [2] and first.metrics["clip_ratio"] == 0 and second.metrics["clip_ratio"] > 0
    assert first.counters["rollout_tokens"] > 0 and second.counters["rollout_tokens"] == 0
    texts = [tokenizer.decode(c[:-1]) + "<|im_end|>" if c[-1] == end else tokenizer.decode(c) for g in fixed for c in g]
    advantages = group_advantages(torch.tensor([reward("", t) for t in texts]).view(2, G)).flatten().tolist()
    new = logps()
    want = transcribed(new, old, None, advantages, [[1] * len(x) for x in new], 0.1, 0.0, loss_type, 8,
                       eps_high=1.3 if loss_type == "cispo" else None)
    assert second.loss.item() == pytest.approx(want, rel=1e-4, abs=1e-6)
    assert second.metrics["completions/clipped_ratio"].item() == 4  # the second prompt's four ran out of budget
    objective.begin_step([batch])
    assert sampled == [2, 2]  # a new rollout every num_iterations steps


def test_a_reward_that_raises_or_returns_nan_stops_the_run_naming_it_and_saves_nothing(tmp_path, tiny_sft_dir,
                                                                                      tokenizer, prompts):
    """Issue 47, bad input: the step fails in one line with the reward's name and the completion; no model is
    written (the run had no checkpoint yet)."""
    from minillm.eval.rewards import RewardError

    data = PromptDataset(prompts, tokenizer, max_length=64)
    calls = []

    def flaky(request: str, answer: str) -> float:
        calls.append(answer)
        if len(calls) > 40:  # the second step's
            raise KeyError("w1")
        return 0.5

    for reward, needle in ((flaky, "reward 'flaky' raised KeyError: 'w1' on the completion '"),
                           (lambda r, a: float("nan"), "reward 'nan' returned nan on the completion '")):
        name = needle.split("'")[1]
        cfg = TrainConfig(out_dir=str(tmp_path / name), batch_size=4, max_steps=3, dtype="float32", eval_every=0,
                          save_every=0)
        objective = GRPO({name: (reward, 1.0)}, tokenizer, group_size=8, max_new_tokens=6)
        with pytest.raises(RewardError) as e:
            train(MiniLLM.from_pretrained(tiny_sft_dir, dtype=torch.float32), data, cfg, objective=objective)
        assert needle in str(e.value) and "\n" not in str(e.value) and "request '" in str(e.value)
        assert not (tmp_path / name / "model.safetensors").exists()
    assert len(calls) == 41  # the first step scored its 32 completions; the second stopped at its 9th
