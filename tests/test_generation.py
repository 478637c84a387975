import pytest
import torch
from conftest import needs_compiler

from minillm.infer.generation import _filter_top_k_top_p, generate

transformers = pytest.importorskip("transformers")


def test_greedy_matches_transformers(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    prompt = torch.randint(3, 97, (2, 8))
    # An eos id the model never produces here, so both run the full 30 steps.
    ours = generate(tiny_model, prompt, max_new_tokens=30, temperature=0)
    theirs = hf.generate(prompt, max_new_tokens=30, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert ours.shape == (2, 38)
    assert torch.equal(ours, theirs)


def test_stops_at_eos_and_pads_finished_rows(tiny_model):
    prompt = torch.randint(3, 97, (2, 5))
    free = generate(tiny_model, prompt, max_new_tokens=12, temperature=0)
    eos = int(free[0, 7])  # the third token row 0 produces greedily
    stopped = generate(tiny_model, prompt, max_new_tokens=12, temperature=0, eos_token_id=eos)
    assert torch.equal(stopped[0, :8], free[0, :8])
    row1_eos = (free[1, 5:] == eos).nonzero()
    if stopped.shape[1] < 17:  # stopped early: every row has produced eos
        assert len(row1_eos) > 0
    after = stopped[0, 8:]
    assert torch.all(after == eos)
    # Row 1 is its own greedy continuation up to its own first eos, then padding with eos.
    end1 = 5 + int(row1_eos[0]) + 1 if len(row1_eos) else free.shape[1]
    assert torch.equal(stopped[1, :min(end1, stopped.shape[1])], free[1, :min(end1, stopped.shape[1])])
    assert torch.all(stopped[1, end1:] == eos)


def test_streaming_yields_the_same_tokens(tiny_model):
    prompt = torch.randint(3, 97, (1, 6))
    whole = generate(tiny_model, prompt, max_new_tokens=15, temperature=0)
    pieces = list(generate(tiny_model, prompt, max_new_tokens=15, temperature=0, stream=True))
    assert all(p.shape == (1,) for p in pieces)
    assert torch.equal(torch.cat([prompt[0], torch.cat(pieces)]), whole[0])


def test_sampling_is_reproducible_and_top_k1_is_greedy(tiny_model):
    prompt = torch.randint(3, 97, (1, 4))
    a = generate(tiny_model, prompt, 10, temperature=1.0, top_p=0.9, generator=torch.Generator().manual_seed(7))
    b = generate(tiny_model, prompt, 10, temperature=1.0, top_p=0.9, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    greedy = generate(tiny_model, prompt, 10, temperature=0)
    assert torch.equal(generate(tiny_model, prompt, 10, temperature=0.7, top_k=1), greedy)


def test_repetition_penalty_matches_transformers(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    prompt = torch.randint(3, 97, (1, 6))
    ours = generate(tiny_model, prompt, max_new_tokens=20, temperature=0, repetition_penalty=1.5)
    theirs = hf.generate(prompt, max_new_tokens=20, do_sample=False, repetition_penalty=1.5,
                         eos_token_id=None, pad_token_id=0)
    assert torch.equal(ours, theirs)


def test_top_k_top_p_filter_values():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = _filter_top_k_top_p(logits, top_k=None, top_p=0.8)
    assert torch.isfinite(kept).tolist() == [[True, True, False, False]]  # 0.5 + 0.3 reaches 0.8
    kept = _filter_top_k_top_p(logits, top_k=3, top_p=0.85)
    assert torch.isfinite(kept).tolist() == [[True, True, True, False]]
    kept = _filter_top_k_top_p(logits, top_k=None, top_p=0.1)
    assert torch.isfinite(kept).tolist() == [[True, False, False, False]]


def test_bad_arguments(tiny_model):
    with pytest.raises(ValueError, match="temperature"):
        generate(tiny_model, [1, 2], temperature=-1)
    with pytest.raises(ValueError, match="no room"):
        generate(tiny_model, torch.zeros(1, 128, dtype=torch.long), max_new_tokens=5)


@needs_compiler
def test_compiled_decode_gives_the_same_tokens(tiny_model):
    """generate(compile=True): one dynamic-shape graph serves every decode step; the tokens are the eager ones."""
    torch._dynamo.reset()
    prompt = torch.randint(3, 97, (2, 7))
    eager = generate(tiny_model, prompt, max_new_tokens=20, temperature=0)
    compiled = generate(tiny_model, prompt, max_new_tokens=20, temperature=0, compile=True)
    assert torch.equal(compiled, eager)
    # Another prompt length and cache length reuse the compiled step. (A new batch size may compile once
    # more, after which torch.compile treats the batch as dynamic too.)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    prompt = torch.randint(3, 97, (2, 4))
    again = generate(tiny_model, prompt, max_new_tokens=9, temperature=0, compile=True)
    assert torch.equal(again, generate(tiny_model, prompt, max_new_tokens=9, temperature=0))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs
    # The compiled step reads the current weights, not copies taken when it was compiled.
    with torch.no_grad():
        for p in tiny_model.parameters():
            p.mul_(1.5)
    changed = generate(tiny_model, prompt, max_new_tokens=9, temperature=0)
    assert not torch.equal(changed, again)
    assert torch.equal(generate(tiny_model, prompt, max_new_tokens=9, temperature=0, compile=True), changed)


def test_sampling_never_empties_the_distribution():
    """Issue 26: a top_p that is 0 in float32 (1e-300) dropped every token; the top token always stays."""
    from minillm.infer.generation import next_token

    logits = torch.tensor([[0.5, 3.0, -1.0, 2.9], [1.0, 1.5, 0.0, -2.0]])
    kept = _filter_top_k_top_p(logits, None, 1e-300)
    assert torch.isfinite(kept).sum(-1).tolist() == [1, 1] and kept[0, 1] == 3.0 and kept[1, 1] == 1.5
    g = torch.Generator().manual_seed(0)
    assert next_token(logits, 1.0, None, 1e-300, g).tolist() == logits.argmax(-1).tolist()
    assert next_token(logits, 1.0, 1, 1e-300, g).tolist() == logits.argmax(-1).tolist()


def test_repetition_penalty_is_bounded():
    from minillm.infer.generation import check_sampling

    for bad in (1e-300, 0.0, 1e300, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=r"repetition_penalty must be in \[0.01, 100\]"):
            check_sampling(1.0, 0.9, bad)
    check_sampling(1.0, 0.9, 0.01)
    check_sampling(1.0, 0.9, 100.0)


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, None, None), (0.7, 5, None), (1.3, None, 0.8),
                                                       (0.9, 20, 0.6)])
def test_sampling_draws_from_the_filtered_softmax(monkeypatch, temperature, top_k, top_p):
    """Issue 32, item 6: what the draw samples from is softmax(logits / T) restricted to the top k and to the
    smallest set of mass >= top p, renormalised (an independent transcription)."""
    import minillm.infer.generation as generation
    from minillm.infer.generation import next_token

    seen = []
    real = generation.draw
    monkeypatch.setattr(generation, "draw", lambda probs, g=None: seen.append(probs.clone()) or real(probs, g))
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(1)) * 3
    next_token(logits, temperature, top_k, top_p, torch.Generator().manual_seed(0))
    for row, got in zip(logits.double(), seen[0].double()):
        p = torch.softmax(row / temperature, -1)
        order = p.argsort(descending=True).tolist()
        keep = order[:top_k] if top_k else order
        if top_p is not None:
            mass, kept = 0.0, []
            renorm = sum(p[i].item() for i in keep)
            for i in keep:
                kept.append(i)
                mass += p[i].item() / renorm
                if mass >= top_p:
                    break
            keep = kept
        want = torch.zeros_like(p)
        want[keep] = p[keep] / p[keep].sum()
        assert torch.allclose(got, want, atol=1e-6), (temperature, top_k, top_p)


def test_the_draw_follows_each_rows_distribution_and_never_takes_a_zero():
    """generation.draw (one uniform per row against the cumulative sum): 20,000 draws per row match the row's
    probabilities (total variation < 0.02), and a token of probability 0 is never drawn, at either end."""
    from minillm.infer.generation import draw

    probs = torch.tensor([[0.0, 0.5, 0.0, 0.25, 0.25, 0.0], [0.1, 0.2, 0.3, 0.4, 0.0, 0.0],
                          [0.0, 0.0, 0.0, 0.0, 0.0, 1.0]])
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([draw(probs, g) for _ in range(20_000)])  # [N, 3]
    for row in range(3):
        freq = torch.bincount(draws[:, row], minlength=6).float() / draws.shape[0]
        assert 0.5 * (freq - probs[row]).abs().sum() < 0.02
        assert (freq[probs[row] == 0] == 0).all()
    with pytest.raises(RuntimeError, match="invalid sampling distribution"):
        draw(torch.tensor([[0.5, float("nan")]]))

