"""Pretrain a minillm model: python train_pretrain.py, or torchrun --nproc_per_node=N train_pretrain.py."""

import sys

from minillm.cli import main

# This stage's defaults; every other flag's default is in `python train_pretrain.py --help`.
# They won bench/speedrun.py on a 2-core CPU (bench/RESULTS.md, "Speedrun"): on 2.1M tokens a CPU hour is
# better spent on a small model (4 x 256, 4.6M parameters) seeing the corpus five times in short
# 2,048-token steps than on one pass of the 26M model (the `v0` recipe, today's LMConfig default shape).
DEFAULTS = dict(
    out_dir="out/pretrain",
    data_path="dataset/pretrain.jsonl",
    learning_rate=2e-3,
    warmup_steps=20,
    epochs=5,
    batch_size=16,
    max_length=128,
    num_hidden_layers=4,
    hidden_size=256,
    num_attention_heads=4,
    num_key_value_heads=2,
)

if __name__ == "__main__":
    sys.exit(main("pretrain", DEFAULTS))
