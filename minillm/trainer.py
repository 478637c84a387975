"""The one training loop, shared by pretraining and SFT: they differ only in the dataset they pass in.

Per optimizer step: A micro-batches (gradient accumulation) -> autocast forward -> scaled backward
(DDP syncs on the last micro-batch only) -> unscale -> clip -> AdamW step -> scaler update. The loss of a
step is token-weighted over the whole global batch (all micro-batches, all processes), so one process
with batch 2B and two processes with batch B compute the same gradient.
"""

from __future__ import annotations

import json
import math
import random
import signal
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm import tqdm

from minillm.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    save_model,
    set_rng_state,
)
from minillm.data import check_vocab, example_lengths, group_by_length, trim_padding
from minillm.distributed import DTYPES, DistEnv, all_reduce_sum, resolve_device, resolve_dtype
from minillm.evaluation import evaluate_perplexity
from minillm.lora import base_fingerprint, has_lora
from minillm.model import MiniLLM
from minillm.schedule import cosine_lr


@dataclass
class TrainConfig:
    """Everything the training loop needs besides the model and the data."""

    out_dir: str = "out/pretrain"
    """Directory for the final model, checkpoints/ and metrics.jsonl."""
    epochs: int = 1
    """Passes over the training data."""
    max_steps: int = 0
    """If > 0, train for this many optimizer steps instead of whole epochs (the schedule spans them)."""
    batch_size: int = 16
    """Sequences per micro-batch on each process."""
    accumulation_steps: int = 1
    """Micro-batches per optimizer step (global batch = batch_size x accumulation_steps x processes)."""
    learning_rate: float = 5e-4
    """Peak learning rate; the cosine schedule decays it to learning_rate / 10."""
    warmup_steps: int = 0
    """Optimizer steps of linear warmup from 0 to the peak learning rate."""
    weight_decay: float = 0.1
    """AdamW weight decay, applied to matrices only (not to norms, biases)."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping."""
    dtype: str = "auto"
    """Autocast dtype: auto (bfloat16 on GPUs that support it, else float16; float32 on CPU), float32, bfloat16, float16."""
    device: str = "auto"
    """cpu, cuda, cuda:N or auto (cuda when available). Under torchrun each process takes cuda:LOCAL_RANK."""
    compile: bool = False
    """Wrap the model in torch.compile."""
    seed: int = 1337
    """Seed for weights, data order and dropout; the same seed gives the same run."""
    num_workers: int = 0
    """DataLoader worker processes per training process."""
    group_by_length: bool = False
    """Batch examples of similar length together and drop all-padding columns (less compute on padding)."""
    log_every: int = 10
    """Write a line to metrics.jsonl every this many steps."""
    eval_every: int = 200
    """Measure the held-out loss every this many steps (0: only at the end)."""
    save_every: int = 500
    """Write a checkpoint every this many steps (0: only at the end)."""
    keep_checkpoints: int = 2
    """How many of the newest checkpoints to keep."""
    resume: bool = False
    """Continue from the newest complete checkpoint in out_dir."""
    max_bad_steps: int = 5
    """Stop after this many non-finite losses or gradient norms in a row (each one skips its update)."""

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "accumulation_steps", "keep_checkpoints", "max_bad_steps",
                     "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_steps", "warmup_steps", "eval_every", "save_every", "num_workers"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.grad_clip < 0 or self.weight_decay < 0:
            raise ValueError("grad_clip and weight_decay must be >= 0")
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ValueError(f"dtype must be auto or one of {', '.join(DTYPES)}, got {self.dtype!r}")


@dataclass
class TrainResult:
    """What a run did."""

    losses: list[float] = field(default_factory=list)
    """Training loss of every optimizer step run in this call (token-weighted over the global batch)."""
    eval_loss: float | None = None
    """Final held-out loss (mean NLL per token), if eval documents were given."""
    steps: int = 0
    """Optimizer steps completed in total (including those before a resume)."""
    tokens: int = 0
    """Input positions processed in this call, over all processes."""
    seconds: float = 0.0
    """Wall time of the loop in this call."""
    interrupted: bool = False
    """True when a signal or should_stop ended the run early (a checkpoint was saved)."""
    skipped_steps: int = 0
    """Updates skipped because the loss or the gradient norm was not finite."""


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only; the fused kernel on CUDA and on the CPU."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    # Fused: one kernel per tensor instead of ~8 passes over it; on the CPU that is 3x faster than the
    # default for-loop (bench/RESULTS.md).
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(0.9, 0.95), eps=1e-8,
                             fused=device.type in ("cuda", "cpu"))


class _StopSignal:
    """Turn SIGINT/SIGTERM into a flag so the loop can finish its step and checkpoint."""

    def __init__(self) -> None:
        self.requested = False
        self._old: dict[int, object] = {}

    def __enter__(self) -> _StopSignal:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: signals stay with their default handlers
                pass
        return self

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def __exit__(self, *exc) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _trim_metrics(path: Path, last_step: int) -> None:
    """On resume, drop metric lines written after the checkpoint by the run that stopped."""
    if not path.exists():
        return
    kept = [line for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= last_step]
    path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")


def plot_metrics(metrics_path: Path, png_path: Path) -> bool:
    """Draw the loss curve (and held-out loss) to a PNG when matplotlib is installed; False if it is not."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = [json.loads(line) for line in metrics_path.read_text(encoding="utf-8").splitlines() if line.strip()]
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    held = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train loss")
    if held:
        ax.plot(*zip(*held), "o-", label="held-out loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
    return True


def train(model: MiniLLM, dataset: Dataset, cfg: TrainConfig, eval_documents: list[list[int]] | None = None,
          tokenizer=None, env: DistEnv | None = None,
          should_stop: Callable[[int], bool] | None = None) -> TrainResult:
    """Train `model` on `dataset` ((X, Y, loss_mask) examples) and save it to cfg.out_dir.

    `eval_documents` are token lists scored for the held-out loss. `should_stop(step)` may end the run
    after a step as a signal would: a checkpoint is saved and the result says interrupted.
    """
    env = env or DistEnv(device=resolve_device(cfg.device))
    device, world = env.device, env.world_size
    out_dir = Path(cfg.out_dir)
    metrics_path = out_dir / "metrics.jsonl"
    check_vocab(dataset, model.config.vocab_size)
    _seed_everything(cfg.seed)

    model.to(device)
    amp_dtype = resolve_dtype(cfg.dtype, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    optimizer = build_optimizer(model, cfg, device)

    sampler = DistributedSampler(dataset, num_replicas=world, rank=env.rank, shuffle=True, seed=cfg.seed,
                                 drop_last=True)
    per_step = cfg.batch_size * cfg.accumulation_steps
    steps_per_epoch = len(sampler) // per_step
    if steps_per_epoch == 0:
        raise ValueError(f"the dataset has {len(dataset)} examples: too few for one step of {per_step} "
                         f"examples on each of {world} processes; lower --batch_size or --accumulation_steps")
    total_steps = cfg.max_steps or cfg.epochs * steps_per_epoch

    # With LoRA the base weights are frozen: checkpoints hold only the adapters, so they record which base
    # they belong to, and resuming onto another base is refused.
    lora_base = base_fingerprint(model) if has_lora(model) else None
    start_step = 0
    if cfg.resume:
        ckpt = latest_checkpoint(out_dir)
        if ckpt is None:
            if env.is_main:
                print(f"--resume: no checkpoint in {out_dir / 'checkpoints'}, starting from scratch")
        else:
            state = load_checkpoint(ckpt, model)
            if lora_base is not None and state.get("lora_base", lora_base) != lora_base:
                raise ValueError(f"{ckpt} holds adapters trained on another base model; resume with the "
                                 "same --init_from weights")
            layout = (state["batch_size"], state["accumulation_steps"], state["world_size"])
            if layout != (cfg.batch_size, cfg.accumulation_steps, world):
                raise ValueError(f"{ckpt} was written with batch_size, accumulation_steps, processes = {layout}; "
                                 f"resume with the same values to continue the same data order")
            optimizer.load_state_dict(state["optimizer"])
            scaler.load_state_dict(state["scaler"])
            start_step = state["step"]
            rngs = state["rng"]
            set_rng_state(rngs[env.rank] if env.rank < len(rngs) else rngs[0])
            if env.is_main:
                print(f"resumed from {ckpt} at step {start_step}")
                _trim_metrics(metrics_path, start_step)

    raw_model = model
    if cfg.compile:
        model = torch.compile(model)
    if env.distributed:
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)

    loader_rng = torch.Generator()  # worker seeds come from here, not the global RNG, so resume is exact
    lengths = example_lengths(dataset) if cfg.group_by_length else None

    def batches_from(epoch: int, skip_steps: int):
        sampler.set_epoch(epoch)
        order = list(sampler)
        if lengths is not None:
            order = group_by_length(order, lengths, cfg.batch_size, seed=cfg.seed + epoch)
        order = order[skip_steps * per_step:]
        loader_rng.manual_seed(cfg.seed + epoch)
        loader = DataLoader(dataset, batch_size=cfg.batch_size, sampler=order, drop_last=True,
                            num_workers=cfg.num_workers, pin_memory=device.type == "cuda", generator=loader_rng)
        return iter(loader)

    def autocast():
        return torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype != torch.float32)

    def held_out_loss() -> float | None:
        if not eval_documents:
            return None
        result = evaluate_perplexity(raw_model, eval_documents, max_length=getattr(dataset, "max_length", 512),
                                     batch_size=cfg.batch_size, eos_id=model_config.eos_token_id,
                                     device=device, dtype=amp_dtype)
        return result.mean_nll

    def checkpoint(step: int) -> None:
        rngs = [None] * world
        if env.distributed:
            dist.all_gather_object(rngs, rng_state())
        else:
            rngs = [rng_state()]
        if env.is_main:
            state = {"optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(), "step": step,
                     "epoch": step // steps_per_epoch, "batches_into_epoch": step % steps_per_epoch,
                     "batch_size": cfg.batch_size, "accumulation_steps": cfg.accumulation_steps,
                     "world_size": world, "rng": rngs, "train_config": asdict(cfg), "lora_base": lora_base}
            save_checkpoint(out_dir, step, raw_model, state, keep=cfg.keep_checkpoints)

    def log(row: dict) -> None:
        with open(metrics_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")

    model_config = raw_model.config
    if env.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    result = TrainResult(steps=start_step)
    bar = tqdm(total=total_steps, initial=start_step, disable=not env.is_main, dynamic_ncols=True,
               desc="train", unit="step")
    epoch = start_step // steps_per_epoch
    batches = batches_from(epoch, start_step % steps_per_epoch)
    bad_in_row = 0
    t0 = time.perf_counter()
    tokens_since_log, t_log = 0, t0
    step = start_step
    model.train()
    with _StopSignal() as stop:
        while step < total_steps:
            if step // steps_per_epoch != epoch:
                epoch = step // steps_per_epoch
                batches = batches_from(epoch, 0)
            lr = cosine_lr(step, total_steps, cfg.learning_rate, cfg.warmup_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr

            micro = [next(batches) for _ in range(cfg.accumulation_steps)]
            if cfg.group_by_length:
                micro = [trim_padding(*batch) for batch in micro]
            micro = [tuple(t.to(device, non_blocking=True) for t in batch) for batch in micro]
            n_global = all_reduce_sum(sum(m.sum() for _, _, m in micro).double())
            loss_sum = torch.zeros((), device=device)
            for i, (X, Y, M) in enumerate(micro):
                last = i == len(micro) - 1
                with model.no_sync() if env.distributed and not last else nullcontext():
                    with autocast():
                        out = model(X, labels=Y, loss_mask=M)
                    # out.loss is this micro-batch's token mean; weight it by its share of the global
                    # batch's tokens (x world: DDP averages gradients over processes).
                    loss = out.loss * (M.sum() * world / n_global.clamp(min=1)).float()
                    scaler.scale(loss).backward()
                loss_sum += loss.detach()
                tokens_since_log += X.numel() * world

            flags = all_reduce_sum(torch.stack([loss_sum.float() / world,
                                                torch.tensor(float(stop.requested), device=device)]))
            loss_value, stop_requested = flags[0].item(), flags[1].item() > 0

            scaler.unscale_(optimizer)
            max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
            grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), max_norm).item()
            finite = math.isfinite(loss_value) and math.isfinite(grad_norm)
            if finite or scaler.is_enabled():
                scaler.step(optimizer)  # with a scaler, a step with inf/nan gradients is skipped inside
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            result.losses.append(loss_value)
            if not finite:
                result.skipped_steps += 1
            # Overflow under float16 loss scaling is routine (the scaler lowers its scale); a non-finite
            # loss, or a non-finite gradient without a scaler, means the run is diverging.
            diverging = not math.isfinite(loss_value) or (not math.isfinite(grad_norm) and not scaler.is_enabled())
            bad_in_row = bad_in_row + 1 if diverging else 0
            if bad_in_row >= cfg.max_bad_steps:
                bar.close()
                raise RuntimeError(f"step {step}: {bad_in_row} non-finite losses or gradient norms in a row; "
                                   f"stopping. Lower --learning_rate or use --dtype bfloat16/float32; "
                                   f"the last checkpoint holds finite weights.")

            now = time.perf_counter()
            if env.is_main:
                bar.update(1)
                tok_s = tokens_since_log / max(now - t_log, 1e-9)
                bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:,.0f}", refresh=False)
            if step % cfg.log_every == 0 and env.is_main:
                log({"step": step, "epoch": epoch, "loss": loss_value, "lr": lr, "grad_norm": grad_norm,
                     "tokens": result.tokens + tokens_since_log,
                     "tokens_per_s": tokens_since_log / max(now - t_log, 1e-9),
                     "skipped_steps": result.skipped_steps})
            if step % cfg.log_every == 0:
                result.tokens += tokens_since_log
                tokens_since_log, t_log = 0, now

            interrupted = stop_requested or (should_stop is not None and should_stop(step))
            if cfg.eval_every and step % cfg.eval_every == 0 and step < total_steps and not interrupted:
                eval_loss = held_out_loss()
                if eval_loss is not None and env.is_main:
                    log({"step": step, "eval_loss": eval_loss})
                    bar.write(f"step {step}: held-out loss {eval_loss:.4f}")
            if interrupted:
                checkpoint(step)
                result.interrupted = True
                if env.is_main:
                    bar.write(f"stopped at step {step}; checkpoint saved in {out_dir / 'checkpoints'}. "
                              f"Continue with the same command plus --resume.")
                break
            if cfg.save_every and step % cfg.save_every == 0 and step < total_steps:
                checkpoint(step)

    bar.close()
    result.tokens += tokens_since_log
    result.seconds = time.perf_counter() - t0
    result.steps = step
    if result.interrupted:
        return result

    checkpoint(step)
    result.eval_loss = held_out_loss()
    if env.is_main:
        if result.eval_loss is not None:
            log({"step": step, "eval_loss": result.eval_loss})
        save_model(raw_model, out_dir, tokenizer)  # with LoRA: the adapter only
        png = out_dir / "loss.png"
        if not plot_metrics(metrics_path, png):
            print("(pip install matplotlib to get a loss-curve PNG)")
    return result
