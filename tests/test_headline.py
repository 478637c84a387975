"""The README's headline results, recomputed from the shipped recipe (issue 32, item 14).

Marked `slow` and opt-in: `python -m pytest -m slow tests/test_headline.py` runs the default pretraining and SFT
in float32 (the dtype the README's numbers were measured in; about 70 minutes on a 2-core CPU), then eval_ppl.py
and eval_tasks.py, and compares with the numbers README.md prints. An edit of the README that no rerun backs,
or a change to the recipe that moves its result, fails here. Tolerances are the measurement's own noise: 0.02
bits per byte (a float32 run on another CPU rounds differently), and each rate's 95% Wilson interval.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys

import pytest
from conftest import REPO

pytestmark = pytest.mark.slow

# The README row the default SFT model is compared with (the bold one, not the first run's).
CHAT_ROW = "default + default SFT (1e-3 x 2"


def readme_row(label: str) -> list[str]:
    """The cells of the table row, in README.md or a page of docs/, whose first cell contains `label` (bold marks
    removed)."""
    text = "\n".join(p.read_text(encoding="utf-8") for p in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))])
    for line in text.splitlines():
        cells = [c.strip().replace("**", "") for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and label in cells[0]:
            return cells
    raise AssertionError(f"neither README.md nor docs/ has a table row for {label!r}")


def percent(cell: str) -> float:
    """'71.9%' -> 0.719."""
    return float(re.match(r"([\d.]+)%", cell).group(1)) / 100


def wilson(p: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson interval of a rate p over n trials."""
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def run(*args: str) -> None:
    """A script of the repository, from its root; its output is shown when it fails."""
    res = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 0, f"{' '.join(args)}\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}"


def within(measured: float, readme: float, n: int) -> bool:
    """The README's rate lies in the 95% interval of the rate measured over n trials."""
    lo, hi = wilson(measured, n)
    return lo <= readme <= hi


def check_against_readme(results) -> None:
    """Compare the JSON reports in `results` (eval_ppl.py and eval_tasks.py's) with README.md's tables."""
    bpb = json.loads((results / "ppl.json").read_text())["bits_per_byte"]
    readme_bpb = float(re.match(r"([\d.]+)", readme_row("default (`train_pretrain.py`)")[4]).group(1))
    assert abs(bpb - readme_bpb) <= 0.02, (bpb, readme_bpb)

    cloze = json.loads((results / "pretrained.json").read_text())["cloze"]
    assert within(cloze["accuracy"], percent(readme_row("default pretrained")[1]), cloze["n"]), cloze

    chat = json.loads((results / "chat.json").read_text())
    row = readme_row(CHAT_ROW)
    assert within(chat["cloze"]["accuracy"], percent(row[1]), chat["cloze"]["n"]), chat["cloze"]
    columns = {"tune": 2, "form": 3, "length": 4, "words": 5}
    for kind, column in columns.items():
        rate = chat["requests"]["kinds"][kind]
        # Greedy answers repeat with their prompt: the form and line-length checks ask 4 distinct prompts 25
        # times between them (README), so their rates move in whole prompts; count the distinct prompts as trials.
        trials = 4 if kind in ("form", "length") else rate["n"]
        assert within(rate["rate"], percent(row[column]), trials), (kind, rate, row[column])


def test_default_recipe_reproduces_the_readme(tmp_path):
    pretrain, sft = tmp_path / "pretrain", tmp_path / "sft"
    run("train_pretrain.py", "--dtype", "float32", "--out_dir", str(pretrain))
    run("train_sft.py", "--dtype", "float32", "--init_from", str(pretrain), "--out_dir", str(sft))
    run("eval_ppl.py", "--model", str(pretrain), "--json", str(tmp_path / "ppl.json"))
    run("eval_tasks.py", "--model", str(pretrain), "--json", str(tmp_path / "pretrained.json"))
    run("eval_tasks.py", "--model", str(sft), "--json", str(tmp_path / "chat.json"))
    check_against_readme(tmp_path)
