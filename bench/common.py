"""Shared helpers of the minillm-vs-transformers benchmarks.

Both sides are built from one checkpoint: a MiniLLM is initialised, written with save_pretrained, and
read back by MiniLLM.from_pretrained and by transformers' AutoModelForCausalLM, so the two models hold
the same weights. Timings alternate the sides round by round in one process (so background load hits
both alike) and report medians. Peak memory is measured for each side in a fresh spawned process: on
CUDA with max_memory_allocated, on the CPU as the resident-set high-water mark (VmHWM), reset after the
model is loaded so that only the workload's own memory is compared.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import re
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from minillm.data.tokenizer import load_tokenizer
from minillm.device import cpu_flags, describe_machine
from minillm.files import atomic_write
from minillm.model.config import LMConfig
from minillm.model.model import MiniLLM

SIDES = ("minillm", "transformers")

# Dense bfloat16 tensor-core peaks (no sparsity), FLOP/s, from the vendor data sheets. Matched as
# substrings of torch.cuda.get_device_name(); the first match wins, so specific names come first.
GPU_BF16_PEAK = [
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),  # SXM: "NVIDIA H100 80GB HBM3"
    ("H200", 989e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
]

# The shipped tokenizer's vocabulary, which train_pretrain.py gives a new model (6,404 since the tool-call tokens;
# LMConfig's default of 6,400 predates them, and the evaluation scripts refuse a model smaller than the tokenizer).
SHIPPED_VOCAB = load_tokenizer().vocab_size

CONFIGS = {
    # train_pretrain.py's default model: 4 layers of 256, 4 heads / 2 KV heads, about 4.6M parameters.
    "pretrain": LMConfig(vocab_size=SHIPPED_VOCAB, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2),
    # LMConfig's shape defaults: 512 hidden, 8 layers, 8 heads / 2 KV heads, about 25.8M parameters.
    "default": LMConfig(vocab_size=SHIPPED_VOCAB),
    # A GPT-2-small-sized model for GPUs: 768 hidden, 12 layers, 12 heads, vocab 32000.
    "124m": LMConfig(vocab_size=32000, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                     num_key_value_heads=12, max_position_embeddings=1024),
}


def add_common_args(parser: argparse.ArgumentParser) -> None:
    """Flags every benchmark shares."""
    parser.add_argument("--config", choices=sorted(CONFIGS), default="default", help="model size preset")
    parser.add_argument("--model_dir", default=None,
                        help="benchmark this checkpoint instead of a randomly initialised --config model")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto (cuda when available)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (torch.set_num_threads)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds per side before timing")
    parser.add_argument("--rounds", type=int, default=10, help="timed rounds per side (median reported)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and the inputs")
    parser.add_argument("--no_memory", action="store_true", help="skip the peak-memory subprocesses")


def resolve_device(name: str) -> torch.device:
    """'auto' means cuda when available."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def setup(threads: int, seed: int) -> None:
    """Fix the thread count and seed, so that runs are comparable."""
    torch.set_num_threads(threads)
    torch.manual_seed(seed)


def write_checkpoint(config_name: str, directory: Path, seed: int, noise: float = 0.0) -> Path:
    """Initialise a MiniLLM of the preset and save it in the HF layout; returns the directory.

    ``noise`` adds N(0, noise) to every parameter (norm weights too): greedy decoding of a freshly
    initialised model is full of near-ties, which a perturbed model avoids.
    """
    torch.manual_seed(seed)
    model = MiniLLM(CONFIGS[config_name])
    if noise:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g) * noise)
    model.save_pretrained(directory)
    return directory


def checkpoint_config(directory: str | Path) -> LMConfig:
    """The LMConfig of a checkpoint directory."""
    return LMConfig.from_hf_dict(json.loads((Path(directory) / "config.json").read_text(encoding="utf-8")))


def load_side(side: str, directory: str | Path, device: torch.device) -> torch.nn.Module:
    """One side's model from the shared checkpoint, float32, on the device."""
    if side == "minillm":
        return MiniLLM.from_pretrained(directory, dtype=torch.float32, device=device)
    import transformers

    transformers.utils.logging.disable_progress_bar()
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32,
                                                              attn_implementation="sdpa")
    return model.to(device).eval()


def sync(device: torch.device) -> None:
    """Wait for queued GPU work, so that a timer reads the real end."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_alternating(fns: dict[str, Callable[[], object]], warmup: int, rounds: int,
                     device: torch.device) -> dict[str, list[float]]:
    """Seconds of each call, sides interleaved (the order flips every round); warm-up rounds untimed."""
    times: dict[str, list[float]] = {side: [] for side in fns}
    order = list(fns)
    for r in range(warmup + rounds):
        for side in order if r % 2 == 0 else order[::-1]:
            sync(device)
            start = time.perf_counter()
            fns[side]()
            sync(device)
            if r >= warmup:
                times[side].append(time.perf_counter() - start)
    return times


def median(xs: list[float]) -> float:
    """Median of a non-empty list."""
    return statistics.median(xs)


def paired_speedup(times: dict[str, list[float]]) -> float:
    """Median over rounds of transformers' time / minillm's time in the same round (robust to load drift)."""
    return statistics.median(h / m for m, h in zip(times["minillm"], times["transformers"]))


def print_ratio(tps: dict[str, float], times: dict[str, list[float]]) -> None:
    """The closing line of a two-side table: ratio of median tokens/s and median of per-round ratios."""
    print(f"\nratio minillm / transformers: {tps['minillm'] / tps['transformers']:.2f}x tokens/s "
          f"(ratio of medians); median of per-round ratios {paired_speedup(times):.2f}x")


def cpu_gemm_peak(n: int = 2048, repeats: int = 10) -> float:
    """Float32 matrix-multiply FLOP/s: the best of `repeats` n x n x n products on this CPU."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    out = torch.empty(n, n)
    torch.mm(a, b, out=out)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b, out=out)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def device_peak(device: torch.device, peak_tflops: float | None) -> tuple[float, str]:
    """(FLOP/s, how it was obtained): --peak_tflops, else the card's bf16 table entry, else a measured CPU GEMM."""
    if peak_tflops:
        return peak_tflops * 1e12, "given by --peak_tflops"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, flops in GPU_BF16_PEAK:
            if key in name:
                return flops, f"bf16 dense peak of {name}"
        raise SystemExit(f"unknown GPU {name!r}: pass its bf16 dense peak with --peak_tflops")
    return cpu_gemm_peak(), "measured float32 2048^3 GEMM, best of 10"


def matmul_params(config: LMConfig) -> int:
    """Weights that take part in matrix multiplies: every Linear, the LM head included, embeddings excluded."""
    C, D = config.hidden_size, config.head_dim
    attn = C * (config.num_attention_heads + 2 * config.num_key_value_heads) * D + config.num_attention_heads * D * C
    mlp = 3 * C * config.intermediate_size
    return config.num_hidden_layers * (attn + mlp) + C * config.vocab_size


def train_flops_per_token(config: LMConfig, seq_len: int) -> float:
    """6 N (matmul weights, LM head included) + 12 L C T attention (QK^T and AV, forward and backward).

    The attention term is the PaLM paper's: it counts the full T x T score matrix, not the causal half.
    """
    return 6 * matmul_params(config) + 12 * config.num_hidden_layers * config.hidden_size * seq_len


@dataclass
class MemoryResult:
    """Peak memory of one side's workload, in MiB."""

    peak: float
    """CPU: process RSS high-water mark; CUDA: max_memory_allocated."""
    extra: float
    """What the workload added on top of the loaded model (peak - baseline)."""


def rss_kib(field: str) -> int:
    """A VmRSS/VmHWM line of /proc/self/status, in KiB."""
    status = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", status, re.M).group(1))


def _memory_child(queue, workload: Callable, side: str, directory: str, device_name: str, threads: int,
                  kwargs: dict) -> None:
    torch.set_num_threads(threads)
    device = torch.device(device_name)
    model = load_side(side, directory, device)
    queue.put(_measure(workload(side, model, device, **kwargs), device))  # the workload returns its step


def _measure(step: Callable[[], object], device: torch.device) -> tuple[float, float]:
    """(peak, peak - before) in MiB of one call of `step`, in this process."""
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        step()
        sync(device)
        peak = torch.cuda.max_memory_allocated(device)
        return peak / 2**20, (peak - base) / 2**20
    # Reset the high-water mark to the current RSS (Linux >= 4.0), so loading spikes don't count.
    Path("/proc/self/clear_refs").write_text("5")
    base = rss_kib("VmRSS")
    step()
    peak = rss_kib("VmHWM")
    return peak / 1024, (peak - base) / 1024


def twice(step: Callable[[], object]) -> Callable[[], None]:
    """Two calls of a training step: a memory workload's peak then holds the gradients and AdamW's state."""
    def both() -> None:
        step()
        step()

    return both


def _workload_child(queue, workload: Callable, device_name: str, threads: int, kwargs: dict) -> None:
    torch.set_num_threads(threads)
    device = torch.device(device_name)
    queue.put(_measure(workload(device, **kwargs), device))


def peak_memory_of(workload: Callable, device: torch.device, threads: int, **kwargs) -> MemoryResult:
    """Run `workload(device, **kwargs)()` once in a fresh spawned process (the workload builds its own models;
    a top-level function); its peak memory and what the step added."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_workload_child, args=(queue, workload, str(device), threads, kwargs))
    proc.start()
    result = queue.get()
    proc.join()
    return MemoryResult(*result)


def peak_memory(workload: Callable, directory: str | Path, device: torch.device, threads: int,
                **kwargs) -> dict[str, MemoryResult]:
    """Run `workload(side, model, device, **kwargs)()` once per side, each in a fresh spawned process."""
    ctx = mp.get_context("spawn")
    out = {}
    for side in SIDES:
        queue = ctx.Queue()
        proc = ctx.Process(target=_memory_child,
                           args=(queue, workload, side, str(directory), str(device), threads, kwargs))
        proc.start()
        result = queue.get()
        proc.join()
        out[side] = MemoryResult(*result)
    return out


def environment(device: torch.device) -> str:
    """One line naming the machine and the library versions."""
    import transformers

    load = "load average {:.2f} {:.2f} {:.2f}".format(*os.getloadavg())
    return (f"{describe_machine(device)}; torch {torch.__version__}, transformers {transformers.__version__}; {load}; "
            f"{time.strftime('%Y-%m-%d %H:%M')}")


TABLES: list[dict] = []  # every table print_table printed in this run, for write_json


def add_json_flag(parser: argparse.ArgumentParser) -> None:
    """The --json flag every benchmark takes: its tables, the machine and the command as one JSON file."""
    parser.add_argument("--json", default=None, metavar="FILE",
                        help="also write the results (every table printed), the machine, the command and the date "
                             "to FILE as JSON")


def write_json(path: str | None, **results: object) -> None:
    """Write the run's tables and `results` to `path` (nothing when None), atomically, with the machine's flags."""
    if path is None:
        return
    record = {"command": " ".join(["python", *sys.argv]), "date": time.strftime("%Y-%m-%d %H:%M"),
              "machine": describe_machine(torch.device("cpu")), "cpu_flags": cpu_flags(),
              "tables": TABLES, **results}
    atomic_write(Path(path), json.dumps(record, ensure_ascii=False, indent=1, default=str) + "\n")
    print(f"wrote {path}")


def print_table(header: list[str], rows: list[list[str]]) -> None:
    """A Markdown table (also kept for write_json)."""
    TABLES.append({"header": list(header), "rows": [list(map(str, row)) for row in rows]})
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


def print_profile(fns: dict[str, Callable[[], object]], calls: int, top: int = 8) -> None:
    """torch.profiler over `calls` calls of each side: the ops with the most self CPU time, their calls, and each
    side's total (the 'where the time goes' tables of RESULTS.md)."""
    from torch.profiler import ProfilerActivity, profile

    tables = {}
    for side, fn in fns.items():
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(calls):
                fn()
        events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
        total = sum(e.self_cpu_time_total for e in events)
        tables[side] = ({e.key: (e.self_cpu_time_total / 1e6, e.count) for e in events}, total / 1e6)
    names = list(dict.fromkeys(k for side in fns for k in list(tables[side][0])[:top]))
    rows = [[name] + [f"{tables[s][0].get(name, (0.0, 0))[0]:.2f} s ({tables[s][0].get(name, (0.0, 0))[1]} calls, "
                      f"{tables[s][0].get(name, (0.0, 0))[0] / tables[s][1]:.0%})" for s in fns] for name in names]
    rows.append(["total self CPU"] + [f"{tables[s][1]:.2f} s" for s in fns])
    print(f"\nprofile: self CPU time over {calls} calls per side")
    print_table(["op", *fns], rows)
