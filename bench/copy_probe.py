"""Can a model copy what its context holds (the induction-head ability that quoting a tool result, copying a
title into a call and using the words a request names all need; issues 45 and 46)?

    python bench/copy_probe.py --model out/pretrain out/sft [--learn_steps 600]

For each model, the mean loss (nats per token) of a span of 10 random vocabulary tokens and of the same span
written again right after it; a model that copies predicts the second far better (ratio second/first near 0), one
that does not predicts both alike (ratio near 1). Also the loss of a held-out poem's lines and of the same lines
written again after the poem. With --learn_steps N, a fresh model of the default pretraining shape (4 x 256, the
shipped vocabulary) is trained for N steps on nothing but such repeated spans (AdamW, lr 1e-3, 16 x 40 tokens a
step) and probed every N/4 steps: can this shape learn to copy at all, and how soon?
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch
import torch.nn.functional as F
from common import add_json_flag, write_json

from minillm.data.tokenizer import Tokenizer, load_tokenizer
from minillm.model.config import LMConfig
from minillm.model.model import MiniLLM

REPO = Path(__file__).resolve().parent.parent
SPAN, PROBES = 10, 40


def span_losses(model: MiniLLM, first_ids: list[list[int]], second_ids: list[list[int]]) -> tuple[float, float]:
    """Mean loss of the tokens of `first` (after its first token) and of `second` written right after it."""
    a = b = 0.0
    for first, second in zip(first_ids, second_ids):
        ids = torch.tensor([first + second])
        with torch.inference_mode():
            logits = model(ids).logits[0, :-1].float()
        losses = F.cross_entropy(logits, ids[0, 1:], reduction="none")
        a += losses[:len(first) - 1].mean().item()
        b += losses[len(first) - 1:].mean().item()
    return a / len(first_ids), b / len(first_ids)


def probe(model: MiniLLM, tokenizer: Tokenizer, poems: list[str], seed: int = 0) -> dict[str, float]:
    """Random spans and held-out poems, each written twice: the loss of each copy."""
    rng = random.Random(seed)
    spans = [[rng.randrange(300, tokenizer.vocab_size - 10) for _ in range(SPAN)] for _ in range(PROBES)]
    r1, r2 = span_losses(model.eval(), spans, spans)
    firsts = [tokenizer.encode(text + "\n") for text in poems]
    seconds = [tokenizer.encode(text.split("\n", 2)[2]) for text in poems]
    p1, p2 = span_losses(model, firsts, seconds)
    return {"random_first": r1, "random_second": r2, "poem_first": p1, "poem_second": p2}


PROBED: list[dict] = []  # every probe shown, for --json


def show(name: str, r: dict[str, float]) -> None:
    """One line of a table."""
    PROBED.append({"model": name, **r})
    print(f"{name:<28} {r['random_first']:7.2f} {r['random_second']:7.2f} {r['random_second'] / r['random_first']:6.2f}"
          f" {r['poem_first']:7.2f} {r['poem_second']:7.2f} {r['poem_second'] / r['poem_first']:6.2f}", flush=True)


def learn(tokenizer: Tokenizer, poems: list[str], steps: int) -> None:
    """Train the default pretraining shape on repeated random spans only; probe as it goes."""
    torch.manual_seed(0)
    config = LMConfig(vocab_size=tokenizer.vocab_size, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=256)
    model = MiniLLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for step in range(1, steps + 1):
        x = torch.randint(1, tokenizer.vocab_size, (16, 20))
        ids = torch.cat([x, x], dim=1)
        model.train()
        loss = F.cross_entropy(model(ids[:, :-1]).logits.flatten(0, 1).float(), ids[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % max(steps // 4, 1) == 0:
            show(f"copy-only, step {step}", probe(model, tokenizer, poems))


def main() -> None:
    """Probe each model; optionally train one on copying."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_json_flag(p)
    p.add_argument("--model", nargs="*", default=[], help="model directories to probe")
    p.add_argument("--data", default=str(REPO / "dataset" / "eval.jsonl"), help="held-out poems (default: %(default)s)")
    p.add_argument("--learn_steps", type=int, default=0, help="train a fresh model on copying for this many steps")
    args = p.parse_args()
    texts = [json.loads(line)["text"] for line in open(args.data, encoding="utf-8")]
    poems = [t for t in texts if t.count("\n") >= 2 and len(t) <= 120][:PROBES]
    print(f"loss (nats/token) of the first and the second copy; {PROBES} random {SPAN}-token spans, "
          f"{len(poems)} held-out poems' lines")
    print(f"{'model':<28} {'rand 1':>7} {'rand 2':>7} {'ratio':>6} {'poem 1':>7} {'poem 2':>7} {'ratio':>6}")
    for directory in args.model:
        show(Path(directory).name, probe(MiniLLM.from_pretrained(directory, dtype=torch.float32),
                                         Tokenizer.from_pretrained(directory), poems))
    if args.learn_steps:
        learn(load_tokenizer(), poems, args.learn_steps)
    write_json(args.json, probes=PROBED)


if __name__ == "__main__":
    main()
