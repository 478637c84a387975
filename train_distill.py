"""Distil a teacher into a student: python train_distill.py --teacher_model DIR, or under torchrun."""

import runpy
import sys
from pathlib import Path

from minillm.cli import main

# The default pretraining's student (4 x 256) and recipe on the same corpus, so that a distilled student compares
# with `python train_pretrain.py` step for step; every other default is in `python train_distill.py --help`.
PRETRAIN = runpy.run_path(str(Path(__file__).with_name("train_pretrain.py")))["DEFAULTS"]
DEFAULTS = {**PRETRAIN, "out_dir": "out/distill"}

if __name__ == "__main__":
    sys.exit(main("distill", DEFAULTS))
