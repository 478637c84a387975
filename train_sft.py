"""Supervised fine-tuning of a pretrained minillm model: python train_sft.py, or under torchrun."""

import sys

from minillm.cli import main

if __name__ == "__main__":
    sys.exit(main("sft"))
