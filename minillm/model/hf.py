"""Checkpoints in the Hugging Face layout: tensor-name mapping, save_pretrained and from_pretrained.

minillm fuses q|k|v and gate|up into single matrices for speed; on disk they are split back into the
separate q_proj, k_proj, v_proj, gate_proj and up_proj tensors that transformers expects.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from minillm.files import atomic_path, read_json, write_json
from minillm.model.config import LMConfig

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"


def _fused_parts(config: LMConfig) -> dict[str, list[tuple[str, int]]]:
    """minillm's fused module -> the HF modules it splits into, with their output sizes."""
    D = config.head_dim
    return {
        "self_attn.qkv_proj": [("self_attn.q_proj", config.num_attention_heads * D),
                               ("self_attn.k_proj", config.num_key_value_heads * D),
                               ("self_attn.v_proj", config.num_key_value_heads * D)],
        "mlp.gate_up_proj": [("mlp.gate_proj", config.intermediate_size),
                             ("mlp.up_proj", config.intermediate_size)],
    }


class CheckpointError(ValueError):
    """Weights that do not fit their config, or that are broken (NaN/inf)."""


_LAYER_KEY = re.compile(r"layers\.(\d+)\.(.+)\.(weight|bias)$")
_EXPERTS_KEY = re.compile(r"layers\.(\d+)\.mlp\.(gate_up_proj|down_proj)$")  # a MoE layer's stacked experts


def _split_experts(layer: str, kind: str, stacked: torch.Tensor) -> dict[str, torch.Tensor]:
    """A MoE layer's stacked [E, 2F, C] gate|up or [E, C, F] down matrices as transformers' per-expert tensors."""
    prefix = f"model.layers.{layer}.mlp.experts"
    out = {}
    for e, matrix in enumerate(stacked):
        if kind == "gate_up_proj":
            gate, up = matrix.chunk(2, dim=0)
            out[f"{prefix}.{e}.gate_proj.weight"], out[f"{prefix}.{e}.up_proj.weight"] = gate, up
        else:
            out[f"{prefix}.{e}.down_proj.weight"] = matrix
    return out


def _stack_experts(hf: Mapping[str, torch.Tensor], layer: int, num_experts: int, left: set[str],
                   cast) -> dict[str, torch.Tensor]:
    """The per-expert tensors of one MoE layer, stacked as minillm keeps them (and marked as placed)."""
    prefix = f"model.layers.{layer}.mlp.experts"
    names = {part: [f"{prefix}.{e}.{part}.weight" for e in range(num_experts)]
             for part in ("gate_proj", "up_proj", "down_proj")}
    missing = [n for group in names.values() for n in group if n not in left]
    if missing:
        raise CheckpointError(f"checkpoint is missing {', '.join(missing[:4])}")
    for group in names.values():
        left.difference_update(group)
    gate_up = [torch.cat([hf[g], hf[u]], dim=0) for g, u in zip(names["gate_proj"], names["up_proj"])]
    return {f"layers.{layer}.mlp.gate_up_proj": cast(torch.stack(gate_up)),
            f"layers.{layer}.mlp.down_proj": cast(torch.stack([hf[d] for d in names["down_proj"]]))}


def to_hf_state_dict(state_dict: dict[str, torch.Tensor], config: LMConfig) -> dict[str, torch.Tensor]:
    """Rename (and split) a MiniLLM state dict into Hugging Face Llama tensor names."""
    fused = _fused_parts(config)
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state_dict.items():
        if name == "lm_head.weight":
            if not config.tie_word_embeddings:
                out[name] = tensor
            continue
        experts = _EXPERTS_KEY.match(name)
        if experts:
            out.update(_split_experts(*experts.groups(), tensor))
            continue
        m = _LAYER_KEY.match(name)
        if m and m.group(2) in fused:
            layer, module, kind = m.groups()
            sizes = [size for _, size in fused[module]]
            for (hf_module, _), part in zip(fused[module], tensor.split(sizes, dim=0)):
                out[f"model.layers.{layer}.{hf_module}.{kind}"] = part
        else:
            out["model." + name] = tensor
    return out


def from_hf_state_dict(hf: Mapping[str, torch.Tensor], config: LMConfig,
                       dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Rename (and fuse) Hugging Face Llama/Qwen2/Qwen3 tensors into a MiniLLM state dict, cast to `dtype` if given.

    Each tensor of `hf` is read once: with a lazy mapping (SafetensorsCheckpoint) the checkpoint is never
    in memory twice, only the tensors of one fused matrix on top of the model.
    """
    cast = (lambda t: t.to(dtype)) if dtype is not None else (lambda t: t)
    # The names not placed yet (old checkpoints also keep rotary_emb.inv_freq, which is derived).
    left = {k for k in hf if not k.endswith("rotary_emb.inv_freq")}
    out: dict[str, torch.Tensor] = {}
    sparse = set(config.sparse_layers())
    for layer in range(config.num_hidden_layers):
        if layer in sparse:
            out.update(_stack_experts(hf, layer, config.num_experts, left, cast))
        for module, parts in _fused_parts(config).items():
            for kind in ("weight", "bias"):
                names = [f"model.layers.{layer}.{hf_module}.{kind}" for hf_module, _ in parts]
                missing = [n for n in names if n not in left]
                if not missing:
                    out[f"layers.{layer}.{module}.{kind}"] = cast(torch.cat([hf[n] for n in names], dim=0))
                    left.difference_update(names)
                elif len(missing) < len(names):
                    raise CheckpointError(f"checkpoint is missing {', '.join(missing)}")
    has_head = "lm_head.weight" in left
    left.discard("lm_head.weight")
    for name in left:
        if not name.startswith("model."):
            raise CheckpointError(f"unexpected tensor {name!r} in checkpoint")
        out[name[len("model."):]] = cast(hf[name])
    if config.tie_word_embeddings:
        if "embed_tokens.weight" in out:
            out["lm_head.weight"] = out["embed_tokens.weight"]
    elif has_head:
        out["lm_head.weight"] = cast(hf["lm_head.weight"])
    return out


def end_ids(config: LMConfig, tokenizer=None) -> int | list[int]:
    """generation_config's eos_token_id: a chat model ends a turn with <|im_end|> (or its template's end marker)
    as well as <|endoftext|>.

    transformers' generate (and servers that read generation_config.json, such as vLLM) stop only at
    these ids, so a chat model that listed only <|endoftext|> would run past the end of its answer.
    """
    if config.chat_trained and tokenizer is not None:  # the text's end too: a Llama 3 config may name <|eot_id|>
        return list(dict.fromkeys([config.eos_token_id, *tokenizer.stop_ids]))
    return config.eos_token_id


def save_pretrained(model: torch.nn.Module, directory: str | Path, tokenizer=None) -> None:
    """Write config.json, generation_config.json and model.safetensors (and the tokenizer, if given)."""
    state = model.state_dict()
    if any(name.endswith(".weight_int8") for name in state):
        raise ValueError("this model holds int8 weights (quantize_int8 / --quantize int8), which no Llama layout "
                         "stores: save the float model, and quantize it when loading")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config: LMConfig = model.config
    # safetensors refuses views that share storage, so each split piece is made contiguous on the CPU.
    tensors = {k: v.detach().to("cpu").contiguous()
               for k, v in to_hf_state_dict(state, config).items()}
    dtype = next(iter(tensors.values())).dtype
    hf_config = config.to_hf_dict()
    hf_config["torch_dtype"] = str(dtype).removeprefix("torch.")
    generation = {"bos_token_id": config.bos_token_id, "eos_token_id": end_ids(config, tokenizer),
                  "pad_token_id": config.pad_token_id}
    with atomic_path(directory / WEIGHTS_NAME) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    write_json(directory / "generation_config.json", generation)
    write_json(directory / CONFIG_NAME, hf_config)  # last: a directory with a config has complete weights
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)


# safetensors dtype codes -> torch dtypes. The format: an 8-byte little-endian header length, a JSON
# header {name: {dtype, shape, data_offsets: [begin, end]}}, then the raw little-endian tensor bytes.
_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool}


@dataclass
class _TensorEntry:
    path: Path
    dtype: torch.dtype
    shape: list[int]
    offset: int  # absolute byte offset in the file
    nbytes: int


def _read_header(path: Path) -> dict[str, _TensorEntry]:
    """The tensor index of one safetensors file, checked against the file's size."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        n = int.from_bytes(raw, "little") if len(raw) == 8 else -1
        if not 0 < n <= size - 8:
            raise ValueError(f"{path}: not a safetensors file (bad header length)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: not a safetensors file ({e})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: not a safetensors file (the header is not a JSON object)")
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            code, (begin, end), shape = info["dtype"], info["data_offsets"], [int(d) for d in info["shape"]]
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{path}: tensor {name!r} has a malformed header entry {info!r}") from None
        if code not in _SAFETENSORS_DTYPES:
            raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {code!r}")
        dtype = _SAFETENSORS_DTYPES[code]
        if end - begin != math.prod(shape) * dtype.itemsize or not 8 + n + end <= size:
            raise ValueError(f"{path}: tensor {name!r} lies outside the file or has the wrong size; "
                             "is the file truncated?")
        entries[name] = _TensorEntry(path, dtype, shape, 8 + n + begin, end - begin)
    return entries


def _read_tensor(name: str, e: _TensorEntry) -> torch.Tensor:
    """One tensor read into fresh memory; ValueError for a cut-short file, CheckpointError for NaN/inf."""
    out = torch.empty(e.shape, dtype=e.dtype)
    with open(e.path, "rb") as f:
        f.seek(e.offset)
        if e.nbytes and f.readinto(out.reshape(-1).view(torch.uint8).numpy()) != e.nbytes:
            raise ValueError(f"{e.path}: tensor {name!r} is cut short; is the file truncated?")
    if out.is_floating_point() and not torch.isfinite(out).all():
        raise CheckpointError(f"{e.path}: tensor {name!r} holds NaN or infinite values; the weights are "
                              "broken (use an earlier checkpoint)")
    return out


def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of one safetensors file, checked as the model's weights are (truncation, NaN, bad header)."""
    return {name: _read_tensor(name, e) for name, e in _read_header(Path(path)).items()}


class SafetensorsCheckpoint(Mapping[str, torch.Tensor]):
    """The tensors of a single-file or sharded safetensors checkpoint, each read from disk when asked for.

    Tensors are read with plain file reads into fresh memory (no memory map), one at a time, so loading
    costs the model's own size and no more. Pickled checkpoints (pytorch_model.bin) are refused.
    """

    def __init__(self, directory: str | Path):
        directory = Path(directory)
        if (directory / WEIGHTS_NAME).is_file():
            files = [directory / WEIGHTS_NAME]
        elif (directory / WEIGHTS_INDEX_NAME).is_file():
            index = read_json(directory / WEIGHTS_INDEX_NAME)
            weight_map = index.get("weight_map") if isinstance(index, dict) else None
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise ValueError(f"{directory / WEIGHTS_INDEX_NAME}: expected a \"weight_map\" object of "
                                 "tensor name -> shard file name")
            files = [directory / shard for shard in sorted(set(weight_map.values()))]
        elif any(directory.glob("pytorch_model*.bin")):
            raise ValueError(
                f"{directory} holds only pytorch_model.bin: minillm refuses to load pickled weights, because "
                "unpickling can run arbitrary code. Convert it once with transformers "
                "(model.save_pretrained(dir, safe_serialization=True)) and load the safetensors.")
        else:
            raise FileNotFoundError(f"{directory} has no {WEIGHTS_NAME} or {WEIGHTS_INDEX_NAME}")
        self._entries: dict[str, _TensorEntry] = {}
        for f in files:
            self._entries.update(_read_header(f))

    def __getitem__(self, name: str) -> torch.Tensor:
        """The tensor `name`, read from disk now."""
        return _read_tensor(name, self._entries[name])

    def shapes(self) -> dict[str, list[int]]:
        """Every tensor's shape, from the headers alone."""
        return {name: list(e.shape) for name, e in self._entries.items()}

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)


def check_shapes(config: LMConfig, checkpoint: SafetensorsCheckpoint, source: Path, cls) -> None:
    """CheckpointError unless the tensors on disk are exactly those `config` describes, names and shapes.

    The vocabulary, width and layer count are compared with the file's header first, so an absurd config
    (1e5 layers, a 1e12 vocabulary) fails before any model is built.
    """
    shapes = checkpoint.shapes()
    embed = shapes.get("model.embed_tokens.weight")
    if embed != [config.vocab_size, config.hidden_size]:
        raise CheckpointError(f"{source}: config.json says vocab_size x hidden_size = {config.vocab_size} x "
                              f"{config.hidden_size}, but model.embed_tokens.weight is {embed or 'missing'}")
    layers = {int(m.group(1)) for name in shapes if (m := re.match(r"model\.layers\.(\d+)\.", name))}
    if layers != set(range(config.num_hidden_layers)):
        raise CheckpointError(f"{source}: config.json says num_hidden_layers {config.num_hidden_layers}, but the "
                              f"weights hold {len(layers)} layers")
    with torch.device("meta"):  # names and shapes only: nothing is allocated
        expected = {k: list(v.shape) for k, v in to_hf_state_dict(cls(config).state_dict(), config).items()}
    optional = {"lm_head.weight"} if config.tie_word_embeddings else set()
    given = {k: v for k, v in shapes.items() if not k.endswith("rotary_emb.inv_freq") and k not in optional}
    missing, unexpected = sorted(set(expected) - set(given)), sorted(set(given) - set(expected))
    wrong = [f"{k} {given[k]} (expected {expected[k]})" for k in sorted(set(expected) & set(given))
             if given[k] != expected[k]]
    if missing or unexpected or wrong:
        parts = [f"{label}: {', '.join(names[:6])}{' ...' if len(names) > 6 else ''}"
                 for label, names in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong))
                 if names]
        raise CheckpointError(f"{source}: the weights do not match config.json ({'; '.join(parts)})")


def read_config(directory: Path) -> LMConfig:
    """The LMConfig of a model directory's config.json; ValueError naming the file and the field."""
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{directory} has no {CONFIG_NAME}; is it a model directory?")
    try:
        return LMConfig.from_hf_dict(read_json(path))
    except (ValueError, TypeError) as e:
        message = str(e)
        raise ValueError(message if message.startswith(str(path)) else f"{path}: {message}") from None


def load_pretrained(cls, directory: str | Path, dtype: torch.dtype | None = None,
                    device: torch.device | str | None = None):
    """Build `cls` from a checkpoint directory (see MiniLLM.from_pretrained)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"model directory {directory} does not exist")
    config = read_config(directory)
    checkpoint = SafetensorsCheckpoint(directory)
    check_shapes(config, checkpoint, directory, cls)
    state = from_hf_state_dict(checkpoint, config, dtype)
    with torch.device("meta"):  # no time spent initialising weights that are about to be replaced
        model = cls(config)
    model.load_state_dict(state, strict=True, assign=True)
    model.tie_weights()  # assign=True broke the tie; restore it
    model._set_rope_tables()
    if device is not None:
        model.to(device)
    return model.eval()
