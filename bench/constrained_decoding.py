"""What a grammar's mask costs per token, beside the decode step it is added to (issue 46, item 4).

    python bench/constrained_decoding.py                 # the 25.8M shape, batch 1, float32, KV cache

Side by side in one run, alternating rounds, medians: (a) one decode step of the model (one token, KV cache),
(b) the grammar's work for one token of a tool call (compute the allowed set, apply it to the logits, advance)
with llguidance (what minillm/infer/constrain.py uses) and with outlines-core (regex-based; its vocabulary is
built here from decoded token strings, which is lossy for tokens that end inside a multi-byte character, so its
timing is indicative only). xgrammar is not measured: its wheel requires transformers and triton at run time.
The ratio (b)/(a) is the overhead constrained decoding adds per token.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from common import CONFIGS, add_json_flag, describe_machine, write_json

from minillm.data.tokenizer import load_tokenizer
from minillm.infer import constrain
from minillm.model.kv_cache import KVCache
from minillm.model.model import MiniLLM

PARAMETERS = {"type": "object", "properties": {"query": {"type": "string"}, "limit": {"type": "integer"}},
              "required": ["query"]}
TOOLS = [{"type": "function", "function": {"name": "search_poems", "parameters": PARAMETERS}},
         {"type": "function", "function": {"name": "rhyme", "parameters": {
             "type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}}}]
CALL = '<tool_call>\n{"name": "search_poems", "arguments": {"query": "春眠不觉晓，处处闻啼鸟", "limit": 3}}\n</tool_call>'


@torch.inference_mode()
def decode_seconds(model: MiniLLM, prompt: int, steps: int) -> float:
    """Seconds per decode step after a `prompt`-token prefill."""
    cache = KVCache(model.config, 1, prompt + steps + 1, device=torch.device("cpu"), dtype=torch.float32)
    model(torch.randint(10, 6000, (1, prompt)), kv_cache=cache, logits_to_keep=1)
    token = torch.tensor([[42]])
    start = time.perf_counter()
    for _ in range(steps):
        logits = model(token, kv_cache=cache, logits_to_keep=1).logits[:, -1]
        token = logits.argmax(-1, keepdim=True)
    return (time.perf_counter() - start) / steps


def llguidance_seconds(tok, ids: list[int], logits: torch.Tensor) -> float:
    """Seconds per token of llguidance's mask, its application and the advance, over the call's tokens."""
    constraint = constrain.Constraint(constrain.call_grammar(TOOLS, tok), tok)
    start = time.perf_counter()
    for i in ids:
        constraint.mask(logits)
        constraint.advance(i)
    return (time.perf_counter() - start) / len(ids)


def outlines_guide(tok):
    """outlines-core's guide for the call's JSON (the markers are left out: it has no control-token syntax)."""
    from outlines_core import Guide, Index, Vocabulary
    from outlines_core.json_schema import build_regex_from_schema

    schema = {"anyOf": [{"type": "object", "properties": {"name": {"const": t["function"]["name"]},
                                                          "arguments": t["function"]["parameters"]},
                         "required": ["name", "arguments"]} for t in TOOLS]}
    vocab: dict[str, list[int]] = {}
    for i in range(tok.vocab_size):
        if i != tok.im_end_id:
            vocab.setdefault(tok.decode([i]), []).append(i)
    return Guide(Index(build_regex_from_schema(json.dumps(schema)), Vocabulary(tok.im_end_id, vocab)))


def outlines_seconds(guide, ids: list[int], logits: torch.Tensor) -> float:
    """Seconds per token of outlines-core's allowed list, its application and the advance."""
    start = time.perf_counter()
    for i in ids:
        allowed = torch.tensor(guide.get_tokens())
        masked = torch.full_like(logits, float("-inf"))
        masked[:, allowed] = logits[:, allowed]
        guide.advance(i)
    return (time.perf_counter() - start) / len(ids)


def main() -> None:
    """Run the rounds and print the medians and ratios."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_json_flag(p)
    p.add_argument("--config", choices=sorted(CONFIGS), default="default")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--prompt", type=int, default=300, help="prompt tokens before the decode steps (a tool prompt)")
    args = p.parse_args()
    torch.manual_seed(0)
    tok = load_tokenizer()
    config = CONFIGS[args.config]
    config = type(config)(**{**config.__dict__, "vocab_size": tok.vocab_size})
    model = MiniLLM(config).eval()
    ids = tok.encode(CALL, allow_special=True)
    json_ids = tok.encode(CALL.split("\n")[1])
    logits = torch.randn(1, tok.vocab_size)
    try:
        outlines = outlines_guide(tok)
    except ImportError:
        outlines = None
    rows: dict[str, list[float]] = {"decode step": [], "llguidance": [], "outlines-core": []}
    for _ in range(args.rounds):
        rows["decode step"].append(decode_seconds(model, args.prompt, len(ids)))
        rows["llguidance"].append(llguidance_seconds(tok, ids, logits))
        if outlines is not None:
            rows["outlines-core"].append(outlines_seconds(outlines_guide(tok), json_ids, logits))
    print(f"{describe_machine(torch.device('cpu'))}; torch {torch.__version__}; {args.config} shape "
          f"({model.num_parameters() / 1e6:.1f}M), {args.prompt}-token prompt; {args.rounds} rounds, medians")
    step = statistics.median(rows["decode step"])
    for name, values in rows.items():
        if values:
            median = statistics.median(values)
            print(f"{name:14s} {median * 1e3:8.3f} ms/token   {median / step:6.1%} of a decode step")
    write_json(args.json, ms_per_token={k: statistics.median(v) * 1e3 for k, v in rows.items() if v},
               config=args.config, prompt_tokens=args.prompt)


if __name__ == "__main__":
    main()
