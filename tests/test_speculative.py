"""Speculative decoding (minillm/infer/speculative.py): greedy output identical to the target's own, token for token;
sampled output distributed as the target's (chi-square over many seeds, against the exact distribution)."""

import math

import pytest
import torch
from conftest import randomized

from minillm.infer.generation import generate, sampling_probs
from minillm.infer.speculative import (
    DraftModel,
    PromptLookup,
    Sampler,
    Speculation,
    SpeculationStats,
    speculative_stream,
)
from minillm.model.config import LMConfig
from minillm.model.model import MiniLLM


def model_of(vocab: int, layers: int, seed: int, scale: float = 0.1, hidden: int = 64) -> MiniLLM:
    torch.manual_seed(seed)
    config = LMConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=128)
    return randomized(MiniLLM(config), scale=scale, seed=seed).eval()


def speculate(target, drafter, prompt, new, k, sampler, eos=()) -> tuple[list[int], SpeculationStats]:
    stats = SpeculationStats()
    return list(speculative_stream(target, drafter, prompt, new, k, sampler, eos, stats)), stats


@pytest.mark.parametrize("k", [1, 3, 8])
@pytest.mark.parametrize("kind", ["draft", "self", "lookup"])
def test_greedy_output_is_the_targets_token_for_token(k, kind):
    target = model_of(97, 2, seed=0, scale=0.3)
    prompt = [5, 17, 33, 5, 17, 60, 2, 5, 17]
    expected = generate(target, prompt, max_new_tokens=40, temperature=0)[0, len(prompt):].tolist()
    sampler = Sampler(0.0)
    drafter = {"draft": lambda: DraftModel(model_of(97, 1, seed=1, scale=0.3), 128, sampler),
               "self": lambda: DraftModel(target, 128, sampler), "lookup": lambda: PromptLookup(3)}[kind]()
    got, stats = speculate(target, drafter, prompt, 40, k, sampler)
    assert got == expected
    assert stats.accepted + stats.rounds == 40 and stats.accepted <= stats.proposed
    if kind == "self":  # the target drafting for itself: every draft kept, K + 1 tokens a round
        assert stats.acceptance == 1.0 and stats.rounds == math.ceil(40 / (k + 1))


def test_generation_stops_at_eos_and_at_the_budget():
    target = model_of(97, 2, seed=0, scale=0.3)
    prompt = [3, 4, 5]
    free = generate(target, prompt, max_new_tokens=30, temperature=0)[0, 3:].tolist()
    eos = free[10]
    got, _ = speculate(target, DraftModel(target, 128, Sampler(0.0)), prompt, 30, 4, Sampler(0.0), eos=[eos])
    assert got == free[:free.index(eos) + 1]
    got, _ = speculate(target, PromptLookup(), prompt, 7, 4, Sampler(0.0))
    assert got == free[:7]
    with pytest.raises(ValueError, match="num_draft_tokens must be >= 1"):
        speculate(target, PromptLookup(), prompt, 7, 0, Sampler(0.0))


def test_prompt_lookup_proposes_what_followed_the_longest_matching_tail():
    lookup = PromptLookup(max_ngram=3)
    assert lookup.propose([5, 1, 2, 3, 4, 1, 2], 3).tokens == [3, 4, 1]  # "1 2" occurred before: what followed
    assert lookup.propose([1, 2, 9, 7, 2, 9, 1, 2, 9], 2).tokens == [7, 2]  # "1 2 9" beats the later "2 9"
    assert lookup.propose([1, 2, 3], 4).tokens == []
    assert lookup.propose([4, 4], 5).tokens == [4]


def exact_distribution(target, prompt, sampler, n_new) -> dict[tuple[int, ...], float]:
    """P(first n_new tokens) under the target's own sampling, by enumerating every prefix."""
    dist = {(): 1.0}
    for _ in range(n_new):
        nxt = {}
        for prefix, p in dist.items():
            with torch.inference_mode():
                logits = target(torch.tensor([prompt + list(prefix)])).logits[:, -1].float()
            for t, q in enumerate(sampler.probs(logits)[0].tolist()):
                if q > 0:
                    nxt[prefix + (t,)] = p * q
        dist = nxt
    return dist


def chi_square_critical(df: int, z: float = 3.719) -> float:
    """The chi-square value exceeded with probability ~1e-4 (Wilson-Hilferty)."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def chi_square(kind: str, temperature: float, top_k=None, top_p=None, runs: int = 3000):
    """(statistic, critical value at p ~1e-4, stats): `runs` seeds, two new tokens each (K = 2: a round's accepts,
    rejections and bonus tokens), against the exact joint distribution of the target's own two tokens; cells
    expected < 5 pooled."""
    target, draft = model_of(8, 2, seed=0, scale=0.25, hidden=32), model_of(8, 1, seed=5, scale=0.25, hidden=32)
    prompt = [1, 2, 3, 1, 2]
    counts: dict[tuple[int, ...], int] = {}
    stats = SpeculationStats()
    for seed in range(runs):
        sampler = Sampler(temperature, top_k, top_p, torch.Generator().manual_seed(seed))
        drafter = DraftModel(draft, 16, sampler) if kind == "draft" else PromptLookup(2)
        out = tuple(speculative_stream(target, drafter, prompt, 2, 2, sampler, stats=stats))
        counts[out] = counts.get(out, 0) + 1
    exact = exact_distribution(target, prompt, Sampler(temperature, top_k, top_p), 2)
    cells, pooled_e, pooled_o = [], 0.0, 0
    for cell, p in exact.items():
        if p * runs >= 5:
            cells.append((counts.get(cell, 0), p * runs))
        else:
            pooled_e, pooled_o = pooled_e + p * runs, pooled_o + counts.get(cell, 0)
    if pooled_e > 0:
        cells.append((pooled_o, pooled_e))
    pooled_o += sum(n for cell, n in counts.items() if cell not in exact)  # a token the target can never draw
    return sum((o - e) ** 2 / e for o, e in cells), chi_square_critical(len(cells) - 1), stats


@pytest.mark.parametrize("kind, temperature, top_k, top_p", [
    ("draft", 1.0, None, None), ("draft", 0.7, 5, 0.9), ("lookup", 1.0, None, None)])
def test_sampled_output_is_distributed_as_the_targets(kind, temperature, top_k, top_p):
    statistic, critical, stats = chi_square(kind, temperature, top_k, top_p)
    assert 0.02 < stats.acceptance < 0.98  # both branches (keep, reject) were taken many times
    assert statistic < critical


def test_the_chi_square_check_sees_a_rule_that_keeps_every_draft(monkeypatch):
    """Without the rejection rule the tokens follow the draft model: the same check fails."""
    import minillm.infer.speculative as speculative

    monkeypatch.setattr(speculative, "judge", lambda logits_TV, proposal, sampler: (
        len(proposal.tokens), sampler.draw(sampler.probs(logits_TV)[len(proposal.tokens)])))
    statistic, critical, _ = chi_square("draft", 1.0)
    assert statistic > critical


def test_sampling_probs_is_what_generate_samples_from():
    logits = torch.tensor([[1.0, 2.0, 0.5, -1.0]])
    probs = sampling_probs(logits, 0.5, top_k=3, top_p=None)
    assert probs[0, 3] == 0 and torch.allclose(probs[0, :3], (logits[0, :3] / 0.5).softmax(-1))


# --- the server: every request speculates in the batched step (issue 49, items 1 and 2) ----------------------------

def serve_alone(scheduler, prompts, n, temperature=0.0):
    """Each prompt submitted alone (the next after the last finished): its tokens and its request."""
    return [serve_together(scheduler, [prompt], n, temperature, first_seed=i)[0] for i, prompt in enumerate(prompts)]


def serve_together(scheduler, prompts, n, temperature=0.0, banned=None, first_seed=0):
    """All prompts submitted at once (request i seeded first_seed + i, never picking the tokens banned[i]): each
    one's tokens and request."""
    import threading

    from minillm.infer.serving import GenerationRequest, Sampling

    outs, done = [], threading.Semaphore(0)
    for i, prompt in enumerate(prompts):
        tokens = []
        request = GenerationRequest(prompt, n, Sampling(temperature, None, seed=first_seed + i), [],
                                    lambda t, tokens=tokens: tokens.append(t) if t is not None else done.release(),
                                    banned=(banned or {}).get(i, ()))
        outs.append((tokens, request))
    scheduler.submit([r for _, r in outs])
    for _ in prompts:
        done.acquire()
    return outs


@pytest.mark.parametrize("drafter", ["same", "other", "lookup"])
def test_a_lone_server_request_speculates_and_keeps_its_greedy_text(drafter):
    """Greedy text with a draft (the target itself: every draft kept; another model: rejections; prompt lookup)
    equals the text without one, token for token, and the rounds are counted."""
    from minillm.infer.serving import Scheduler

    target = model_of(96, 2, 0)
    draft = {"same": target, "other": model_of(96, 1, 5), "lookup": None}[drafter]
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 96, (n,), generator=g).tolist() * 2 for n in (3, 8, 20)]  # repeats: lookup finds some
    plain = Scheduler(target, max_batch=4, context=128).start()
    speculation = Speculation(draft, num_draft_tokens=4)
    spec = Scheduler(target, max_batch=4, context=128, speculation=speculation).start()
    try:
        want = [t for t, _ in serve_alone(plain, prompts, 40)]
        got = [t for t, _ in serve_alone(spec, prompts, 40)]
    finally:
        plain.stop()
        spec.stop()
    assert got == want and all(len(t) == 40 for t in got)
    stats = speculation.stats
    assert stats.rounds > 0 and stats.proposed > 0
    if drafter == "same":
        assert stats.accepted == stats.proposed and stats.rounds <= 3 * 40 / 5 + 3  # K + 1 tokens a round
    if drafter == "other":
        assert 0 <= stats.accepted < stats.proposed


def test_a_failing_draft_costs_its_request_the_speculation_only():
    """A draft that raises: the request decodes plainly to its end, the same greedy text, and no error."""
    from minillm.infer.serving import Scheduler

    target, draft = model_of(96, 2, 0), model_of(96, 1, 5)
    draft.forward = lambda *a, **kw: (_ for _ in ()).throw(RuntimeError("draft out of memory"))
    prompts = [[5, 6, 7, 8]]
    plain = Scheduler(target, max_batch=2, context=64).start()
    spec = Scheduler(target, max_batch=2, context=64, speculation=Speculation(draft, 3)).start()
    try:
        (want, _), = serve_alone(plain, prompts, 20)
        (got, request), = serve_alone(spec, prompts, 20)
    finally:
        plain.stop()
        spec.stop()
    assert got == want and request.finish_reason == "length" and request.error is None
    assert not request.speculating


@pytest.mark.parametrize("max_batch", [1, 8])
def test_speculative_server_sampling_matches_the_targets_distribution(max_batch):
    """Sampled at temperature 1 with a draft that differs, the first generated token after a fixed prompt
    follows the target's distribution (chi-square over a 12-token vocabulary, 3,000 requests), for requests
    served one at a time and eight to a batch (each row judged with its own generator)."""
    from minillm.infer.serving import Scheduler

    target, draft = model_of(12, 1, 0, scale=0.6, hidden=32), model_of(12, 1, 3, scale=0.6, hidden=32)
    prompt = [1, 2, 3]
    with torch.no_grad():  # condition on the likeliest first token a; the target's next-token distribution p
        a = int(target(torch.tensor([prompt])).logits[0, -1].argmax())
        p = torch.softmax(target(torch.tensor([prompt + [a]])).logits[0, -1].double(), -1)
    spec = Scheduler(target, max_batch=max_batch, context=16, max_waiting=3000,
                     speculation=Speculation(draft, 2)).start()
    try:
        # Three tokens per request: the first from the prefill, the second from a speculative round's judge (one
        # draft: kept, or rejected and redrawn); keep the requests whose first token was a, count their second.
        outs = (serve_alone(spec, [prompt] * 3000, 3, temperature=1.0) if max_batch == 1 else
                serve_together(spec, [prompt] * 3000, 3, temperature=1.0))
    finally:
        spec.stop()
    assert spec.speculation.stats.rounds == 3000  # every request's second token came from a round
    seconds = [t[1] for t, _ in outs if t[0] == a]
    counts = torch.bincount(torch.tensor(seconds), minlength=12).double()
    n = counts.sum()
    assert n > 100
    expected = p * n
    keep = expected > 5
    chi2 = (((counts - expected) ** 2 / expected)[keep]).sum().item()
    assert chi2 < 30, (chi2, counts.tolist(), expected.tolist())  # 11 degrees of freedom: p ~ 0.002


def test_the_slot_cache_reads_several_tokens_a_row_as_the_whole_sequence_would():
    """A speculative step's pass: three slots at lengths 5, 9 and 2 feed 4, 2 and 1 of T = 4 tokens; each row's
    logits equal a plain forward over its whole sequence, the lengths move by the widths, and no row writes past
    its width (the padding is computed, never stored)."""
    from minillm.model.kv_cache import SlotKVCache

    model = model_of(96, 2, 0, scale=0.3)
    g = torch.Generator().manual_seed(0)
    prefixes = [torch.randint(3, 96, (n,), generator=g).tolist() for n in (5, 9, 2)]
    fed = [torch.randint(3, 96, (w,), generator=g).tolist() for w in (4, 2, 1)]
    cache = SlotKVCache(model.config, 4, 32)
    with torch.no_grad():
        for b, prefix in enumerate(prefixes):
            model(torch.tensor([prefix]), kv_cache=cache.slot(b))
            cache.lengths[b], cache.active[b] = len(prefix), True
        cache.cover([0, 1, 2], [4, 2, 1])
        tokens = torch.tensor([f + f[:1] * (4 - len(f)) for f in fed])
        logits = model(tokens, kv_cache=cache).logits
        for i, (prefix, f) in enumerate(zip(prefixes, fed)):
            whole = model(torch.tensor([prefix + f])).logits[0, len(prefix):]
            torch.testing.assert_close(logits[i, :len(f)], whole, atol=1e-5, rtol=1e-5)
    assert cache.lengths[:3] == [9, 11, 3]
    for layer in range(model.config.num_hidden_layers):
        assert cache.cache.k[layer][2, :, 3:].abs().sum() == 0 and cache.cache.k[layer][1, :, 11:].abs().sum() == 0
        assert cache.cache.k[layer][2, :, 2].abs().sum() > 0


@pytest.mark.parametrize("drafter", ["same", "other", "lookup"])
def test_requests_that_share_the_batch_speculate_each_by_its_own_acceptance(drafter):
    """Six requests at once on four slots, one of them barred from the token it would pick first (as tool_choice
    "none" bars the call marker: it never drafts): every greedy text equals the text without speculation, rows
    drafted while others ran beside them, and a draft identical to the target keeps every proposal."""
    from minillm.infer.serving import Scheduler

    target = model_of(96, 2, 0)
    draft = {"same": target, "other": model_of(96, 1, 5), "lookup": None}[drafter]
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, 96, (n,), generator=g).tolist() * 2 for n in (3, 8, 20, 5, 2, 11)]
    plain = Scheduler(target, max_batch=4, context=128).start()
    speculation = Speculation(draft, num_draft_tokens=3)
    spec = Scheduler(target, max_batch=4, context=128, speculation=speculation).start()
    try:
        banned = {1: serve_alone(plain, prompts[1:2], 1)[0][0]}
        want = [t for t, _ in serve_alone(plain, prompts, 30)]
        want[1] = serve_together(plain, prompts[1:2], 30, banned={0: banned[1]})[0][0]
        got = serve_together(spec, prompts, 30, banned=banned)
    finally:
        plain.stop()
        spec.stop()
    assert [t for t, _ in got] == want and all(r.finish_reason == "length" for _, r in got)
    assert spec.max_running == 4 and got[1][1].drafter is None  # the barred request never drafted
    stats = speculation.stats
    assert stats.rounds > 0 and stats.proposed > 0
    if drafter == "same":
        assert stats.accepted == stats.proposed and stats.rounds < 5 * 30 / 2
    if drafter == "other":
        assert 0 <= stats.accepted < stats.proposed

