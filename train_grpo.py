"""Reinforcement learning (GRPO) of a chat model on verifiable rewards: python train_grpo.py, or under torchrun."""

import sys

from minillm.cli import main

# This stage's defaults; every other flag's default is in `python train_grpo.py --help`. README's pipeline adds
# --kl_beta 0.04 (the flag's default stays 0, as TRL's): it kept the SFT model's tune and cloze (bench/RESULTS.md).
DEFAULTS = dict(
    out_dir="out/grpo",
    data_path="dataset/dpo.jsonl",  # the prompts of the preference pairs: the requests the SFT model follows least
    init_from="out/sft",
    learning_rate=2e-4,  # measured on the 4.6M default (docs/rl.md, "Post-training")
    warmup_steps=0,
    epochs=1,
    max_minutes=20.0,  # about 220 of the epoch's 350 steps on a 2-core CPU: the stage fits in 30 minutes
    batch_size=4,  # prompts per micro-batch; x --group_size completions each
    max_length=128,  # the longest prompt kept
    group_by_length=True,
)

if __name__ == "__main__":
    sys.exit(main("grpo", DEFAULTS))
