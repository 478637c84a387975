"""MiniLLM: a Llama-style decoder written by hand (RMSNorm, RoPE, GQA, SwiGLU, tied embeddings, KV cache, QK-norm).

Shapes are named in suffixes: B batch, T new tokens, S cached + new tokens, C hidden size,
H query heads, K key/value heads, D head dim, V vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from minillm.model.config import LMConfig
from minillm.model.kv_cache import KVCache, SlotKVCache
from minillm.model.linear import Int8Linear, Linear
from minillm.model.loss import chunked_cross_entropy, masked_cross_entropy
from minillm.model.moe import MoE, RouterStats, load_balancing_loss, router_z_loss


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight, computed in float32 whatever the input dtype."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise over the last dimension."""
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)  # one fused kernel
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)  # Llama's order: cast back, then scale


def rope_tables(config: LMConfig, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of shape [max_position_embeddings, head_dim] in the half-split (rotate_half) layout."""
    D = config.head_dim
    # Frequencies in float32 as transformers computes them; the angles in float64 so that far positions
    # are not rounded.
    inv_freq_D2 = 1.0 / (config.rope_theta ** (torch.arange(0, D, 2, device=device).float() / D))
    t_P = torch.arange(config.max_position_embeddings, device=device, dtype=torch.float64)
    angles_PD2 = torch.outer(t_P, inv_freq_D2.double())
    angles_PD = torch.cat([angles_PD2, angles_PD2], dim=-1)
    return angles_PD.cos().float(), angles_PD.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (i, i + D/2) of the last dimension by the position's angle (cos/sin broadcast to x)."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return x * cos + rotated * sin


def decode_attention(q_BHTD: torch.Tensor, k_BKSD: torch.Tensor, v_BKSD: torch.Tensor) -> torch.Tensor:
    """One query per head over every cached key: two small matmuls, [B, H, 1, D].

    Chosen when SDPA's flash kernel, splitting this tiny job across threads, lost under load; isolated, SDPA
    is faster on some CPUs (bench/levers.py; bench/RESULTS.md, "Levers"). Compiled at batch 1, the two
    products are written as multiply-and-sum so that inductor fuses the whole step instead of matching
    them back into an SDPA call (model/linear.py says why).
    """
    B, H, _, D = q_BHTD.shape
    K = k_BKSD.shape[1]
    G = H // K  # query heads per KV head; head h reads KV head h // G, as in enable_gqa
    q_BKGD = q_BHTD.reshape(B, K, G, D)
    if torch.compiler.is_compiling() and B == 1:  # multiply-and-sum: inductor fuses it all (see linear.py)
        scores_BKGS = (q_BKGD[:, :, :, None, :] * k_BKSD[:, :, None]).sum(-1) * D**-0.5
        probs_BKGS = scores_BKGS.softmax(-1, dtype=torch.float32).to(v_BKSD.dtype)
        return (probs_BKGS[..., None] * v_BKSD[:, :, None]).sum(-2).reshape(B, H, 1, D)
    scores_BKGS = q_BKGD @ k_BKSD.transpose(-1, -2) * D**-0.5
    probs_BKGS = scores_BKGS.softmax(-1, dtype=torch.float32).to(v_BKSD.dtype)
    return (probs_BKGS @ v_BKSD).reshape(B, H, 1, D)


class Attention(nn.Module):
    """Grouped-query self-attention through SDPA; q, k and v come from one fused projection."""

    def __init__(self, config: LMConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = (config.num_attention_heads, config.num_key_value_heads,
                                                        config.head_dim)
        # Fused q|k|v: one matmul instead of three. hf.py splits it back into q_proj, k_proj, v_proj.
        qkv_out = (self.n_heads + 2 * self.n_kv_heads) * self.head_dim
        self.qkv_proj = Linear(config.hidden_size, qkv_out, bias=config.attention_bias)
        self.o_proj = Linear(self.n_heads * self.head_dim, config.hidden_size, bias=False)
        self.dropout = config.dropout
        self.qk_norm = config.qk_norm
        if self.qk_norm:  # Qwen3: each head's queries and keys normalised over head_dim before RoPE
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)

    def forward(self, x_BTC: torch.Tensor, cos_T1D: torch.Tensor, sin_T1D: torch.Tensor,
                kv_cache: KVCache | SlotKVCache | None = None, layer: int = 0) -> torch.Tensor:
        """Attend causally over the cached and the new positions."""
        B, T, _ = x_BTC.shape
        H, K, D = self.n_heads, self.n_kv_heads, self.head_dim
        qkv_BTND = self.qkv_proj(x_BTC).view(B, T, H + 2 * K, D)  # N = H query + K key + K value heads
        # Queries and keys rotate in one call (half the kernels of rotating them apart).
        qk_BTND = qkv_BTND[:, :, :H + K]
        if self.qk_norm:
            qk_BTND = torch.cat([self.q_norm(qk_BTND[:, :, :H]), self.k_norm(qk_BTND[:, :, H:])], dim=2)
        qk_BTND = apply_rope(qk_BTND, cos_T1D, sin_T1D)
        q_BHTD = qk_BTND[:, :, :H].transpose(1, 2)
        k_BKTD = qk_BTND[:, :, H:].transpose(1, 2)
        v_BKTD = qkv_BTND[:, :, H + K:].transpose(1, 2)
        if isinstance(kv_cache, SlotKVCache):
            y_BHTD = kv_cache.attend(layer, q_BHTD, k_BKTD, v_BKTD)
            return self.o_proj(y_BHTD.transpose(1, 2).reshape(B, T, H * D))
        past = 0
        if kv_cache is not None:
            past = kv_cache.pos
            k_BKTD, v_BKTD = kv_cache.update(layer, k_BKTD, v_BKTD)
        if T == 1 and not (self.training and self.dropout):
            y_BHTD = decode_attention(q_BHTD, k_BKTD, v_BKTD)
            return self.o_proj(y_BHTD.transpose(1, 2).reshape(B, T, H * D))
        if T == 1:
            mask, causal = None, False  # one new query sees every cached key
        elif past == 0:
            mask, causal = None, True
        else:  # a chunk after a prefix: query i sees keys up to past + i (bottom-right aligned)
            S = past + T
            mask = torch.ones(T, S, dtype=torch.bool, device=x_BTC.device).tril(diagonal=past)
            causal = False
        y_BHTD = F.scaled_dot_product_attention(
            q_BHTD, k_BKTD, v_BKTD, attn_mask=mask, is_causal=causal,
            dropout_p=self.dropout if self.training else 0.0, enable_gqa=K != H)
        return self.o_proj(y_BHTD.transpose(1, 2).reshape(B, T, H * D))


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x)), gate and up fused into one matmul."""

    def __init__(self, config: LMConfig):
        super().__init__()
        self.intermediate_size = config.intermediate_size
        self.gate_up_proj = Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x_BTC: torch.Tensor) -> torch.Tensor:
        """Gated feed-forward."""
        gate_BTI, up_BTI = self.gate_up_proj(x_BTC).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate_BTI) * up_BTI)


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: LMConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MoE(config) if layer in config.sparse_layers() else MLP(config)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x_BTC: torch.Tensor, cos_T1D: torch.Tensor, sin_T1D: torch.Tensor,
                kv_cache: KVCache | SlotKVCache | None = None) -> torch.Tensor:
        """One transformer layer."""
        x_BTC = x_BTC + self.resid_dropout(
            self.self_attn(self.input_layernorm(x_BTC), cos_T1D, sin_T1D, kv_cache, self.layer))
        return x_BTC + self.resid_dropout(self.mlp(self.post_attention_layernorm(x_BTC)))


@dataclass
class ModelOutput:
    """What MiniLLM.forward returns."""

    logits: torch.Tensor | None
    """[B, T, V] next-token logits (None when the loss was computed in chunks)."""
    loss: torch.Tensor | None = None
    """Mean cross-entropy over the counted tokens, when labels were given."""


class MiniLLM(nn.Module):
    """A decoder-only language model whose weights map one to one onto Hugging Face's Llama/Qwen2/Qwen3."""

    def __init__(self, config: LMConfig):
        super().__init__()
        self.config = config
        # _weight skips nn.Embedding's own init: reset_parameters() below draws the real one.
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size,
                                         _weight=torch.empty(config.vocab_size, config.hidden_size))
        self.dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()
        # Training-time switch: recompute each block in backward instead of keeping its activations.
        self.activation_checkpointing = False
        # Built on the meta device (from_pretrained, or meta -> to_empty() -> reset_parameters()), there is
        # nothing to compute yet; normal_ or pow on meta tensors would also import torch's symbolic machinery
        # (2 s and 70 MB).
        if not self.embed_tokens.weight.is_meta:
            self.reset_parameters()

    def reset_parameters(self) -> None:
        """Draw fresh weights (N(0, initializer_range), residual projections scaled by depth); set RoPE tables."""
        self.tie_weights()  # to_empty() gives the two modules separate tensors
        self._set_rope_tables(self.embed_tokens.weight.device)
        self.apply(self._init_weights)
        # Residual output projections start smaller so the residual stream's variance stays ~constant in depth.
        depth_std = self.config.initializer_range / math.sqrt(2 * self.config.num_hidden_layers)
        for block in self.layers:
            nn.init.normal_(block.self_attn.o_proj.weight, mean=0.0, std=depth_std)
            down = block.mlp.down_proj
            nn.init.normal_(down if isinstance(down, nn.Parameter) else down.weight, mean=0.0, std=depth_std)

    def tie_weights(self) -> None:
        """Make the LM head share the embedding matrix when the config ties them."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    @torch.no_grad()
    def grow_vocab(self, vocab_size: int) -> None:
        """Add rows for new tokens (a tokenizer's added control tokens), each the mean of the existing rows: a
        start the softmax neither favours nor ignores. The ids the model knew keep their weights."""
        old = self.config.vocab_size
        if vocab_size <= old:
            return
        weight = self.embed_tokens.weight
        rows = weight.mean(dim=0, keepdim=True).expand(vocab_size - old, -1)
        self.embed_tokens.weight = nn.Parameter(torch.cat([weight, rows]))
        self.embed_tokens.num_embeddings = vocab_size
        if not self.config.tie_word_embeddings:
            head = self.lm_head.weight
            self.lm_head.weight = nn.Parameter(torch.cat([head, head.mean(dim=0, keepdim=True).expand(
                vocab_size - old, -1)]))
        self.lm_head.out_features = vocab_size
        self.config.vocab_size = vocab_size
        self.tie_weights()

    def _set_rope_tables(self, device: torch.device | None = None) -> None:
        cos, sin = rope_tables(self.config, device)
        # Not persistent: derived from the config, so they stay out of the checkpoint.
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)
        elif isinstance(module, MoE):  # the stacked experts (the router is an nn.Linear, above)
            nn.init.normal_(module.gate_up_proj, mean=0.0, std=std)

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Number of distinct parameters (a tied matrix counts once; int8 weights count as the weights they are)."""
        n = sum(p.numel() for p in self.parameters())
        tied_head = self.lm_head if self.config.tie_word_embeddings else None  # quantized, a copy of the embedding
        n += sum(m.weight_int8.numel() + (0 if m.bias is None else m.bias.numel()) for m in self.modules()
                 if isinstance(m, Int8Linear) and m is not tied_head)
        if exclude_embeddings:
            n -= self.embed_tokens.weight.numel()
        return n

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                loss_mask: torch.Tensor | None = None, kv_cache: KVCache | SlotKVCache | None = None,
                loss_chunk: int = 0, logits_to_keep: int = 0) -> ModelOutput:
        """Logits for every position and, given already-shifted labels, the masked mean cross-entropy.

        loss_chunk > 0 (with labels) computes the loss over chunks of that many positions and returns no
        logits: the [B, T, V] logits are never all in memory, in forward or backward. logits_to_keep > 0
        (without labels) returns the logits of the last that many positions only, as transformers' argument:
        a prompt's prefill needs one row of the LM head, not T.
        """
        if logits_to_keep and labels is not None:
            raise ValueError("logits_to_keep applies without labels: the loss needs every position's logits")
        B, T = input_ids.shape
        past = kv_cache.pos if isinstance(kv_cache, KVCache) else 0
        if past + T > self.config.max_position_embeddings:
            raise ValueError(f"sequence of {past + T} positions exceeds max_position_embeddings "
                             f"({self.config.max_position_embeddings})")
        x_BTC = self.dropout(self.embed_tokens(input_ids))
        # Positions [T] (or [B, 1] for a SlotKVCache) -> cos/sin [T, 1, D] ([B, 1, 1, D]), broadcast over heads.
        index = kv_cache.rope_index(T) if kv_cache is not None else slice(0, T)
        cos_T1D = self.rope_cos[index][..., None, :].to(x_BTC.dtype)
        sin_T1D = self.rope_sin[index][..., None, :].to(x_BTC.dtype)
        recompute = self.activation_checkpointing and self.training and torch.is_grad_enabled() and kv_cache is None
        for block in self.layers:
            if recompute:  # keep only the block's input; backward runs its forward again (same dropout masks)
                x_BTC = checkpoint(block, x_BTC, cos_T1D, sin_T1D, use_reentrant=False)
            else:
                x_BTC = block(x_BTC, cos_T1D, sin_T1D, kv_cache)
        if kv_cache is not None:
            kv_cache.advance(T)
        logits_BTV, loss = None, None
        if labels is not None and loss_chunk > 0:
            loss = chunked_cross_entropy(self.lm_head, self.norm(x_BTC), labels, loss_mask, loss_chunk)
        else:
            logits_BTV = self.lm_head(self.norm(x_BTC[:, -logits_to_keep:] if logits_to_keep else x_BTC))
            if labels is not None:
                loss = masked_cross_entropy(logits_BTV, labels, loss_mask)
        if loss is not None and self.config.num_experts:  # transformers adds it to the loss the same way
            loss = loss + self.router_loss()
        return ModelOutput(logits=logits_BTV, loss=loss)

    def router_stats(self) -> list[RouterStats]:
        """The routing of each sparse layer in the last forward pass."""
        return [block.mlp.last_stats for block in self.layers if isinstance(block.mlp, MoE)]

    def router_loss(self) -> torch.Tensor:
        """router_aux_loss_coef x the load-balancing loss (+ router_z_loss_coef x the z-loss) of the last forward."""
        stats = self.router_stats()
        loss = self.config.router_aux_loss_coef * load_balancing_loss(stats, self.config.num_experts)
        if self.config.router_z_loss_coef:
            loss = loss + self.config.router_z_loss_coef * router_z_loss(stats)
        return loss

    # --- checkpoints in the Hugging Face layout --------------------------------------------------------
    def save_pretrained(self, directory: str | Path, tokenizer=None) -> None:
        """Write config.json and model.safetensors (HF Llama names), plus the tokenizer files if given."""
        from minillm.model.hf import save_pretrained

        save_pretrained(self, directory, tokenizer)

    @classmethod
    def from_pretrained(cls, directory: str | Path, dtype: torch.dtype | None = None,
                        device: torch.device | str | None = None) -> MiniLLM:
        """Load minillm's output or a Hugging Face Llama/Qwen2/Qwen3 checkpoint (safetensors only)."""
        from minillm.model.hf import load_pretrained

        return load_pretrained(cls, directory, dtype=dtype, device=device)
