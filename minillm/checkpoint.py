"""Training checkpoints: model weights (safetensors) plus optimizer/scaler/RNG state, written atomically.

Layout: <out_dir>/checkpoints/step_00000100/{config.json, model.safetensors, state.pt}; for a model with
LoRA adapters, {adapter_config.json, adapter_model.safetensors, state.pt} (the frozen base is not copied).
A checkpoint is written under a .tmp name and renamed only when complete, so a crash never leaves one that
looks whole.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from minillm.hf import SafetensorsCheckpoint, from_hf_state_dict
from minillm.lora import ADAPTER_CONFIG_NAME, check_same_lora, has_lora, load_adapter_weights, save_adapter

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


def save_model(model: torch.nn.Module, directory: str | Path, tokenizer=None) -> None:
    """Save the model (config + weights), or only its adapter when it has LoRA layers; plus the tokenizer."""
    if has_lora(model):
        save_adapter(model, directory)
        if tokenizer is not None:
            tokenizer.save_pretrained(directory)
    else:
        model.save_pretrained(directory, tokenizer=tokenizer)


def save_checkpoint(out_dir: str | Path, step: int, model: torch.nn.Module, state: dict[str, Any],
                    keep: int = 2) -> Path:
    """Write model weights and training state for `step`, then keep only the newest `keep` checkpoints."""
    for name, p in model.named_parameters():
        if not torch.isfinite(p).all():
            raise RuntimeError(f"refusing to checkpoint non-finite weights ({name})")
    root = Path(out_dir) / CHECKPOINT_DIR
    final = root / f"step_{step:08d}"
    tmp = root / f"step_{step:08d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    save_model(model, tmp)
    torch.save(state, tmp / STATE_NAME)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_checkpoints(out_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(out_dir: str | Path) -> list[Path]:
    """Complete checkpoints in `out_dir`, oldest first (unfinished .tmp directories are ignored)."""
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


def load_checkpoint(path: str | Path, model: torch.nn.Module) -> dict[str, Any]:
    """Copy a checkpoint's weights (or adapters) into `model` and return its training state (weights_only)."""
    path = Path(path)
    if has_lora(model):
        if not (path / ADAPTER_CONFIG_NAME).is_file():
            raise ValueError(f"{path} holds a full model, not a LoRA adapter; resume without --lora")
        check_same_lora(model, path)
        load_adapter_weights(model, path)
        return torch.load(path / STATE_NAME, map_location="cpu", weights_only=True)
    if (path / ADAPTER_CONFIG_NAME).is_file():
        raise ValueError(f"{path} holds a LoRA adapter only; resume with --lora, the same LoRA flags and the "
                         "same --init_from base model")
    weights = from_hf_state_dict(SafetensorsCheckpoint(path), model.config)
    model.load_state_dict(weights, strict=True)
    return torch.load(path / STATE_NAME, map_location="cpu", weights_only=True)
