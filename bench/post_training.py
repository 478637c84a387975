"""Which post-training stage does most for a chat model: SFT alone, SFT -> DPO, SFT -> GRPO, measured by
eval_tasks.py on the held-out requests, greedy and sampled (temperature 1, --samples answers per prompt).

    python bench/post_training.py --sft out/sft --out bench_post --stage dpo:--learning_rate=5e-5 \\
        --stage grpo:--learning_rate=2e-4,--max_minutes=20

Each --stage is `dpo` or `grpo`, then `:` and comma-separated flags for train_dpo.py / train_grpo.py; each
starts from --sft and writes OUT/<n>_<stage>. Every model is evaluated by the same two eval_tasks.py commands,
and one table is printed: the rates, the stage's training time and the held-out loss it ended with.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
KINDS = ("tune", "form", "length", "words")


def run(cmd: list[str], log: Path) -> float:
    """Run a script of the repository, its output to `log`; the wall seconds it took."""
    start = time.perf_counter()
    with open(log, "w", encoding="utf-8") as f:
        res = subprocess.run([sys.executable, *cmd], cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
    if res.returncode:
        sys.exit(f"{' '.join(cmd)} failed (exit {res.returncode}); see {log}")
    return time.perf_counter() - start


def evaluate(model: Path, out: Path, samples: int) -> dict:
    """Greedy cloze + requests, and sampled requests: {name: rate}."""
    greedy, sampled = out / f"{model.name}_greedy.json", out / f"{model.name}_t1.json"
    run(["eval_tasks.py", "--model", str(model), "--json", str(greedy)], out / f"{model.name}_greedy.log")
    run(["eval_tasks.py", "--model", str(model), "--tasks", "requests", "--temperature", "1", "--samples",
         str(samples), "--json", str(sampled)], out / f"{model.name}_t1.log")
    g, s = json.loads(greedy.read_text()), json.loads(sampled.read_text())
    rates = {"cloze": g["cloze"]["accuracy"]}
    for kind in KINDS:
        rates[kind] = g["requests"]["kinds"][kind]["rate"]
        rates[f"{kind} t=1"] = s["requests"]["kinds"][kind]["rate"]
    rates["copies"] = sum(k["copied"] for k in g["requests"]["kinds"].values()) / sum(
        k["n"] for k in g["requests"]["kinds"].values())
    return rates


def final_loss(model: Path) -> float | None:
    """The held-out loss the run ended with (metrics.jsonl), if it measured one."""
    path = model / "metrics.jsonl"
    if not path.is_file():
        return None
    rows = [json.loads(line) for line in path.read_text().splitlines() if "eval_loss" in line]
    return rows[-1]["eval_loss"] if rows else None


def main() -> None:
    """Run the stages and print the table."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sft", required=True, help="the SFT model every stage starts from")
    p.add_argument("--out", default="bench_post", help="folder for the models, logs and JSON (default: %(default)s)")
    p.add_argument("--stage", action="append", default=[], help="dpo or grpo, then :flag=value,flag=value")
    p.add_argument("--samples", type=int, default=4, help="sampled answers per prompt (default: %(default)s)")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table = [("sft", evaluate(Path(args.sft), out, args.samples), None, final_loss(Path(args.sft)))]
    for n, spec in enumerate(args.stage):
        stage, _, flags = spec.partition(":")
        if stage not in ("dpo", "grpo"):
            sys.exit(f"--stage {spec}: the stage must be dpo or grpo")
        model = out / f"{n}_{stage}"
        extra = [part.replace("=", " ", 1).split(" ", 1) for part in filter(None, flags.split(","))]
        cmd = [f"train_{stage}.py", "--init_from", args.sft, "--out_dir", str(model), "--overwrite",
               *[x for pair in extra for x in pair]]
        seconds = run(cmd, out / f"{model.name}.log")
        table.append((f"{stage} {flags}", evaluate(model, out, args.samples), seconds, final_loss(model)))
    names = ["cloze", *(k for kind in KINDS for k in (kind, f"{kind} t=1")), "copies"]
    print("| model | " + " | ".join(names) + " | training s | held-out loss |")
    print("|---" * (len(names) + 3) + "|")
    for label, rates, seconds, loss in table:
        cells = [f"{100 * rates[k]:.1f}%" for k in names]
        print(f"| {label} | " + " | ".join(cells) + f" | {'' if seconds is None else f'{seconds:.0f}'} | "
              + ("" if loss is None else f"{loss:.4f}") + " |")


if __name__ == "__main__":
    main()
