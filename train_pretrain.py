"""Pretrain a minillm model: python train_pretrain.py, or torchrun --nproc_per_node=N train_pretrain.py."""

import sys

from minillm.cli import main

# This stage's defaults; every other flag's default is in `python train_pretrain.py --help`.
DEFAULTS = dict(
    out_dir="out/pretrain",
    data_path="dataset/pretrain.jsonl",
    learning_rate=1e-3,
    warmup_steps=50,
    epochs=1,
    batch_size=16,
    max_length=256,
)

if __name__ == "__main__":
    sys.exit(main("pretrain", DEFAULTS))
