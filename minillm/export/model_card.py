"""The model card: README.md in every model directory minillm writes, in the Hugging Face convention.

The card is rendered from the files beside it and nothing else: config.json (or adapter_config.json),
train_results.json (the training scripts write it when a run finishes) and eval_results.json (eval_tasks.py
writes it). A re-run, a resumed run or a new evaluation rewrites the card, so it stays true; results of an
evaluation of other weights (the run continued since) are shown as stale rather than as the model's.
"""

from __future__ import annotations

import html
import json
import re
import shlex
from pathlib import Path

from minillm.files import atomic_write, read_json, remove, sha256_file, write_json

CARD_NAME = "README.md"
TRAIN_RESULTS = "train_results.json"
EVAL_RESULTS = "eval_results.json"
_MARK = "<!-- written by minillm: rewritten from train_results.json and eval_results.json -->"
_STAGES = {"pretrain": ("pretraining", "train_pretrain.py"), "sft": ("supervised fine-tuning", "train_sft.py"),
           "dpo": ("DPO", "train_dpo.py"), "grpo": ("GRPO", "train_grpo.py"),
           "distill": ("distillation", "train_distill.py")}
_KINDS = {"tune": "names the requested tune", "form": "writes the requested form (4/8 clauses of 5/7)",
          "length": "writes the requested line length (5/7)", "words": "uses both requested words"}


def weights_file(model_dir: Path) -> Path:
    """The directory's weights: the adapter's for a LoRA directory, else the model's."""
    adapter = model_dir / "adapter_model.safetensors"
    return adapter if adapter.is_file() else model_dir / "model.safetensors"


def code_span(value: object, in_table: bool = False) -> str:
    """`value` as inline code whatever it holds: a fence of more backticks than any run inside, line breaks as
    spaces, and (in a table cell) pipes escaped, so flag values can never end the span or inject markup."""
    text = str(value).replace("\r", " ").replace("\n", " ")
    if in_table:
        text = text.replace("|", "\\|")
    fence = "`" * (max((len(r) for r in re.findall("`+", text)), default=0) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") or not text.strip() else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def code_block(text: str, language: str) -> list[str]:
    """A fenced code block that `text` cannot close: the fence is longer than any run of backticks in it."""
    fence = "`" * max(3, max((len(r) for r in re.findall("`+", text)), default=0) + 1)
    return [fence + language, text, fence]


def plain_text(value: object) -> str:
    """`value` as literal markdown text: HTML escaped, markdown punctuation backslash-escaped, one line."""
    text = html.escape(str(value).replace("\r", " ").replace("\n", " "), quote=False)
    return re.sub(r"([\\`*_\[\]#|~])", r"\\\1", text)


def _yaml_scalar(value: object) -> str:
    # JSON strings are YAML double-quoted scalars; numbers and booleans read the same in both.
    return json.dumps(value, ensure_ascii=False)


def front_matter(meta: dict[str, object]) -> str:
    """The YAML block the Hugging Face Hub reads: scalars and lists of scalars, None values left out."""
    lines = ["---"]
    for key, value in meta.items():
        if value is None or value == []:
            continue
        if isinstance(value, list):
            lines += [f"{key}:"] + [f"- {_yaml_scalar(v)}" for v in value]
        else:
            lines.append(f"{key}: {_yaml_scalar(value)}")
    return "\n".join([*lines, "---"]) + "\n"


def describe_model(config: dict) -> str:
    """'Llama: 4 layers of 256, 4 heads (2 key/value heads), vocabulary 6,400' from a config.json dict."""
    arch = {"llama": "Llama", "qwen2": "Qwen2", "qwen3": "Qwen3 (QK-norm)", "qwen3_moe": "Qwen3-MoE"}.get(
        config.get("model_type"), str(config.get("model_type")))
    parts = [f"{config['num_hidden_layers']} layers of {config['hidden_size']}",
             f"{config['num_attention_heads']} heads ({config.get('num_key_value_heads')} key/value heads)",
             f"vocabulary {config['vocab_size']:,}"]
    if config.get("num_experts"):
        parts.append(f"{config['num_experts']} experts, {config['num_experts_per_tok']} per token")
    return f"{arch}: {', '.join(parts)}"


def _training_section(run: dict, config: dict | None) -> list[str]:
    stage, script = _STAGES[run["stage"]]
    rows = [("stage", f"{stage} (`{script}`{', LoRA adapters' if run.get('lora') else ''})"),
            ("model", f"{run['parameters'] / 1e6:.2f}M parameters; {plain_text(describe_model(config))}"
             if config else None),
            ("started from", code_span(run["base_model"], True) if run.get("base_model") else "random initialisation"),
            ("teacher", code_span(run["teacher"], True) if run.get("teacher") else None),
            ("data", code_span(run["data"], True)),
            ("steps", f"{run['steps']:,}"),
            ("tokens", f"{run['tokens']:,} input positions"),
            ("training time", f"{run['train_seconds']:,.0f} s"),
            ("compute dtype", plain_text(run["dtype"]) if run.get("dtype") else None),
            ("machine", plain_text(f"{run['machine']}; torch {run['torch']}")),
            ("date", plain_text(run["date"]) if run.get("date") else None)]
    if run.get("reward"):
        r = run["reward"]
        rows.append(("reward", f"{r['first']:.3f} over the first {r['steps']} steps, {r['last']:.3f} over the last "
                               f"{r['steps']} (metrics.jsonl)"))
    if run.get("eval_loss") is not None:
        rows.append(("held-out loss", f"{run['eval_loss']:.4f} nats/token on {code_span(run['eval_data'], True)}"))
    if run.get("eval_bits_per_byte") is not None:
        rows.append(("held-out bits per byte", f"{run['eval_bits_per_byte']:.4f} (in windows of the training "
                                               "context; `eval_ppl.py` reports its own windows)"))
    lines = ["## Training", "", "| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows if v is not None]
    lines += ["", *code_block(run["command"], "bash"), ""]
    return lines


_TOOL_KINDS = {"quote": "quote a poem's clause (search)", "tone": "a character's tone (rhyme)",
               "none": "no call when none is needed", "quote_tools_off": "quote with the tools off"}


def _rows(evaluation: dict) -> list[tuple[str, str, str, int]]:
    """(task, training-wordings value, held-out value, n) of each result eval_tasks.py saved."""
    rows = []
    cloze = evaluation.get("cloze")
    if cloze:
        centered = (cloze["accuracy"] - 0.25) / 0.75
        rows.append(("poetry cloze (4 choices)", f"{cloze['accuracy']:.1%} (centered {centered:+.1%})",
                     "(held-out poems)", cloze["n"]))
    requests = evaluation.get("requests", {})
    held = requests.get("heldout", {})
    for kind, rate in requests.get("kinds", {}).items():
        other = f"{held[kind]['rate']:.1%}" if kind in held else "not measured"
        rows.append((_KINDS.get(kind) or plain_text(kind), f"{rate['rate']:.1%}", other, rate["n"]))
    train, heldout = requests.get("degeneration_train"), requests.get("degeneration_heldout")
    if train and heldout:
        rows.append(("repetitive answers (a line twice, or a phrase three times)", f"{train['repeats']:.1%}",
                     f"{heldout['repeats']:.1%}", train["n"]))
        rows.append(("distinct-2 (distinct character bigrams)", f"{train['distinct_2']:.3f}",
                     f"{heldout['distinct_2']:.3f}", train["n"]))
    tools = evaluation.get("tools", {})
    for kind, rate in tools.get("train", {}).items():  # eval/tool_tasks.py: tool use, the same two columns
        held_rate = tools.get("heldout", {}).get(kind)
        for key, what in (("valid_call", "right tool, valid arguments"), ("correct", "answer right")):
            if key in rate:
                other = f"{held_rate[key]:.1%}" if held_rate and key in held_rate else "not measured"
                rows.append((f"tools, {_TOOL_KINDS.get(kind, plain_text(kind))}: {what}", f"{rate[key]:.1%}", other,
                             rate["n"]))
    return rows


def _base_evaluation(run: dict, evaluation: dict) -> dict | None:
    """The --init_from model's eval_tasks.py results, when they are of its present weights and measured the same
    way as these (same data, dtype and sampling): the card shows them beside the new ones."""
    base = Path(run["base_model"]) if run.get("base_model") and not run.get("lora") else None
    if base is None or not (base / EVAL_RESULTS).is_file():
        return None
    try:
        before = read_json(base / EVAL_RESULTS)
        if before.get("weights_sha256") != sha256_file(weights_file(base)):
            return None
    except (OSError, ValueError):
        return None
    same = all(before.get(k) == evaluation.get(k) for k in ("data", "dtype", "temperature", "samples"))
    return before if same else None


def _evaluation_section(model_dir: Path, evaluation: dict | None, use: str, run: dict) -> list[str]:
    lines = ["## Evaluation", ""]
    if evaluation is None:
        return lines + [f"Not evaluated yet: {code_span(f'python eval_tasks.py {use}')} adds its results here.", ""]
    if evaluation.get("weights_sha256") != sha256_file(weights_file(model_dir)):
        return lines + ["The last `eval_tasks.py` results are of earlier weights (the run went on since), so "
                        f"they are not shown; {code_span(f'python eval_tasks.py {use}')} measures these.", ""]
    how = ("greedy answers" if not evaluation.get("temperature") else
           f"{evaluation['samples']} answers sampled per prompt at temperature {evaluation['temperature']:g}")
    before = _base_evaluation(run, evaluation)
    earlier = {task: (train, held) for task, train, held, _ in _rows(before)} if before else {}
    lines += [f"{code_span(f'python eval_tasks.py {use}')} ({plain_text(evaluation['date'])}, "
              f"{plain_text(evaluation['dtype'])}, {how}; held-out poems of {code_span(evaluation['data'])}). "
              "Requests are asked twice: in the wordings and word list of the training data, and held out, in "
              "wordings and with words no training file holds" +
              (f"; beside them, the model this run started from ({code_span(run['base_model'], True)}, its own "
               "eval_tasks.py results)" if before else "") + ":", ""]
    if before:
        lines += ["| task | training wordings | held out | before: training wordings | before: held out | n |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {task} | {train} | {held} | {' | '.join(earlier.get(task, ('-', '-')))} | {n} |"
                  for task, train, held, n in _rows(evaluation)]
    else:
        lines += ["| task | training wordings | held out | n |", "|---|---|---|---|"]
        lines += [f"| {task} | {train} | {held} | {n} |" for task, train, held, n in _rows(evaluation)]
    return lines + [""]


def _use_section(model_dir: Path, run: dict, chat: bool) -> list[str]:
    # Paths as literals of their language (json.dumps is a valid Python string literal; shlex.quote a shell word).
    here = json.dumps(str(model_dir), ensure_ascii=False)
    if run.get("lora"):
        load = ("from peft import PeftModel\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
                f"base = AutoModelForCausalLM.from_pretrained({json.dumps(str(run['base_model']), ensure_ascii=False)})\n"
                f"model = PeftModel.from_pretrained(base, {here})\n"
                f"tokenizer = AutoTokenizer.from_pretrained({here})")
    else:
        load = ("from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
                f"model = AutoModelForCausalLM.from_pretrained({here})\n"
                f"tokenizer = AutoTokenizer.from_pretrained({here})")
    ours = _model_flags(model_dir, run)
    commands = [f"python generate.py {ours}    # an interactive chat" if chat else
                f"python generate.py {ours} --raw --prompt \"TEXT\"    # continues TEXT",
                f"python serve.py {ours}    # an OpenAI-compatible API and a chat page on 127.0.0.1"]
    if not run.get("lora"):
        commands += [f"python export_gguf.py --model {shlex.quote(str(model_dir))} --out model.gguf    # llama.cpp; "
                     "also writes an ollama Modelfile", "ollama create mymodel -f Modelfile"]
    return ["## Use", "", "In transformers (and peft for an adapter):", "", *code_block(load, "python"), "",
            "With minillm:", "", *code_block("\n".join(commands), "bash"), ""]


def _model_flags(model_dir: Path, run: dict) -> str:
    """--model DIR (and --adapter DIR for LoRA), quoted for the shell."""
    if run.get("lora"):
        return f"--model {shlex.quote(str(run['base_model']))} --adapter {shlex.quote(str(model_dir))}"
    return f"--model {shlex.quote(str(model_dir))}"


def render_card(model_dir: str | Path) -> str:
    """The card of `model_dir` as markdown, from its train_results.json, config.json and eval_results.json."""
    model_dir = Path(model_dir)
    run = read_json(model_dir / TRAIN_RESULTS)
    config = run.get("model_config")
    eval_path = model_dir / EVAL_RESULTS
    evaluation = read_json(eval_path) if eval_path.is_file() else None
    chat = bool(config and config.get("chat_trained")) or run["stage"] != "pretrain"
    arch_tag = config.get("model_type") if config else None
    meta = {"library_name": "peft" if run.get("lora") else "transformers", "language": run.get("language") or [],
            "license": run.get("license"), "base_model": run.get("base_model"),
            "tags": ["minillm", run["stage"], *(["lora"] if run.get("lora") else []), *([arch_tag] if arch_tag else [])],
            "pipeline_tag": "text-generation"}
    use = _model_flags(model_dir, run)
    title = [f"# {plain_text(model_dir.resolve().name)}", "", _MARK, "",
             f"A {'chat ' if chat else ''}language model trained with minillm ({_STAGES[run['stage']][0]}). "
             "The weights are safetensors in the Hugging Face layout, so transformers, peft and llama.cpp load "
             "them as they are.", ""]
    curve = ["![training and held-out loss](loss.png)", ""] if (model_dir / "loss.png").is_file() else []
    body = (title + _training_section(run, config) + curve + _evaluation_section(model_dir, evaluation, use, run)
            + _use_section(model_dir, run, chat))
    return front_matter(meta) + "\n" + "\n".join(body)


def write_card(model_dir: str | Path) -> Path:
    """Render and write model_dir/README.md atomically; its path."""
    path = Path(model_dir) / CARD_NAME
    atomic_write(path, render_card(model_dir))
    return path


def record_training(model_dir: str | Path, run: dict) -> Path:
    """Save a finished run's facts (train_results.json) and write the card; the card's path."""
    write_json(Path(model_dir) / TRAIN_RESULTS, run)
    return write_card(model_dir)


def record_evaluation(model_dir: str | Path, results: dict) -> Path | None:
    """Save eval_tasks.py's results beside weights minillm trained, and rewrite the card; None for other
    directories (an outside checkpoint has no train_results.json and keeps its own README)."""
    model_dir = Path(model_dir)
    if not (model_dir / TRAIN_RESULTS).is_file():
        return None
    write_json(model_dir / EVAL_RESULTS, {**results, "weights_sha256": sha256_file(weights_file(model_dir))})
    return write_card(model_dir)


def is_minillm_card(path: Path) -> bool:
    """True when `path` is a card this module wrote (safe to remove with its run)."""
    try:
        return _MARK in path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False


def remove_card(model_dir: str | Path) -> None:
    """Remove a run's card and its results files (when the run is started over); a README not written here stays."""
    model_dir = Path(model_dir)
    for name in (TRAIN_RESULTS, EVAL_RESULTS):
        remove(model_dir / name)
    if is_minillm_card(model_dir / CARD_NAME):
        remove(model_dir / CARD_NAME)
