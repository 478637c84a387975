"""The golden loss curve (issue 51, item 2): a tiny deterministic float32 run whose losses are committed.

A silent change to the data pipeline, the model, the optimizer or the schedule moves these numbers; a deliberate
one rewrites tests/golden/loss_curve.json in the same commit, with its reason:

    python tests/test_golden_curve.py --update "why the curve changed"

The run: train_pretrain.py on the first 200 poems of the shipped corpus (a 2-layer model of 64, float32, one
thread, fixed seed), then train_sft.py from it on the first 64 SFT records. Every step's loss, gradient norm and
learning rate is compared. The tolerance (TOLERANCE) comes from the largest relative difference between runs
that should agree, measured with --measure: 1 and 2 threads, and other kernels on the same CPU (ATen's scalar
kernels through ATEN_CPU_CAPABILITY=default, MKL's SSE4.2 path), which stand in for the vector widths of other
machines; the golden file's "measured" field records each machine's numbers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
GOLDEN = Path(__file__).resolve().parent / "golden" / "loss_curve.json"
TINY = ["--hidden_size", "64", "--num_hidden_layers", "2", "--num_attention_heads", "4", "--num_key_value_heads", "2"]
COMMON = ["--eval_data", "", "--dtype", "float32", "--log_every", "1", "--save_every", "0", "--seed", "1337"]
PRETRAIN = ["--max_length", "32", "--batch_size", "4", "--max_steps", "30", "--warmup_steps", "3",
            "--learning_rate", "2e-3", *TINY]
SFT = ["--max_length", "96", "--batch_size", "2", "--max_steps", "12", "--warmup_steps", "2", "--learning_rate", "1e-3"]
TOLERANCE = 5e-4  # relative, on each step's loss and gradient norm: 64x the largest difference measured (7.8e-6)


def head(source: Path, n: int, path: Path) -> Path:
    """The first n lines of `source` written to `path`."""
    with open(source, encoding="utf-8") as f:
        path.write_text("".join(next(f) for _ in range(n)), encoding="utf-8")
    return path


def curve(work: Path, threads: int = 1, env: dict | None = None) -> dict[str, list[list[float]]]:
    """Run the two stages in `work`; {"pretrain": [[loss, grad_norm, lr], ...], "sft": [...]}."""
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), **(env or {})}
    corpus = head(REPO / "dataset" / "pretrain.jsonl", 200, work / "pretrain.jsonl")
    sft = head(REPO / "dataset" / "sft.jsonl", 64, work / "sft.jsonl")
    out = {}
    for stage, flags in (("pretrain", ["--data_path", str(corpus), *PRETRAIN]),
                         ("sft", ["--data_path", str(sft), "--init_from", str(work / "pretrain"), *SFT])):
        done = subprocess.run([sys.executable, str(REPO / f"train_{stage}.py"), *flags, *COMMON, "--out_dir",
                               str(work / stage)], capture_output=True, text=True, timeout=600, cwd=REPO, env=env)
        assert done.returncode == 0, done.stderr[-2000:]
        rows = [json.loads(line) for line in (work / stage / "metrics.jsonl").read_text().splitlines()]
        out[stage] = [[r["loss"], r["grad_norm"], r["lr"]] for r in rows if "loss" in r]
    return out


def largest_difference(a: dict, b: dict) -> float:
    """The largest relative difference of loss or gradient norm between two curves of the same steps."""
    worst = 0.0
    for stage in a:
        assert len(a[stage]) == len(b[stage]), stage
        for x, y in zip(a[stage], b[stage]):
            for u, v in zip(x[:2], y[:2]):
                worst = max(worst, abs(u - v) / max(abs(v), 1e-12))
    return worst


def dump(record: dict) -> str:
    """The golden file's text: one line per field, and one per step ([loss, grad_norm, lr]), for readable diffs."""
    lines = []
    for key, value in record.items():
        if isinstance(value, list):
            rows = ",\n".join(f"  {json.dumps(row)}" for row in value)
            lines.append(f"{json.dumps(key)}: [\n{rows}\n ]")
        else:
            lines.append(f"{json.dumps(key)}: {json.dumps(value, ensure_ascii=False)}")
    return "{\n " + ",\n ".join(lines) + "\n}\n"


def test_the_golden_loss_curve(tmp_path):
    """Mutations caught (each moves some step past the tolerance): the data's order or masking, a model change
    (norm, RoPE, attention scale), AdamW's betas or weight decay, the warmup or the cosine floor, clipping."""
    golden = json.loads(GOLDEN.read_text())
    got = curve(tmp_path)
    for stage in ("pretrain", "sft"):
        assert len(got[stage]) == len(golden[stage]), stage
        for step, (ours, want) in enumerate(zip(got[stage], golden[stage]), start=1):
            assert abs(ours[2] - want[2]) <= 1e-12 * max(want[2], 1e-12), (stage, step, "lr", ours[2], want[2])
            for name, u, v in (("loss", ours[0], want[0]), ("grad_norm", ours[1], want[1])):
                assert abs(u - v) <= TOLERANCE * abs(v), (stage, step, name, u, v, golden["reason"])
    assert got["pretrain"][-1][0] < got["pretrain"][0][0] - 1.0  # and it learns


def main(argv: list[str]) -> None:
    """--update REASON: rerun and rewrite the golden file; --measure: the differences the tolerance covers."""
    import platform

    sys.path.insert(0, str(REPO))
    import torch

    from minillm.device import describe_machine

    with tempfile.TemporaryDirectory() as d:
        base = curve(Path(d) / "a")
        if argv[:1] == ["--update"] and len(argv) == 2:
            record = {"reason": argv[1], "machine": describe_machine(torch.device("cpu")),
                      "torch": torch.__version__, "python": platform.python_version(), **base}
            old = json.loads(GOLDEN.read_text()) if GOLDEN.is_file() else {}
            record["measured"] = old.get("measured", {})
            GOLDEN.parent.mkdir(exist_ok=True)
            GOLDEN.write_text(dump(record))
            print(f"wrote {GOLDEN}")
        elif argv[:1] == ["--measure"]:
            variants = {"2 threads": curve(Path(d) / "b", threads=2),
                        "ATEN_CPU_CAPABILITY=default": curve(Path(d) / "c", env={"ATEN_CPU_CAPABILITY": "default"}),
                        "MKL_ENABLE_INSTRUCTIONS=SSE4_2": curve(Path(d) / "e",
                                                                env={"MKL_ENABLE_INSTRUCTIONS": "SSE4_2"}),
                        "committed curve": json.loads(GOLDEN.read_text())}
            for name, other in variants.items():
                print(f"{name}: largest relative difference {largest_difference(base, other):.2e}")
        else:
            raise SystemExit("usage: python tests/test_golden_curve.py --update REASON | --measure")


if __name__ == "__main__":
    main(sys.argv[1:])
