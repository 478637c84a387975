"""Speculative decoding (Leviathan et al. 2023; Chen et al. 2023): a cheap drafter proposes K tokens, the target
model checks them all in one forward pass, and a rejection rule keeps the output the target's own: token for
token under greedy decoding, in distribution when sampling.

Two drafters: a smaller model with the target's tokenizer (DraftModel), and prompt lookup (PromptLookup), which
proposes the tokens that followed the last earlier occurrence of the sequence's final n-gram, at no cost. One
sequence at a time; a KV cache rolls back past a rejected draft by moving its length back (the next writes
overwrite what lay beyond).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from minillm.infer.generation import draw, sampling_probs
from minillm.model.kv_cache import KVCache
from minillm.model.model import MiniLLM


@dataclass
class Sampler:
    """How tokens are picked (target and drafter alike): greedy at temperature 0, else from sampling_probs."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    generator: torch.Generator | None = None

    def probs(self, logits_TV: torch.Tensor) -> torch.Tensor:
        """The distribution of each row (temperature > 0)."""
        return sampling_probs(logits_TV, self.temperature, self.top_k, self.top_p)

    def draw(self, probs_V: torch.Tensor) -> int:
        """One token from a distribution."""
        return int(draw(probs_V[None], self.generator)[0])


@dataclass
class Proposal:
    """Draft tokens and, for a drafter that samples, the distribution each was drawn from ([K, V])."""

    tokens: list[int]
    probs_KV: torch.Tensor | None = None  # None: proposed with certainty (greedy, or prompt lookup)


@dataclass
class SpeculationStats:
    """What the drafter proposed and the target kept, over a generation."""

    rounds: int = 0
    proposed: int = 0
    accepted: int = 0

    @property
    def acceptance(self) -> float:
        """Share of the proposed tokens the target kept."""
        return self.accepted / self.proposed if self.proposed else 0.0


class DraftModel:
    """A smaller model that shares the target's tokenizer proposes by decoding K tokens with its own KV cache."""

    def __init__(self, model: MiniLLM, max_len: int, sampler: Sampler) -> None:
        if max_len > model.config.max_position_embeddings:
            raise ValueError(f"the draft model's context ({model.config.max_position_embeddings} positions) is "
                             f"shorter than the {max_len} this generation needs")
        param = next(model.parameters())
        self.model, self.sampler, self.device = model.eval(), sampler, param.device
        self.cache = KVCache(model.config, 1, max_len, device=param.device, dtype=param.dtype)

    @torch.inference_mode()
    def propose(self, ids: Sequence[int], k: int) -> Proposal:
        """k tokens to follow `ids`; the cache reads what it has not seen of them first."""
        feed, tokens, probs = list(ids[self.cache.pos:]), [], []
        for _ in range(k):
            logits_1V = self.model(torch.tensor([feed], device=self.device), kv_cache=self.cache,
                                   logits_to_keep=1).logits[:, -1].float()
            if self.sampler.temperature == 0:
                token = int(logits_1V.argmax())
            else:
                probs.append(self.sampler.probs(logits_1V)[0])
                token = self.sampler.draw(probs[-1])
            tokens.append(token)
            feed = [token]
        return Proposal(tokens, torch.stack(probs) if probs else None)

    def keep(self, n: int) -> None:
        """Only the sequence's first n tokens stand: forget what the cache holds beyond them."""
        self.cache.pos = min(self.cache.pos, n)


class PromptLookup:
    """Proposes the tokens that followed the last earlier occurrence of the sequence's final n-gram (the longest
    n <= max_ngram that occurs), as transformers' prompt lookup decoding does: free, and right whenever the
    answer repeats its context (quotes, code, names)."""

    def __init__(self, max_ngram: int = 3) -> None:
        if max_ngram < 1:
            raise ValueError(f"max_ngram must be >= 1, got {max_ngram}")
        self.max_ngram = max_ngram

    def propose(self, ids: Sequence[int], k: int) -> Proposal:
        """Up to k tokens copied from earlier in `ids`; none when the tail occurs nowhere before."""
        ids = list(ids)
        for n in range(min(self.max_ngram, len(ids) - 1), 0, -1):
            tail = ids[-n:]
            for start in range(len(ids) - n - 1, -1, -1):
                if ids[start:start + n] == tail:
                    return Proposal(ids[start + n:start + n + k])
        return Proposal([])

    def keep(self, n: int) -> None:
        """Nothing to roll back."""


def judge(logits_TV: torch.Tensor, proposal: Proposal, sampler: Sampler) -> tuple[int, int]:
    """How many draft tokens the target keeps, and the token that follows them.

    logits_TV holds the target's logits after the last settled token and after each draft token (K + 1 rows).
    Greedy: keep drafts while they are the target's argmax; the next token is the argmax where they part.
    Sampling: keep draft token t with probability min(1, p(t) / q(t)); at the first rejection draw from
    max(0, p - q) renormalised; when all are kept, draw the bonus token from p. The tokens are then distributed
    exactly as the target's own samples (Leviathan et al. 2023, theorem 1).
    """
    drafts = proposal.tokens
    if sampler.temperature == 0:
        best = logits_TV.argmax(-1).tolist()
        kept = next((i for i, t in enumerate(drafts) if best[i] != t), len(drafts))
        return kept, best[kept]
    p_TV = sampler.probs(logits_TV.float())
    for i, t in enumerate(drafts):
        q_V = proposal.probs_KV[i] if proposal.probs_KV is not None else torch.nn.functional.one_hot(
            torch.tensor(t), p_TV.shape[-1]).float()
        u = float(torch.rand((), generator=sampler.generator))
        if u * float(q_V[t]) < float(p_TV[i, t]):
            continue
        residual_V = (p_TV[i] - q_V.to(p_TV.device)).clamp_min(0)
        total = float(residual_V.sum())
        return i, sampler.draw(residual_V / total if total > 0 else p_TV[i])
    return len(drafts), sampler.draw(p_TV[len(drafts)])


@torch.inference_mode()
def speculative_stream(target: MiniLLM, drafter: DraftModel | PromptLookup, prompt_ids: Sequence[int],
                       max_new_tokens: int, num_draft_tokens: int, sampler: Sampler,
                       eos_ids: Sequence[int] = (), stats: SpeculationStats | None = None) -> Iterator[int]:
    """The target's continuation of one prompt, token by token, K drafts checked per target forward pass.

    Stops after an eos id (which it yields) or max_new_tokens. Sampled text differs from generate()'s for the
    same seed (the random numbers are used differently); its distribution is the same.
    """
    if num_draft_tokens < 1:
        raise ValueError(f"num_draft_tokens must be >= 1, got {num_draft_tokens}")
    ids = list(prompt_ids)
    if not ids:
        raise ValueError("speculative decoding needs a prompt of at least one token")
    max_len = min(len(ids) + max_new_tokens, target.config.max_position_embeddings)
    if len(ids) >= max_len:
        raise ValueError(f"prompt of {len(ids)} tokens leaves no room in the context of "
                         f"{target.config.max_position_embeddings} positions")
    param = next(target.parameters())
    cache = KVCache(target.config, 1, max_len, device=param.device, dtype=param.dtype)
    if len(ids) > 1:  # everything but the last token; each round feeds the last settled token and the drafts
        target(torch.tensor([ids[:-1]], device=param.device), kv_cache=cache, logits_to_keep=1)
    stats = stats if stats is not None else SpeculationStats()
    left = max_len - len(ids)
    while left > 0:
        k = min(num_draft_tokens, left - 1)  # a round emits up to k + 1 tokens
        proposal = drafter.propose(ids, k) if k > 0 else Proposal([])
        proposal.tokens = proposal.tokens[:k]
        settled = len(ids)
        logits_TV = target(torch.tensor([[ids[-1], *proposal.tokens]], device=param.device),
                           kv_cache=cache).logits[0].float()
        kept, following = judge(logits_TV, proposal, sampler)
        cache.pos = settled + kept  # the cache holds every token but the last emitted one
        drafter.keep(settled + kept)
        stats.rounds += 1
        stats.proposed += len(proposal.tokens)
        stats.accepted += kept
        for token in [*proposal.tokens[:kept], following]:
            ids.append(token)
            left -= 1
            yield token
            if token in eos_ids:
                return


@dataclass
class Speculation:
    """How a generation speculates: with a draft model, or by prompt lookup when draft is None."""

    draft: MiniLLM | None = None
    num_draft_tokens: int = 4
    max_ngram: int = 3
    stats: SpeculationStats = field(default_factory=SpeculationStats)
    """Summed over every generation run with this object."""

    def drafter(self, max_len: int, sampler: Sampler) -> DraftModel | PromptLookup:
        """A fresh drafter for one sequence of up to max_len tokens."""
        return DraftModel(self.draft, max_len, sampler) if self.draft is not None else PromptLookup(self.max_ngram)

    def stream(self, target: MiniLLM, prompt_ids: Sequence[int], max_new_tokens: int, sampler: Sampler,
               eos_ids: Sequence[int] = ()) -> Iterator[int]:
        """speculative_stream with this drafter."""
        max_len = min(len(prompt_ids) + max_new_tokens, target.config.max_position_embeddings)
        return speculative_stream(target, self.drafter(max_len, sampler), prompt_ids, max_new_tokens,
                                  self.num_draft_tokens, sampler, eos_ids, self.stats)
