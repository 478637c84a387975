"""FSDP2 and sharded checkpoints: parameters, gradients and optimizer state split over the processes.

`--fsdp` applies PyTorch's `fully_shard` (FSDP2) to every transformer block and then to the root, which
holds the embedding, the final norm and the (tied) head: each process keeps 1/N of every parameter, its
gradient and its AdamW moments, and gathers a block's full weights only while computing it. On GPUs
with bfloat16, parameters are computed in bf16 while gradients are reduced and kept in fp32.

A run with --fsdp checkpoints the model and the optimizer with torch.distributed.checkpoint (DCP): every
process writes its own shards into one directory, and any number of processes can load it (DCP reshards),
so a run saved by 2 processes resumes on 1 and the other way round. With one process there is nothing to
shard: the model stays plain and only the checkpoint format is DCP's.
"""

from __future__ import annotations

import warnings
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from minillm.train.distributed import DistEnv

DCP_DIR = "dcp"  # inside a checkpoint directory: the DCP files of the model and the optimizer


def fsdp_policy(device: torch.device, amp_dtype: torch.dtype) -> MixedPrecisionPolicy:
    """bf16 parameters with fp32 gradient reduction on GPUs computing in bf16, else the parameters' own dtype."""
    if device.type == "cuda" and amp_dtype == torch.bfloat16:
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()  # CPU (gloo, under autocast) and float32


def apply_fsdp(model: torch.nn.Module, policy: MixedPrecisionPolicy) -> None:
    """Shard `model` in place over the process group: each block, then the root."""
    for block in model.layers:
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)


def is_sharded(model: torch.nn.Module) -> bool:
    """True for a module that fully_shard has wrapped (through a torch.compile wrapper too)."""
    return isinstance(getattr(model, "_orig_mod", model), FSDPModule)


def gradient_sync(model: torch.nn.Module, env: DistEnv, last: bool) -> AbstractContextManager:
    """Reduce gradients only on the last micro-batch of a step: DDP's no_sync, FSDP2's requires_gradient_sync."""
    inner = getattr(model, "_orig_mod", model)
    if isinstance(inner, FSDPModule):
        inner.set_requires_gradient_sync(last)
        return nullcontext()
    return model.no_sync() if env.distributed and not last else nullcontext()


def save_sharded(directory: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Every process writes its shards of the model and the optimizer into `directory` (a collective)."""
    import torch.distributed.checkpoint as dcp  # imported when used: 0.7 s that only --fsdp runs pay
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    with warnings.catch_warnings():  # one process without a process group is the intended case here
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=str(directory))


def load_sharded(directory: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Load a DCP checkpoint into `model` and `optimizer`, resharded to this run's processes (a collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optimizer": optim_sd}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=str(directory))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def gathered_model(model: torch.nn.Module) -> torch.nn.Module | None:
    """A plain copy of a sharded model with all its weights, on the CPU of rank 0 (None elsewhere; a collective).

    This is what the run's final model directory is written from, in the Hugging Face layout.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not state:  # ranks other than 0 receive nothing
        return None
    with torch.device("meta"):
        copy = type(model)(model.config)
    copy.load_state_dict(state, strict=True, assign=True)
    copy.tie_weights()
    copy._set_rope_tables()
    return copy.eval()


def non_finite_parameter(model: torch.nn.Module) -> str | None:
    """The name of a parameter holding NaN/inf on any process (each checks its own shards), else None."""
    bad = next((name for name, p in model.named_parameters()
                if not torch.isfinite(p.to_local() if hasattr(p, "to_local") else p).all()), None)
    if dist.is_initialized() and dist.get_world_size() > 1:
        names = [None] * dist.get_world_size()
        dist.all_gather_object(names, bad)
        bad = next((n for n in names if n), None)
    return bad
