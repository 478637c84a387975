"""The optimizers: AdamW for everything, or Muon for the blocks' hidden matrices with AdamW for the rest.

Muon orthogonalises each weight matrix's momentum with a few Newton-Schulz iterations, so every
direction of the matrix moves at the same rate. It suits the hidden projections of the transformer
blocks; the embedding (tied to the head), the norms and the biases keep AdamW, as in the Muon papers.
Both optimizers sit behind one object with one state_dict, so a checkpoint resumes either exactly. Every
parameter group carries its `peak_lr`; the trainer multiplies it by the schedule's factor.

torch.optim.Muon runs its iterations in bfloat16, which a CPU without bf16 units emulates: 64 s per step
of the default model on the project's AVX2 CPU. The Muon here is the same update with the iterations in
a dtype the device computes natively (float32 there, bfloat16 on GPUs and AMX CPUs).
"""

from __future__ import annotations

import math
import re
from typing import Any

import torch

from minillm.device import native_bf16

OPTIMIZERS = ("adamw", "muon")
# The hidden matrices Muon takes: the attention and feed-forward projections of every block (not LoRA's).
_HIDDEN_MATRIX = re.compile(r"(^|\.)layers\.\d+\.(self_attn|mlp)\.\w+_proj\.weight$")


def hidden_matrices(model: torch.nn.Module) -> list[str]:
    """Names of the trainable parameters Muon updates under --optimizer muon."""
    return [n for n, p in model.named_parameters() if p.requires_grad and p.dim() == 2 and _HIDDEN_MATRIX.search(n)]


# The quintic Newton-Schulz coefficients of the Muon reference implementation (Keller Jordan, 2024).
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def orthogonalise(g: torch.Tensor, steps: int = 5, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Approximately U V^T of g = U S V^T (singular values pushed into ~[0.7, 1.2]) by Newton-Schulz iterations."""
    a, b, c = NS_COEFFICIENTS
    x = g.to(dtype)
    wide = x.shape[0] <= x.shape[1]
    x = x if wide else x.T  # iterate on the smaller Gram matrix
    x = x / x.norm().clamp(min=1e-7)  # spectral norm <= Frobenius norm = 1: inside the iteration's range
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x if wide else x.T


class Muon(torch.optim.Optimizer):
    """Nesterov momentum, orthogonalised per matrix, scaled to AdamW's update size (0.2 sqrt(max(rows, cols)))."""

    def __init__(self, params, lr: float, weight_decay: float = 0.0, momentum: float = 0.95, ns_steps: int = 5,
                 ns_dtype: torch.dtype = torch.float32) -> None:
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay, "momentum": momentum,
                                  "ns_steps": ns_steps, "ns_dtype": ns_dtype})

    @torch.no_grad()
    def step(self, closure=None) -> None:
        """One update of every matrix with a gradient."""
        for group in self.param_groups:
            lr, mu = group["lr"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - mu)
                update = orthogonalise(p.grad.lerp(buf, mu), group["ns_steps"], group["ns_dtype"])
                # Moonshot's scaling ("Muon is Scalable for LLM Training"): the update's RMS matches AdamW's,
                # so Muon reuses AdamW's learning rate and weight decay.
                p.mul_(1 - lr * group["weight_decay"])
                p.add_(update.to(p.dtype), alpha=-lr * 0.2 * math.sqrt(max(p.shape)))


class MuonWithAdamW:
    """Muon on the hidden matrices and AdamW on the rest, stepped, zeroed, saved and loaded as one optimizer."""

    def __init__(self, muon: torch.optim.Optimizer, adamw: torch.optim.Optimizer) -> None:
        self.optimizers = {"muon": muon, "adamw": adamw}

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        """Every group of both optimizers (GradScaler unscales and the trainer sets learning rates through it)."""
        return [g for opt in self.optimizers.values() for g in opt.param_groups]

    def step(self, closure=None) -> None:
        """One update of every parameter."""
        for opt in self.optimizers.values():
            opt.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear every gradient."""
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        """Both optimizers' state dicts, by name."""
        return {name: opt.state_dict() for name, opt in self.optimizers.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what state_dict() returned."""
        if not isinstance(state, dict) or set(state) != set(self.optimizers):
            raise ValueError("the checkpoint's optimizer state is not Muon + AdamW's")
        for name, opt in self.optimizers.items():
            opt.load_state_dict(state[name])


def set_peak_lr(optimizer, learning_rate: float, matrix_lr: float = 0.0) -> None:
    """Write every group's peak_lr: learning_rate, and matrix_lr (or learning_rate) for Muon's matrices.

    Called after a resume too: the flags' rates hold, not those saved with the optimizer's groups.
    """
    for group in optimizer.param_groups:
        group["peak_lr"] = learning_rate
    if isinstance(optimizer, MuonWithAdamW):
        for group in optimizer.optimizers["muon"].param_groups:
            group["peak_lr"] = matrix_lr or learning_rate


def build_optimizer(model: torch.nn.Module, kind: str, learning_rate: float, weight_decay: float,
                    device: torch.device, matrix_lr: float = 0.0):
    """AdamW (weight decay on matrices only), or Muon + AdamW when kind is 'muon'; groups carry peak_lr."""
    if kind not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {kind!r}")
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    muon_names = set(hidden_matrices(model)) if kind == "muon" else set()
    rest = [(n, p) for n, p in named if n not in muon_names]
    groups = [{"params": [p for _, p in rest if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for _, p in rest if p.dim() < 2], "weight_decay": 0.0}]
    # Fused: one kernel per tensor instead of ~8 passes over it; on the CPU that is 3x faster than the
    # default for-loop (bench/RESULTS.md).
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=learning_rate, betas=(0.9, 0.95),
                                  eps=1e-8, fused=device.type in ("cuda", "cpu"))
    if kind == "muon":
        if not muon_names:
            raise ValueError("--optimizer muon found no trainable hidden matrices "
                             "(layers.N.self_attn/mlp.*_proj.weight)")
        fast = device.type == "cuda" or native_bf16()
        muon = Muon([p for n, p in named if n in muon_names], lr=matrix_lr or learning_rate,
                    weight_decay=weight_decay, ns_dtype=torch.bfloat16 if fast else torch.float32)
        optimizer = MuonWithAdamW(muon, optimizer)
    set_peak_lr(optimizer, learning_rate, matrix_lr)
    return optimizer
