"""Training checkpoints: the one definition of the training state, and the checkpointer that saves and resumes it.

Layout: <out_dir>/checkpoints/step_00000100/{config.json, model.safetensors, tokenizer files, state.pt,
manifest.json}, so a checkpoint is also a complete model directory; for a model with LoRA adapters,
{adapter_config.json, adapter_model.safetensors, ...} (the frozen base is not copied). A checkpoint is
written under a temporary name, its manifest (every file's size and sha256) last, flushed to the disk
and renamed only when complete. Resume verifies the manifest and falls back to the newest intact
checkpoint, so neither a crash nor a damaged file loses the run.
"""

from __future__ import annotations

import errno
import pickle
import re
from collections.abc import Callable
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from minillm.files import atomic_path, read_json, remove, sha256_file, write_json
from minillm.model.hf import SafetensorsCheckpoint, from_hf_state_dict
from minillm.model.lora import (
    ADAPTER_CONFIG_NAME,
    base_fingerprint,
    check_same_lora,
    has_lora,
    load_adapter_weights,
    save_adapter,
)
from minillm.train.distributed import barrier
from minillm.train.rng import rng_state, set_rng_state
from minillm.train.sharding import DCP_DIR, load_sharded, non_finite_parameter, save_sharded

CHECKPOINT_DIR = "checkpoints"
STATE_NAME = "state.pt"
MANIFEST_NAME = "manifest.json"
# Settings that fix the data order: a resume that changes them would not continue the run. The batch
# layout (batch_size x accumulation_steps x processes) may change if the global batch stays the same:
# step s always takes positions [s G, (s + 1) G) of the epoch's shuffle, however they are split. The
# optimizer's kind fixes the shape of its saved state.
EXACT_SETTINGS = ("seed", "group_by_length", "global_batch", "optimizer")
LAYOUT_SETTINGS = ("batch_size", "accumulation_steps", "processes")
SCHEDULE_SETTINGS = ("max_steps", "epochs", "max_minutes", "learning_rate", "matrix_lr", "warmup_steps")
_STEP_DIR = re.compile(r"^step_(\d+)$")


@dataclass
class TrainState:
    """Everything besides the weights that a checkpoint holds: what is saved is exactly what is loaded."""

    step: int
    """Optimizer steps completed; the data position and the learning rate follow from it."""
    optimizer: dict
    """optimizer.state_dict(): AdamW moments and step counts (empty for --fsdp runs: they are in the DCP files)."""
    scaler: dict
    """GradScaler.state_dict() (float16 loss scaling; empty when disabled)."""
    rng: list
    """rng_state() of every process, by rank: dropout and data-loader draws continue where they were."""
    world_size: int
    """Number of processes; with train_config's batch_size and accumulation_steps it fixes the data order."""
    train_config: dict
    """The whole TrainConfig of the run that wrote the checkpoint."""
    lora_base: str | None = None
    """sha256 of the frozen base weights when only LoRA adapters train (they fit no other base)."""
    identity: dict | None = None
    """What the run trains on: the data (kind, size, content) and the model's shape; fixed for a run."""
    train_seconds: float = 0.0
    """Training time up to this step (the clock of --max_minutes and of its schedule)."""
    tokens: int = 0
    """Input positions trained on up to this step, over all processes (the model card's count)."""
    horizon_steps: int = 0
    """The steps the learning-rate schedule spans (RunSchedule.horizon): --max_steps or the epochs', or what a
    --max_minutes run fixed after timing its first steps; 0 while not fixed. A resume takes it back, so the rate
    of every step is the uninterrupted run's."""
    objective: list | None = None
    """Every process's objective.state_dict(), by rank, when one is kept between steps (GRPO's --num_iterations)."""

    def to_dict(self) -> dict[str, Any]:
        """The fields as a plain dict for torch.save (not deep-copied)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, d: Any, source: str | Path = "state") -> TrainState:
        """Rebuild from to_dict(); ValueError naming `source` when a field is missing."""
        names = [f.name for f in fields(cls)]
        required = [f.name for f in fields(cls) if f.default is MISSING]  # fields added later have defaults
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
    """Write model weights and training state for `step`, then keep only the newest `keep` checkpoints.

    A failed write (a full disk) removes what it wrote and raises one RuntimeError naming the step and the
    intact previous checkpoint.
    """
    for name, p in model.named_parameters():
        if not torch.isfinite(p).all():
            raise RuntimeError(f"refusing to checkpoint non-finite weights ({name})")
    final = Path(out_dir) / CHECKPOINT_DIR / f"step_{step:08d}"
    final.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_path(final) as tmp:
            save_model(model, tmp, tokenizer)
            torch.save(state.to_dict(), tmp / STATE_NAME)
            write_manifest(tmp, step)
    except (OSError, RuntimeError) as e:
        # torch.save reports a full disk as a short write of its zip writer ("unexpected pos ...", "file
        # write failed"), not as ENOSPC; the temporary is gone by now, so free space proves nothing.
        full = (getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT)
                or any(s in str(e) for s in ("unexpected pos", "file write failed", "No space left")))
        reason = "no space left on device" if full else (getattr(e, "strerror", None) or str(e).splitlines()[0])
        previous = latest_checkpoint(out_dir)
        kept = f"the previous checkpoint {previous.name} is intact" if previous else "no earlier checkpoint exists"
        raise RuntimeError(f"{reason} while writing checkpoint step {step} in {final.parent}; {kept}") from None
    keep_newest(out_dir, keep)
    return final


def write_manifest(directory: Path, step: int) -> None:
    """Write the manifest: every file's size and sha256 (last: it vouches for the rest)."""
    files = {str(p.relative_to(directory)): {"size": p.stat().st_size, "sha256": sha256_file(p)}
             for p in sorted(directory.rglob("*")) if p.is_file()}
    write_json(directory / MANIFEST_NAME, {"step": step, "files": files})


def save_sharded_checkpoint(out_dir: str | Path, step: int, model: torch.nn.Module,
                            optimizer: torch.optim.Optimizer, state: TrainState, rank: int, keep: int = 2,
                            tokenizer=None) -> Path | None:
    """An --fsdp checkpoint (a collective): every rank writes its DCP shards; rank 0 the rest, then renames.

    Layout: dcp/ (model and optimizer shards), state.pt, the tokenizer, manifest.json; not a model directory
    (the final model is). Returns the path on rank 0, None elsewhere.
    """
    bad = non_finite_parameter(model)
    if bad is not None:
        raise RuntimeError(f"refusing to checkpoint non-finite weights ({bad})")
    final = Path(out_dir) / CHECKPOINT_DIR / f"step_{step:08d}"
    name = [None]
    if rank != 0:
        if dist.is_initialized():
            dist.broadcast_object_list(name, src=0)  # rank 0 names the temporary directory
        save_sharded(Path(name[0]) / DCP_DIR, model, optimizer)
        barrier()
        return None
    with atomic_path(final) as tmp:
        tmp.mkdir(parents=True)
        name = [str(tmp)]
        if dist.is_initialized():
            dist.broadcast_object_list(name, src=0)
        save_sharded(tmp / DCP_DIR, model, optimizer)
        barrier()  # every rank's shards are on disk
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        torch.save(state.to_dict(), tmp / STATE_NAME)
        write_manifest(tmp, step)
    keep_newest(out_dir, keep)
    return final


def keep_newest(out_dir: str | Path, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints (keep 0: none are deleted)."""
    for old in list_checkpoints(out_dir)[:-keep] if keep > 0 else []:
        delete_checkpoint(old)


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


def verify_checkpoint(path: Path) -> str | None:
    """Why the checkpoint at `path` is damaged (a file missing, cut short or changed), or None if intact."""
    manifest_path = path / MANIFEST_NAME
    if not manifest_path.is_file():
        return None  # written by a minillm without manifests: nothing to verify against
    try:
        files = read_json(manifest_path)["files"]
        for name, expected in files.items():
            f = path / name
            if not f.is_file():
                return f"{name} is missing"
            if f.stat().st_size != expected["size"]:
                return f"{name} has {f.stat().st_size} bytes, the manifest says {expected['size']}"
            if sha256_file(f) != expected["sha256"]:
                return f"{name} does not match its checksum"
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        return f"{MANIFEST_NAME} is damaged ({e})"
    return None


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The newest complete checkpoint, or None."""
    found = list_checkpoints(out_dir)
    return found[-1] if found else None


class DamagedCheckpoint(ValueError):
    """A checkpoint whose files are missing, cut short or changed since they were written."""


def read_state(path: str | Path) -> TrainState:
    """The training state of a checkpoint (weights_only: never unpickles code); DamagedCheckpoint if unreadable."""
    path = Path(path)
    try:
        raw = torch.load(path / STATE_NAME, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as e:
        # weights_only refuses any pickled object other than tensors and plain values; its own message
        # suggests weights_only=False, which would run whatever code the file carries.
        reason = ("it holds objects other than tensors and plain values" if isinstance(e, pickle.UnpicklingError)
                  else f"unreadable: {str(e).splitlines()[0]}")
        raise DamagedCheckpoint(f"{path / STATE_NAME}: not a minillm training state ({reason}); it will not be "
                                "unpickled") from None
    return TrainState.from_dict(raw, path / STATE_NAME)


def check_checkpoint_kind(path: Path, model: torch.nn.Module) -> None:
    """Refuse adapters for a full model and a full model for adapters, or adapters of another shape."""
    if has_lora(model):
        if not (path / ADAPTER_CONFIG_NAME).is_file():
            raise ValueError(f"{path} holds a full model, not a LoRA adapter; resume without --lora")
        check_same_lora(model, path)
    elif (path / ADAPTER_CONFIG_NAME).is_file():
        raise ValueError(f"{path} holds a LoRA adapter only; resume with --lora, the same LoRA flags and the "
                         "same --init_from base model")


def load_weights(path: Path, model: torch.nn.Module) -> None:
    """Copy a checkpoint's weights (or adapters) into `model`."""
    if has_lora(model):
        load_adapter_weights(model, path)
    else:
        model.load_state_dict(from_hf_state_dict(SafetensorsCheckpoint(path), model.config), strict=True)


def load_checkpoint(path: str | Path, model: torch.nn.Module) -> TrainState:
    """Copy a checkpoint's weights (or adapters) into `model` and return its training state."""
    path = Path(path)
    state = read_state(path)
    check_checkpoint_kind(path, model)
    load_weights(path, model)
    return state


def _with_layout(config: dict, world_size: int) -> dict:
    """A train_config with the process count and the global batch it implies."""
    batch = config.get("batch_size", 1) * config.get("accumulation_steps", 1) * world_size
    # Checkpoints written before --optimizer existed hold AdamW's state.
    return {"optimizer": "adamw", **config, "processes": world_size, "global_batch": batch}


def _differences(old: dict, new: dict, keys) -> list[str]:
    return [f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]


class Checkpointer:
    """Saves the training state of a run to out_dir/checkpoints and restores it on --resume.

    `model` is the plain module (not the DDP/compiled wrapper). Every process calls save() (the RNG
    states are gathered from all ranks); rank 0 alone writes. `identity` describes the data and the model
    (what a resumed run must share); `log` prints notes (on rank 0).
    """

    def __init__(self, out_dir: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 scaler: torch.amp.GradScaler, train_config: dict, rank: int = 0, world_size: int = 1,
                 keep: int = 2, tokenizer=None, identity: dict | None = None,
                 log: Callable[[str], None] = print, sharded: bool = False, objective: object = None) -> None:
        self.out_dir, self.model, self.optimizer, self.scaler = Path(out_dir), model, optimizer, scaler
        self.train_config, self.rank, self.world_size = train_config, rank, world_size
        self.keep, self.tokenizer, self.identity = keep, tokenizer, identity or {}
        self.sharded = sharded  # --fsdp: model and optimizer in DCP files
        self.objective = objective if hasattr(objective, "state_dict") else None  # one with state between steps
        self.log = log if rank == 0 else (lambda message: None)
        # With LoRA the base weights are frozen and not in the checkpoint: record which base it fits.
        self.lora_base = base_fingerprint(model) if has_lora(model) else None

    def capture(self, step: int, train_seconds: float = 0.0, tokens: int = 0, horizon_steps: int = 0) -> TrainState:
        """The live training state after `step` optimizer steps (a collective under torch.distributed)."""
        rngs = self._by_rank(rng_state())
        objective = self._by_rank(self.objective.state_dict()) if self.objective is not None else [None]
        objective = None if all(s is None for s in objective) else objective
        optimizer = {} if self.sharded else self.optimizer.state_dict()
        return TrainState(step=step, optimizer=optimizer, scaler=self.scaler.state_dict(),
                          rng=rngs, world_size=self.world_size, train_config=self.train_config,
                          lora_base=self.lora_base, identity=self.identity, train_seconds=train_seconds,
                          tokens=tokens, horizon_steps=horizon_steps, objective=objective)

    def _by_rank(self, value: object) -> list:
        """`value` of every process, by rank (a collective under torch.distributed)."""
        if self.world_size == 1:
            return [value]
        values = [None] * self.world_size
        dist.all_gather_object(values, value)
        return values

    def check_compatible(self, state: TrainState, source: Path) -> None:
        """Refuse a resume that would not continue the same run; note the settings it may change."""
        if self.lora_base is not None and (state.lora_base or self.lora_base) != self.lora_base:
            raise ValueError(f"{source} holds adapters trained on another base model; resume with the "
                             "same --init_from weights")
        old, new = state.train_config, self.train_config
        old, new = _with_layout(old, state.world_size), _with_layout(new, self.world_size)
        exact = (*EXACT_SETTINGS, *LAYOUT_SETTINGS) if old.get("group_by_length") else EXACT_SETTINGS
        refused = _differences(old, new, exact)
        for part in ("data", "model"):
            if state.identity and part in state.identity:
                refused += [f"{part} {d}" for d in _differences(state.identity[part], self.identity.get(part, {}),
                                                                state.identity[part])]
        if refused:
            raise ValueError(f"{source} was written by a run with other settings ({'; '.join(refused)}): "
                             "resume with the same values to continue the same data order, or start a new "
                             "run (another --out_dir, or --overwrite)")
        allowed = [k for k in new if k in old and k not in (*EXACT_SETTINGS, "resume", "overwrite")]
        if refused == [] and _differences(old, new, LAYOUT_SETTINGS):
            self.log(f"note: the global batch ({new['global_batch']}) is split differently; the data order "
                     "continues exactly")
        changed = _differences(old, new, allowed)
        if changed:
            self.log(f"note: resuming with changed settings: {'; '.join(changed)}")
        if _differences(old, new, SCHEDULE_SETTINGS):
            self.log("note: the learning-rate schedule is refitted to the new settings: warmup and cosine now span "
                     f"the new run, so step {state.step} continues at the rate the new schedule gives it (a longer "
                     "run jumps back up the cosine, a shorter one down), not where the old schedule left off")

    def restore(self, state: TrainState) -> None:
        """Put a loaded state back into the optimizer, the scaler and the RNGs."""
        if not self.sharded:
            self.optimizer.load_state_dict(state.optimizer)
        self.scaler.load_state_dict(state.scaler)
        set_rng_state(state.rng[self.rank] if self.rank < len(state.rng) else state.rng[0])
        if state.objective and len(state.objective) != self.world_size:
            raise ValueError(f"this checkpoint was saved between the --num_iterations updates of one rollout by "
                             f"{len(state.objective)} processes; resume it with {len(state.objective)}")
        if self.objective is not None:
            self.objective.load_state_dict(state.objective[self.rank] if state.objective else None)

    def save(self, step: int, train_seconds: float = 0.0, tokens: int = 0, horizon_steps: int = 0) -> Path | None:
        """Write the checkpoint of `step` (rank 0); returns its path there, None elsewhere."""
        state = self.capture(step, train_seconds, tokens, horizon_steps)
        if self.sharded:
            return save_sharded_checkpoint(self.out_dir, step, self.model, self.optimizer, state, self.rank,
                                           self.keep, self.tokenizer)
        if self.rank != 0:
            return None
        return save_checkpoint(self.out_dir, step, self.model, state, keep=self.keep, tokenizer=self.tokenizer)

    def resume(self) -> tuple[TrainState | None, Path | None]:
        """Load the newest intact checkpoint into the model and the training state; (its state, its path).

        A damaged checkpoint is skipped with a note naming it and why; (None, None) when none is left.
        """
        for path in reversed(list_checkpoints(self.out_dir)):
            try:
                damage = verify_checkpoint(path)
                if damage is not None:
                    raise DamagedCheckpoint(damage)
                state = read_state(path)
            except DamagedCheckpoint as e:
                self.log(f"skipping checkpoint {path}: {e}")
                continue
            check_checkpoint_kind(path, self.model)
            self.check_compatible(state, path)
            if (path / DCP_DIR).is_dir() != self.sharded:
                raise ValueError(f"{path} was written by a run {'with' if not self.sharded else 'without'} "
                                 "--fsdp; resume with the same setting")
            if self.sharded:
                load_sharded(path / DCP_DIR, self.model, self.optimizer)
            else:
                load_weights(path, self.model)
            self.restore(state)
            return state, path
        return None, None
