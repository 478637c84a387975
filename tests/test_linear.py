"""The decode fast path (one-row products as reductions under torch.compile) and weight-only int8."""

import pytest
import torch
import torch.nn.functional as F
from conftest import needs_compiler

from minillm import device
from minillm.infer.generation import generate
from minillm.model import linear
from minillm.model.linear import Int8Linear, Linear, quantize_int8
from minillm.model.model import MiniLLM


def traced_targets(module: torch.nn.Module, x: torch.Tensor) -> list:
    """The functions torch.compile's graph of module(x) calls (a recording backend: no C++ compiler needed)."""
    targets = []

    def record(gm: torch.fx.GraphModule, example_inputs):
        targets.extend(node.target for node in gm.graph.nodes if node.op in ("call_function", "call_method"))
        return gm.forward

    torch._dynamo.reset()
    torch.compile(module, backend=record)(x)
    return targets


@pytest.fixture(params=[False, True], ids=["reduction", "blas_gemv"])
def blas_gemv(request, monkeypatch):
    """Both decode paths on any CPU: products as reductions (AMD), or left to a threaded BLAS GEMV (Intel's MKL)."""
    monkeypatch.setattr(linear, "BLAS_GEMV", request.param)
    torch._dynamo.reset()
    yield request.param
    torch._dynamo.reset()


def test_one_row_under_compile_is_a_reduction_and_nothing_else_changes(blas_gemv):
    torch.manual_seed(0)
    layer = Linear(64, 48, bias=True)
    row, rows = torch.randn(1, 1, 64), torch.randn(1, 3, 64)
    # Eager, whatever the shape: exactly F.linear.
    assert torch.equal(layer(row), F.linear(row, layer.weight, layer.bias))
    assert torch.equal(layer(rows), F.linear(rows, layer.weight, layer.bias))
    # Traced: one row becomes a multiply and a sum (or stays F.linear where the GEMV is threaded); more rows
    # stay one F.linear (training, prefill, batches).
    one = traced_targets(layer, row)
    assert (F.linear in one, "sum" in one) == ((True, False) if blas_gemv else (False, True))
    assert F.linear in traced_targets(layer, rows)
    # int8 weights always take the reduction: no BLAS multiplies them.
    one = traced_targets(Int8Linear(torch.nn.Linear(64, 48)), row)
    assert F.linear not in one and "sum" in one


def test_int8_products_of_few_rows_go_by_blocks_of_output_rows(monkeypatch):
    torch.manual_seed(0)
    q = Int8Linear(torch.nn.Linear(96, 600, bias=True))  # blocks of 256 output rows: 256, 256, 88

    def whole(x):
        return F.linear(x, q.dequantized(torch.float32), q.bias)

    few, many = torch.randn(3, 5, 96), torch.randn(2, 40, 96)  # 15 rows (blocked), 80 rows (whole weight)
    expected_few, expected_many = whole(few), whole(many)
    calls = []
    plain = F.linear
    monkeypatch.setattr(F, "linear", lambda x, w, b=None: calls.append(w.shape[0]) or plain(x, w, b))
    torch.testing.assert_close(q(few), expected_few, rtol=1e-6, atol=1e-6)
    assert calls == [256, 256, 88]
    calls.clear()
    assert torch.equal(q(many), expected_many) and calls == [600]


def test_threaded_blas_gemv_is_mkl_on_intel_unless_overridden(monkeypatch):
    monkeypatch.delenv("MINILLM_BLAS_GEMV", raising=False)
    monkeypatch.setattr(torch.backends.mkl, "is_available", lambda: True)
    for vendor, threaded in (("GenuineIntel", True), ("AuthenticAMD", False), (None, False)):
        monkeypatch.setattr(device, "_cpuinfo", lambda field, v=vendor: v if field == "vendor_id" else None)
        assert device.threaded_blas_gemv() is threaded, vendor
    monkeypatch.setattr(torch.backends.mkl, "is_available", lambda: False)  # another BLAS: no claim about it
    monkeypatch.setattr(device, "_cpuinfo", lambda field: "GenuineIntel")
    assert device.threaded_blas_gemv() is False
    for value in ("0", "1"):
        monkeypatch.setenv("MINILLM_BLAS_GEMV", value)
        assert device.threaded_blas_gemv() is (value == "1")


@needs_compiler
def test_compiled_one_row_product_equals_f_linear(blas_gemv):
    torch.manual_seed(0)
    layer = Linear(256, 300, bias=False)
    compiled = torch.compile(layer)
    x = torch.randn(1, 1, 256)
    torch.testing.assert_close(compiled(x), F.linear(x, layer.weight), rtol=1e-5, atol=1e-5)


@needs_compiler
def test_compiled_batch_one_decode_gives_the_eager_tokens_on_both_paths(tiny_model, blas_gemv):
    prompt = torch.randint(3, 97, (1, 7), generator=torch.Generator().manual_seed(0))
    eager = generate(tiny_model, prompt, max_new_tokens=24, temperature=0)
    assert torch.equal(generate(tiny_model, prompt, max_new_tokens=24, temperature=0, compile=True), eager)


def test_int8_weights_round_to_the_nearest_step_of_their_row():
    torch.manual_seed(0)
    base = torch.nn.Linear(40, 24, bias=True)
    q = Int8Linear(base)
    w = base.weight.detach()
    scale = w.abs().amax(dim=1) / 127  # absmax per output row maps to +-127
    torch.testing.assert_close(q.scale, scale)
    assert q.weight_int8.dtype == torch.int8 and int(q.weight_int8.abs().max()) == 127
    assert torch.equal(q.weight_int8, torch.round(w / scale[:, None]).to(torch.int8))
    assert ((q.dequantized(torch.float32) - w).abs() <= scale[:, None] / 2 + 1e-7).all()
    x = torch.randn(2, 5, 40)
    assert torch.equal(q(x), F.linear(x, q.dequantized(torch.float32), base.bias))
    row = torch.randn(1, 1, 40)
    one = traced_targets(q, row)
    assert F.linear not in one and "sum" in one


def test_quantize_int8_replaces_every_linear_and_keeps_the_embedding(tiny_model, tmp_path):
    model = MiniLLM(tiny_model.config)
    model.load_state_dict(tiny_model.state_dict())
    embedding = model.embed_tokens.weight.clone()
    count = model.num_parameters()
    quantize_int8(model)
    assert model.num_parameters() == count  # the int8 weights are still the model's weights, the tied head once
    kinds = {type(m) for m in model.modules()}
    assert Int8Linear in kinds and Linear not in kinds and torch.nn.Linear not in kinds
    assert torch.equal(model.embed_tokens.weight, embedding)
    with pytest.raises(ValueError, match="int8 weights"):  # no half-written directory either
        model.save_pretrained(tmp_path / "q")
    assert not (tmp_path / "q").exists()
    # The tied head reads the int8 copy of the embedding.
    torch.testing.assert_close(model.lm_head.dequantized(torch.float32), embedding,
                               atol=float(model.lm_head.scale.max()) / 2 + 1e-7, rtol=0)


def teacher_forced_agreement(reference: MiniLLM, other: MiniLLM, sequences: list[list[int]]) -> float:
    """Share of positions of the sequences where both models' most likely next token is the same."""
    agree = total = 0
    with torch.no_grad():
        for ids in sequences:
            x = torch.tensor([ids])
            a, b = reference(x).logits.argmax(-1), other(x).logits.argmax(-1)
            agree += int((a == b).sum())
            total += a.numel()
    return agree / total


def test_int8_picks_the_float_models_greedy_tokens(tiny_sft_dir, tokenizer):
    """Teacher-forced along the float model's own greedy answers to chat prompts: the same top token >= 98%."""
    model = MiniLLM.from_pretrained(tiny_sft_dir).eval()
    int8 = quantize_int8(MiniLLM.from_pretrained(tiny_sft_dir)).eval()
    prompts = ["请写一首五言绝句。", "请以《浣溪沙》为词牌，写一首词。", "写一首七言诗，要用上春风和明月。", "你好"]
    sequences = []
    for text in prompts:
        prompt, _ = tokenizer.render_conversation([{"role": "user", "content": text}], add_generation_prompt=True)
        sequences.append(generate(model, prompt, max_new_tokens=48, temperature=0)[0].tolist())
    rate = teacher_forced_agreement(model, int8, sequences)
    assert rate >= 0.98, rate
    # A coarser quantization (4 bits: 7 steps each side) does not pass: the check can fail.
    coarse = quantize_int8(MiniLLM.from_pretrained(tiny_sft_dir)).eval()
    for m in coarse.modules():
        if isinstance(m, Int8Linear):
            m.scale.mul_(127 / 7)
            m.weight_int8.copy_(torch.round(m.weight_int8.float() * 7 / 127).to(torch.int8))
    assert teacher_forced_agreement(model, coarse, sequences) < 0.98


@needs_compiler
@pytest.mark.parametrize("int8", [False, True])
def test_compiled_batch_one_decode_gives_the_eager_tokens(tiny_sft_dir, tokenizer, int8):
    """Batch 1 is the reduction path (the batch-2 case is in test_generation.py): the eager model's tokens."""
    model = MiniLLM.from_pretrained(tiny_sft_dir).eval()
    if int8:
        quantize_int8(model)
    prompt, _ = tokenizer.render_conversation([{"role": "user", "content": "请写一首五言绝句。"}],
                                              add_generation_prompt=True)
    torch._dynamo.reset()
    eager = generate(model, prompt, max_new_tokens=40, temperature=0)
    assert torch.equal(generate(model, prompt, max_new_tokens=40, temperature=0, compile=True), eager)
