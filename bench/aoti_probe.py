"""Probe, not a supported path: what taking Python out of the 4.6M decode step would buy (AOTInductor).

At 4.6M parameters a compiled decode step is bound by fixed costs around its one fused kernel (Dynamo's
guards, inductor's Python wrapper), not by memory (bench/RESULTS.md, "Decoding against llama.cpp"). This
exports one batch-1 greedy decode step with static shapes (the KV cache as buffers written with
index_copy_ at a position tensor, attention over the whole buffer with later positions masked, argmax in
the graph), compiles it ahead of time with AOTInductor, and times it against the torch.compile step that
`generate(compile=True)` runs, alternating, in one process. To export, it swaps three module globals of
minillm for the run (the cache type check, the one-row test and the decode attention); nothing else uses it.

    python bench/aoti_probe.py                       # train_pretrain.py's default shape, random weights
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch
from common import CONFIGS, cpu_flags, median, setup

import minillm.model.linear as linear_module
import minillm.model.model as model_module
from minillm.model.kv_cache import KVCache
from minillm.model.model import MiniLLM


class StaticStep(torch.nn.Module):
    """One greedy decode step with static shapes; it is also the cache the model writes into."""

    def __init__(self, model: MiniLLM, max_len: int):
        super().__init__()
        self.model = model
        shape = (1, model.config.num_key_value_heads, max_len, model.config.head_dim)
        for i in range(model.config.num_hidden_layers):
            self.register_buffer(f"k{i}", torch.zeros(shape))
            self.register_buffer(f"v{i}", torch.zeros(shape))
        self.pos = torch.zeros(1, dtype=torch.long)

    def rope_index(self, T: int) -> torch.Tensor:
        """The step's position, a [1] tensor."""
        return self.pos

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new key/value at pos; the whole buffers."""
        kb, vb = getattr(self, f"k{layer}"), getattr(self, f"v{layer}")
        kb.index_copy_(2, self.pos, k)
        vb.index_copy_(2, self.pos, v)
        return kb, vb

    def advance(self, T: int) -> None:
        """Positions come from the caller."""

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Attention over the whole buffer, positions after pos masked."""
        B, H, _, D = q.shape
        K, S = k.shape[1], k.shape[2]
        scores = (q.reshape(B, K, H // K, 1, D) * k[:, :, None]).sum(-1) * D**-0.5
        scores = scores.masked_fill(torch.arange(S) > self.pos, float("-inf"))
        return (scores.softmax(-1, dtype=torch.float32)[..., None] * v[:, :, None]).sum(-2).reshape(B, H, 1, D)

    def forward(self, token: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """The next greedy token after `token` at position `pos`."""
        self.pos = pos
        return self.model(token, kv_cache=self).logits[:, -1, :].argmax(-1)


def main(argv: list[str] | None = None) -> None:
    """Print ms per token of both steps."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", choices=sorted(CONFIGS), default="pretrain", help="model shape (random weights)")
    p.add_argument("--max_len", type=int, default=160, help="KV cache positions (32-token prompt + 128 new)")
    p.add_argument("--rounds", type=int, default=10, help="alternating rounds of 120 steps (median)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = p.parse_args(argv)
    setup(args.threads, seed=0)
    model = MiniLLM(CONFIGS[args.config]).eval()
    step = StaticStep(model, args.max_len).eval()
    saved = model_module.KVCache, model_module.decode_attention, linear_module._one_row
    model_module.KVCache = type("NotAKVCache", (), {})  # MiniLLM.forward's Python-int position checks skipped
    model_module.decode_attention = step.attend
    linear_module._one_row = lambda x: x.numel() == x.shape[-1]  # the reduction form while exporting
    try:
        with torch.no_grad(), tempfile.TemporaryDirectory() as tmp:
            exported = torch.export.export(step, (torch.tensor([[5]]), torch.tensor([3])))
            start = time.perf_counter()
            package = torch._inductor.aoti_compile_and_package(exported, package_path=f"{tmp}/step.pt2")
            compile_s = time.perf_counter() - start
            runner = torch._inductor.aoti_load_package(package)
    finally:
        model_module.KVCache, model_module.decode_attention, linear_module._one_row = saved
    compiled = torch.compile(model, dynamic=True, options={"size_asserts": False})  # as generate(compile=True)
    times: dict[str, list[float]] = {"torch.compile (generate's)": [], "AOTInductor, static shapes": []}
    prompt = torch.randint(3, model.config.vocab_size, (1, 32))
    with torch.inference_mode():
        for _ in range(args.rounds + 2):
            cache = KVCache(model.config, 1, args.max_len)
            model(prompt, kv_cache=cache)
            token = prompt[:, -1:]
            compiled(token, kv_cache=cache)
            start = time.perf_counter()
            for _ in range(120):
                token = compiled(token, kv_cache=cache).logits[:, -1, :].argmax(-1)[:, None]
            times["torch.compile (generate's)"].append((time.perf_counter() - start) / 120)
            token, pos = prompt[:, -1:], torch.zeros(1, dtype=torch.long)
            start = time.perf_counter()
            for i in range(120):
                pos.fill_(33 + i)
                token = runner(token, pos)[:, None]
            times["AOTInductor, static shapes"].append((time.perf_counter() - start) / 120)
    print(f"# {args.config}, batch 1, {args.threads} threads, cache {args.max_len}; {cpu_flags()}; "
          f"torch {torch.__version__}; AOTInductor compile {compile_s:.0f} s")
    for name, ts in times.items():
        print(f"{name}: {median(ts[2:]) * 1e3:.3f} ms per token")


if __name__ == "__main__":
    main()
