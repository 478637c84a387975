"""Activation checkpointing and the chunked loss: the plain losses and gradients, with less kept for backward."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_pretrain

from minillm.model.config import LMConfig
from minillm.model.model import MiniLLM

T = 24


def tiny(dropout: float = 0.0, vocab: int = 300) -> MiniLLM:
    """A 2-layer model with a fixed seed."""
    torch.manual_seed(0)
    return MiniLLM(LMConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, max_position_embeddings=64, dropout=dropout))


def batch(vocab: int = 300):
    """Inputs, labels with ignored positions and a loss mask that hides a prefix (as SFT prompts are)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, vocab, (3, T), generator=g)
    y = torch.randint(0, vocab, (3, T), generator=g)
    y[0, -5:] = -100
    mask = torch.ones(3, T, dtype=torch.long)
    mask[1, :9] = 0
    return x, y, mask


def loss_and_grads(model: MiniLLM, seed: int = 5, **kwargs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One forward and backward: the loss and every parameter's gradient."""
    model.zero_grad()
    torch.manual_seed(seed)  # the dropout masks
    x, y, mask = batch(model.config.vocab_size)
    loss = model(x, labels=y, loss_mask=mask, **kwargs).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def saved_bytes(model: MiniLLM, **kwargs) -> tuple[int, int]:
    """(bytes of all tensors autograd keeps for backward, the largest one) in one training forward."""
    sizes = []

    def pack(t):
        sizes.append(t.numel() * t.element_size())
        return t

    x, y, mask = batch(model.config.vocab_size)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x, labels=y, loss_mask=mask, **kwargs)
    return sum(sizes), max(sizes)


@pytest.mark.parametrize("chunk", [1, 5, 8, T, T + 7])
def test_chunked_loss_equals_the_plain_loss_and_gradients(chunk):
    model = tiny().train()
    plain_loss, plain_grads = loss_and_grads(model)
    loss, grads = loss_and_grads(model, loss_chunk=chunk)
    torch.testing.assert_close(loss, plain_loss, rtol=1e-6, atol=1e-6)
    for name, g in grads.items():
        torch.testing.assert_close(g, plain_grads[name], rtol=1e-5, atol=1e-7, msg=name)
    x, y, mask = batch()
    assert model(x, labels=y, loss_mask=mask, loss_chunk=chunk).logits is None


def test_chunked_loss_never_keeps_the_whole_logits_for_backward():
    model = tiny(vocab=4000).train()
    logits_bytes = 3 * T * 4000 * 4
    _, plain_largest = saved_bytes(model)
    assert plain_largest >= logits_bytes  # the plain path keeps all [B, T, V] logits (or their softmax)
    _, chunked_largest = saved_bytes(model, loss_chunk=4)
    assert chunked_largest < logits_bytes / 4


def test_activation_checkpointing_gives_the_same_loss_and_gradients_with_less_saved():
    model = tiny(dropout=0.1).train()
    plain_loss, plain_grads = loss_and_grads(model)
    plain_saved, _ = saved_bytes(model)
    model.activation_checkpointing = True
    loss, grads = loss_and_grads(model)  # dropout replays the same masks in the recomputation
    assert torch.equal(loss, plain_loss)
    for name, g in grads.items():
        torch.testing.assert_close(g, plain_grads[name], rtol=1e-6, atol=1e-8, msg=name)
    saved, _ = saved_bytes(model)
    assert saved < plain_saved / 2
    model.eval()  # inference is untouched
    with torch.no_grad():
        x, _, _ = batch()
        model.activation_checkpointing = False
        reference = model(x).logits
        model.activation_checkpointing = True
        assert torch.equal(model(x).logits, reference)


@pytest.mark.exactness
def test_training_cli_with_both_options_gives_the_plain_losses(tmp_path, corpus, capsys):
    def losses(name, *flags):
        code, _, err = tiny_pretrain(tmp_path / name, corpus, "--max_steps", "4", *flags, capsys=capsys)
        assert code == 0, err
        return [json.loads(line)["loss"] for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]

    plain = losses("plain", "--dtype", "float32")
    both = losses("both", "--dtype", "float32", "--activation_checkpointing", "--loss_chunk", "7")
    assert len(plain) == 4 and plain[-1] < plain[0]
    assert both == pytest.approx(plain, rel=1e-5)
