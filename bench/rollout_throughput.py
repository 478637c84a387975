"""GRPO's rollouts and optimizer step: the batched engine against the path before it, side by side (issue 47).

Before (kept here as the baseline): each prompt's group_size completions by generate() on [prompt] * G, prompt
after prompt, every row reading the prompt itself. Now: sample_groups (minillm/infer/engine.py), every prompt of
the step in flight together, each prompt read once. Same model, prompts (the first of dataset/dpo.jsonl, as
train_grpo.py reads them), GRPO's default settings (4 prompts x 8 completions, up to 160 new tokens, temperature
1); rounds alternate, medians. Prints rollout tokens/s of both and a whole optimizer step (rollouts, rewards,
forward and backward) of both.

    python bench/rollout_throughput.py                       # random weights of the 4 x 256 default shape
    python bench/rollout_throughput.py --model_dir out/sft   # a trained chat model: real stop points
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from common import CONFIGS, environment, median, print_table, setup

from minillm.data.prompts import PromptDataset
from minillm.data.tokenizer import Tokenizer, load_tokenizer
from minillm.eval.rewards import build_rewards
from minillm.infer.generation import generate
from minillm.infer.tool_rollouts import Trajectory
from minillm.model.model import MiniLLM
from minillm.train.grpo import GRPO

REPO = Path(__file__).resolve().parent.parent


def per_prompt(self: GRPO, prompts: list[list[int]]) -> list[list[Trajectory]]:
    """The rollouts before the engine: one generate() call per prompt, G copies of the prompt in its batch."""
    groups = []
    for prompt in prompts:
        out = generate(self.policy, [prompt] * self.group_size, max_new_tokens=self.max_new_tokens,
                       temperature=self.temperature, eos_token_id=self.stops)
        rows = []
        for row in out[:, len(prompt):].tolist():
            end = next((i + 1 for i, t in enumerate(row) if t in self.stops), len(row))
            rows.append(Trajectory.single(prompt, row[:end]))
        groups.append(rows)
    return groups


def main(argv: list[str] | None = None) -> None:
    """Print the two tables and the ratios."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model_dir", default=None, help="a trained chat model (default: random weights of --config)")
    p.add_argument("--config", choices=sorted(CONFIGS), default="pretrain", help="shape of the random model")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds, medians (default: %(default)s)")
    p.add_argument("--prompts", type=int, default=4, help="prompts per step (train_grpo.py's --batch_size)")
    p.add_argument("--group_size", type=int, default=8)
    p.add_argument("--max_new_tokens", type=int, default=160)
    p.add_argument("--json", default=None, help="also write the numbers to this file")
    args = p.parse_args(argv)
    setup(args.threads, seed=0)
    if args.model_dir:
        model, tokenizer = MiniLLM.from_pretrained(args.model_dir), Tokenizer.from_pretrained(args.model_dir)
    else:
        model, tokenizer = MiniLLM(CONFIGS[args.config]), load_tokenizer()
    data = PromptDataset(REPO / "dataset" / "dpo.jsonl", tokenizer, max_length=128)
    batch = [torch.stack(t) for t in zip(*(data[i] for i in range(args.prompts)))]
    rewards = build_rewards("composite", REPO / "dataset" / "pretrain.jsonl", REPO / "dataset" / "sft.jsonl")
    objective = GRPO(rewards, tokenizer, group_size=args.group_size, max_new_tokens=args.max_new_tokens)
    objective.prepare(model, data, torch.device("cpu"), torch.float32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.0)  # lr 0: the same weights every round
    engine = GRPO.rollouts

    def rollouts(side: str) -> tuple[float, int]:
        GRPO.rollouts = engine if side == "engine" else per_prompt
        start = time.perf_counter()
        out = objective.sample([batch])[0]
        return time.perf_counter() - start, sum(row.sampled_tokens for row in out.rows)

    def step(side: str) -> float:
        GRPO.rollouts = engine if side == "engine" else per_prompt
        start = time.perf_counter()
        model.train()
        objective.begin_step([batch])
        objective(model, batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return time.perf_counter() - start

    sides = ("per prompt (before)", "engine")
    roll = {s: [] for s in sides}
    steps = {s: [] for s in sides}
    for r in range(args.rounds + 1):  # the first round warms up
        for side in sides if r % 2 else sides[::-1]:
            key = "engine" if side == "engine" else "before"
            seconds, tokens = rollouts(key)
            step_seconds = step(key)
            if r:
                roll[side].append(tokens / seconds)
                steps[side].append(step_seconds)
    GRPO.rollouts = engine
    print(f"# {args.model_dir or args.config + ' (random weights)'}, {args.prompts} prompts x {args.group_size}, up to "
          f"{args.max_new_tokens} new tokens, {args.threads} thread(s); {environment(torch.device('cpu'))}")
    print_table(["rollouts", "rollout tokens/s (median)", "seconds per optimizer step (median)"],
                [[s, f"{median(roll[s]):,.0f}", f"{median(steps[s]):.2f}"] for s in sides])
    speed = median(roll["engine"]) / median(roll[sides[0]])
    faster = median(steps[sides[0]]) / median(steps["engine"])
    print(f"\nengine / before: {speed:.2f}x rollout tokens/s (target >= 3x); optimizer step {faster:.2f}x faster "
          "(target >= 2x)")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"rollout_tokens_per_s": {s: median(roll[s]) for s in sides},
                       "step_seconds": {s: median(steps[s]) for s in sides}, "rollout_speedup": speed,
                       "step_speedup": faster}, f, indent=1)


if __name__ == "__main__":
    main()
