"""An exported GGUF opened in llama.cpp through llama-cpp-python (the dev extra): the reference that tests and
bench/ compare minillm against, with llama.cpp's weight repacking optionally off."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def load_llama_cpp(path: str | Path, repack: bool = True, **kwargs: Any) -> Any:
    """`llama_cpp.Llama` on the GGUF at `path` (kwargs passed on); repack=False is llama.cpp's --no-repack.

    On Xeons with AMX, repacking moves quantized weights into llama.cpp's AMX kernels, which crash on q8_0 (a
    segfault in ggml_backend_amx_mul_mat, llama.cpp issue #20824). `llama_cpp.Llama` has no argument for it, so
    its default model parameters (`use_extra_bufts`) are swapped for this one call.
    """
    import llama_cpp  # optional: only the dev extra installs it

    bindings = llama_cpp.llama.llama_cpp  # the module whose defaults llama_cpp.Llama starts its model params from
    defaults = bindings.llama_model_default_params

    def without_repacking():
        params = defaults()
        params.use_extra_bufts = False
        return params

    if not repack:
        bindings.llama_model_default_params = without_repacking
    try:
        return llama_cpp.Llama(model_path=str(path), **kwargs)
    finally:
        bindings.llama_model_default_params = defaults
