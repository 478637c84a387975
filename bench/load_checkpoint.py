"""Loading a checkpoint: seconds and resident memory of minillm's and transformers' from_pretrained.

Each load runs in a fresh spawned process (imports done first, not counted): the time of the call, the RSS it
added, and the high-water mark during it (reset with /proc/self/clear_refs just before), against the file's size.
A float32 checkpoint is loaded by both sides, and a bfloat16 copy of it by minillm as float32 (the upcast path).

    python bench/load_checkpoint.py                 # the 25.8M shape, 5 loads per row
    python bench/load_checkpoint.py --config 124m --repeats 3
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import tempfile
import time
from pathlib import Path

import torch
from common import (
    CONFIGS,
    SIDES,
    add_json_flag,
    cpu_flags,
    load_side,
    print_table,
    rss_kib,
    write_checkpoint,
    write_json,
)

from minillm.model.model import MiniLLM


def _load_child(queue, side: str, directory: str) -> None:
    import transformers  # noqa: F401  (imports are not part of the measurement, on either side)

    Path("/proc/self/clear_refs").write_text("5")
    before = rss_kib("VmRSS")
    start = time.perf_counter()
    model = load_side(side, directory, torch.device("cpu"))
    seconds = time.perf_counter() - start
    queue.put((seconds, (rss_kib("VmHWM") - before) / 1024, (rss_kib("VmRSS") - before) / 1024))
    del model


def measure(side: str, directory: Path, repeats: int) -> list[tuple[float, float, float]]:
    """(seconds, peak MiB added, MiB added after) of `repeats` loads, each in a fresh process."""
    ctx = mp.get_context("spawn")
    out = []
    for _ in range(repeats):
        queue = ctx.Queue()
        proc = ctx.Process(target=_load_child, args=(queue, side, str(directory)))
        proc.start()
        out.append(queue.get())
        proc.join()
    return out


def span(values: list[float], fmt: str) -> str:
    """'a to b' (or 'a' when all equal after formatting)."""
    lo, hi = format(min(values), fmt), format(max(values), fmt)
    return lo if lo == hi else f"{lo} to {hi}"


def main(argv: list[str] | None = None) -> None:
    """Print the load table."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_json_flag(p)
    p.add_argument("--config", choices=sorted(CONFIGS), default="default", help="model shape (default: default)")
    p.add_argument("--repeats", type=int, default=5, help="fresh-process loads per row (default: 5)")
    args = p.parse_args(argv)
    print(f"# {cpu_flags()}; torch {torch.__version__}")
    with tempfile.TemporaryDirectory() as tmp:
        f32 = write_checkpoint(args.config, Path(tmp) / "f32", seed=0)
        bf16 = Path(tmp) / "bf16"
        MiniLLM.from_pretrained(f32).to(torch.bfloat16).save_pretrained(bf16)
        rows = []
        for label, side, directory in [(f"{s}, float32 file" , s, f32) for s in SIDES] + [
                ("minillm, bfloat16 file loaded as float32", "minillm", bf16)]:
            runs = measure(side, directory, args.repeats)
            size = (directory / "model.safetensors").stat().st_size / 2**20
            rows.append([label, f"{size:.1f}", span([r[0] for r in runs], ".2f"), span([r[1] for r in runs], ".0f"),
                         span([r[2] for r in runs], ".0f")])
    print_table(["load", "file MiB", "seconds", "peak RSS added MiB", "RSS added after MiB"], rows)
    write_json(args.json)


if __name__ == "__main__":
    main()
