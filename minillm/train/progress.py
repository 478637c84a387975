"""What a run shows and records as it goes: the progress bar, out_dir/metrics.jsonl, tokens/s, loss.png."""

from __future__ import annotations

import json
import time
from pathlib import Path

from tqdm import tqdm

from minillm.files import atomic_write

METRICS_NAME = "metrics.jsonl"
COMPLETIONS_NAME = "completions.jsonl"  # what GRPO sampled, with --log_completions
TENSORBOARD_DIR = "runs"  # --report_to tensorboard's event files
RUN_FILES = (METRICS_NAME, COMPLETIONS_NAME, "loss.png", TENSORBOARD_DIR)  # a run's records, besides checkpoints and the model


def _lines(path: Path) -> tuple[list[tuple[str, dict]], int]:
    """A JSON-lines file's (line, row) pairs and how many lines were unreadable (e.g. one torn by a crash)."""
    pairs, torn = [], 0
    if not path.is_file():
        return pairs, torn
    for line in path.read_bytes().decode("utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if isinstance(row, dict):
            pairs.append((line, row))
        else:
            torn += 1
    return pairs, torn


def read_metrics(path: Path) -> tuple[list[dict], int]:
    """The rows of a metrics file and how many unreadable lines were dropped (e.g. one torn by a crash)."""
    pairs, torn = _lines(path)
    return [row for _, row in pairs], torn


def trim_metrics(path: Path, last_step: int) -> int:
    """On resume, keep only rows up to the checkpoint's step (0 when there is none), each line as it was written;
    returns the torn lines dropped."""
    pairs, torn = _lines(path)
    if path.is_file():
        atomic_write(path, "".join(line + "\n" for line, row in pairs if row.get("step", 0) <= last_step))
    return torn


def plot_metrics(metrics_path: Path, png_path: Path) -> str | None:
    """Draw the loss curve (and held-out loss; GRPO's reward in a second panel) to a PNG; None when drawn, else
    why not (one line)."""
    rows, _ = read_metrics(metrics_path)
    if not any("loss" in r or "eval_loss" in r for r in rows):
        return (f"no loss.png: {metrics_path.name} holds no loss yet (the run took fewer steps than --log_every "
                "and measured no held-out loss)")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "no loss.png: matplotlib is not installed (pip install matplotlib, or minillm's [plot] extra)"
    fig = metrics_figure(rows, plt)
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
    return None


def metrics_figure(rows: list[dict], plt):
    """The figure of loss.png: training and held-out loss; below it the reward per step when the rows have one."""
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    held = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    reward = [(r["step"], r["reward"]) for r in rows if "reward" in r]
    fig, axes = plt.subplots(2 if reward else 1, 1, figsize=(7, 6.5 if reward else 4), sharex=True, squeeze=False)
    ax = axes[0, 0]
    if train:
        ax.plot(*zip(*train), label="train loss")
    if held:
        ax.plot(*zip(*held), "o-", label="held-out loss")
    ax.set_ylabel("loss (nats/token)")
    ax.legend()
    ax.grid(alpha=0.3)
    if reward:
        low = axes[1, 0]
        low.plot(*zip(*reward), color="tab:green", label="mean reward per step")
        low.set_ylabel("reward")
        low.legend()
        low.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("step")
    fig.tight_layout()
    return fig


class Progress:
    """The bar, the metrics rows and the token throughput of one run; silent on processes other than rank 0."""

    def __init__(self, out_dir: Path, log_every: int, enabled: bool, report_to: str = "none") -> None:
        self.path = Path(out_dir) / METRICS_NAME
        self.log_every, self.enabled = log_every, enabled
        self.writer = None  # TensorBoard's, when --report_to tensorboard: every row again, as scalars
        if enabled and report_to == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(Path(out_dir) / TENSORBOARD_DIR))
        self.bar: tqdm | None = None
        self.tokens = 0  # input positions in the rows logged so far, this session
        self.start_tokens = 0  # input positions before this session (a resumed run's checkpoint)
        self._window_tokens = 0
        self._t0 = self._t_window = time.perf_counter()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()  # a message printed after an error starts on a line of its own
        if self.writer is not None:  # the event file's handle, released once the run has logged everything
            self.writer.close()
            self.writer = None

    def begin(self, total_steps: int | None, start_step: int, start_tokens: int = 0) -> None:
        """Show the bar, at start_step of total_steps (None: unknown, a time budget); the clock starts now.
        metrics.jsonl's token count goes on from start_tokens (a resumed run's)."""
        self.start_tokens = start_tokens
        self.bar = tqdm(total=total_steps, initial=start_step, disable=not self.enabled, dynamic_ncols=True,
                        desc="train", unit="step")
        self._t0 = self._t_window = time.perf_counter()

    def set_total(self, total_steps: int) -> None:
        """Give the bar its total once it is known (a time budget's horizon), so that it shows an ETA."""
        if self.bar is not None and total_steps and self.bar.total != total_steps:
            self.bar.total = total_steps
            self.bar.refresh()

    def log(self, row: dict) -> None:
        """Append one row to metrics.jsonl (and its numbers to TensorBoard: train/<name>, eval/loss)."""
        if self.enabled:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
        if self.writer is not None:
            prefix = "eval" if "eval_loss" in row else "train"
            for key, value in row.items():
                if key != "step" and isinstance(value, int | float) and not isinstance(value, bool):
                    self.writer.add_scalar(f"{prefix}/{'loss' if key == 'eval_loss' else key}", value, row["step"])

    def note(self, message: str) -> None:
        """A line above the bar."""
        if self.enabled:
            tqdm.write(message)

    def step(self, step: int, tokens: int, loss: float, lr: float, metrics: dict[str, float] | None = None,
             **fields: float) -> None:
        """Count one optimizer step of `tokens` input positions; a metrics row every log_every steps.

        `metrics` (the objective's, e.g. DPO's rewards/margins) show in the bar and in every row.
        """
        metrics = metrics or {}
        self._window_tokens += tokens
        now = time.perf_counter()
        tok_s = self._window_tokens / max(now - self._t_window, 1e-9)
        self.bar.update(1)
        shown = {name.replace("rewards/", ""): f"{value:.3f}" for name, value in metrics.items()
                 if "logps" not in name and not name.startswith(("rollout_", "completions/", "clip", "kl", "moe/load_"))}
        self.bar.set_postfix(loss=f"{loss:.4f}", **shown, lr=f"{lr:.2e}", tok_s=f"{tok_s:,.0f}", refresh=False)
        if step % self.log_every == 0:
            self.tokens += self._window_tokens
            self.log({"step": step, "loss": loss, **metrics, "lr": lr, **fields, "tokens": self.start_tokens + self.tokens,
                      "tokens_per_s": tok_s})
            self._window_tokens, self._t_window = 0, now

    def samples(self, step: int, rows: list[dict], every: int = 1) -> None:
        """Append the step's sampled completions to completions.jsonl (on every `every`-th step)."""
        if self.enabled and rows and step % every == 0:
            with open(self.path.with_name(COMPLETIONS_NAME), "a", encoding="utf-8") as f:
                f.writelines(json.dumps({"step": step, **row}, ensure_ascii=False) + "\n" for row in rows)

    def last_samples(self, shown: int = 8, width: int = 60) -> str | None:
        """The last logged step's first `shown` completions as a table for the console, or None."""
        path = self.path.with_name(COMPLETIONS_NAME)
        if not self.enabled or not path.is_file():
            return None
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not rows:
            return None
        last = [r for r in rows if r["step"] == rows[-1]["step"]]

        def cell(text: str, n: int) -> str:
            text = text.replace("\n", "⏎").replace("|", "\\|")
            return text if len(text) <= n else text[:n - 1] + "…"

        lines = [f"the last sampled completions (step {rows[-1]['step']}, {min(shown, len(last))} of {len(last)}; "
                 f"all in {path}):", "| reward | advantage | request | completion |", "|---|---|---|---|"]
        lines += [f"| {r['reward']:.3f} | {r['advantage']:+.3f} | {cell(r['request'], 24)} | "
                  f"{cell(r['completion'], width)} |" for r in last[:shown]]
        return "\n".join(lines)

    def held_out(self, step: int, loss: float | None, seconds: float | None = None) -> None:
        """Record a held-out loss (with the training seconds spent so far, when given)."""
        if loss is not None:
            self.log({"step": step, "eval_loss": loss, **({"seconds": seconds} if seconds is not None else {})})
            self.note(f"step {step}: held-out loss {loss:.4f}")

    def close(self) -> tuple[int, float]:
        """Close the bar (again: a no-op); (tokens, seconds) of this session."""
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.flush()  # the run's last held-out loss comes after the bar closes
        self.tokens += self._window_tokens
        self._window_tokens = 0
        return self.tokens, time.perf_counter() - self._t0
