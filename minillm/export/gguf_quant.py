"""k-quants (q4_k_m, q5_k_m) by llama.cpp's own quantizer, as llama-cpp-python exposes it (llama_model_quantize):
minillm writes an exact f32 GGUF, llama.cpp requantizes it. No k-quant block format is written here by hand."""

from __future__ import annotations

import ctypes
from pathlib import Path

KQUANTS = ("q4_k_m", "q5_k_m")
"""The --dtype values export_gguf.py hands to llama.cpp's quantizer."""


def quantize_gguf(source: str | Path, target: str | Path, kind: str, threads: int = 0) -> None:
    """Write `target`, the f32 GGUF `source` quantized to `kind` (one of KQUANTS) by llama.cpp."""
    if kind not in KQUANTS:
        raise ValueError(f"k-quant must be one of {', '.join(KQUANTS)}, got {kind!r}")
    try:
        import llama_cpp
    except ImportError:
        raise ValueError(f"--dtype {kind} uses llama.cpp's quantizer: pip install llama-cpp-python (minillm's dev "
                         "extra pins the tested version)") from None
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{kind.upper()}")
    params.nthread = threads
    status = llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), ctypes.byref(params))
    if status != 0:
        raise RuntimeError(f"llama.cpp could not quantize {source} to {kind} (status {status})")
