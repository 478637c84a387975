"""GGUF export: a model in the Hugging Face Llama/Qwen2/Qwen3 layout as one file llama.cpp, ollama and LM Studio run.

llama.cpp's own converter knows a byte-level BPE tokenizer only by a hash of its output, so it refuses
any tokenizer trained here. This module writes the file itself with the `gguf` package (the llama.cpp
project's writer, the `[gguf]` extra): the hyperparameters llama.cpp reads, the vocabulary with its merges
and token types, a pre-tokenizer name whose split is the tokenizer's own, the special ids and the ChatML
template. Tensors are converted and written one at a time, so memory holds the model and one tensor.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from minillm.data.tokenizer import CHAT_TEMPLATE, Tokenizer
from minillm.files import atomic_path, atomic_write
from minillm.model.config import LMConfig
from minillm.model.hf import to_hf_state_dict

try:
    import gguf
except ImportError:  # the optional extra; export_gguf() says how to install it
    gguf = None

DTYPES = ("f32", "f16", "bf16", "q8_0")

# The regex of Qwen2's tokenizer.json Split pre-tokenizer; llama.cpp's "qwen2" pre-tokenizer is this split.
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
               r"\s*[\r\n]+|\s+(?!\S)|\s+")

# Hugging Face tensor names -> llama.cpp's (the same for the llama, qwen2 and qwen3 architectures).
_TOP_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
              "lm_head.weight": "output.weight"}
_BLOCK_NAMES = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
                "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
                "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm", "mlp.gate": "ffn_gate_inp",
                "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                "mlp.down_proj": "ffn_down"}


class ExportError(ValueError):
    """A model or tokenizer that GGUF (as llama.cpp reads it) cannot represent faithfully."""


def gguf_name(hf_name: str) -> str:
    """llama.cpp's name for a Hugging Face Llama/Qwen2 tensor name."""
    if hf_name in _TOP_NAMES:
        return _TOP_NAMES[hf_name]
    parts = hf_name.split(".")  # model.layers.N.<module...>.<weight|bias>
    if len(parts) < 5 or parts[:2] != ["model", "layers"] or ".".join(parts[3:-1]) not in _BLOCK_NAMES:
        raise ExportError(f"tensor {hf_name!r} has no llama.cpp counterpart")
    return f"blk.{parts[2]}.{_BLOCK_NAMES['.'.join(parts[3:-1])]}.{parts[-1]}"


def interleave_rotary(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder q/k projection rows from Hugging Face's rotary layout to llama.cpp's (for the llama architecture).

    Transformers rotates the pair (i, i + D/2) of each head (rotate_half); llama.cpp's llama architecture
    rotates the pair (2i, 2i + 1). Moving row j * D/2 + i to row 2i + j gives the same attention scores.
    """
    D = w.shape[0] // n_heads
    return w.reshape(n_heads, 2, D // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def pre_tokenizer_name(spec: dict) -> str:
    """llama.cpp's pre-tokenizer that splits text exactly as this tokenizer.json does; ExportError if none does."""
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or (spec.get("decoder") or {}).get("type") != "ByteLevel":
        raise ExportError("the tokenizer is not byte-level BPE (model BPE with a ByteLevel decoder); "
                          "GGUF export supports the byte-level BPE tokenizers of minillm, GPT-2 and Qwen2")
    if model.get("byte_fallback") or model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        raise ExportError("the BPE tokenizer uses byte_fallback or subword prefixes/suffixes, which llama.cpp's "
                          "byte-level BPE does not")
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    normalizer = (spec.get("normalizer") or {}).get("type")
    kinds = [s.get("type") for s in steps]
    if any(s.get("add_prefix_space") for s in steps if s.get("type") == "ByteLevel"):
        raise ExportError("the tokenizer's ByteLevel pre-tokenizer adds a prefix space, which llama.cpp's "
                          "byte-level BPE does not")
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True) and normalizer is None:
        return "gpt-2"  # the GPT-2 regex inside ByteLevel, as minillm's tokenizers use
    # Qwen2: the Split regex, then ByteLevel without its own regex. llama.cpp skips the NFC normalizer,
    # which changes only text that is not already NFC.
    if (kinds == ["Split", "ByteLevel"] and steps[0].get("pattern", {}).get("Regex") == QWEN2_SPLIT
            and steps[0].get("behavior") == "Isolated" and not steps[0].get("invert")
            and not steps[1].get("use_regex", True) and normalizer in (None, "NFC")):
        return "qwen2"
    raise ExportError(f"the tokenizer's pre-tokenizer ({json.dumps(pre)[:120]}) is not one llama.cpp "
                      "knows; supported: GPT-2's byte-level split (minillm's tokenizers) and Qwen2's")


@dataclass
class Vocab:
    """What GGUF's tokenizer.ggml.* keys hold."""

    tokens: list[str]
    types: list[int]
    merges: list[str]
    pre: str


def vocab_of(tokenizer: Tokenizer, vocab_size: int) -> Vocab:
    """The token strings, types and merges of `tokenizer`, padded to the model's `vocab_size` rows."""
    spec = json.loads(tokenizer.backend.to_str())
    pre = pre_tokenizer_name(spec)
    by_id = {i: t for t, i in tokenizer.backend.get_vocab(with_added_tokens=True).items()}
    added = tokenizer.backend.get_added_tokens_decoder()
    if len(by_id) > vocab_size:
        raise ExportError(f"the tokenizer has {len(by_id)} tokens but the model only {vocab_size} rows")
    kinds = gguf.TokenType
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:  # embedding rows beyond the tokenizer (Qwen2 pads its table): never produced
            tokens.append(f"[PAD{i}]")
            types.append(int(kinds.UNUSED))
        else:
            tokens.append(by_id[i])
            kind = kinds.NORMAL if i not in added else kinds.CONTROL if added[i].special else kinds.USER_DEFINED
            types.append(int(kind))
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]
    return Vocab(tokens, types, merges, pre)


def _file_type(dtype: str) -> tuple[object, int]:
    """(tensor type of the weight matrices, llama.cpp's general.file_type) for an export dtype."""
    q, f = gguf.GGMLQuantizationType, gguf.LlamaFileType
    return {"f32": (q.F32, f.ALL_F32), "f16": (q.F16, f.MOSTLY_F16), "bf16": (q.BF16, f.MOSTLY_BF16),
            "q8_0": (q.Q8_0, f.MOSTLY_Q8_0)}[dtype]


def _tensor_type(shape: tuple[int, ...], matrix_type):
    """Norms, biases and matrices whose rows do not fill whole blocks stay f32 (as llama.cpp's converter does)."""
    q = gguf.GGMLQuantizationType
    if len(shape) < 2 or matrix_type == q.F32:
        return q.F32
    block, _ = gguf.GGML_QUANT_SIZES[matrix_type]
    return matrix_type if shape[-1] % block == 0 else q.F16


def gguf_tensors(state: dict[str, torch.Tensor], config: LMConfig, arch: str
                 ) -> Iterator[tuple[str, torch.Tensor]]:
    """(llama.cpp name, float32 tensor in llama.cpp's layout) for each tensor of a MiniLLM state dict.

    A MoE layer's experts stay stacked, as llama.cpp keeps them: ffn_gate_exps and ffn_up_exps [E, F, C],
    ffn_down_exps [E, C, F]; its router is ffn_gate_inp [E, C].
    """
    heads = {"self_attn.q_proj": config.num_attention_heads, "self_attn.k_proj": config.num_key_value_heads}
    stacked = {k for k in state if k.endswith(("mlp.gate_up_proj", "mlp.down_proj"))}
    for hf_name, tensor in to_hf_state_dict({k: v for k, v in state.items() if k not in stacked}, config).items():
        tensor = tensor.detach().to("cpu", torch.float32)
        module = ".".join(hf_name.split(".")[3:-1])
        if arch == "llama" and module in heads:  # qwen2/qwen3 use transformers' rotary layout (NEOX) as it is
            tensor = interleave_rotary(tensor, heads[module])
        yield gguf_name(hf_name), tensor
    for layer in config.sparse_layers():
        gate, up = state[f"layers.{layer}.mlp.gate_up_proj"].detach().to("cpu", torch.float32).chunk(2, dim=1)
        yield f"blk.{layer}.ffn_gate_exps.weight", gate.contiguous()
        yield f"blk.{layer}.ffn_up_exps.weight", up.contiguous()
        yield f"blk.{layer}.ffn_down_exps.weight", state[f"layers.{layer}.mlp.down_proj"].detach().to("cpu", torch.float32)


def _add_metadata(w, config: LMConfig, vocab: Vocab, tokenizer: Tokenizer, name: str, file_type: int) -> None:
    """The hyperparameters, tokenizer and template keys llama.cpp reads."""
    w.add_name(name)
    w.add_file_type(file_type)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_block_count(config.num_hidden_layers)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(config.num_attention_heads)
    w.add_head_count_kv(config.num_key_value_heads)
    w.add_key_length(config.head_dim)
    w.add_value_length(config.head_dim)
    w.add_rope_dimension_count(config.head_dim)
    w.add_rope_freq_base(float(config.rope_theta))
    w.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    if config.num_experts:
        w.add_expert_count(config.num_experts)
        w.add_expert_used_count(config.num_experts_per_tok)
        w.add_expert_feed_forward_length(config.moe_intermediate_size)
    w.add_vocab_size(config.vocab_size)
    w.add_tokenizer_model("gpt2")  # llama.cpp's name for byte-level BPE
    w.add_tokenizer_pre(vocab.pre)
    w.add_token_list(vocab.tokens)
    w.add_token_types(vocab.types)
    w.add_token_merges(vocab.merges)
    # minillm's ChatML has no BOS of its own; an outside template names its own (Llama 3's <|begin_of_text|>),
    # which the template writes itself, so neither is added when tokenizing.
    bos = tokenizer.template.special.get("bos_token") if tokenizer.template is not None else None
    bos_id = tokenizer.backend.token_to_id(bos) if isinstance(bos, str) else None
    w.add_bos_token_id(tokenizer.eos_id if bos_id is None else bos_id)
    w.add_eos_token_id(tokenizer.eos_id)
    w.add_eot_token_id(tokenizer.turn_end_ids[0])
    w.add_pad_token_id(tokenizer.pad_id)
    w.add_add_bos_token(False)
    w.add_add_eos_token(False)
    w.add_chat_template(CHAT_TEMPLATE if tokenizer.template is None else tokenizer.template.source)


def modelfile_value(value: str) -> str | None:
    """`value` quoted so that ollama's Modelfile parser reads back exactly `value`, or None when no quoting can.

    ollama's values have no escapes: a value ends at the first space or newline after which the text so far is
    a whole quoted string ("..." or \"\"\"...\"\"\"), and characters that are not printable (other than
    the space, tab and newline inside quotes) are dropped. So: "v" when v holds no quote and no line break;
    \"\"\"v\"\"\" when v holds no three quotes in a row; nothing otherwise, and nothing for control or format
    characters, which ollama would drop in silence.
    """
    if not value or any(not (c.isprintable() or c in " \t\n") for c in value):
        return None
    if '"' not in value and "\n" not in value:
        return f'"{value}"'
    if '"""' not in value:
        return f'"""{value}"""'
    return None


def ollama_modelfile(gguf_file: str, chat: bool, stops: list[str] | None = None,
                     warn: Callable[[str], None] | None = None) -> str:
    """An ollama Modelfile for the GGUF beside it: ChatML and stop at <|im_end|> for chat models, raw otherwise.

    `stops` given: an outside chat template. ollama's templates are Go templates, so none is written: ollama
    takes the template from the GGUF's tokenizer.chat_template, and the Modelfile adds the turn's end markers.
    Every value is quoted (modelfile_value); a stop string no quoting can carry (it comes from the model's
    vocabulary) is left out with one line to `warn`; a file name that cannot be written is an ExportError.
    """
    source = f"./{gguf_file}"
    # A plain name goes bare, as ollama writes it; anything else quoted.
    source = source if all(c.isprintable() and c not in ' "' for c in source) else modelfile_value(source)
    if source is None:
        raise ExportError(f"the GGUF file name {gguf_file!r} cannot be written into an ollama Modelfile (it holds "
                          "a line break, a control character or three quotes in a row); choose another --out")
    template = None
    if stops is None and chat:
        template = ('{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n'
                    '{{ end }}<|im_start|>assistant\n')
        stops = ["<|im_end|>", "<|endoftext|>"]
    elif stops is None:  # a pretrained-only model continues the prompt as plain text
        template, stops = "{{ .Prompt }}", ["<|endoftext|>"]
    lines = [f"FROM {source}"] + ([f'TEMPLATE """{template}"""'] if template else [])
    if stops == ["<|im_end|>", "<|endoftext|>"]:  # minillm's ChatML: its tool calls are not carried over
        lines.insert(1, "# Tool calling is not exported: this template renders messages only (serve.py takes tools).")
    for stop in stops:
        quoted = modelfile_value(stop)
        if quoted is None:
            if warn is not None:
                warn(f"warning: the stop string {stop!r} cannot be written into the Modelfile; left out")
            continue
        lines.append(f"PARAMETER stop {quoted}")
    return "\n".join(lines) + "\n"


def export_gguf(model: torch.nn.Module, tokenizer: Tokenizer, out: Path, dtype: str = "f16",
                name: str = "minillm") -> dict[str, object]:
    """Write `model` and `tokenizer` as one GGUF file at `out` (atomically); returns a summary."""
    if gguf is None:
        raise ExportError('GGUF export needs the gguf package: pip install -e ".[gguf]"')
    if dtype not in DTYPES:
        raise ExportError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    config: LMConfig = model.config
    arch = config.hf_model_type().replace("_", "")  # llama.cpp's names: llama, qwen2, qwen3, qwen3moe
    if config.num_experts and config.sparse_layers() != list(range(config.num_hidden_layers)):
        raise ExportError("llama.cpp's qwen3moe makes every layer sparse, and this model keeps dense layers "
                          "(decoder_sparse_step / mlp_only_layers): it has no GGUF counterpart")
    if config.num_experts and not config.norm_topk_prob:
        raise ExportError("llama.cpp's qwen3moe always renormalises the top-k router weights; this model was "
                          "trained with --no-norm_topk_prob, so llama.cpp would compute another function")
    vocab = vocab_of(tokenizer, config.vocab_size)
    matrix_type, file_type = _file_type(dtype)
    state = model.state_dict()
    # Tensor infos first (names, shapes, types), then the data one tensor at a time.
    shapes = {name: tuple(t.shape) for name, t in gguf_tensors(state, config, arch)}
    types = {gname: _tensor_type(shape, matrix_type) for gname, shape in shapes.items()}
    w = gguf.GGUFWriter(None, arch)
    _add_metadata(w, config, vocab, tokenizer, name, int(file_type))
    for gname, shape in shapes.items():
        byte_shape = gguf.quant_shape_to_byte_shape(shape, types[gname])
        w.add_tensor_info(gname, byte_shape, np.dtype(np.uint8), math.prod(byte_shape), raw_dtype=types[gname])
    with atomic_path(out) as tmp:
        try:
            w.write_header_to_file(Path(tmp))
            w.write_kv_data_to_file()
            w.write_ti_data_to_file()
            for gname, t in gguf_tensors(state, config, arch):
                data = gguf.quants.quantize(t.numpy(), types[gname])
                w.write_tensor_data(np.ascontiguousarray(data).view(np.uint8))
        finally:
            w.close()
    return {"architecture": arch, "pre_tokenizer": vocab.pre, "tensors": len(shapes), "dtype": dtype,
            "bytes": out.stat().st_size}


def write_modelfile(out: Path, gguf_path: Path, chat: bool, tokenizer: Tokenizer | None = None,
                    warn: Callable[[str], None] | None = None) -> None:
    """Write the ollama Modelfile for `gguf_path` at `out` (a tokenizer with its own template: its end markers)."""
    stops = None
    if chat and tokenizer is not None and tokenizer.template is not None:
        stops = [tokenizer.backend.id_to_token(i) for i in tokenizer.stop_ids]
    atomic_write(out, ollama_modelfile(gguf_path.name, chat, stops, warn))
