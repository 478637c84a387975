"""LMConfig: the model's hyperparameters, validated, with JSON and Hugging Face config.json round trips."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from minillm.files import read_json, write_json

_REQUIRED_HF_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")


@dataclass
class LMConfig:
    """Hyperparameters of a decoder-only transformer in the Llama family."""

    vocab_size: int = 6400
    """Number of token ids the embedding and the LM head cover."""
    hidden_size: int = 512
    """Width of the residual stream (d_model)."""
    num_hidden_layers: int = 8
    """Number of transformer blocks."""
    num_attention_heads: int = 8
    """Query heads per attention layer; must divide hidden_size."""
    num_key_value_heads: int | None = 2
    """Key/value heads (grouped-query attention); must divide num_attention_heads. None means MHA."""
    intermediate_size: int | None = None
    """Hidden width of the SwiGLU feed-forward; None derives 8/3 * hidden_size rounded up to a multiple of 64."""
    head_dim: int | None = None
    """Width of one attention head; None derives hidden_size / num_attention_heads (Qwen3 sets it apart, e.g.
    128 at hidden_size 1024 with 16 heads)."""
    max_position_embeddings: int = 2048
    """Longest sequence the rotary tables (and the KV cache) cover."""
    rope_theta: float = 1e6
    """Base of the rotary position embedding frequencies."""
    rms_norm_eps: float = 1e-5
    """Epsilon inside RMSNorm's square root."""
    dropout: float = 0.0
    """Dropout on attention probabilities and residual branches during training."""
    tie_word_embeddings: bool = True
    """Share one matrix between the token embedding and the LM head."""
    attention_bias: bool = False
    """Bias on the q, k and v projections (the Qwen2 layout); o_proj never has one."""
    qk_norm: bool = False
    """RMSNorm over each head's queries and keys (one weight per head_dim) before RoPE: the Qwen3 layout, saved as
    Qwen3ForCausalLM."""
    num_experts: int = 0
    """Experts of each sparse feed-forward layer (Mixture of Experts, saved in the Qwen3-MoE layout, which has QK-norm:
    the training scripts turn --qk_norm on with it); 0: dense."""
    num_experts_per_tok: int = 2
    """Experts each token is routed to (top-k of a softmax router)."""
    moe_intermediate_size: int | None = None
    """Hidden width of each expert's SwiGLU; None: intermediate_size / num_experts_per_tok, rounded up to 64."""
    decoder_sparse_step: int = 1
    """Layer i (0-based) is sparse when (i + 1) is a multiple of this and i is not in mlp_only_layers."""
    mlp_only_layers: list[int] = field(default_factory=list)
    """Layers that stay dense in a MoE model."""
    norm_topk_prob: bool = True
    """Renormalise each token's top-k router probabilities to sum to 1."""
    router_aux_loss_coef: float = 0.001
    """Weight of the load-balancing loss (Switch Transformer's, as transformers computes it) in the training loss."""
    router_z_loss_coef: float = 0.0
    """Weight of the router z-loss (mean squared logsumexp of the router logits, ST-MoE); 0: off."""
    bos_token_id: int = 0
    """Id that starts a sequence (minillm uses <|endoftext|> as the document separator and prefix)."""
    eos_token_id: int = 0
    """Id that ends a document (<|endoftext|>)."""
    pad_token_id: int = 0
    """Id used for padding; equal to eos in minillm, which the loss mask accounts for."""
    initializer_range: float = 0.02
    """Standard deviation of the normal weight initialisation."""
    trained_context: int | None = None
    """Sequence length the model was last trained on (recorded by train_*.py); eval_ppl.py defaults to it."""
    chat_trained: bool | None = None
    """Whether the model was fine-tuned on the chat template (recorded by train_*.py; None: unknown)."""

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.intermediate_size is None:
            self.intermediate_size = 64 * math.ceil(8 * self.hidden_size / 3 / 64)
        if self.head_dim is None and isinstance(self.num_attention_heads, int) and self.num_attention_heads > 0:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(f"num_attention_heads ({self.num_attention_heads}) must divide hidden_size "
                                 f"({self.hidden_size}), or give head_dim")
            self.head_dim = self.hidden_size // self.num_attention_heads
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "intermediate_size", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"LMConfig.{name} must be a positive integer, got {value!r}")
        for name in ("rope_theta", "rms_norm_eps", "dropout", "initializer_range"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                raise ValueError(f"LMConfig.{name} must be a finite number, got {value!r}")
        for name in ("tie_word_embeddings", "attention_bias", "qk_norm"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"LMConfig.{name} must be true or false, got {getattr(self, name)!r}")
        self._check_experts()
        if self.qk_norm and self.attention_bias:
            raise ValueError("qk_norm with attention_bias is not supported: Qwen3's attention_bias also puts a bias "
                             "on o_proj, and minillm's is Qwen2's (q, k and v only)")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_key_value_heads ({self.num_key_value_heads}) must divide "
                             f"num_attention_heads ({self.num_attention_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim ({self.head_dim}) must be even for rotary embeddings")
        if not self.rope_theta > 0:
            raise ValueError(f"rope_theta must be positive, got {self.rope_theta}")
        if not self.rms_norm_eps > 0:
            raise ValueError(f"rms_norm_eps must be positive, got {self.rms_norm_eps}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.trained_context is not None and (not isinstance(self.trained_context, int) or self.trained_context < 2):
            raise ValueError(f"trained_context must be an integer >= 2 or None, got {self.trained_context!r}")
        if self.chat_trained not in (None, True, False):
            raise ValueError(f"chat_trained must be true, false or null, got {self.chat_trained!r}")
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < self.vocab_size:
                raise ValueError(f"{name} ({value}) must be a valid id below vocab_size ({self.vocab_size})")

    def _check_experts(self) -> None:
        if not isinstance(self.num_experts, int) or isinstance(self.num_experts, bool) or self.num_experts < 0:
            raise ValueError(f"num_experts must be an integer >= 0, got {self.num_experts!r}")
        if not self.num_experts:
            return
        if not self.qk_norm:
            raise ValueError("a Mixture of Experts model is saved in the Qwen3-MoE layout, which has QK-norm: "
                             "set qk_norm too (--qk_norm)")
        if not isinstance(self.num_experts_per_tok, int) or not 1 <= self.num_experts_per_tok <= self.num_experts:
            raise ValueError(f"num_experts_per_tok must be between 1 and num_experts ({self.num_experts}), got "
                             f"{self.num_experts_per_tok!r}")
        if self.moe_intermediate_size is None:
            self.moe_intermediate_size = 64 * math.ceil(self.intermediate_size / self.num_experts_per_tok / 64)
        if not isinstance(self.moe_intermediate_size, int) or self.moe_intermediate_size <= 0:
            raise ValueError(f"moe_intermediate_size must be a positive integer, got {self.moe_intermediate_size!r}")
        if not isinstance(self.decoder_sparse_step, int) or self.decoder_sparse_step < 1:
            raise ValueError(f"decoder_sparse_step must be an integer >= 1, got {self.decoder_sparse_step!r}")
        for name in ("router_aux_loss_coef", "router_z_loss_coef"):
            if not math.isfinite(getattr(self, name)) or getattr(self, name) < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {getattr(self, name)!r}")
        if not self.sparse_layers():
            raise ValueError("num_experts is set but decoder_sparse_step and mlp_only_layers leave no sparse layer")

    def sparse_layers(self) -> list[int]:
        """The layers whose feed-forward is a Mixture of Experts (Qwen3-MoE's rule)."""
        if not self.num_experts:
            return []
        return [i for i in range(self.num_hidden_layers)
                if (i + 1) % self.decoder_sparse_step == 0 and i not in self.mlp_only_layers]

    def shape(self) -> dict[str, Any]:
        """The fields that decide the weights' names and shapes (what a checkpoint must match)."""
        keys = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "intermediate_size", "head_dim", "tie_word_embeddings", "attention_bias", "qk_norm", "num_experts",
                "moe_intermediate_size", "decoder_sparse_step", "mlp_only_layers")
        return {k: getattr(self, k) for k in keys}

    # --- minillm's own JSON -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """All fields as a plain dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LMConfig:
        """Build from a dict of fields; unknown keys are an error so typos don't pass silently."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown LMConfig fields: {', '.join(unknown)}")
        return cls(**d)

    def save_json(self, path: str | Path) -> None:
        """Write the fields to a JSON file."""
        write_json(path, self.to_dict())

    @classmethod
    def load_json(cls, path: str | Path) -> LMConfig:
        """Read a file written by save_json."""
        return cls.from_dict(read_json(path))

    # --- Hugging Face config.json -------------------------------------------------------------------
    def to_hf_dict(self) -> dict[str, Any]:
        """A Hugging Face config.json: Llama keys, Qwen2 when attention_bias is set, Qwen3 when qk_norm is."""
        model_type = self.hf_model_type()
        d: dict[str, Any] = {
            "architectures": [{"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                               "qwen3": "Qwen3ForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}[model_type]],
            "model_type": model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            # Both spellings: transformers < 5 reads rope_theta, 5.x reads rope_parameters.
            "rope_theta": self.rope_theta,
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
            "attention_dropout": self.dropout,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "initializer_range": self.initializer_range,
            "use_cache": True,
        }
        if model_type != "llama":
            d.update(use_sliding_window=False, sliding_window=None, max_window_layers=self.num_hidden_layers)
        if model_type in ("qwen3", "qwen3_moe"):
            d.update(attention_bias=False)
        if model_type == "qwen3_moe":
            d.update(num_experts=self.num_experts, num_experts_per_tok=self.num_experts_per_tok,
                     moe_intermediate_size=self.moe_intermediate_size, decoder_sparse_step=self.decoder_sparse_step,
                     mlp_only_layers=list(self.mlp_only_layers), norm_topk_prob=self.norm_topk_prob,
                     router_aux_loss_coef=self.router_aux_loss_coef, output_router_logits=False)
        elif model_type == "llama":
            d.update(attention_bias=False, mlp_bias=False)
        d["minillm"] = {"dropout": self.dropout, "trained_context": self.trained_context,
                        "chat_trained": self.chat_trained}
        if self.router_z_loss_coef:
            d["minillm"]["router_z_loss_coef"] = self.router_z_loss_coef
        return d

    def hf_model_type(self) -> str:
        """The Hugging Face family this config saves as: qwen3 (QK-norm), qwen2 (q/k/v bias) or llama."""
        if self.num_experts:
            return "qwen3_moe"
        return "qwen3" if self.qk_norm else "qwen2" if self.attention_bias else "llama"

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> LMConfig:
        """Read a Hugging Face Llama, Qwen2 or Qwen3 config.json; unsupported variants raise a clear error."""
        if not isinstance(d, dict):
            raise ValueError(f"expected a JSON object, got {type(d).__name__}")
        missing = [k for k in _REQUIRED_HF_KEYS if k not in d]
        if missing:
            raise ValueError(f"missing required key{'s' * (len(missing) > 1)} {', '.join(missing)}")
        model_type = d.get("model_type", "llama")
        if model_type not in ("llama", "qwen2", "qwen3", "qwen3_moe"):
            raise ValueError(f"unsupported model_type {model_type!r}: minillm loads Llama, Qwen2, Qwen3 and "
                             "Qwen3-MoE layouts")
        if d.get("hidden_act", "silu") != "silu":
            raise ValueError(f"unsupported hidden_act {d['hidden_act']!r}: minillm's MLP is SwiGLU (silu)")
        if d.get("mlp_bias"):
            raise ValueError("mlp_bias=true is not supported")
        if model_type == "llama" and d.get("attention_bias"):
            raise ValueError("Llama with attention_bias=true (bias on o_proj too) is not supported; "
                             "minillm's attention_bias is the Qwen2 layout (q, k, v only)")
        if model_type in ("qwen3", "qwen3_moe") and d.get("attention_bias"):
            raise ValueError(f"{model_type} with attention_bias=true (bias on o_proj too) is not supported")
        if model_type != "llama" and d.get("use_sliding_window"):
            raise ValueError(f"{model_type} sliding-window attention is not supported")
        rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
        if not isinstance(rope, dict):
            raise ValueError(f"rope_scaling must be an object such as {{\"rope_type\": \"default\"}}, got {rope!r}")
        if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
            raise ValueError(f"unsupported rope scaling {rope!r}: only plain RoPE is implemented")
        theta = rope.get("rope_theta", d.get("rope_theta", 10000.0))
        heads = d["num_attention_heads"]

        def one_id(value: Any, default: int) -> int:
            # eos_token_id may be a list in HF configs; minillm keeps the first.
            if isinstance(value, list):
                value = value[0] if value else None
            return default if value is None else value

        extra = d.get("minillm") or {}
        eos = one_id(d.get("eos_token_id"), 0)

        def moe_fields(d: dict[str, Any]) -> dict[str, Any]:
            experts = d.get("num_experts", d.get("num_local_experts"))
            if not experts:
                raise ValueError("qwen3_moe config.json without num_experts")
            return {"num_experts": experts, "num_experts_per_tok": d.get("num_experts_per_tok", 8),
                    "moe_intermediate_size": d.get("moe_intermediate_size"),
                    "decoder_sparse_step": d.get("decoder_sparse_step", 1),
                    "mlp_only_layers": list(d.get("mlp_only_layers") or []),
                    "norm_topk_prob": bool(d.get("norm_topk_prob", False)),
                    "router_aux_loss_coef": d.get("router_aux_loss_coef", 0.001),
                    "router_z_loss_coef": extra.get("router_z_loss_coef", 0.0)}

        config = cls(
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=d.get("num_key_value_heads") or heads,
            intermediate_size=d["intermediate_size"],
            head_dim=d.get("head_dim"),
            max_position_embeddings=d.get("max_position_embeddings", 2048),
            rope_theta=theta,
            rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            dropout=extra.get("dropout", d.get("attention_dropout", 0.0)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            attention_bias=model_type == "qwen2",
            qk_norm=model_type in ("qwen3", "qwen3_moe"),
            **(moe_fields(d) if model_type == "qwen3_moe" else {}),
            bos_token_id=one_id(d.get("bos_token_id"), eos),
            eos_token_id=eos,
            pad_token_id=one_id(d.get("pad_token_id"), eos),
            initializer_range=d.get("initializer_range", 0.02),
            trained_context=extra.get("trained_context"),
            chat_trained=extra.get("chat_trained"),
        )
        return config
