"""LoRA: low-rank adapters on the attention and MLP projections, saved in PEFT's layout.

Each adapted projection computes base(x) + alpha/r * B(A(dropout(x))) with the base weight frozen. minillm
fuses q|k|v and gate|up into one matrix each, so one LoRALinear carries a separate (A, B) pair per output
slice: the adapters are exactly those PEFT puts on transformers' separate q_proj, k_proj, ... modules, and
`save_adapter` writes them under PEFT's names so that `peft` loads them onto the transformers model.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

from minillm.files import atomic_path, read_json, write_json
from minillm.model.hf import read_safetensors
from minillm.model.linear import Linear

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
ADAPTER_META_NAME = "minillm_adapter.json"  # what PEFT has no field for (chat training)
DEFAULT_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
# Short target name -> (minillm module inside a block, Hugging Face module name).
_TARGETS = {
    "q": ("self_attn.qkv_proj", "q_proj"), "k": ("self_attn.qkv_proj", "k_proj"),
    "v": ("self_attn.qkv_proj", "v_proj"), "o": ("self_attn.o_proj", "o_proj"),
    "gate": ("mlp.gate_up_proj", "gate_proj"), "up": ("mlp.gate_up_proj", "up_proj"),
    "down": ("mlp.down_proj", "down_proj"),
}
_HF_TO_SHORT = {hf: short for short, (_, hf) in _TARGETS.items()}
_PEFT_PREFIX = "base_model.model.model."


@dataclass
class LoRAConfig:
    """How a model was adapted; stored on the model as `model.lora_config`."""

    r: int = 8
    """Rank of each adapter."""
    alpha: float = 16.0
    """The update is scaled by alpha / r."""
    dropout: float = 0.0
    """Dropout on the adapter's input (training only)."""
    targets: tuple[str, ...] = DEFAULT_TARGETS
    """Projections that get adapters: q, k, v, o, gate, up, down."""
    base_model_name_or_path: str | None = None
    """The base model directory, recorded in adapter_config.json."""
    chat_trained: bool | None = None
    """Whether the adapter was trained on chat (SFT), recorded beside it in minillm_adapter.json (PEFT would warn
    about a key of ours in adapter_config.json); None: unknown, e.g. an adapter PEFT wrote."""

    @property
    def scaling(self) -> float:
        """Factor on B @ A."""
        return self.alpha / self.r


def parse_targets(targets: str | Iterable[str]) -> tuple[str, ...]:
    """Normalise 'q,k,v' or ['q_proj', 'o'] into short target names, in canonical order."""
    names = targets.split(",") if isinstance(targets, str) else list(targets)
    short = set()
    for name in (n.strip() for n in names):
        if not name:
            continue
        name = _HF_TO_SHORT.get(name, name)
        if name not in _TARGETS:
            raise ValueError(f"unknown LoRA target {name!r}; choose from {', '.join(DEFAULT_TARGETS)} "
                             f"(or their Hugging Face names {', '.join(_HF_TO_SHORT)})")
        short.add(name)
    if not short:
        raise ValueError("no LoRA targets given")
    return tuple(t for t in DEFAULT_TARGETS if t in short)


class LoRALinear(nn.Module):
    """A frozen linear layer plus one low-rank adapter per chosen slice of its output rows.

    `slices` lists (name, rows) in output order; `adapted` names the slices that get an adapter. The layer
    keeps the base layer's own `weight` and `bias` parameters, so the model's state-dict names for them do
    not change.
    """

    def __init__(self, base: nn.Linear, slices: list[tuple[str, int]], adapted: Iterable[str], r: int,
                 alpha: float, dropout: float = 0.0):
        super().__init__()
        if sum(rows for _, rows in slices) != base.out_features:
            raise ValueError(f"slices {slices} do not cover the {base.out_features} output rows")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.slices = list(slices)
        adapted = set(adapted)
        self.adapted = [name for name, _ in slices if name in adapted]
        self.r, self.scaling = r, alpha / r
        self.enabled = True  # False: the layer is its base layer (a DPO reference without a second copy)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        kw = dict(device=base.weight.device, dtype=base.weight.dtype)
        rows = dict(slices)
        self.lora_A = nn.ParameterDict({s: nn.Parameter(torch.empty(r, self.in_features, **kw)) for s in self.adapted})
        self.lora_B = nn.ParameterDict({s: nn.Parameter(torch.zeros(rows[s], r, **kw)) for s in self.adapted})
        for a in self.lora_A.values():
            # PEFT's default: A like an nn.Linear init, B zero, so the layer starts equal to the base layer.
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))

    def delta_weight(self) -> torch.Tensor:
        """scaling * B @ A for every slice (zero rows where a slice has no adapter), [out, in], float32."""
        parts = []
        for name, rows in self.slices:
            if name in self.lora_B:
                parts.append(self.lora_B[name].float() @ self.lora_A[name].float())
            else:
                parts.append(torch.zeros(rows, self.in_features, device=self.weight.device))
        return torch.cat(parts) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """base(x) + scaling * [B_s A_s dropout(x) for each slice s] concatenated along the output."""
        out = F.linear(x, self.weight, self.bias)
        if not self.enabled:
            return out
        # Two small matmuls whatever the number of slices: all the A's stacked (they share the input), then
        # the B's as one block-diagonal matrix (zero rows for slices without an adapter), accumulated into
        # the base output by addmm. The scaling goes on B, a tiny tensor, not on the activations.
        if len(self.adapted) == 1:
            a_all = self.lora_A[self.adapted[0]]
        else:
            a_all = torch.cat([self.lora_A[s] for s in self.adapted])
        if len(self.slices) == 1:
            b_all = self.lora_B[self.adapted[0]]
        else:
            b_all = torch.block_diag(*[self.lora_B[name] if name in self.lora_B else self.weight.new_zeros(rows, 0)
                                       for name, rows in self.slices])
        xa = F.linear(self.dropout(x), a_all)
        out_2d = torch.addmm(out.reshape(-1, self.out_features), xa.reshape(-1, xa.shape[-1]),
                             (b_all * self.scaling).t())
        return out_2d.view(out.shape)

    def merged(self) -> Linear:
        """A plain Linear whose weight is base + scaling * B @ A (the base parameter is updated in place)."""
        with torch.no_grad():
            self.weight.add_(self.delta_weight().to(self.weight.dtype))
        linear = Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        linear.weight = self.weight
        linear.bias = self.bias
        return linear

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, r={self.r}, adapted={self.adapted}"


def _block_slices(config) -> dict[str, list[tuple[str, int]]]:
    """Each adaptable module of a block -> its output slices, named by Hugging Face module."""
    D = config.head_dim
    H, K, C, inter = config.num_attention_heads, config.num_key_value_heads, config.hidden_size, \
        config.intermediate_size
    return {"self_attn.qkv_proj": [("q_proj", H * D), ("k_proj", K * D), ("v_proj", K * D)],
            "self_attn.o_proj": [("o_proj", C)],
            "mlp.gate_up_proj": [("gate_proj", inter), ("up_proj", inter)],
            "mlp.down_proj": [("down_proj", C)]}


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """The model's LoRALinear modules by their module path (e.g. layers.0.self_attn.qkv_proj)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def has_lora(model: nn.Module) -> bool:
    """True when the model carries LoRA adapters."""
    return any(isinstance(m, LoRALinear) for m in model.modules())


@contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, every LoRALinear computes its base layer alone: the model is the frozen base."""
    layers = list(lora_layers(model).values())
    for layer in layers:
        layer.enabled = False
    try:
        yield model
    finally:
        for layer in layers:
            layer.enabled = True


def apply_lora(model: nn.Module, r: int = 8, alpha: float = 16.0, dropout: float = 0.0,
               targets: str | Iterable[str] = DEFAULT_TARGETS) -> nn.Module:
    """Freeze every weight of `model` and add trainable adapters to the target projections (in place)."""
    if has_lora(model):
        raise ValueError("the model already has LoRA adapters; merge_lora() them first")
    if not (isinstance(r, int) and r >= 1):
        raise ValueError(f"LoRA rank r must be a positive integer, got {r!r}")
    if not alpha > 0:
        raise ValueError(f"LoRA alpha must be > 0, got {alpha}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout}")
    targets = parse_targets(targets)
    hf_targets = {_TARGETS[t][1] for t in targets}
    model.requires_grad_(False)
    for block in model.layers:
        for path, slices in _block_slices(model.config).items():
            adapted = [name for name, _ in slices if name in hf_targets]
            if not adapted:
                continue
            parent_path, attr = path.rsplit(".", 1)
            parent = block.get_submodule(parent_path)
            if not isinstance(getattr(parent, attr), nn.Linear):  # a MoE layer's stacked experts: not adapted
                continue
            setattr(parent, attr, LoRALinear(getattr(parent, attr), slices, adapted, r, alpha, dropout))
    model.lora_config = LoRAConfig(r=r, alpha=float(alpha), dropout=float(dropout), targets=targets)
    return model


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, each shared tensor counted once."""
    params = {id(p): p for p in model.parameters()}.values()
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def base_fingerprint(model: nn.Module) -> str:
    """sha256 of the frozen base weights (names, dtypes, shapes and bytes): the model the adapters fit."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if ".lora_" in name:
            continue
        t = tensor.detach().to("cpu").contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors under PEFT's names (base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight)."""
    out = {}
    for path, layer in lora_layers(model).items():
        # path is layers.N.self_attn.qkv_proj; the slice names the HF module that replaces the last part.
        prefix = _PEFT_PREFIX + path.rsplit(".", 1)[0]
        for name in layer.adapted:
            out[f"{prefix}.{name}.lora_A.weight"] = layer.lora_A[name].detach()
            out[f"{prefix}.{name}.lora_B.weight"] = layer.lora_B[name].detach()
    return out


def load_lora_state_dict(model: nn.Module, tensors: dict[str, torch.Tensor], source: str = "adapter") -> None:
    """Copy PEFT-named adapter tensors into the model's adapters; every adapter must be matched exactly."""
    # PEFT names tensors of a named adapter ...lora_A.default.weight in memory; files drop ".default".
    tensors = {k.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B."): v
               for k, v in tensors.items()}
    expected = lora_state_dict(model)
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{source}: adapter tensors do not match the model's adapters: missing {missing[:4]}, "
                       f"unexpected {unexpected[:4]}")
    with torch.no_grad():
        for key, target in expected.items():
            if tensors[key].shape != target.shape:
                raise ValueError(f"{source}: {key} has shape {tuple(tensors[key].shape)}, "
                                 f"the model expects {tuple(target.shape)}")
            if not torch.isfinite(tensors[key]).all():
                raise ValueError(f"{source}: tensor {key!r} holds NaN or infinite values; the adapter is broken")
            target.copy_(tensors[key])


def adapter_config(cfg: LoRAConfig) -> dict:
    """PEFT's adapter_config.json for a LoRAConfig."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": cfg.base_model_name_or_path,
        "r": cfg.r,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "target_modules": [_TARGETS[t][1] for t in cfg.targets],
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }


def save_adapter(model: nn.Module, directory: str | Path, base_model_path: str | Path | None = None) -> None:
    """Write adapter_config.json and adapter_model.safetensors (PEFT layout) for the model's adapters."""
    if not has_lora(model):
        raise ValueError("the model has no LoRA adapters to save")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    cfg: LoRAConfig = model.lora_config
    if base_model_path is not None:
        cfg.base_model_name_or_path = str(base_model_path)
    tensors = {k: v.to("cpu").contiguous() for k, v in lora_state_dict(model).items()}
    with atomic_path(directory / ADAPTER_WEIGHTS_NAME) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    write_json(directory / ADAPTER_META_NAME, {"chat_trained": cfg.chat_trained})
    # The config last: a directory with a config is one whose tensors are complete.
    write_json(directory / ADAPTER_CONFIG_NAME, adapter_config(cfg))


def read_adapter_config(directory: str | Path) -> LoRAConfig:
    """Read a PEFT adapter_config.json into a LoRAConfig, refusing the PEFT options minillm does not implement."""
    path = Path(directory) / ADAPTER_CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{directory} has no {ADAPTER_CONFIG_NAME}; is it a LoRA adapter directory?")
    d = read_json(path)
    if not isinstance(d, dict):
        raise ValueError(f"{path}: expected a JSON object")
    if d.get("peft_type") != "LORA":
        raise ValueError(f"{path}: peft_type is {d.get('peft_type')!r}; only LORA adapters are supported")
    unsupported = {"use_rslora": True, "use_dora": True, "fan_in_fan_out": True}
    for key, bad in unsupported.items():
        if d.get(key) == bad:
            raise ValueError(f"{path}: {key}={bad} is not supported")
    for key in ("rank_pattern", "alpha_pattern", "modules_to_save", "layers_to_transform"):
        if d.get(key):
            raise ValueError(f"{path}: {key} is not supported (got {d[key]!r})")
    if d.get("bias", "none") != "none":
        raise ValueError(f"{path}: bias={d['bias']!r} is not supported; only 'none'")
    modules = d.get("target_modules")
    if not isinstance(modules, list):
        raise ValueError(f"{path}: target_modules must be a list of module names such as q_proj, got {modules!r}")
    try:
        targets = parse_targets(modules)
    except ValueError as e:
        raise ValueError(f"{path}: target_modules: {e}") from e
    return LoRAConfig(r=int(d["r"]), alpha=float(d.get("lora_alpha", 8)), dropout=float(d.get("lora_dropout", 0.0)),
                      targets=targets, base_model_name_or_path=d.get("base_model_name_or_path"),
                      chat_trained=_chat_trained(Path(directory) / ADAPTER_META_NAME))


def _chat_trained(path: Path) -> bool | None:
    """What minillm_adapter.json says of chat training; None without the file."""
    meta = read_json(path) if path.is_file() else {}
    value = meta.get("chat_trained") if isinstance(meta, dict) else None
    return value if isinstance(value, bool) else None


def load_adapter_weights(model: nn.Module, directory: str | Path) -> None:
    """Load adapter_model.safetensors from `directory` into a model that already has matching adapters."""
    path = Path(directory) / ADAPTER_WEIGHTS_NAME
    if not path.is_file():
        if (Path(directory) / "adapter_model.bin").is_file():
            raise ValueError(f"{directory} holds only adapter_model.bin; minillm loads safetensors only "
                             "(unpickling can run arbitrary code)")
        raise FileNotFoundError(f"{directory} has no {ADAPTER_WEIGHTS_NAME}")
    load_lora_state_dict(model, read_safetensors(path), source=str(path))


def check_same_lora(model: nn.Module, directory: str | Path) -> None:
    """Raise ValueError unless `directory`'s adapter has the model's rank, alpha, dropout and targets."""
    saved, ours = read_adapter_config(directory), model.lora_config
    a = (saved.r, saved.alpha, saved.dropout, saved.targets)
    b = (ours.r, ours.alpha, ours.dropout, ours.targets)
    if a != b:
        raise ValueError(f"{directory}: adapter has r, alpha, dropout, targets = {a}, the model {b}; "
                         "use the same --lora_* flags")


def load_adapter(model: nn.Module, directory: str | Path) -> nn.Module:
    """Add the adapters described by `directory`'s adapter_config.json to `model` and load their weights."""
    cfg = read_adapter_config(directory)
    apply_lora(model, r=cfg.r, alpha=cfg.alpha, dropout=cfg.dropout, targets=cfg.targets)
    model.lora_config.base_model_name_or_path = cfg.base_model_name_or_path
    model.lora_config.chat_trained = cfg.chat_trained
    load_adapter_weights(model, directory)
    if cfg.chat_trained is not None and hasattr(model, "config"):  # one rule for generate, serve and export
        model.config.chat_trained = cfg.chat_trained or bool(model.config.chat_trained)
    return model


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and put plain nn.Linear layers back (in place; all trainable)."""
    for path, layer in lora_layers(model).items():
        parent_path, attr = path.rsplit(".", 1)
        setattr(model.get_submodule(parent_path), attr, layer.merged())
    if hasattr(model, "lora_config"):
        del model.lora_config
    model.requires_grad_(True)
    return model
