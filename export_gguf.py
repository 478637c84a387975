"""Export a trained model to GGUF for llama.cpp, ollama and LM Studio: a thin CLI over minillm.export.gguf.

    pip install -e ".[gguf]"
    python export_gguf.py --model out/sft                       # out/sft-f16.gguf + out/sft-f16.Modelfile
    python export_gguf.py --model out/sft --dtype q8_0 --out model.gguf
    python export_gguf.py --model out/sft --dtype q4_k_m        # llama.cpp's own quantizer (llama-cpp-python)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from minillm.cli import BAD_INPUT, CliError, add_model_flags, load_trained, report
from minillm.data.tokenizer import declares_chat_template
from minillm.export.gguf import DTYPES, export_gguf, modelfile_value, write_modelfile
from minillm.export.gguf_quant import KQUANTS, quantize_gguf
from minillm.files import atomic_path, remove_stale_temporaries

PROG = "export_gguf.py"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line."""
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Write a model directory (minillm's, or a Hugging Face Llama/Qwen2 checkpoint) as one GGUF "
                    "file with its tokenizer, special ids and ChatML template, plus an ollama Modelfile beside "
                    "it. Needs the [gguf] extra.")
    add_model_flags(p)
    p.add_argument("--out", default=None, metavar="FILE.gguf",
                   help="output file (default: the model directory's path with -DTYPE.gguf appended, e.g. "
                        "out/sft-f16.gguf); the Modelfile goes beside it with the suffix .Modelfile")
    p.add_argument("--dtype", default="f16", choices=(*DTYPES, *KQUANTS),
                   help="type of the weight matrices: f32 (exact), f16 and bf16 (half the size), q8_0 (8-bit "
                        "blocks, about a quarter), or q5_k_m / q4_k_m (llama.cpp's k-quants, made by its own "
                        "quantizer from the f32 file; needs llama-cpp-python); norms and biases stay f32 "
                        "(default: %(default)s)")
    p.add_argument("--name", default=None,
                   help="general.name in the file (default: the model directory's name)")
    p.add_argument("--force", action="store_true", help="overwrite an existing output file and Modelfile")
    return p.parse_args(argv)


def output_paths(args: argparse.Namespace) -> tuple[Path, Path]:
    """(the .gguf path, the Modelfile path), refused if they exist and --force is not given."""
    model = Path(args.model)
    out = Path(args.out) if args.out else model.with_name(f"{model.name}-{args.dtype}.gguf")
    modelfile = out.with_suffix(".Modelfile")
    if out.is_dir():
        raise CliError(f"--out {out} is a directory; give a file name such as {out / 'model.gguf'}")
    if modelfile == out:
        raise CliError(f"--out {out} is where the Modelfile goes (the .gguf's name with the suffix .Modelfile); "
                       f"give the .gguf's name, such as {out.with_suffix('.gguf')}")
    if modelfile_value(f"./{out.name}") is None:  # checked before any work: the Modelfile names the file
        raise CliError(f"--out {str(out)!r}: the file name holds a line break, a control character or three quotes "
                       "in a row, which an ollama Modelfile cannot name; choose another name")
    for path in (out, modelfile):
        if path.exists() and not args.force:
            raise CliError(f"{path} already exists; pass --force to overwrite it")
    return out, modelfile


def run(args: argparse.Namespace) -> str:
    """Export; the summary line."""
    out, modelfile = output_paths(args)
    model, tokenizer, tokenizer_dir = load_trained(args, torch.device("cpu"), dtype=torch.float32)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out.parent, out.name)  # what an export killed with -9 left behind
    name = args.name or Path(args.model).resolve().name
    if args.dtype in KQUANTS:  # an exact f32 file first, then llama.cpp's quantizer, both under temporary names
        with atomic_path(out) as tmp:
            f32 = tmp.with_name(tmp.name + ".f32")
            try:
                summary = export_gguf(model, tokenizer, f32, "f32", name=name)
                quantize_gguf(f32, tmp, args.dtype)
            finally:
                f32.unlink(missing_ok=True)
        summary["bytes"] = out.stat().st_size
    else:
        summary = export_gguf(model, tokenizer, out, args.dtype, name=name)
    # minillm records whether SFT ran; an outside checkpoint (None) is a chat model when its tokenizer has a template.
    chat = (model.config.chat_trained if model.config.chat_trained is not None
            else declares_chat_template(tokenizer_dir))
    write_modelfile(modelfile, out, chat, tokenizer, warn=lambda line: print(line, file=sys.stderr))
    return (f"wrote {out} ({summary['bytes'] / 2**20:.1f} MiB, {summary['tensors']} tensors, {args.dtype}, "
            f"architecture {summary['architecture']}, pre-tokenizer {summary['pre_tokenizer']}) and {modelfile} "
            f"({'raw-prompt' if not chat else 'ChatML' if tokenizer.template is None else 'the GGUF'} template)\n"
            f"  llama.cpp: llama-cli -m {out}" + (" -cnv" if chat else ' -p "..."') + "\n"
            f"  ollama:    ollama create {name} -f {modelfile} && ollama run {name}"
            + (f"\n  tools:     not exported to ollama (the Modelfile's template renders messages only); serve.py "
               f"--model {args.model} takes OpenAI tools" if chat and tokenizer.tool_ids else ""))


def main(argv: list[str] | None = None) -> int:
    """Entry point; bad input gives one message on stderr and exit status 1, no traceback."""
    args = parse_args(argv)
    try:
        print(run(args))
    except BAD_INPUT as e:
        return report(PROG, e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
