"""Checkpoints in the Hugging Face layout: tensor-name mapping, save_pretrained and from_pretrained.

minillm fuses q|k|v and gate|up into single matrices for speed; on disk they are split back into the
separate q_proj, k_proj, v_proj, gate_proj and up_proj tensors that transformers expects.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from minillm.config import LMConfig

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


_LAYER_KEY = re.compile(r"layers\.(\d+)\.(.+)\.(weight|bias)$")


def to_hf_state_dict(state_dict: dict[str, torch.Tensor], config: LMConfig) -> dict[str, torch.Tensor]:
    """Rename (and split) a MiniLLM state dict into Hugging Face Llama tensor names."""
    fused = _fused_parts(config)
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state_dict.items():
        if name == "lm_head.weight":
            if not config.tie_word_embeddings:
                out[name] = tensor
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


def from_hf_state_dict(hf: dict[str, torch.Tensor], config: LMConfig) -> dict[str, torch.Tensor]:
    """Rename (and fuse) Hugging Face Llama/Qwen2 tensors into a MiniLLM state dict."""
    hf = {k: v for k, v in hf.items() if not k.endswith("rotary_emb.inv_freq")}  # old checkpoints keep it
    out: dict[str, torch.Tensor] = {}
    for layer in range(config.num_hidden_layers):
        for module, parts in _fused_parts(config).items():
            for kind in ("weight", "bias"):
                names = [f"model.layers.{layer}.{hf_module}.{kind}" for hf_module, _ in parts]
                present = [n in hf for n in names]
                if all(present):
                    out[f"layers.{layer}.{module}.{kind}"] = torch.cat([hf.pop(n) for n in names], dim=0)
                elif any(present):
                    missing = [n for n, p in zip(names, present) if not p]
                    raise KeyError(f"checkpoint is missing {', '.join(missing)}")
    head = hf.pop("lm_head.weight", None)
    for name, tensor in hf.items():
        if not name.startswith("model."):
            raise KeyError(f"unexpected tensor {name!r} in checkpoint")
        out[name[len("model."):]] = tensor
    if config.tie_word_embeddings:
        if "embed_tokens.weight" in out:
            out["lm_head.weight"] = out["embed_tokens.weight"]
    elif head is not None:
        out["lm_head.weight"] = head
    return out


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def save_pretrained(model: torch.nn.Module, directory: str | Path, tokenizer=None) -> None:
    """Write config.json, generation_config.json and model.safetensors (and the tokenizer, if given)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config: LMConfig = model.config
    # safetensors refuses views that share storage, so each split piece is made contiguous on the CPU.
    tensors = {k: v.detach().to("cpu").contiguous()
               for k, v in to_hf_state_dict(model.state_dict(), config).items()}
    dtype = next(iter(tensors.values())).dtype
    hf_config = config.to_hf_dict()
    hf_config["torch_dtype"] = str(dtype).removeprefix("torch.")
    generation = {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id,
                  "pad_token_id": config.pad_token_id}
    _atomic_write(directory / WEIGHTS_NAME, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    _atomic_write(directory / "generation_config.json",
                  lambda p: p.write_text(json.dumps(generation, indent=2) + "\n", encoding="utf-8"))
    # config.json last: a directory with a config is a directory whose weights are complete.
    _atomic_write(directory / CONFIG_NAME,
                  lambda p: p.write_text(json.dumps(hf_config, indent=2) + "\n", encoding="utf-8"))
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)


def read_safetensors(directory: Path) -> dict[str, torch.Tensor]:
    """All tensors of a single-file or sharded safetensors checkpoint; pickles are refused."""
    if (directory / WEIGHTS_NAME).is_file():
        return load_file(str(directory / WEIGHTS_NAME))
    if (directory / WEIGHTS_INDEX_NAME).is_file():
        index = json.loads((directory / WEIGHTS_INDEX_NAME).read_text(encoding="utf-8"))
        tensors: dict[str, torch.Tensor] = {}
        for shard in sorted(set(index["weight_map"].values())):
            tensors.update(load_file(str(directory / shard)))
        return tensors
    if any(directory.glob("pytorch_model*.bin")):
        raise ValueError(
            f"{directory} holds only pytorch_model.bin: minillm refuses to load pickled weights, because "
            "unpickling can run arbitrary code. Convert it once with transformers "
            "(model.save_pretrained(dir, safe_serialization=True)) and load the safetensors.")
    raise FileNotFoundError(f"{directory} has no {WEIGHTS_NAME} or {WEIGHTS_INDEX_NAME}")


def load_pretrained(cls, directory: str | Path, dtype: torch.dtype | None = None,
                    device: torch.device | str | None = None):
    """Build `cls` from a checkpoint directory (see MiniLLM.from_pretrained)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"model directory {directory} does not exist")
    if not (directory / CONFIG_NAME).is_file():
        raise FileNotFoundError(f"{directory} has no {CONFIG_NAME}; is it a model directory?")
    config = LMConfig.from_hf_dict(json.loads((directory / CONFIG_NAME).read_text(encoding="utf-8")))
    state = from_hf_state_dict(read_safetensors(directory), config)
    with torch.device("meta"):  # no time spent initialising weights that are about to be replaced
        model = cls(config)
    expected, given = set(model.state_dict()), set(state)
    if expected != given:
        raise KeyError(f"{directory}: checkpoint does not match the config: missing "
                       f"{sorted(expected - given)[:8]}, unexpected {sorted(given - expected)[:8]}")
    model.load_state_dict(state, strict=True, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight  # assign=True broke the tie; restore it
    if dtype is not None:
        model.to(dtype)
    model._set_rope_tables()
    if device is not None:
        model.to(device)
    return model.eval()
