"""Greedy decoding throughput of minillm's generate vs transformers' generate on the same weights.

Both sides decode with their KV cache (minillm: preallocated buffers; transformers: its default
dynamic cache), greedy, no end-of-sequence stop, so every row gets exactly --new_tokens tokens after
a random --prompt_len-token prompt. The generated ids are asserted identical; then calls alternate
between the sides after warm-up, and new tokens per second (prefill included) come from the median.

    python bench/generate_throughput.py                  # batch 1 and batch 8, 64 + 128 tokens
    python bench/generate_throughput.py --batch_sizes 1 --rounds 20
    python bench/generate_throughput.py --batch_sizes 1 --rounds 2 --no_memory --profile 2   # where decode time goes
    python bench/generate_throughput.py --compile minillm   # minillm's generate(compile=True) vs eager HF

--compile minillm runs minillm's decode steps through torch.compile (generate(compile=True)); --compile
both also gives transformers its own compiled path: a static cache with generate's auto-compilation
(CompileConfig mode "default", allowed on every device). Compilation happens in the first (untimed) call;
its time is printed.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch
from common import (
    SIDES,
    add_common_args,
    add_json_flag,
    environment,
    load_side,
    median,
    paired_speedup,
    peak_memory,
    print_profile,
    print_table,
    resolve_device,
    setup,
    time_alternating,
    write_checkpoint,
    write_json,
)

from minillm.infer.generation import generate

# Noise added to the fresh weights: greedy decoding of an untrained model is full of near-ties that
# float rounding could break either way; perturbed weights give clear winners.
WEIGHT_NOISE = 0.1  # smallest top-2 logit gap then ~1e-3 at batch 1 and 8 (0.05 left a 1.3e-5 tie)


def make_generate(side: str, model: torch.nn.Module, device: torch.device, batch_size: int, prompt_len: int,
                  new_tokens: int, seed: int, compile: bool = False):
    """A closure that decodes `new_tokens` greedily from a fixed random prompt; returns [B, new] ids."""
    g = torch.Generator().manual_seed(seed)
    # Ids from 3 on: no special tokens in the prompt.
    prompt = torch.randint(3, model.config.vocab_size, (batch_size, prompt_len), generator=g).to(device)
    if side == "minillm":
        def run() -> torch.Tensor:
            return generate(model, prompt, max_new_tokens=new_tokens, temperature=0,
                            compile=compile)[:, prompt_len:]
        return run

    model.generation_config.eos_token_id = None  # decode the full length, as minillm does without eos
    attention_mask = torch.ones_like(prompt)
    compiled = {}
    if compile:
        from transformers import CompileConfig

        config = CompileConfig(mode="default")  # "reduce-overhead" means CUDA graphs
        config._compile_all_devices = True  # generate auto-compiles only on accelerators otherwise
        compiled = dict(cache_implementation="static", compile_config=config)

    def run_hf() -> torch.Tensor:
        out = model.generate(input_ids=prompt, attention_mask=attention_mask, max_new_tokens=new_tokens,
                             min_new_tokens=None, do_sample=False, pad_token_id=model.config.pad_token_id,
                             **compiled)
        return out[:, prompt_len:]

    return run_hf


def generate_memory_workload(side, model, device, **kwargs):
    """One generate call."""
    return make_generate(side, model, device, **kwargs)


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark and print Markdown tables."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_json_flag(parser)
    add_common_args(parser)
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 8], help="prompts decoded at once")
    parser.add_argument("--prompt_len", type=int, default=64, help="tokens in each prompt")
    parser.add_argument("--new_tokens", type=int, default=128, help="tokens generated per prompt")
    parser.add_argument("--compile", nargs="?", const="both", choices=["both", "minillm"], default=None,
                        help="compiled decoding for both sides, or (--compile minillm) minillm's only")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="also profile N calls per side at each batch size (torch.profiler)")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    setup(args.threads, args.seed)

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        directory = args.model_dir or write_checkpoint(args.config, tmp, args.seed, noise=WEIGHT_NOISE)
        models = {side: load_side(side, directory, device) for side in SIDES}
        compiled = {side: args.compile == "both" or args.compile == side for side in SIDES}
        for batch_size in args.batch_sizes:
            kwargs = dict(batch_size=batch_size, prompt_len=args.prompt_len, new_tokens=args.new_tokens,
                          seed=args.seed)
            runs = {side: make_generate(side, models[side], device, compile=compiled[side], **kwargs)
                    for side in SIDES}
            ids, first_call = {}, {}
            for side in SIDES:  # the first call compiles, where asked to
                start = time.perf_counter()
                ids[side] = runs[side]()
                first_call[side] = time.perf_counter() - start
            assert ids["minillm"].shape == (batch_size, args.new_tokens), ids["minillm"].shape
            if not torch.equal(ids["minillm"], ids["transformers"]):
                diff = (ids["minillm"] != ids["transformers"]).nonzero()[0].tolist()
                raise AssertionError(f"generated tokens differ at batch {batch_size}, first at [row, step] {diff}")
            times = time_alternating(runs, args.warmup, args.rounds, device)
            if args.profile:
                print(f"batch {batch_size}:")
                print_profile(runs, args.profile)
            memory = {} if args.no_memory else peak_memory(generate_memory_workload, directory, device,
                                                           args.threads, **kwargs)
            results.append((batch_size, times, memory, first_call))

    print(f"# greedy generation: {args.model_dir or args.config}, prompt {args.prompt_len} + {args.new_tokens} "
          f"new tokens, float32; generated tokens identical; compiled: "
          f"{', '.join(side for side in SIDES if compiled[side]) or 'none'}")
    print(f"# {environment(device)}")
    header = ["batch", "side", "first call ms", "call ms (median)", "min", "new tokens/s"]
    if any(memory for _, _, memory, _ in results):
        header += ["peak MiB", "workload MiB"]
    rows, ratios = [], []
    for batch_size, times, memory, first_call in results:
        tps = {}
        for side in SIDES:
            t = median(times[side])
            tps[side] = batch_size * args.new_tokens / t
            name = side + (" (compiled)" if compiled[side] else "")
            row = [str(batch_size), name, f"{first_call[side] * 1e3:.0f}", f"{t * 1e3:.1f}",
                   f"{min(times[side]) * 1e3:.1f}", f"{tps[side]:,.1f}"]
            if memory:
                row += [f"{memory[side].peak:,.0f}", f"{memory[side].extra:,.1f}"]
            rows.append(row)
        ratios.append(f"batch {batch_size}: {tps['minillm'] / tps['transformers']:.2f}x "
                      f"(median of per-round ratios {paired_speedup(times):.2f}x)")
    print_table(header, rows)
    print("\nratio minillm / transformers tokens/s: " + "; ".join(ratios))
    write_json(args.json)


if __name__ == "__main__":
    main()
