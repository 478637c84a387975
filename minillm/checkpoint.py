"""Training checkpoints: the one definition of the training state, and the checkpointer that saves and resumes it.

Layout: <out_dir>/checkpoints/step_00000100/{config.json, model.safetensors, tokenizer files, state.pt}, so
a checkpoint is also a complete model directory; for a model with LoRA adapters, {adapter_config.json,
adapter_model.safetensors, state.pt} (the frozen base is not copied). A checkpoint is written under a
temporary name, flushed to the disk and renamed only when complete, so a crash never leaves one that
looks whole.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from minillm.files import atomic_path, remove
from minillm.hf import SafetensorsCheckpoint, from_hf_state_dict
from minillm.lora import (
    ADAPTER_CONFIG_NAME,
    base_fingerprint,
    check_same_lora,
    has_lora,
    load_adapter_weights,
    save_adapter,
)

CHECKPOINT_DIR = "checkpoints"
STATE_NAME = "state.pt"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def rng_state() -> dict[str, Any]:
    """The RNG states of Python, NumPy, torch and CUDA, as tensors and plain values (weights_only-safe)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what rng_state() captured."""
    random.setstate((state["python"][0], tuple(state["python"][1]), state["python"][2]))
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class TrainState:
    """Everything besides the weights that a checkpoint holds: what is saved is exactly what is loaded."""

    step: int
    """Optimizer steps completed; the data position and the learning rate follow from it."""
    optimizer: dict
    """optimizer.state_dict(): AdamW moments and step counts."""
    scaler: dict
    """GradScaler.state_dict() (float16 loss scaling; empty when disabled)."""
    rng: list
    """rng_state() of every process, by rank: dropout and data-loader draws continue where they were."""
    batch_size: int
    """Sequences per micro-batch per process; with the next two it fixes the data order."""
    accumulation_steps: int
    """Micro-batches per optimizer step."""
    world_size: int
    """Number of processes."""
    train_config: dict
    """The whole TrainConfig of the run that wrote the checkpoint."""
    lora_base: str | None = None
    """sha256 of the frozen base weights when only LoRA adapters train (they fit no other base)."""

    def to_dict(self) -> dict[str, Any]:
        """The fields as a plain dict for torch.save (not deep-copied)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, d: Any, source: str | Path = "state") -> TrainState:
        """Rebuild from to_dict(); ValueError naming `source` when a field is missing."""
        names = [f.name for f in fields(cls)]
        required = [f.name for f in fields(cls) if f.name != "lora_base"]
        missing = [n for n in required if not isinstance(d, dict) or n not in d]
        if missing:
            raise ValueError(f"{source}: not a minillm training state (missing {', '.join(missing)})")
        return cls(**{n: d[n] for n in names if n in d})


def save_model(model: torch.nn.Module, directory: str | Path, tokenizer=None) -> None:
    """Save the model (config + weights), or only its adapter when it has LoRA layers; plus the tokenizer."""
    if has_lora(model):
        save_adapter(model, directory)
        if tokenizer is not None:
            tokenizer.save_pretrained(directory)
    else:
        model.save_pretrained(directory, tokenizer=tokenizer)


def save_checkpoint(out_dir: str | Path, step: int, model: torch.nn.Module, state: TrainState,
                    keep: int = 2, tokenizer=None) -> Path:
    """Write model weights and training state for `step`, then keep only the newest `keep` checkpoints."""
    for name, p in model.named_parameters():
        if not torch.isfinite(p).all():
            raise RuntimeError(f"refusing to checkpoint non-finite weights ({name})")
    final = Path(out_dir) / CHECKPOINT_DIR / f"step_{step:08d}"
    final.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(final) as tmp:
        save_model(model, tmp, tokenizer)
        torch.save(state.to_dict(), tmp / STATE_NAME)
    for old in list_checkpoints(out_dir)[:-keep] if keep > 0 else []:
        delete_checkpoint(old)
    return final


def delete_checkpoint(path: Path) -> None:
    """Delete a checkpoint so that no half-deleted one is left looking whole: its state goes first."""
    (path / STATE_NAME).unlink(missing_ok=True)
    remove(path)


def list_checkpoints(out_dir: str | Path) -> list[Path]:
    """Complete checkpoints in `out_dir`, oldest first (unfinished temporary directories are ignored)."""
    root = Path(out_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := _STEP_DIR.match(p.name)) and (p / STATE_NAME).is_file()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The newest complete checkpoint, or None."""
    found = list_checkpoints(out_dir)
    return found[-1] if found else None


def load_checkpoint(path: str | Path, model: torch.nn.Module) -> TrainState:
    """Copy a checkpoint's weights (or adapters) into `model` and return its training state (weights_only)."""
    path = Path(path)
    if has_lora(model):
        if not (path / ADAPTER_CONFIG_NAME).is_file():
            raise ValueError(f"{path} holds a full model, not a LoRA adapter; resume without --lora")
        check_same_lora(model, path)
        load_adapter_weights(model, path)
    elif (path / ADAPTER_CONFIG_NAME).is_file():
        raise ValueError(f"{path} holds a LoRA adapter only; resume with --lora, the same LoRA flags and the "
                         "same --init_from base model")
    else:
        model.load_state_dict(from_hf_state_dict(SafetensorsCheckpoint(path), model.config), strict=True)
    return TrainState.from_dict(torch.load(path / STATE_NAME, map_location="cpu", weights_only=True),
                                path / STATE_NAME)


class Checkpointer:
    """Saves the training state of a run to out_dir/checkpoints and restores it on --resume.

    `model` is the plain module (not the DDP/compiled wrapper). Every process calls save() (the RNG
    states are gathered from all ranks); rank 0 alone writes.
    """

    def __init__(self, out_dir: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 scaler: torch.amp.GradScaler, train_config: dict, rank: int = 0, world_size: int = 1,
                 keep: int = 2, tokenizer=None) -> None:
        self.out_dir, self.model, self.optimizer, self.scaler = Path(out_dir), model, optimizer, scaler
        self.train_config, self.rank, self.world_size = train_config, rank, world_size
        self.keep, self.tokenizer = keep, tokenizer
        # With LoRA the base weights are frozen and not in the checkpoint: record which base it fits.
        self.lora_base = base_fingerprint(model) if has_lora(model) else None

    def capture(self, step: int) -> TrainState:
        """The live training state after `step` optimizer steps (a collective under torch.distributed)."""
        rngs = [rng_state()]
        if self.world_size > 1:
            rngs = [None] * self.world_size
            dist.all_gather_object(rngs, rng_state())
        return TrainState(step=step, optimizer=self.optimizer.state_dict(), scaler=self.scaler.state_dict(),
                          rng=rngs, batch_size=self.train_config["batch_size"],
                          accumulation_steps=self.train_config["accumulation_steps"], world_size=self.world_size,
                          train_config=self.train_config, lora_base=self.lora_base)

    def restore(self, state: TrainState, source: Path) -> None:
        """Put a loaded state back into the optimizer, the scaler and the RNGs; refuse what cannot continue."""
        if self.lora_base is not None and (state.lora_base or self.lora_base) != self.lora_base:
            raise ValueError(f"{source} holds adapters trained on another base model; resume with the "
                             "same --init_from weights")
        layout = (state.batch_size, state.accumulation_steps, state.world_size)
        now = (self.train_config["batch_size"], self.train_config["accumulation_steps"], self.world_size)
        if layout != now:
            raise ValueError(f"{source} was written with batch_size, accumulation_steps, processes = {layout}; "
                             f"resume with the same values to continue the same data order")
        self.optimizer.load_state_dict(state.optimizer)
        self.scaler.load_state_dict(state.scaler)
        set_rng_state(state.rng[self.rank] if self.rank < len(state.rng) else state.rng[0])

    def save(self, step: int) -> Path | None:
        """Write the checkpoint of `step` (rank 0); returns its path there, None elsewhere."""
        state = self.capture(step)
        if self.rank != 0:
            return None
        return save_checkpoint(self.out_dir, step, self.model, state, keep=self.keep, tokenizer=self.tokenizer)

    def resume(self) -> tuple[int, Path | None]:
        """Load the newest checkpoint into the model and the training state; (its step, its path), or (0, None)."""
        path = latest_checkpoint(self.out_dir)
        if path is None:
            return 0, None
        state = load_checkpoint(path, self.model)
        self.restore(state, path)
        return state.step, path
