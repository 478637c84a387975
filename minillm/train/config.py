"""TrainConfig and TrainResult: what the training loop is asked to do, validated, and what it did."""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass, field
from pathlib import Path

from minillm.device import DTYPES
from minillm.train.optim import OPTIMIZERS

REPORT_TO = ("none", "tensorboard")


@dataclass
class TrainConfig:
    """Everything the training loop needs besides the model and the data."""

    out_dir: str = "out/pretrain"
    """Directory for the final model, checkpoints/ and metrics.jsonl."""
    epochs: int = 1
    """Passes over the training data."""
    max_steps: int = 0
    """If > 0, train for this many optimizer steps instead of whole epochs (the schedule spans them)."""
    max_minutes: float = 0.0
    """If > 0, train for this many minutes of training time (held-out evaluations and checkpoints not counted), over as many epochs as fit. The budget decides when to stop, not the rate: the schedule spans --max_steps if given, else the steps the budget holds at the speed of the first timed steps (fixed once, saved with each checkpoint, so a resume is exact)."""
    batch_size: int = 16
    """Sequences per micro-batch on each process."""
    accumulation_steps: int = 1
    """Micro-batches per optimizer step (global batch = batch_size x accumulation_steps x processes)."""
    learning_rate: float = 5e-4
    """Peak learning rate; the cosine schedule decays it to learning_rate / 10."""
    warmup_steps: int = 0
    """Optimizer steps of linear warmup from 0 to the peak learning rate."""
    weight_decay: float = 0.1
    """Decoupled weight decay, applied to matrices only (not to norms, biases)."""
    optimizer: str = "adamw"
    """adamw, or muon: Muon for the blocks' hidden matrices and AdamW for embeddings, norms and biases."""
    matrix_lr: float = 0.0
    """With --optimizer muon: peak learning rate of the hidden matrices, on AdamW's scale; 0: learning_rate."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping."""
    dtype: str = "auto"
    """Autocast dtype: auto (bfloat16 on GPUs that support it, else float16; on CPUs bfloat16 where they have native bf16 matrix units, AMX or AVX512-BF16, else float32), float32, bfloat16, float16."""
    eval_dtype: str = "float32"
    """Compute dtype of the held-out loss: float32 (default), so bits/byte does not change with the machine that --dtype auto meets; bfloat16 or float16 under autocast when asked. (FSDP on GPUs computes in bf16 whatever this says.)"""
    device: str = "auto"
    """cpu, cuda, cuda:N or auto (cuda when available). Under torchrun each process takes cuda:LOCAL_RANK."""
    compile: bool = False
    """Wrap the model in torch.compile."""
    fsdp: bool = False
    """Shard parameters, gradients and optimizer state over the processes with FSDP2 (bf16 compute on GPUs); checkpoints in DCP's sharded format, resumable on another process count."""
    activation_checkpointing: bool = False
    """Recompute each transformer block in backward instead of keeping its activations: the same losses, less memory, about one more forward pass of compute."""
    loss_chunk: int = 0
    """If > 0, compute the loss over chunks of this many positions, recomputed in backward, so the [batch, seq, vocab] logits are never all in memory (large vocabularies); 0: at once."""
    seed: int = 1337
    """Seed for weights, data order and dropout; the same seed gives the same run."""
    num_workers: int = 0
    """DataLoader worker processes per training process."""
    group_by_length: bool = False
    """Batch examples of similar length together and drop all-padding columns (less compute on padding)."""
    log_every: int = 10
    """Write a line to metrics.jsonl every this many steps."""
    report_to: str = "none"
    """Also send every metrics.jsonl row to: none, or tensorboard (scalars in out_dir/runs; pip install -e ".[tensorboard]"). metrics.jsonl stays the record."""
    eval_every: int = 200
    """Measure the held-out loss every this many steps (0: only at the end)."""
    save_every: int = 500
    """Write a checkpoint every this many steps (0: only at the end)."""
    keep_checkpoints: int = 2
    """How many of the newest checkpoints to keep."""
    resume: bool = False
    """Continue from the newest complete checkpoint in out_dir."""
    overwrite: bool = False
    """Start over in an out_dir that holds an earlier run: delete its checkpoints and metrics first."""
    max_bad_steps: int = 5
    """Stop after this many non-finite losses or gradient norms in a row (each one skips its update)."""

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "accumulation_steps", "keep_checkpoints", "max_bad_steps",
                     "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_steps", "warmup_steps", "eval_every", "save_every", "num_workers", "loss_chunk"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("learning_rate", "weight_decay", "grad_clip", "max_minutes", "matrix_lr"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be a finite number, got {getattr(self, name)}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if min(self.grad_clip, self.weight_decay, self.max_minutes, self.matrix_lr) < 0:
            raise ValueError("grad_clip, weight_decay, max_minutes and matrix_lr must be >= 0")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ValueError(f"dtype must be auto or one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.report_to not in REPORT_TO:
            raise ValueError(f"report_to must be one of {', '.join(REPORT_TO)}, got {self.report_to!r}")
        if self.report_to == "tensorboard" and importlib.util.find_spec("tensorboard") is None:
            raise ValueError("report_to tensorboard needs the tensorboard package: pip install -e \".[tensorboard]\"")
        if self.eval_dtype not in DTYPES:
            raise ValueError(f"eval_dtype must be one of {', '.join(DTYPES)}, got {self.eval_dtype!r}")


@dataclass
class TrainResult:
    """What a run did."""

    losses: list[float] = field(default_factory=list)
    """Training loss of every optimizer step run in this call (token-weighted over the global batch)."""
    eval_loss: float | None = None
    """Final held-out loss (mean NLL per token), if eval documents were given."""
    eval_bits_per_byte: float | None = None
    """The same loss in bits per UTF-8 byte of the held-out text (set by the CLI, which has the text)."""
    steps: int = 0
    """Optimizer steps completed in total (including those before a resume)."""
    start_step: int = 0
    """The step this call started from (0, or the resumed checkpoint's)."""
    tokens: int = 0
    """Input positions processed in this call, over all processes."""
    seconds: float = 0.0
    """Wall time of the loop in this call."""
    train_seconds: float = 0.0
    """Training time of the whole run, before a resume included: the clock --max_minutes counts."""
    total_tokens: int = 0
    """Input positions trained on in the whole run, before a resume included, over all processes."""
    interrupted: bool = False
    """True when a signal or should_stop ended the run early (a checkpoint was saved)."""
    checkpoint: Path | None = None
    """The checkpoint written last (on rank 0)."""
    skipped_steps: int = 0
    """Updates skipped because the loss or the gradient norm was not finite."""
