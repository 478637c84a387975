"""Speedrun: held-out bits per byte against training time for named pretraining recipes, one after the other.

Each recipe is a `train_pretrain.py` command line, run in its own process with nothing else running, with
held-out evaluations every --eval_every steps (their time is not counted: the trainer's clock runs during
training steps only). The transformers baseline, a plain LlamaForCausalLM loop of the default shape on
random windows of the packed corpus, runs in the same invocation under the same budget. The script prints
each recipe's bits per byte over time, the time it needs to reach --target, and the ratio to the first
recipe's time.

    python bench/speedrun.py --minutes 10 --recipe v0 --recipe default --baseline
    python bench/speedrun.py --recipe v0 --recipe default             # each recipe's own run length
    python bench/speedrun.py --minutes 8 --recipe "lr2x=--learning_rate 1e-3"   # an ad-hoc lever

A recipe is a name from RECIPES or `label=flags`. --minutes M adds `--max_minutes M` to every recipe
(the schedule then spans M minutes); without it each recipe runs as defined.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from minillm.eval.perplexity import bits_per_byte  # noqa: E402 (after the path insert)

# Named recipes: flags for train_pretrain.py. v0 spells out the default recipe of 2026-11-24 (one epoch of
# 16 x 256 blocks, AdamW at 1e-3 after 50 warmup steps, 8 layers of 512, float32 on CPUs without bf16 units)
# so that it stays runnable whatever the defaults become.
_V0_SHAPE = "--hidden_size 512 --num_hidden_layers 8 --num_attention_heads 8 --num_key_value_heads 2"
RECIPES = {
    "v0": f"--epochs 1 --batch_size 16 --max_length 256 --learning_rate 1e-3 --warmup_steps 50 --optimizer adamw "
          f"{_V0_SHAPE} --no-compile",
    # The transformers baseline's hyperparameters on minillm (AdamW 5e-4, no warmup): the ablation's reference.
    "lr5e-4": f"--batch_size 16 --max_length 256 --learning_rate 5e-4 --warmup_steps 0 --optimizer adamw {_V0_SHAPE}",
    # The best recipe of the 8-minute ablation (bench/RESULTS.md): a 4.6M-parameter model on 2,048-token steps.
    "4x256": "--batch_size 16 --max_length 128 --learning_rate 2e-3 --warmup_steps 20 --num_hidden_layers 4 "
             "--hidden_size 256 --num_attention_heads 4 --num_key_value_heads 2",
    "default": "",
    # Issue 29's levers on the default recipe: QK-norm (the Qwen3 layout), and a Mixture of Experts at the
    # default's active size (4 experts of 384, top-2: 7.2M parameters, 4.8M active per token).
    "qk_norm": "--qk_norm",
    "moe4top2": "--num_experts 4 --num_experts_per_tok 2",
}
BASELINE = "transformers"


def eval_set(tokenizer) -> tuple[list[list[int]], int, int]:
    """The held-out documents as token lists, their scored token count and their UTF-8 bytes."""
    from minillm.eval.perplexity import read_documents, scored_size

    texts = read_documents(ROOT / "dataset" / "eval.jsonl")
    docs = tokenizer.encode_batch(texts)
    return docs, *scored_size(texts, docs)


def run_recipe(label: str, flags: str, args: argparse.Namespace, tokens: int, n_bytes: int) -> list[tuple]:
    """Train one recipe in a subprocess; [(seconds, step, bits per byte)] of its held-out evaluations."""
    out_dir = Path(args.work_dir) / label
    cmd = [sys.executable, str(ROOT / "train_pretrain.py"), *shlex.split(flags), "--out_dir", str(out_dir),
           "--overwrite", "--eval_every", str(args.eval_every), "--save_every", "0", "--log_every", "10"]
    if args.minutes:
        cmd += ["--max_minutes", str(args.minutes)]
    print(f"# {label}: {shlex.join(cmd[1:])}", flush=True)
    start = time.perf_counter()
    res = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wall = time.perf_counter() - start
    if res.returncode:
        raise SystemExit(f"{label} failed:\n{res.stdout[-3000:]}")
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    points = [(r["seconds"], r["step"], bits_per_byte(r["eval_loss"], tokens, n_bytes))
              for r in rows if "eval_loss" in r]
    print(f"# {label}: {len(points)} evaluations, {wall:.0f} s wall; final {points[-1][2]:.4f} bits/byte "
          f"at {points[-1][0]:.0f} s of training", flush=True)
    return points


def run_baseline(args: argparse.Namespace, docs: list[list[int]], tokens: int, n_bytes: int) -> list[tuple]:
    """The transformers loop: AdamW 5e-4, betas (0.9, 0.95), wd 0.1, cosine to lr/10 over the budget."""
    import numpy as np
    import torch.nn.functional as F
    import transformers

    from minillm.data.packed import PackedDataset
    from minillm.eval.perplexity import evaluate_perplexity
    from minillm.model.config import LMConfig
    from minillm.model.model import MiniLLM
    from minillm.train.optim import build_optimizer
    from minillm.train.schedule import RunSchedule

    torch.manual_seed(1337)
    directory = Path(args.work_dir) / BASELINE
    MiniLLM(LMConfig()).save_pretrained(directory)  # same shape and initialisation rule as minillm's default
    transformers.utils.logging.disable_progress_bar()
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32,
                                                              attn_implementation="sdpa")
    stream = PackedDataset(ROOT / "dataset" / "pretrain.tokens.bin", 257).tokens
    optimizer = build_optimizer(model, "adamw", 5e-4, 0.1, torch.device("cpu"))
    rng = np.random.default_rng(1337)
    budget, steps = args.minutes * 60, args.baseline_steps
    length = f"{args.minutes:g} minutes" if args.minutes else f"{steps} steps"
    print(f"# {BASELINE}: LlamaForCausalLM, {length} of random 16 x 256 windows", flush=True)
    points, clock, step = [], 0.0, 0
    schedule = RunSchedule(0 if budget else steps, budget, 0)  # the rule minillm's --max_minutes follows
    while not schedule.done(step, clock):
        factor = schedule.lr_factor(step)
        for group in optimizer.param_groups:
            group["lr"] = group["peak_lr"] * factor
        t = time.perf_counter()
        starts = rng.integers(0, len(stream) - 257, size=16)
        w = torch.from_numpy(np.stack([stream[s:s + 257].astype(np.int64) for s in starts]))
        logits = model(input_ids=w[:, :-1]).logits
        loss = F.cross_entropy(logits.flatten(0, 1), w[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        clock += time.perf_counter() - t
        step += 1
        schedule.observe(step, clock)
        last = schedule.done(step, clock)
        if step % args.eval_every == 0 or last:
            nll = evaluate_perplexity(model, docs, max_length=256, batch_size=16, eos_id=0).mean_nll
            model.train()
            points.append((clock, step, bits_per_byte(nll, tokens, n_bytes)))
    print(f"# {BASELINE}: final {points[-1][2]:.4f} bits/byte at {clock:.0f} s, {step} steps", flush=True)
    return points


def time_to(points: list[tuple], target: float) -> float | None:
    """Training seconds at which bits per byte first reaches target (linear between evaluations), or None."""
    prev = (0.0, 0, math.inf)
    for point in points:
        if point[2] <= target:
            if math.isinf(prev[2]):
                return point[0]
            return prev[0] + (point[0] - prev[0]) * (prev[2] - target) / (prev[2] - point[2])
        prev = point
    return None


def main() -> None:
    """Run the recipes (and the baseline), then print the curves and the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", action="append", default=[],
                        help=f"a recipe: one of {', '.join(RECIPES)}, or label=flags; repeatable, run in order")
    parser.add_argument("--minutes", type=float, default=0.0,
                        help="training-time budget for every recipe (--max_minutes); 0: each recipe's own length")
    parser.add_argument("--baseline", action="store_true", help="also run the transformers baseline loop")
    parser.add_argument("--baseline_steps", type=int, default=122,
                        help="baseline steps without --minutes (default: %(default)s, 499,712 tokens)")
    parser.add_argument("--target", type=float, action="append", default=None,
                        help="bits per byte to time; repeatable (default: 2.286, the v0 recipe's one-epoch "
                             "result, and 2.10); the speed ratio is to the first target")
    parser.add_argument("--eval_every", type=int, default=20, help="steps between held-out evaluations")
    parser.add_argument("--work_dir", default="out/speedrun", help="where each recipe's run is written")
    parser.add_argument("--json", default=None, help="also write every curve to this JSON file")
    args = parser.parse_args()
    targets = args.target or [2.286, 2.10]
    recipes = [(r, RECIPES[r]) if r in RECIPES else tuple(r.split("=", 1)) for r in args.recipe or ["default"]]
    for r in recipes:
        if len(r) != 2:
            parser.error(f"--recipe {r[0]!r}: not one of {', '.join(RECIPES)} and not label=flags")
    from common import environment, print_table

    from minillm.data.tokenizer import load_tokenizer

    torch.set_num_threads(2)
    docs, tokens, n_bytes = eval_set(load_tokenizer(None))
    print(f"# {environment(torch.device('cpu'))}")
    curves, walls = {}, {}
    for label, flags in recipes:
        start = time.perf_counter()
        curves[label] = run_recipe(label, flags, args, tokens, n_bytes)
        walls[label] = time.perf_counter() - start
    if args.baseline:
        start = time.perf_counter()
        curves[BASELINE] = run_baseline(args, docs, tokens, n_bytes)
        walls[BASELINE] = time.perf_counter() - start
    for label, points in curves.items():
        print(f"{label}: " + ", ".join(f"{s:.0f}s {b:.3f}" for s, _, b in points))
    first = next(iter(curves))
    reference = time_to(curves[first], targets[0])
    rows = []
    for label, points in curves.items():
        times = [time_to(points, t) for t in targets]
        ratio = f"{reference / times[0]:.2f}x" if times[0] and reference else "-"
        rows.append([label, f"{points[-1][2]:.4f}", f"{points[-1][0]:.0f}", f"{walls[label]:.0f}", str(points[-1][1]),
                     *(f"{t:.0f}" if t else "not reached" for t in times), ratio])
    print_table(["recipe", "final bits/byte", "training s", "wall s", "steps", *(f"s to {t}" for t in targets),
                 f"speed to {targets[0]} vs {first}"], rows)
    if args.json:
        Path(args.json).write_text(json.dumps({"targets": targets, "minutes": args.minutes, "curves": curves,
                                               "wall_seconds": walls}))


if __name__ == "__main__":
    main()
