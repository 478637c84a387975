"""Tokenizing a corpus larger than memory: MB/s at 1 and 2 processes, peak memory, time to the first step.

The corpora are the shipped dataset/pretrain.jsonl repeated until 100 MB and 1 GB, each repetition
perturbed (its poems in another seeded order, the repetition's number before each text) so that no
two shards hold the same bytes. For each size and process count a fresh subprocess builds the sharded
cache (minillm.data.shards.build_shards, 64 MB shards) and reports its wall time and the peak resident memory
of itself and of its worker processes. Then `train_pretrain.py --max_steps 1` on the built cache
measures the time from launch to the end of the first step.

    python bench/data_scale.py                     # 100 MB and 1 GB (about 15 minutes on 2 cores)
    python bench/data_scale.py --sizes_mb 100
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import add_json_flag, print_table, write_json

REPO = Path(__file__).resolve().parent.parent

BUILD = """
import json, resource, sys, time
from minillm.data.shards import build_shards
from minillm.data.tokenizer import load_tokenizer
if __name__ == "__main__":
    tok = load_tokenizer()
    start = time.perf_counter()
    index = build_shards(sys.argv[1], tok, num_proc=int(sys.argv[2]), progress=False)
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "tokens": json.loads(index.read_text())["n_tokens"],
                      "rss_self_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "rss_workers_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))
"""


def make_corpus(path: Path, size_mb: int) -> int:
    """Write the perturbed repetitions of the shipped corpus until `size_mb` MB; the bytes written."""
    lines = (REPO / "dataset" / "pretrain.jsonl").read_text(encoding="utf-8").splitlines()
    texts = [json.loads(line)["text"] for line in lines]
    written, r = 0, 0
    with open(path, "w", encoding="utf-8") as f:
        while written < size_mb * 10**6:
            order = list(range(len(texts)))
            random.Random(r).shuffle(order)
            chunk = "".join(json.dumps({"text": f"{r} {texts[i]}"}, ensure_ascii=False) + "\n" for i in order)
            f.write(chunk)
            written += len(chunk.encode("utf-8"))
            r += 1
    return path.stat().st_size


def main() -> None:
    """Run the measurements and print a Markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_json_flag(parser)
    parser.add_argument("--sizes_mb", type=int, nargs="+", default=[100, 1000], help="corpus sizes in MB")
    parser.add_argument("--procs", type=int, nargs="+", default=[1, 2], help="tokenizer process counts")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(dir=REPO / "out" if (REPO / "out").is_dir() else None) as tmp:
        tmp = Path(tmp)
        (tmp / "build.py").write_text(BUILD)
        for size_mb in args.sizes_mb:
            corpus_dir = tmp / f"corpus{size_mb}"
            corpus_dir.mkdir()
            nbytes = make_corpus(corpus_dir / "corpus.jsonl", size_mb)
            for procs in args.procs:
                for cache in corpus_dir.glob(".minillm-tokens-*"):
                    shutil.rmtree(cache)  # build from scratch
                res = subprocess.run([sys.executable, str(tmp / "build.py"), str(corpus_dir), str(procs)],
                                     capture_output=True, text=True, cwd=REPO)
                if res.returncode:
                    raise SystemExit(res.stderr[-3000:])
                r = json.loads(res.stdout.strip().splitlines()[-1])
                start = time.perf_counter()
                first = subprocess.run(
                    [sys.executable, str(REPO / "train_pretrain.py"), "--data_path", str(corpus_dir), "--eval_data",
                     "", "--out_dir", str(tmp / "run"), "--overwrite", "--max_steps", "1", "--max_length", "256"],
                    capture_output=True, text=True, cwd=REPO)
                to_first_step = time.perf_counter() - start
                if first.returncode:
                    raise SystemExit(first.stderr[-3000:])
                rows.append([f"{nbytes / 1e6:,.0f}", str(procs), f"{r['tokens']:,}", f"{r['seconds']:.1f}",
                             f"{nbytes / 1e6 / r['seconds']:.2f}", f"{r['rss_self_mib']:,.0f}",
                             f"{r['rss_workers_mib']:,.0f}", f"{to_first_step:.1f}"])
            shutil.rmtree(corpus_dir)
    print("# sharded cache build (64 MB shards) and train_pretrain.py --max_steps 1 on it (default model)")
    header = ["corpus MB", "processes", "tokens", "build s", "MB/s", "peak RSS main MiB", "peak RSS worker MiB",
              "launch to first step s"]
    print_table(header, rows)
    write_json(args.json)


if __name__ == "__main__":
    main()
