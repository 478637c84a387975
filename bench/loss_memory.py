"""Memory and time of the training loss for a large vocabulary: the whole [B, T, V] logits against --loss_chunk.

Each row runs in a fresh process: hidden states [B, T, C] and a [V, C] head (the 124m preset's sizes:
C 768, V 32000), then forward and backward of the token-weighted loss, either at once
(`masked_cross_entropy(head(h))`, what `--loss_chunk 0` does) or in chunks (`chunked_cross_entropy`).
It reports the peak resident memory above the inputs (VmHWM, reset after setup), the seconds per
forward + backward, and the largest difference of the loss and of the gradients from the whole-logits
row (computed in the same process, after the measured pass).

    python bench/loss_memory.py                         # batch 16 x 1024: 2 GB of float32 logits at once
    python bench/loss_memory.py --batch_size 4 --chunks 0,256
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
from common import add_json_flag, write_json


def inputs(args: argparse.Namespace) -> tuple[torch.Tensor, torch.nn.Linear, torch.Tensor]:
    """Seeded hidden states, head and labels (a few positions ignored, as padding would be)."""
    g = torch.Generator().manual_seed(0)
    h_BTC = torch.randn(args.batch_size, args.seq_len, args.hidden, generator=g)
    head = torch.nn.Linear(args.hidden, args.vocab, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(args.vocab, args.hidden, generator=g) * args.hidden ** -0.5)
    labels_BT = torch.randint(0, args.vocab, (args.batch_size, args.seq_len), generator=g)
    labels_BT[:, -7:] = -100
    return h_BTC, head, labels_BT


def loss_and_grads(h_BTC, head, labels_BT, chunk: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward and backward of one loss: (loss, dL/dh, dL/dW)."""
    from minillm.model.loss import chunked_cross_entropy, masked_cross_entropy

    h_BTC = h_BTC.detach().requires_grad_(True)
    head.zero_grad(set_to_none=True)
    if chunk:
        loss = chunked_cross_entropy(head, h_BTC, labels_BT, None, chunk)
    else:
        loss = masked_cross_entropy(head(h_BTC), labels_BT)
    loss.backward()
    return loss.detach(), h_BTC.grad, head.weight.grad


def worker(args: argparse.Namespace) -> None:
    """One row: measure one chunk setting, then compare it with the whole-logits result; print JSON."""
    from common import rss_kib

    torch.set_num_threads(args.threads)
    h_BTC, head, labels_BT = inputs(args)
    Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark: measure the loss only
    base = rss_kib("VmRSS") / 1024
    start = time.perf_counter()
    loss, dh, dw = loss_and_grads(h_BTC, head, labels_BT, args.chunk)
    seconds = time.perf_counter() - start
    peak = rss_kib("VmHWM") / 1024 - base
    dh, dw = dh.clone(), dw.clone()
    ref_loss, ref_dh, ref_dw = loss_and_grads(h_BTC, head, labels_BT, 0)
    print(json.dumps({"chunk": args.chunk, "peak_mib": peak, "seconds": seconds,
                      "loss_diff": abs(loss - ref_loss).item(), "dh_diff": (dh - ref_dh).abs().max().item(),
                      "dw_diff": (dw - ref_dw).abs().max().item()}))


def main() -> None:
    """Run every chunk setting in its own process and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_json_flag(parser)
    parser.add_argument("--batch_size", type=int, default=16, help="sequences (default: %(default)s)")
    parser.add_argument("--seq_len", type=int, default=1024, help="positions per sequence (default: %(default)s)")
    parser.add_argument("--hidden", type=int, default=768, help="hidden size C (default: %(default)s)")
    parser.add_argument("--vocab", type=int, default=32000, help="vocabulary size V (default: %(default)s)")
    parser.add_argument("--chunks", default="0,256,64",
                        help="comma-separated --loss_chunk values; 0 is the whole logits (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: %(default)s)")
    parser.add_argument("--chunk", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    from common import environment, print_table

    rows = []
    for chunk in (int(c) for c in args.chunks.split(",")):
        cmd = [sys.executable, __file__, "--worker", "--chunk", str(chunk), "--batch_size", str(args.batch_size),
               "--seq_len", str(args.seq_len), "--hidden", str(args.hidden), "--vocab", str(args.vocab),
               "--threads", str(args.threads)]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode:
            raise SystemExit(f"--loss_chunk {chunk} failed:\n{res.stderr[-3000:]}")
        r = json.loads(res.stdout.strip().splitlines()[-1])
        rows.append([str(chunk) if chunk else "0 (whole logits)", f"{r['peak_mib']:,.0f}", f"{r['seconds']:.2f}",
                     f"{r['loss_diff']:.1e}", f"{r['dh_diff']:.1e}", f"{r['dw_diff']:.1e}"])
    logits_mib = args.batch_size * args.seq_len * args.vocab * 4 / 2**20
    print(f"# loss over [{args.batch_size}, {args.seq_len}, {args.vocab}] float32 logits ({logits_mib:,.0f} MiB), "
          f"hidden {args.hidden}; forward + backward; {args.threads} threads")
    print(f"# {environment(torch.device('cpu'))}")
    print_table(["loss_chunk", "peak above inputs MiB", "s fwd+bwd", "|loss - whole|", "max |dh - whole|",
                 "max |dW - whole|"], rows)
    write_json(args.json)


if __name__ == "__main__":
    main()
