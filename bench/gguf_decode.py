"""Batch-1 greedy decoding and prefill on the CPU: minillm (eager, compiled, int8) against llama.cpp, same weights.

One checkpoint (random weights perturbed so that greedy has clear winners, or --model_dir) is exported
with export_gguf in f32, f16 and q8_0 and run by llama.cpp through llama-cpp-python with the same
thread count as torch. Every side decodes --new_tokens greedy tokens after a --prompt_len-token prompt,
prefill included, no end-of-sequence stop; calls alternate between the sides after warm-up and the
medians are reported. llama.cpp f32 runs with an f32 KV cache (the same arithmetic as minillm, so the
same tokens); f16 and q8_0 with llama.cpp's default f16 cache. The last column is the first position
where a side's tokens leave minillm's (on random weights, small rounding differences flip near-ties).
"minillm compiled" is generate(compile=True), the decode fast path (minillm/model/linear.py); "minillm int8"
is the same after quantize_int8 (weight-only, per output row). Prefill is timed apart: a --prefill_len-token
prompt and one new token, in prompt tokens/s.

    python bench/gguf_decode.py                      # default model shape, 32 + 128 tokens, 2 threads
    python bench/gguf_decode.py --config 124m --rounds 5
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import llama_cpp
import torch
from common import (
    add_common_args,
    add_json_flag,
    environment,
    median,
    print_table,
    setup,
    time_alternating,
    write_checkpoint,
    write_json,
)

from minillm.data.tokenizer import load_tokenizer
from minillm.export.gguf import export_gguf
from minillm.export.llama_cpp_loader import load_llama_cpp
from minillm.infer.generation import generate
from minillm.model.linear import quantize_int8
from minillm.model.model import MiniLLM

WEIGHT_NOISE = 0.1  # as in generate_throughput.py: fresh weights are full of near-ties


def minillm_run(model: MiniLLM, prompt: torch.Tensor, new_tokens: int, compile: bool):
    """A closure: minillm's greedy generate, new ids as a list."""
    def run() -> list[int]:
        return generate(model, prompt, max_new_tokens=new_tokens, temperature=0, compile=compile)[0, -new_tokens:].tolist()
    return run


def llama_run(path: Path, prompt: list[int], new_tokens: int, threads: int, n_ctx: int, kv_f32: bool,
              repack: bool = True):
    """A closure: llama.cpp's greedy decoding, new ids as a list; KV cache f32, or llama.cpp's default f16.
    repack=False is llama.cpp's --no-repack."""
    kv = {"type_k": llama_cpp.GGML_TYPE_F32, "type_v": llama_cpp.GGML_TYPE_F32} if kv_f32 else {}
    llm = load_llama_cpp(path, repack=repack, n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, verbose=False,
                         **kv)

    def run() -> list[int]:
        llm.reset()
        out = []
        for token in llm.generate(prompt, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0):
            out.append(token)
            if len(out) == new_tokens:
                return out
    return run


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark and print a Markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_json_flag(parser)
    add_common_args(parser)
    parser.add_argument("--prompt_len", type=int, default=32, help="tokens in the prompt")
    parser.add_argument("--new_tokens", type=int, default=128, help="tokens generated per call")
    parser.add_argument("--prefill_len", type=int, default=512, help="prompt tokens of the prefill measurement")
    parser.add_argument("--no_compile", action="store_true", help="leave out minillm compiled and int8")
    parser.add_argument("--no_repack", action="store_true",
                        help="llama.cpp without weight repacking (its --no-repack): on Xeons with AMX its AMX kernels "
                             "crash on q8_0 (llama.cpp issue #20824), so pass this there")
    args = parser.parse_args(argv)
    setup(args.threads, args.seed)
    device = torch.device("cpu")
    g = torch.Generator().manual_seed(args.seed)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        directory = Path(args.model_dir) if args.model_dir else write_checkpoint(args.config, tmp / "m", args.seed,
                                                                                 noise=WEIGHT_NOISE)
        model = MiniLLM.from_pretrained(directory, dtype=torch.float32)
        tokenizer = load_tokenizer(directory if (directory / "tokenizer.json").is_file() else None)
        prompt = torch.randint(3, model.config.vocab_size, (1, args.prompt_len), generator=g)
        long_prompt = torch.randint(3, model.config.vocab_size, (1, args.prefill_len), generator=g)
        n_ctx = max(args.prompt_len + args.new_tokens, args.prefill_len + 1) + 16
        models = {"minillm eager": (model, False)}
        if not args.no_compile:
            models["minillm compiled"] = (model, True)
            models["minillm int8"] = (quantize_int8(MiniLLM.from_pretrained(directory, dtype=torch.float32)), True)
        runs = {name: minillm_run(m, prompt, args.new_tokens, c) for name, (m, c) in models.items()}
        prefills = {name: minillm_run(m, long_prompt, 1, c) for name, (m, c) in models.items()}
        sizes = {name: sum({t.data_ptr(): t.nbytes for t in m.state_dict().values()}.values())  # tied: once
                 for name, (m, _) in models.items()}
        for dtype in ("f32", "f16", "q8_0"):
            path = tmp / f"m-{dtype}.gguf"
            sizes[f"llama.cpp {dtype}"] = export_gguf(model, tokenizer, path, dtype)["bytes"]
            runs[f"llama.cpp {dtype}"] = llama_run(path, prompt[0].tolist(), args.new_tokens, args.threads, n_ctx,
                                                   kv_f32=dtype == "f32", repack=not args.no_repack)
            prefills[f"llama.cpp {dtype}"] = llama_run(path, long_prompt[0].tolist(), 1, args.threads, n_ctx,
                                                       kv_f32=dtype == "f32", repack=not args.no_repack)
        first_call, ids = {}, {}
        for name, run in runs.items():  # the first call compiles (minillm compiled) or maps the file
            start = time.perf_counter()
            ids[name] = run()
            first_call[name] = time.perf_counter() - start
        times = time_alternating(runs, args.warmup, args.rounds, device)
        prefill_times = time_alternating(prefills, 1, args.rounds, device)

    reference = ids["minillm eager"]
    print(f"# batch-1 greedy decoding: {args.model_dir or args.config} ({sum(p.numel() for p in model.parameters()):,} "
          f"parameters), prompt {args.prompt_len} + {args.new_tokens} new tokens, {args.threads} threads each")
    print(f"# {environment(device)}; llama-cpp-python {llama_cpp.__version__}"
          f"{', weight repacking off (--no_repack)' if args.no_repack else ''}")
    header = ["side", "weights MiB", "KV cache", "first call ms", "call ms (median)", "new tokens/s",
              "vs minillm eager", "same tokens as minillm until", f"prefill {args.prefill_len} tokens/s"]
    rows = []
    base = median(times["minillm eager"])
    for name in runs:
        t = median(times[name])
        same = next((i for i, (a, b) in enumerate(zip(ids[name], reference)) if a != b), len(reference))
        kv = "f16" if name in ("llama.cpp f16", "llama.cpp q8_0") else "f32"
        rows.append([name, f"{sizes[name] / 2**20:.1f}", kv, f"{first_call[name] * 1e3:.0f}", f"{t * 1e3:.1f}",
                     f"{args.new_tokens / t:,.1f}", f"{base / t:.2f}x", f"{same}/{len(reference)}",
                     f"{args.prefill_len / median(prefill_times[name]):,.0f}"])
    print_table(header, rows)
    write_json(args.json)


if __name__ == "__main__":
    main()
