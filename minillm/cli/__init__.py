"""Command-line wiring shared by the scripts: training.py for train_pretrain.py, train_sft.py and train_dpo.py;
loading.py for the scripts that use a trained model, and the error conventions all of them share."""

from minillm.cli.loading import (
    BAD_INPUT,
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    CliError,
    add_inference_flags,
    add_model_flags,
    check_output_file,
    check_same_tokenizer,
    default_context,
    load_trained,
    report,
)
from minillm.cli.training import build_parser, field_docs, main, summary

__all__ = ["BAD_INPUT", "EXIT_ERROR", "EXIT_INTERRUPTED", "CliError", "add_inference_flags", "add_model_flags",
           "build_parser", "check_output_file", "check_same_tokenizer", "default_context", "field_docs", "load_trained", "main", "report",
           "summary"]
