"""The one training loop, shared by pretraining and SFT: they differ only in the dataset they pass in.

Per optimizer step: A micro-batches (gradient accumulation) -> autocast forward -> scaled backward
(DDP syncs on the last micro-batch only) -> unscale -> clip -> optimizer step -> scaler update. The loss of a
step is token-weighted over the whole global batch (all micro-batches, all processes), so one process
with batch 2B and two processes with batch B compute the same gradient.
"""

from __future__ import annotations

import math
import signal
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict
from pathlib import Path
from typing import NamedTuple

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from minillm.data.datasets import (
    check_learnable,
    check_vocab,
    dataset_identity,
    example_lengths,
    group_by_length,
    scan_examples,
    trim_padding,
)
from minillm.device import DTYPES, resolve_device, resolve_dtype
from minillm.eval.perplexity import evaluate_perplexity
from minillm.export.model_card import remove_card
from minillm.files import DirLock, check_writable, remove, remove_stale_temporaries
from minillm.model.lora import has_lora
from minillm.model.model import MiniLLM
from minillm.train.checkpoint import (
    CHECKPOINT_DIR,
    SCHEDULE_SETTINGS,
    Checkpointer,
    list_checkpoints,
    save_model,
)
from minillm.train.config import TrainConfig, TrainResult
from minillm.train.distributed import DistEnv, all_reduce_sum, barrier
from minillm.train.objective import LanguageModeling, Objective
from minillm.train.optim import build_optimizer, set_peak_lr
from minillm.train.progress import (
    COMPLETIONS_NAME,
    METRICS_NAME,
    RUN_FILES,
    Progress,
    plot_metrics,
    trim_metrics,
)
from minillm.train.rng import seed_everything
from minillm.train.schedule import RunSchedule
from minillm.train.sharding import apply_fsdp, fsdp_policy, gathered_model, gradient_sync, is_sharded


class StopSignal:
    """Turn SIGINT/SIGTERM into a flag so the loop can finish its step and checkpoint."""

    def __init__(self) -> None:
        self.requested = False
        self.raise_now = False  # set while nothing can be finished gracefully (the final evaluation)
        self._old: dict[int, object] = {}

    def __enter__(self) -> StopSignal:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: signals stay with their default handlers
                pass
        return self

    def _handle(self, signum, frame) -> None:
        self.requested = True
        if self.raise_now:
            raise KeyboardInterrupt

    def __exit__(self, *exc) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


class StepBatches:
    """The micro-batches of every optimizer step, in the sampler's order, from any step on (exact resume).

    Each epoch is a fresh seeded shuffle split over the processes; with group_by_length, examples of
    similar length share a batch and all-padding columns are dropped. Examples that are not all labels
    (SFT, padded documents) are counted up front: none to learn is an error, mostly none a warning.
    """

    def __init__(self, dataset: Dataset, cfg: TrainConfig, env: DistEnv, repeat: int = 1) -> None:
        self.dataset, self.cfg, self.device = dataset, cfg, env.device
        self.sampler = DistributedSampler(dataset, num_replicas=env.world_size, rank=env.rank, shuffle=True,
                                          seed=cfg.seed, drop_last=True)
        per_step = cfg.batch_size * cfg.accumulation_steps
        # Each batch serves `repeat` consecutive steps (GRPO's --num_iterations: updates on the same rollouts).
        self.repeat, self._batches_per_epoch = repeat, len(self.sampler) // per_step
        self.steps_per_epoch = self._batches_per_epoch * repeat
        self._last: tuple[int, list] | None = None  # (batch index, its micro-batches), served again while repeated
        if self.steps_per_epoch == 0:
            raise ValueError(f"the dataset has {len(dataset)} examples: too few for one step of {per_step} "
                             f"examples on each of {env.world_size} processes; lower --batch_size or "
                             "--accumulation_steps")
        lengths = None
        if not getattr(dataset, "all_learned", False):  # count the labels up front: fail now, not after the run
            lengths, learned = scan_examples(dataset)
            warning = check_learnable(learned, getattr(dataset, "path", type(dataset).__name__),
                                      getattr(dataset, "max_length", None))
            if warning and env.is_main:
                print(warning, file=sys.stderr)
        self.lengths = (lengths or example_lengths(dataset)) if cfg.group_by_length else None
        self._generator = torch.Generator()  # worker seeds come from here, not the global RNG
        self._epoch: int | None = None
        self._loader: Iterator | None = None

    def _epoch_loader(self, epoch: int, skip_steps: int) -> Iterator:
        self.sampler.set_epoch(epoch)
        order = list(self.sampler)
        if self.lengths is not None:
            order = group_by_length(order, self.lengths, self.cfg.batch_size, seed=self.cfg.seed + epoch)
        order = order[skip_steps * self.cfg.batch_size * self.cfg.accumulation_steps:]
        self._generator.manual_seed(self.cfg.seed + epoch)
        return iter(DataLoader(self.dataset, batch_size=self.cfg.batch_size, sampler=order, drop_last=True,
                               num_workers=self.cfg.num_workers, pin_memory=self.device.type == "cuda",
                               generator=self._generator))

    def get(self, step: int) -> list[tuple[torch.Tensor, ...]]:
        """The (X, Y, loss_mask) micro-batches of optimizer step `step` (0-based), on the device."""
        index = step // self.repeat
        if self._last is not None and self._last[0] == index:
            return self._last[1]
        epoch, into = divmod(index, self._batches_per_epoch)
        if epoch != self._epoch:
            self._epoch, self._loader = epoch, self._epoch_loader(epoch, into)
        micro = [next(self._loader) for _ in range(self.cfg.accumulation_steps)]
        if self.cfg.group_by_length:
            micro = [trim_padding(*batch) for batch in micro]
        micro = [tuple(t.to(self.device, non_blocking=True) for t in batch) for batch in micro]
        self._last = (index, micro)
        return micro


class StepOutcome(NamedTuple):
    """What one optimizer step reports, agreed by every process."""

    loss: float
    grad_norm: float
    tokens: int
    stop: bool
    """A stop was requested on some process."""
    clock: float
    """Training seconds at the end of the step, averaged over the processes (one clock for the schedule)."""
    metrics: dict[str, float]
    """The objective's metrics, averaged over the units of the global batch, and its counters (this process's)."""
    samples: list[dict] | None = None
    """This process's rows for completions.jsonl, when the objective logs what it sampled."""


def train_step(model: torch.nn.Module, params: list[torch.nn.Parameter], optimizer: torch.optim.Optimizer,
               scaler: torch.amp.GradScaler, micro: list[tuple[torch.Tensor, ...]], amp_dtype: torch.dtype,
               env: DistEnv, grad_clip: float, stop_requested: bool, loss_chunk: int = 0,
               clock_base: float | None = None, objective: Objective | None = None) -> StepOutcome:
    """One optimizer step over the micro-batches (of the language-modelling loss unless `objective` says).

    The training clock reads clock_base + time.perf_counter() (None: the clock is not kept). The stop flag,
    the clock and the metrics ride along with the loss in one all-reduce, so they cost no extra sync.
    """
    objective = objective or LanguageModeling()
    world, names = env.world_size, objective.metric_names
    amp = lambda: torch.autocast(env.device.type, dtype=amp_dtype, enabled=amp_dtype != torch.float32)  # noqa: E731
    begin = getattr(objective, "begin_step", None)
    if begin is not None:  # an objective that needs the whole step first (GRPO samples every micro-batch's rollouts)
        with amp():
            begin(micro)
    n_global = all_reduce_sum(sum(objective.units(batch) for batch in micro).double())
    loss_sum = torch.zeros((), device=env.device)
    metric_sums = torch.zeros(len(names), device=env.device)
    tokens, counters, samples = 0, {}, []
    for i, batch in enumerate(micro):
        last = i == len(micro) - 1
        with gradient_sync(model, env, last):
            with amp():
                out = objective(model, batch, loss_chunk)
            # out.loss is this micro-batch's mean over its units (tokens, pairs); weight it by its share of the
            # global batch's units (x world: DDP and FSDP average gradients over processes).
            loss = out.loss * (objective.units(batch) * world / n_global.clamp(min=1)).float()
            scaler.scale(loss).backward()
        loss_sum += loss.detach()
        tokens += batch[0].numel() if out.tokens is None else out.tokens
        for name, value in (out.counters or {}).items():
            counters[name] = counters.get(name, 0.0) + value
        samples += out.samples or []
        if names:
            metric_sums += torch.stack([out.metrics[name].float() for name in names])
    clock = 0.0 if clock_base is None else clock_base + time.perf_counter()
    extra = torch.tensor([float(stop_requested), clock / world], device=env.device)
    reduced = all_reduce_sum(torch.cat([(loss_sum.float() / world)[None], extra, metric_sums]))
    loss_value, stop_any, seconds = reduced[:3].tolist()
    metrics = dict(zip(names, (reduced[3:].double() / n_global.clamp(min=1)).tolist()))
    scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf")).item()
    if (math.isfinite(loss_value) and math.isfinite(grad_norm)) or scaler.is_enabled():
        scaler.step(optimizer)  # with a scaler, a step with inf/nan gradients is skipped inside
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return StepOutcome(loss_value, grad_norm, tokens * world, stop_any > 0, seconds, {**metrics, **counters},
                       samples or None)


@contextmanager
def claim_out_dir(cfg: TrainConfig, env: DistEnv) -> Iterator[None]:
    """Own out_dir for the run: writable (checked now, not at the first checkpoint), locked against a second
    run, and not mixed into an earlier run's files unless --resume or --overwrite says what to do."""
    out_dir = Path(cfg.out_dir)
    check_writable(out_dir, "out_dir")
    check_writable(out_dir / CHECKPOINT_DIR, "the checkpoint folder")
    if env.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    with DirLock(out_dir) if env.is_main else nullcontext():
        earlier = list_checkpoints(out_dir)
        finished = any((out_dir / name).is_file() for name in ("model.safetensors", "adapter_model.safetensors"))
        if not cfg.resume and not earlier and not finished and (out_dir / METRICS_NAME).exists():
            # A run stopped before its first checkpoint left only metrics: nothing to continue or to protect.
            if env.is_main:
                print(f"note: {out_dir} holds {METRICS_NAME} but no checkpoint or model (a run stopped before its "
                      "first checkpoint); starting over")
                for name in RUN_FILES:
                    remove(out_dir / name)
                remove_card(out_dir)
        elif not cfg.resume and (earlier or (out_dir / METRICS_NAME).exists()):
            if not cfg.overwrite:
                what = f"checkpoints up to {earlier[-1].name}" if earlier else METRICS_NAME
                raise ValueError(f"{out_dir} already holds a run ({what}); continue it with --resume, or start "
                                 "over with --overwrite (deletes its checkpoints and metrics)")
            if env.is_main:
                for name in (CHECKPOINT_DIR, *RUN_FILES):
                    remove(out_dir / name)
                remove_card(out_dir)
        if env.is_main:
            (out_dir / CHECKPOINT_DIR).mkdir(exist_ok=True)
            remove_stale_temporaries(out_dir / CHECKPOINT_DIR)  # checkpoints a kill -9 cut short
        barrier()
        yield


def check_fsdp(model: torch.nn.Module, amp_dtype: torch.dtype, optimizer: str = "adamw") -> None:
    """Refuse what --fsdp does not support, with the way out."""
    if optimizer == "muon":
        raise ValueError("--fsdp with --optimizer muon is not supported: Muon orthogonalises whole matrices, which "
                         "FSDP2 splits over the processes; use --optimizer adamw with --fsdp")
    if has_lora(model):
        raise ValueError("--fsdp with --lora is not supported: LoRA trains a few adapters on a frozen base, "
                         "which DDP (without --fsdp) handles with less communication")
    if amp_dtype == torch.float16:
        raise ValueError("--fsdp computes in bfloat16 or float32; float16 would need a sharded loss scaler. "
                         "Use --dtype bfloat16 (or float32)")


def train(model: MiniLLM, dataset: Dataset, cfg: TrainConfig, eval_documents: list[list[int]] | None = None,
          tokenizer=None, env: DistEnv | None = None, should_stop: Callable[[int], bool] | None = None,
          objective: Objective | None = None) -> TrainResult:
    """Train `model` on `dataset` and save it to cfg.out_dir; minimise `objective` (default: language modelling
    on (X, Y, loss_mask) examples).

    `eval_documents` are token lists scored for the held-out loss. `should_stop(step)` may end the run
    after a step as a signal would: a checkpoint is saved and the result says interrupted.
    """
    objective = objective or LanguageModeling()
    env = env or DistEnv(device=resolve_device(cfg.device))
    check_vocab(dataset, model.config.vocab_size)
    seed_everything(cfg.seed)
    model.to(env.device)
    amp_dtype = resolve_dtype(cfg.dtype, env.device)
    objective.prepare(model, dataset, env.device, amp_dtype)  # before FSDP: a reference may need the whole model
    if cfg.fsdp:
        check_fsdp(model, amp_dtype, cfg.optimizer)
        if env.distributed:  # one process has nothing to shard; its checkpoints are still DCP's
            apply_fsdp(model, fsdp_policy(env.device, amp_dtype))
    scaler = torch.amp.GradScaler(env.device.type, enabled=amp_dtype == torch.float16)
    optimizer = build_optimizer(model, cfg.optimizer, cfg.learning_rate, cfg.weight_decay, env.device, cfg.matrix_lr)
    batches = StepBatches(dataset, cfg, env, repeat=getattr(objective, "num_iterations", 1))
    schedule = RunSchedule.of(cfg, batches.steps_per_epoch, warn=env.is_main)
    repeat = {"num_iterations": batches.repeat} if hasattr(objective, "num_iterations") else {}  # the data order
    identity = {"data": {**dataset_identity(dataset), **repeat}, "model": model.config.shape()}
    checkpointer = Checkpointer(cfg.out_dir, model, optimizer, scaler, asdict(cfg), env.rank, env.world_size,
                                cfg.keep_checkpoints, tokenizer, identity, sharded=cfg.fsdp, objective=objective)
    # A row per step for an objective whose steps differ (GRPO's rewards), every log_every steps otherwise.
    every = 1 if getattr(objective, "log_each_step", False) else cfg.log_every
    progress = Progress(Path(cfg.out_dir), every, env.is_main, cfg.report_to)
    with claim_out_dir(cfg, env), StopSignal() as stop, progress:
        start_step, clock, seen = _resume(checkpointer, cfg, env, schedule)
        set_peak_lr(optimizer, cfg.learning_rate, cfg.matrix_lr)  # a resume restored the saved groups' rates
        running = clock
        progress.begin(schedule.horizon or None, start_step, seen)  # a budget's horizon: once fixed
        model.activation_checkpointing = cfg.activation_checkpointing
        wrapped = torch.compile(model) if cfg.compile else model
        if env.distributed and not cfg.fsdp:
            wrapped = DDP(wrapped, device_ids=[env.device.index] if env.device.type == "cuda" else None)
        params = list(model.parameters())
        result = TrainResult(steps=start_step, start_step=start_step)
        held_out = lambda: held_out_loss(model, eval_documents, dataset, cfg, env.device)  # noqa: E731
        step, bad_in_row = start_step, 0
        wrapped.train()
        while not schedule.done(step, clock) and not result.interrupted:
            factor = schedule.lr_factor(step)
            for group in optimizer.param_groups:
                group["lr"] = group["peak_lr"] * factor
            # The clock runs during steps (data and update included), not through evaluations and checkpoints.
            # This process's own clock is `running`; the processes agree on `clock`, their mean at the step's
            # all-reduce (a part of one update behind), for the schedule and the end of the run.
            t_start = time.perf_counter()
            out = train_step(wrapped, params, optimizer, scaler, batches.get(step), amp_dtype, env, cfg.grad_clip,
                             stop.requested, cfg.loss_chunk, clock_base=running - t_start, objective=objective)
            running += time.perf_counter() - t_start
            step, clock, seen = step + 1, out.clock, seen + out.tokens
            schedule.observe(step, clock)  # a time budget without --max_steps fixes its horizon once
            progress.set_total(schedule.horizon)
            result.losses.append(out.loss)
            result.skipped_steps += not (math.isfinite(out.loss) and math.isfinite(out.grad_norm))
            # Overflow under float16 loss scaling is routine (the scaler lowers its scale); a non-finite loss,
            # or a non-finite gradient without a scaler, means the run is diverging.
            diverging = not math.isfinite(out.loss) or (not math.isfinite(out.grad_norm) and not scaler.is_enabled())
            bad_in_row = bad_in_row + 1 if diverging else 0
            if bad_in_row >= cfg.max_bad_steps:
                raise RuntimeError(f"step {step}: {bad_in_row} non-finite losses or gradient norms in a row; "
                                   "stopping. Lower --learning_rate or use --dtype bfloat16/float32; the last "
                                   "checkpoint holds finite weights.")
            progress.samples(step, out.samples or [], getattr(objective, "log_completions", 1))
            progress.step(step, out.tokens, out.loss, cfg.learning_rate * factor,
                          epoch=(step - 1) // batches.steps_per_epoch, grad_norm=out.grad_norm,
                          skipped_steps=result.skipped_steps, seconds=clock, metrics=out.metrics)
            result.interrupted = out.stop or (should_stop is not None and should_stop(step))
            last = schedule.done(step, clock)
            if cfg.eval_every and step % cfg.eval_every == 0 and not last and not result.interrupted:
                progress.held_out(step, held_out(), clock)
            if result.interrupted or (cfg.save_every and step % cfg.save_every == 0 and not last):
                result.checkpoint = checkpointer.save(step, clock, seen, schedule.horizon)
        result.tokens, result.seconds = progress.close()
        result.steps, result.train_seconds, result.total_tokens = step, clock, seen
        if result.interrupted:
            return result
        result.checkpoint = checkpointer.save(step, clock, seen, schedule.horizon)
        try:  # the last evaluation cannot stop half-way and resume: a signal abandons it at once
            stop.raise_now = True
            result.eval_loss = held_out()
        except KeyboardInterrupt:
            result.interrupted = True
            return result
        finally:
            stop.raise_now = False
        final = gathered_model(model) if is_sharded(model) else model  # under --fsdp a collective
        if env.is_main:
            progress.held_out(step, result.eval_loss, clock)
            save_model(final, cfg.out_dir, tokenizer)  # with LoRA: the adapter only
            why_not = plot_metrics(progress.path, Path(cfg.out_dir) / "loss.png")
            if why_not:
                print(f"({why_not})")
            if getattr(objective, "log_completions", 0):  # GRPO --log_completions: what it sampled last
                print(progress.last_samples() or "(no completions were logged)")
    return result


def _resume(checkpointer: Checkpointer, cfg: TrainConfig, env: DistEnv, schedule: RunSchedule
            ) -> tuple[int, float, int]:
    """With --resume: load the newest intact checkpoint and trim metrics.jsonl to it; (its step, clock, tokens).
    A time-budgeted run takes back the horizon it fixed, unless the schedule's settings changed."""
    if not cfg.resume:
        return 0, 0.0, 0
    state, path = checkpointer.resume()
    start_step, clock, tokens = (state.step, state.train_seconds, state.tokens) if state else (0, 0.0, 0)
    if state is not None and all(state.train_config.get(k) == getattr(cfg, k) for k in SCHEDULE_SETTINGS):
        schedule.restore(state.horizon_steps)
    if env.is_main:
        print(f"resumed from {path} at step {start_step}" if path else
              f"--resume: no intact checkpoint in {Path(cfg.out_dir) / CHECKPOINT_DIR}, starting from scratch")
        torn = trim_metrics(Path(cfg.out_dir) / METRICS_NAME, start_step)
        trim_metrics(Path(cfg.out_dir) / COMPLETIONS_NAME, start_step)  # what the resumed steps sample again
        if torn:
            print(f"note: dropped {torn} unreadable line{'s' * (torn > 1)} of {METRICS_NAME} (cut short by a crash "
                  "or a full disk)")
    return start_step, clock, tokens


def held_out_loss(model: MiniLLM, documents: list[list[int]] | None, dataset: Dataset, cfg: TrainConfig,
                  device: torch.device) -> float | None:
    """Mean NLL per token of the held-out documents at the training context (in cfg.eval_dtype), or None."""
    if not documents:
        return None
    return evaluate_perplexity(model, documents, max_length=getattr(dataset, "max_length", 512),
                               batch_size=cfg.batch_size, eos_id=model.config.eos_token_id, device=device,
                               dtype=DTYPES[cfg.eval_dtype], lockstep=is_sharded(model)).mean_nll
