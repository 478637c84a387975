"""Pretrain a minillm model: python train_pretrain.py, or torchrun --nproc_per_node=N train_pretrain.py."""

import sys

from minillm.cli import main

if __name__ == "__main__":
    sys.exit(main("pretrain"))
