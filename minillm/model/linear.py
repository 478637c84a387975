"""Linear layers that decode one row at the memory-bandwidth limit: Linear (float) and Int8Linear (int8 weights).

Decoding one token multiplies a single row by every weight matrix, so it is bound by how fast the weights are
read. On AMD CPUs torch's one-row product (MKL's GEMV) reads them with one core's bandwidth whatever the
thread count (bench/gemv_bandwidth.py). Written as a multiply and a sum over the input dimension, the same
product becomes, under torch.compile, one reduction kernel that inductor splits over the output rows across
every core and never materialises the product (bench/RESULTS.md, "Decoding against llama.cpp"). Where the BLAS
GEMV already reads with every core (MKL on Intel CPUs: device.threaded_blas_gemv), float products stay
F.linear, which was faster there. Outside torch.compile, and for more than one row, Linear is exactly F.linear:
training, prefill and batches do not change.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from minillm.device import threaded_blas_gemv

# Decided once, at import: torch.compile reads it while tracing (a guarded global), never per call.
BLAS_GEMV = threaded_blas_gemv()


def _one_row(x: torch.Tensor) -> bool:
    """True when x holds a single row and we are being traced by torch.compile (the decode step)."""
    return torch.compiler.is_compiling() and x.numel() == x.shape[-1]


def row_product(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None = None,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T (* scale per output) (+ bias) for one row as a multiply-and-sum in x's dtype (weight cast
    element by element)."""
    y = (x.unsqueeze(-2) * weight.to(x.dtype)).sum(-1)
    if scale is not None:
        y = y * scale.to(x.dtype)
    return y if bias is None else y + bias


class Linear(nn.Linear):
    """nn.Linear (same parameters, same state-dict names) whose one-row product compiles to a parallel reduction."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """F.linear, computed as row_product for a single row under torch.compile (except on CPUs whose BLAS
        GEMV is threaded)."""
        if _one_row(x) and not (BLAS_GEMV and x.device.type == "cpu"):
            return row_product(x, self.weight, bias=self.bias)
        return F.linear(x, self.weight, self.bias)


class Int8Linear(nn.Module):
    """Weight-only int8: weight ~= weight_int8 * scale[:, None], one scale per output row (symmetric, absmax/127).

    The activations stay in float. A one-row product under torch.compile reads the int8 weights (a quarter of
    float32's bytes) and converts them in registers. Up to BLOCKED_MAX_ROWS rows outside torch.compile (eager
    decoding, the server's batched steps) dequantize DEQUANT_BLOCK output rows at a time, each block used while
    it is still in cache; longer inputs (prefill) dequantize the whole weight for one F.linear.
    """

    # Measured on a 2-core Xeon, 25.8M shape: 1.3-1.6x faster than the whole-weight product for 1 to 16 rows,
    # 1.1x slower at 512 rows (bench/RESULTS.md, "int8 without torch.compile").
    DEQUANT_BLOCK = 256
    BLOCKED_MAX_ROWS = 64

    def __init__(self, linear: nn.Linear):
        super().__init__()
        w = linear.weight.detach().float()
        scale = w.abs().amax(dim=1).clamp(min=torch.finfo(torch.float32).tiny) / 127
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("weight_int8", torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale.to(linear.weight.dtype))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())

    def dequantized(self, dtype: torch.dtype, rows: slice = slice(None)) -> torch.Tensor:
        """The weight this layer multiplies by, [out, in] (or those output rows), in dtype."""
        return self.weight_int8[rows].to(dtype).mul_(self.scale[rows, None].to(dtype))  # .to copies: mul_ is safe

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x @ (weight_int8 * scale).T (+ bias)."""
        if _one_row(x):
            return row_product(x, self.weight_int8, self.scale, self.bias)
        if torch.compiler.is_compiling() or x.numel() > self.BLOCKED_MAX_ROWS * x.shape[-1]:
            return F.linear(x, self.dequantized(x.dtype), self.bias)
        y = x.new_empty(*x.shape[:-1], self.out_features)
        for start in range(0, self.out_features, self.DEQUANT_BLOCK):
            rows = slice(start, start + self.DEQUANT_BLOCK)
            y[..., rows] = F.linear(x, self.dequantized(x.dtype, rows), None if self.bias is None else self.bias[rows])
        return y

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, int8 per output row"


@torch.inference_mode()
def rows_independent(model: nn.Module, rows: int) -> bool:
    """True when every linear layer of `model` gives a row the same bits whether it is multiplied alone or with
    up to `rows - 1` others.

    BLAS libraries pick their kernel by the row count, and kernels sum in different orders: MKL on an Intel Xeon
    has one kernel for a single row, one for a few and one for many, whose results differ in the last bits (on
    AMD EPYCs its products are the same for every count). Row position within one count does not matter. A
    server that promises a request the same tokens alone as beside others asks this once, with random rows.
    """
    g = torch.Generator().manual_seed(0)
    for module in model.modules():
        if not isinstance(module, (nn.Linear, Int8Linear)):
            continue
        ref = module.scale if isinstance(module, Int8Linear) else module.weight  # the activations' dtype, device
        x = torch.randn(rows, module.in_features, generator=g).to(ref.device, ref.dtype)
        first = module(x[:1])
        if any(not torch.equal(module(x[:m])[:1], first) for m in range(2, rows + 1)):
            return False
    return True


def quantize_int8(model: nn.Module) -> nn.Module:
    """Replace every nn.Linear of the model by an Int8Linear, in place (inference only; the embedding stays float).

    A tied LM head is quantized too: the embedding keeps its float matrix, the head reads the int8 copy.
    Mixture-of-Experts models are refused: their experts are stacked tensors, not Linear layers, and the router
    reads its float weight directly, so quantizing would change the routing and leave most weights float.
    """
    if getattr(getattr(model, "config", None), "num_experts", 0):
        raise ValueError("--quantize int8 supports dense models only: this Mixture-of-Experts model keeps its "
                         "experts as stacked tensors that the int8 path does not cover; run it without --quantize")
    for module in list(model.modules()):
        for attr, child in list(module.named_children()):
            if type(child) in (nn.Linear, Linear):
                setattr(module, attr, Int8Linear(child))
    model.requires_grad_(False)
    return model
