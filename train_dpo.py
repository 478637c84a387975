"""Preference optimization (DPO) of a chat model: python train_dpo.py, or under torchrun."""

import sys

from minillm.cli import main

# This stage's defaults; every other flag's default is in `python train_dpo.py --help`.
DEFAULTS = dict(
    out_dir="out/dpo",
    data_path="dataset/dpo.jsonl",
    init_from="out/sft",
    learning_rate=5e-5,  # measured against 2e-4 on the 4.6M default (docs/rl.md, "Post-training")
    warmup_steps=0,
    epochs=1,
    batch_size=8,
    max_length=256,
    group_by_length=True,  # pairs vary in length: batch alike ones, skip all-padding columns
)

if __name__ == "__main__":
    sys.exit(main("dpo", DEFAULTS))
