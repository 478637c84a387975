"""Autoregressive generation with a KV cache: greedy or sampled (temperature, top-k, top-p), streaming."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch

from minillm.model.kv_cache import KVCache
from minillm.model.linear import Int8Linear
from minillm.model.model import MiniLLM


def _penalise_repeats(logits_BV: torch.Tensor, seen_BV: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL-style repetition penalty: shrink the logits of tokens already in the sequence."""
    penalised = torch.where(logits_BV > 0, logits_BV / penalty, logits_BV * penalty)
    return torch.where(seen_BV, penalised, logits_BV)


def _filter_top_k_top_p(logits_BV: torch.Tensor, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """Set to -inf every logit outside the top k and outside the smallest set with probability >= top_p."""
    if top_k is not None and 0 < top_k < logits_BV.shape[-1]:
        kth_B1 = torch.topk(logits_BV, top_k, dim=-1).values[:, -1:]
        logits_BV = logits_BV.masked_fill(logits_BV < kth_B1, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_BV, order_BV = torch.sort(logits_BV, descending=True)
        cum_BV = sorted_BV.softmax(-1).cumsum(-1)
        # Drop a token when the tokens ranked above it already reach top_p; the best token always stays, even
        # for a top_p that rounds to 0 in float32 (the distribution is never empty).
        drop_sorted_BV = (cum_BV - sorted_BV.softmax(-1)) >= top_p
        drop_sorted_BV[:, 0] = False
        drop_BV = drop_sorted_BV.scatter(-1, order_BV, drop_sorted_BV)
        logits_BV = logits_BV.masked_fill(drop_BV, float("-inf"))
    return logits_BV


def sampling_probs(logits_BV: torch.Tensor, temperature: float, top_k: int | None = None,
                   top_p: float | None = None) -> torch.Tensor:
    """The distribution a sampled token is drawn from (temperature > 0): filtered, scaled, normalised."""
    return _filter_top_k_top_p(logits_BV.float() / temperature, top_k, top_p).softmax(-1)


def draw(probs_BV: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One index per row, drawn from each row's distribution: one uniform per row against the cumulative sum.

    torch.multinomial draws an exponential variate for every entry of the row (6,400 per token here), which cost
    31% of a batched decode step on a 2-core CPU (bench/RESULTS.md, "Rollouts"); the inverse CDF needs one. A token
    of probability 0 (filtered by top-k or top-p) is never drawn: with side="right" the first cumulative sum above
    the uniform is taken, and a zero adds nothing to it.
    """
    cdf_BV = probs_BV.float().cumsum(-1)
    total_B1 = cdf_BV[:, -1:]
    if not bool(((total_B1 > 0) & torch.isfinite(total_B1)).all()):  # as torch.multinomial refuses it
        raise RuntimeError("invalid sampling distribution: probabilities that are not finite or sum to 0")
    u_B1 = torch.rand(cdf_BV.shape[0], 1, generator=generator, device=cdf_BV.device) * total_B1
    return torch.searchsorted(cdf_BV, u_B1, right=True).squeeze(-1).clamp_(max=cdf_BV.shape[-1] - 1)


def next_token(logits_BV: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
               top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Pick one token per row: argmax when temperature is 0, else sample from the filtered distribution."""
    if temperature == 0:
        return logits_BV.argmax(dim=-1)
    return draw(sampling_probs(logits_BV, temperature, top_k, top_p), generator)


# Below this, logits / temperature overflow float32 for ordinary logits: sampling would be greedy at best.
MIN_TEMPERATURE = 1e-3
# The repetition penalty divides or multiplies logits: outside this range they overflow float32 or vanish.
PENALTY_RANGE = (1e-2, 1e2)


def check_sampling(temperature: float, top_p: float | None = None, repetition_penalty: float = 1.0) -> None:
    """ValueError for sampling values that are not finite or make no sense (one rule for library and CLI)."""
    if not (temperature == 0 or MIN_TEMPERATURE <= temperature < math.inf):
        raise ValueError(f"temperature must be 0 (greedy) or a finite number >= {MIN_TEMPERATURE:g}, got {temperature}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    lo, hi = PENALTY_RANGE
    if not lo <= repetition_penalty <= hi:
        raise ValueError(f"repetition_penalty must be in [{lo:g}, {hi:g}] (1 = off), got {repetition_penalty}")


def _decode_options(model: MiniLLM) -> dict[str, object]:
    """Inductor options of the compiled decode step."""
    options: dict[str, object] = {"size_asserts": False}
    if any(isinstance(m, Int8Linear) for m in model.modules()):
        # int8 products are bound by arithmetic, not memory: inductor's default inlines each RMSNorm into the
        # product that reads it, recomputing it for every weight row; computing such inputs once measured
        # ~18% faster per step (bench/RESULTS.md). Float32 products are memory-bound and gain nothing.
        options["realize_opcount_threshold"] = 4
    return options


@torch.inference_mode()
def _stream(model: MiniLLM, input_ids_BT: torch.Tensor, max_new_tokens: int, temperature: float,
            top_k: int | None, top_p: float | None, repetition_penalty: float,
            eos_ids: Sequence[int], generator: torch.Generator | None,
            compile: bool = False) -> Iterator[torch.Tensor]:
    B, T = input_ids_BT.shape
    max_len = min(T + max_new_tokens, model.config.max_position_embeddings)
    if T >= max_len and max_new_tokens > 0:
        raise ValueError(f"prompt of {T} tokens leaves no room in the context of "
                         f"{model.config.max_position_embeddings} positions")
    param = next(model.parameters())
    cache = KVCache(model.config, B, max_len, device=param.device, dtype=param.dtype)
    seen_BV = None
    if repetition_penalty != 1.0:
        seen_BV = torch.zeros(B, model.config.vocab_size, dtype=torch.bool, device=param.device)
        seen_BV.scatter_(1, input_ids_BT, True)
    eos_t = torch.tensor(list(eos_ids), device=param.device, dtype=torch.long)
    finished_B = torch.zeros(B, dtype=torch.bool, device=param.device)
    pad = eos_ids[0] if eos_ids else model.config.pad_token_id
    # Decode steps can run through torch.compile: one graph serves every step (dynamic=True makes the cache
    # length symbolic) and the ~170 small kernels of a step fuse. At batch 1 every product and the attention
    # become reductions split over the cores (model/linear.py), which reads the weights at the memory's
    # speed. torch.compile reuses its code for a model it has compiled before, so later calls do not
    # recompile. Inductor's per-call size asserts cost ~10% of a small model's step and are left out.
    # (Freezing the weights into the graph and max-autotune GEMMs were measured too: no faster on the CPU,
    # and stale after a weight update.)
    decode = torch.compile(model, dynamic=True, options=_decode_options(model)) if compile else model
    tokens_BT = input_ids_BT  # prefill once (eager: its shape changes every call), then one token per step
    for step in range(max_len - T):
        logits_BV = (decode if step else model)(tokens_BT, kv_cache=cache, logits_to_keep=1).logits[:, -1, :]
        if seen_BV is not None:
            logits_BV = _penalise_repeats(logits_BV, seen_BV, repetition_penalty)
        token_B = next_token(logits_BV, temperature, top_k, top_p, generator)
        token_B = torch.where(finished_B, torch.full_like(token_B, pad), token_B)
        yield token_B
        if seen_BV is not None:
            seen_BV.scatter_(1, token_B[:, None], True)
        if len(eos_ids):
            finished_B |= torch.isin(token_B, eos_t)
            if bool(finished_B.all()):
                return
        tokens_BT = token_B[:, None]


def generate(model: MiniLLM, input_ids: torch.Tensor | Sequence[int], max_new_tokens: int = 128,
             temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             repetition_penalty: float = 1.0, eos_token_id: int | Sequence[int] | None = None,
             stream: bool = False, generator: torch.Generator | None = None, compile: bool = False):
    """Continue prompts of equal length; returns [B, T + new] ids, or with stream=True an iterator of [B] ids.

    Greedy when temperature is 0. Stops when every row has produced an eos id (rows that finished early
    are padded with the first eos id) or after max_new_tokens. compile=True runs the decode steps through
    torch.compile: the first call pays the compilation (about 30 s on a 2-core CPU), later calls decode
    faster (bench/RESULTS.md).
    """
    check_sampling(temperature, top_p, repetition_penalty)
    param = next(model.parameters())
    ids_BT = torch.as_tensor(input_ids, dtype=torch.long, device=param.device)
    if ids_BT.dim() == 1:
        ids_BT = ids_BT[None]
    if ids_BT.shape[1] == 0:
        raise ValueError("generate needs a prompt of at least one token")
    if eos_token_id is None:
        eos_ids: list[int] = []
    elif isinstance(eos_token_id, int):
        eos_ids = [eos_token_id]
    else:
        eos_ids = list(eos_token_id)
    was_training = model.training
    model.eval()
    steps = _stream(model, ids_BT, max_new_tokens, temperature, top_k, top_p, repetition_penalty, eos_ids,
                    generator, compile)
    if stream:
        return steps
    try:
        new = list(steps)
    finally:
        model.train(was_training)
    return torch.cat([ids_BT, torch.stack(new, dim=1)], dim=1) if new else ids_BT
