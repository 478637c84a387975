"""The training scripts' wiring: train_pretrain.py, train_sft.py and train_dpo.py (flags, model, tokenizer, data,
objective, train())."""

from __future__ import annotations

import argparse
import ast
import inspect
import re
import shlex
import sys
import textwrap
import time
from dataclasses import MISSING, fields
from pathlib import Path

import torch

from minillm.cli.loading import (
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    REPO_ROOT,
    CliError,
    add_model_end_ids,
    resolve_path,
)
from minillm.cli.stages import add_stage_flags, build_objective, check_stage_context, check_stage_flags
from minillm.cli.training_data import build_dataset, data_kind
from minillm.data.datasets import DataError
from minillm.data.tokenizer import Tokenizer, load_tokenizer
from minillm.device import describe_machine, dtype_reason, resolve_dtype
from minillm.eval.perplexity import bits_per_byte, read_documents, scored_size
from minillm.export.model_card import record_training, weights_file
from minillm.files import check_writable
from minillm.model.config import LMConfig
from minillm.model.lora import DEFAULT_TARGETS, apply_lora, merge_lora, parameter_counts
from minillm.model.model import MiniLLM
from minillm.streams import guard_output
from minillm.train.checkpoint import CHECKPOINT_DIR
from minillm.train.config import TrainConfig, TrainResult
from minillm.train.distributed import barrier, setup_distributed, teardown_distributed
from minillm.train.progress import read_metrics
from minillm.train.trainer import train

# Flags that shape a new model; with --init_from the loaded model's values hold and a different value is an error.
NEW_MODEL_FLAGS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "dropout",
                   "qk_norm", "num_experts", "num_experts_per_tok", "moe_intermediate_size", "decoder_sparse_step",
                   "norm_topk_prob", "router_aux_loss_coef", "router_z_loss_coef")
_FLOAT_FLAGS, _BOOL_FLAGS = ("dropout", "router_aux_loss_coef", "router_z_loss_coef"), ("qk_norm", "norm_topk_prob")

def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of a dataclass, read from its source (one text for readers and --help)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _add_dataclass_flags(group, cls: type, names, defaults: dict) -> None:
    docs = field_docs(cls)
    for f in fields(cls):
        if f.name not in names:
            continue
        default = defaults.get(f.name, f.default if f.default is not MISSING else None)
        flag = f"--{f.name}"
        if f.type in ("bool", bool):
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=docs[f.name])
        else:
            kind = {"int": int, "float": float, "str": str}.get(str(f.type).split(" ")[0], str)
            group.add_argument(flag, type=kind, default=default, help=docs[f.name] + " (default: %(default)s)")


def build_parser(kind: str, d: dict) -> argparse.ArgumentParser:
    """The flags of a training script (kind 'pretrain', 'sft', 'dpo', 'grpo', 'distill'), with the stage's
    defaults `d`."""
    what = {"pretrain": "Pretrain a language model", "sft": "Fine-tune a pretrained model on chat data",
            "dpo": "Align a chat model to preference pairs with DPO",
            "grpo": "Reinforce a chat model's verifiable behaviour with GRPO",
            "distill": "Distil a frozen teacher's distribution into a student"}[kind]
    records = {"pretrain": '; records {"text": ...}. Also a directory or a glob of .jsonl, .jsonl.gz and .txt files (one '
                           "document per line), tokenized into a sharded cache",
               "sft": '; chat {"conversations": [...]} or {"instruction", "input", "output"} records',
               "dpo": '; pairs {"prompt": [messages], "chosen": [reply], "rejected": [reply]} (TRL), {"chosen": '
                      '[messages], "rejected": [messages]} sharing the prompt turns (minimind), or plain-text '
                      '{"prompt", "chosen", "rejected"} strings',
               "grpo": '; prompts {"prompt": [messages]} or {"prompt": "..."}, or any DPO pair line (its prompt)',
               "distill": '; documents {"text": ...} (packed, as in pretraining) or chats {"conversations": [...]} '
                          "(their assistant turns learned, as in SFT), told apart by the first record"}[kind]
    p = argparse.ArgumentParser(
        description=f"{what} with minillm. Runs as one process, or on several GPUs/nodes under torchrun.")
    data = p.add_argument_group("data")
    data.add_argument("--data_path", default=d["data_path"],
                      help="Training data, JSON lines (default: %(default)s)" + records)
    data.add_argument("--eval_data", default="dataset/eval.jsonl",
                      help="Held-out documents for the eval loss; '' disables (default: %(default)s)")
    data.add_argument("--max_length", type=int, default=d["max_length"],
                      help="Tokens per training sequence (default: %(default)s)")
    data.add_argument("--tokenizer", default=None,
                      help="Tokenizer directory (default: the one beside --init_from, else minillm's shipped one)")
    if kind in ("pretrain", "distill"):
        data.add_argument("--packed", action=argparse.BooleanOptionalAction, default=True,
                          help="Train on contiguous max_length blocks of a packed token cache (built once beside "
                               "the data, rebuilt when data or tokenizer change), so no compute goes to padding; "
                               "--no-packed trains on one padded document per row (default: packed)")
        data.add_argument("--num_proc", type=int, default=1,
                          help="Processes that tokenize the packed cache; > 1 (or a directory, glob, .gz or .txt "
                               "--data_path) builds a sharded cache: shards of ~64 MB, resumable, read through "
                               "memory maps (default: %(default)s)")
        data.add_argument("--copy_share", type=float, default=d.get("copy_share", 0.0),
                          help="Share of the packed examples that are copy blocks: a block's tokens shuffled into "
                               "spans each written twice, only the copies learned, so that the model learns to "
                               "copy from its context (minillm/data/copying.py; default: %(default)s)")
    model = p.add_argument_group("model")
    model.add_argument("--init_from", default=d.get("init_from"),
                       help="Start from this model directory (minillm or Hugging Face Llama/Qwen2/Qwen3/Qwen3-MoE safetensors) "
                            + ("instead of random weights" if kind == "pretrain" else "(default: %(default)s)"))
    docs, new_config = field_docs(LMConfig), LMConfig()
    # The stage's shape for a new model (d may name one); the flags themselves default to None so that with
    # --init_from only a flag the user typed is checked against the loaded model.
    shape = {name: d.get(name, getattr(new_config, name)) for name in NEW_MODEL_FLAGS}
    p.set_defaults(new_model_shape=shape)
    for name in NEW_MODEL_FLAGS:
        kind_of = ({"action": argparse.BooleanOptionalAction} if name in _BOOL_FLAGS
                   else {"type": float if name in _FLOAT_FLAGS else int})
        model.add_argument(f"--{name}", default=None, **kind_of,
                           help=f"{docs[name]} New model only: with --init_from it must match the loaded "
                                f"model or be left out (default: {shape[name]})")
    lora = p.add_argument_group("LoRA (low-rank adapters on a frozen --init_from model)")
    lora.add_argument("--lora", action="store_true",
                      help="Train only LoRA adapters; out_dir then holds the adapter in the PEFT layout "
                           "(adapter_config.json + adapter_model.safetensors) and the tokenizer, and checkpoints "
                           "hold adapters only. Needs --init_from")
    lora.add_argument("--lora_r", type=int, default=8, help="Adapter rank (default: %(default)s)")
    lora.add_argument("--lora_alpha", type=float, default=16.0,
                      help="The update is scaled by lora_alpha / lora_r (default: %(default)s)")
    lora.add_argument("--lora_dropout", type=float, default=0.0,
                      help="Dropout on the adapters' input (default: %(default)s)")
    lora.add_argument("--lora_targets", default=",".join(DEFAULT_TARGETS),
                      help="Comma-separated projections to adapt, from q,k,v,o,gate,up,down (default: %(default)s)")
    lora.add_argument("--merge", action="store_true",
                      help="With --lora: also fold the adapters into the base weights at the end and save that "
                           "plain model (loadable without peft) in out_dir/merged")
    add_stage_flags(p, kind)
    card = p.add_argument_group("model card (out_dir/README.md)")
    card.add_argument("--license", default=None,
                      help="License identifier for the card's metadata, e.g. apache-2.0 (default: none stated)")
    card.add_argument("--language", default="auto", nargs="+",
                      help="Language codes for the card's metadata; auto: zh for the shipped dataset, none stated "
                           "for other data (default: %(default)s)")
    loop = p.add_argument_group("training loop (exit status: 0 done, 1 error, 2 bad flags, "
                                f"{EXIT_INTERRUPTED} interrupted with a checkpoint saved)")
    _add_dataclass_flags(loop, TrainConfig, {f.name for f in fields(TrainConfig)}, d)
    return p


_LANGUAGE = re.compile(r"[a-z]{2,3}(-[A-Za-z0-9]{2,8})*")  # ISO 639 with BCP 47 subtags: zh, en, zh-Hant, pt-BR
_LICENSE = re.compile(r"[a-z0-9][a-z0-9.+-]{0,63}")  # the Hub's license identifiers: apache-2.0, cc-by-4.0, other


def check_card_flags(args) -> None:
    """--language and --license go into the model card: codes and identifiers only, never markup."""
    if args.language != "auto":
        for code in args.language:
            if not _LANGUAGE.fullmatch(code):
                raise ValueError(f"--language {code!r} is not a language code (ISO 639, e.g. zh, en, or with a "
                                 "BCP 47 subtag such as zh-Hant)")
    if args.license is not None and not _LICENSE.fullmatch(args.license):
        raise ValueError(f"--license {args.license!r} is not a license identifier (lower case, e.g. apache-2.0, "
                         "mit, cc-by-4.0, other)")


def _load_tokenizer(args) -> Tokenizer:
    if args.tokenizer:
        tokenizer = Tokenizer.from_pretrained(args.tokenizer)
    elif args.init_from and (Path(args.init_from) / "tokenizer.json").is_file():
        tokenizer = Tokenizer.from_pretrained(args.init_from)
    elif args.init_from and (Path(args.init_from) / "config.json").is_file():
        # a model without its tokenizer: minillm's default would not fit it
        raise FileNotFoundError(f"--init_from {args.init_from} has no tokenizer.json beside the weights; pass "
                                "--tokenizer DIR with the tokenizer the model was trained with")
    else:
        tokenizer = load_tokenizer()
    tokenizer.check_template()  # a broken or hostile template fails now, in one line naming its file
    if args.init_from:
        add_model_end_ids(tokenizer, Path(args.init_from))
    return tokenizer


def _extends(tokenizer: Tokenizer, init_from: str | None, vocab_size: int) -> bool:
    """Whether `tokenizer` is the one saved in init_from plus added tokens only (e.g. the tool-call tokens): the
    same learned vocabulary and the same ids below the model's vocab_size."""
    if not init_from or not (Path(init_from) / "tokenizer.json").is_file():
        return False
    old = Tokenizer.from_pretrained(init_from)
    learned = (old.backend.get_vocab_size(with_added_tokens=False),
               tokenizer.backend.get_vocab_size(with_added_tokens=False))
    return (old.vocab_size == vocab_size and learned[0] == learned[1]
            and all(old.backend.id_to_token(i) == tokenizer.backend.id_to_token(i) for i in range(vocab_size)))


def _check_tokenizer_fits(args, tokenizer: Tokenizer, model: MiniLLM, is_main: bool = True) -> None:
    """Refuse a tokenizer whose ids would index past the model's embedding table, unless it extends the model's
    own with added tokens: then the table grows (new rows start at the mean row)."""
    if tokenizer.vocab_size <= model.config.vocab_size:
        return
    if not getattr(args, "lora", False) and _extends(tokenizer, args.init_from, model.config.vocab_size):
        if is_main:
            print(f"note: --tokenizer {args.tokenizer} extends the tokenizer of {args.init_from} with "
                  f"{tokenizer.vocab_size - model.config.vocab_size} added tokens: the embedding grows to "
                  f"{tokenizer.vocab_size} rows")
        model.grow_vocab(tokenizer.vocab_size)
        return
    source = args.tokenizer or args.init_from or "minillm's shipped tokenizer"
    raise ValueError(f"the tokenizer ({source}) has {tokenizer.vocab_size} tokens but the model"
                     + (f" in {args.init_from}" if args.init_from else "") + f" has vocab_size "
                     f"{model.config.vocab_size}: ids >= {model.config.vocab_size} would index past its "
                     "embedding table. Use the tokenizer the model was trained with (the one saved beside its "
                     "weights) or a model built for this tokenizer")


def _add_lora(args, model: MiniLLM, is_main: bool) -> None:
    """Freeze the model and add adapters as the --lora_* flags say."""
    if not args.init_from:
        raise ValueError("--lora needs --init_from: adapters train on top of an existing model")
    torch.manual_seed(args.seed)  # the adapters' A is drawn at random: the same seed, the same run
    apply_lora(model, r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout, targets=args.lora_targets)
    model.lora_config.base_model_name_or_path = str(Path(args.init_from).resolve())
    model.lora_config.chat_trained = bool(model.config.chat_trained)
    if is_main:
        trainable, total = parameter_counts(model)
        print(f"LoRA r={args.lora_r} alpha={args.lora_alpha:g} on {','.join(model.lora_config.targets)}: "
              f"{trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.2f}%)")


def _check_new_model_flags(args, model: MiniLLM) -> None:
    """With --init_from, refuse shape flags that disagree with the loaded model instead of ignoring them."""
    clash = [f"--{n} {getattr(args, n)} (the model has {getattr(model.config, n)})" for n in NEW_MODEL_FLAGS
             if getattr(args, n) is not None and getattr(args, n) != getattr(model.config, n)]
    if clash:
        raise CliError(f"--init_from {args.init_from}: {'; '.join(clash)}; these flags shape a new model "
                       "only: leave them out to keep the loaded model's")


def _build_model(args, tokenizer: Tokenizer) -> MiniLLM:
    if args.init_from:
        init = Path(args.init_from)
        if not (init / "config.json").is_file():
            raise FileNotFoundError(f"--init_from {init}: no model there (no config.json); "
                                    + ("run train_pretrain.py first" if "pretrain" in str(init) else ""))
        model = MiniLLM.from_pretrained(init, dtype=torch.float32)
        _check_new_model_flags(args, model)
        return model.train()
    given = {k: args.new_model_shape[k] if getattr(args, k) is None else getattr(args, k) for k in NEW_MODEL_FLAGS}
    if given["num_experts"] and args.qk_norm is None:
        given["qk_norm"] = True  # the Qwen3-MoE layout has QK-norm
    config = LMConfig(vocab_size=tokenizer.vocab_size, max_position_embeddings=max(2048, args.max_length),
                      bos_token_id=tokenizer.eos_id, eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id,
                      **given)
    torch.manual_seed(args.seed)
    return MiniLLM(config)


def _run(kind: str, args, cfg: TrainConfig, env) -> TrainResult:
    # An unwritable out_dir fails now, before minutes of loading and tokenizing (train() checks again).
    check_writable(Path(cfg.out_dir), "out_dir")
    check_writable(Path(cfg.out_dir) / CHECKPOINT_DIR, "the checkpoint folder")
    tokenizer = _load_tokenizer(args)
    if args.merge and not args.lora:
        raise CliError("--merge only applies with --lora")
    if kind in ("dpo", "grpo") and not args.init_from:
        raise CliError(f"{kind.upper()} starts from a trained chat model: pass --init_from DIR (train_sft.py's out_dir)")
    model = _build_model(args, tokenizer)
    _check_tokenizer_fits(args, tokenizer, model, env.is_main)
    check_stage_context(args, kind, model)
    # What eval_ppl.py and generate.py read back: the context trained on, and whether chat was learnt. DPO and
    # GRPO keep the chat model's own (GRPO's --max_length caps prompts, not the context).
    if kind in ("pretrain", "sft", "distill") or not model.config.trained_context:
        model.config.trained_context = args.max_length
    if kind == "sft" or (kind == "distill" and data_kind(kind, args) == "sft"):
        model.config.chat_trained = True
    elif not args.init_from:
        model.config.chat_trained = False
    if args.lora:
        _add_lora(args, model, env.is_main)
    dataset = build_dataset(kind, args, tokenizer, env.is_main)
    eval_path = resolve_path(args.eval_data)
    eval_texts = read_documents(eval_path) if eval_path is not None else []
    eval_docs = tokenizer.encode_batch(eval_texts) if eval_path is not None else None
    if env.is_main:
        start = f"from {args.init_from}" if args.init_from else "a new model"
        print(f"{kind}: {start}, {model.num_parameters() / 1e6:.2f}M parameters, {len(dataset):,} examples of "
              f"{args.max_length} tokens from {args.data_path}, {env.world_size} process(es) on {env.device}, "
              f"out_dir {cfg.out_dir}")
        print(f"compute dtype {dtype_reason(cfg.dtype, env.device)}, held-out loss in {cfg.eval_dtype}; "
              f"optimizer {cfg.optimizer}"
              + (f"; {cfg.max_minutes:g} minutes of training" if cfg.max_minutes else ""))
        if data_kind(kind, args) != "pretrain":
            print(f"chat template: {tokenizer.template_name()}")
    objective = build_objective(kind, args, cfg, tokenizer, env.is_main, dataset)
    result = train(model, dataset, cfg, eval_documents=eval_docs, tokenizer=tokenizer, env=env, objective=objective)
    if args.merge and env.is_main and not result.interrupted:
        merge_lora(model).save_pretrained(Path(cfg.out_dir) / "merged", tokenizer=tokenizer)
    size = scored_size(eval_texts, eval_docs) if eval_docs else None
    if result.eval_loss is not None and size and size[1]:
        result.eval_bits_per_byte = bits_per_byte(result.eval_loss, *size)
    if env.is_main and not result.interrupted and weights_file(Path(cfg.out_dir)).is_file():
        record_training(cfg.out_dir, run_facts(kind, args, cfg, env, model, result))
    return result


def run_facts(kind: str, args, cfg: TrainConfig, env, model: MiniLLM, result: TrainResult) -> dict:
    """What the model card says about a finished run (train_results.json)."""
    launcher = ["torchrun", f"--nproc_per_node={env.world_size}"] if env.world_size > 1 else ["python"]
    data = resolve_path(args.data_path)
    shipped = data is not None and data.resolve().parent == REPO_ROOT / "dataset"
    return {"stage": kind, "command": shlex.join([*launcher, f"train_{kind}.py", *args.argv]),
            "data": args.data_path, "eval_data": args.eval_data or None, "base_model": args.init_from,
            "lora": bool(args.lora), "parameters": model.num_parameters(), "model_config": model.config.to_hf_dict(),
            "steps": result.steps, "tokens": result.total_tokens, "train_seconds": round(result.train_seconds, 1),
            "eval_loss": result.eval_loss, "eval_bits_per_byte": result.eval_bits_per_byte,
            "dtype": str(resolve_dtype(cfg.dtype, env.device)).removeprefix("torch."),
            "machine": describe_machine(env.device) + (f", {env.world_size} processes" if env.world_size > 1 else ""),
            "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
            "language": args.language if args.language != "auto" else (["zh"] if shipped else []),
            "license": args.license, **({"teacher": args.teacher_model} if kind == "distill" else {}),
            **({"reward": reward_trend(Path(cfg.out_dir) / "metrics.jsonl")} if kind == "grpo" else {})}


def reward_trend(metrics: Path) -> dict | None:
    """GRPO's mean reward over its first and last k logged steps (k = 10, or half the steps when fewer)."""
    rewards = [row["reward"] for row in read_metrics(metrics)[0] if "reward" in row]
    if not rewards:
        return None
    k = max(1, min(10, len(rewards) // 2))
    return {"first": sum(rewards[:k]) / k, "last": sum(rewards[-k:]) / k, "steps": k}


def summary(args, cfg: TrainConfig, result: TrainResult) -> str:
    """The closing lines: steps, this session's tokens and speed, and where the model or checkpoint is."""
    this = result.steps - result.start_step
    session = (f"{this} step{'s' * (this != 1)}, {result.tokens:,} tokens in {result.seconds:.0f} s "
               f"({result.tokens / max(result.seconds, 1e-9):,.0f} tokens/s)")
    done = (f"{result.steps} steps ({session} in this session)" if result.start_step else session)
    if result.interrupted:
        ckpt = result.checkpoint
        use = (f"python generate.py --model {args.init_from} --adapter {ckpt}" if args.lora
               else f"python generate.py --model {ckpt}")
        return (f"interrupted after {done}.\nCheckpoint: {ckpt} (usable as it is: {use}).\n"
                "Continue with the same command plus --resume.")
    held = f", held-out loss {result.eval_loss:.4f}" if result.eval_loss is not None else ""
    if result.eval_bits_per_byte is not None:
        held += f" ({result.eval_bits_per_byte:.3f} bits/byte)"
    merged = f", merged model in {Path(cfg.out_dir) / 'merged'}" if args.merge else ""
    return f"done: {done}{held}; {'adapter' if args.lora else 'model'} in {cfg.out_dir}{merged}"


def main(kind: str, defaults: dict, argv: list[str] | None = None) -> int:
    """Parse flags, build tokenizer, model and dataset, and run the shared training loop; the exit status."""
    args = build_parser(kind, defaults).parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # the model card's command line
    guard_output()  # a closed pipe or terminal must not cost the checkpoint (tee ended by the same Ctrl-C)
    try:
        cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)})
        check_stage_flags(args, kind)
        check_card_flags(args)
        env = setup_distributed(cfg.device)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        result = _run(kind, args, cfg, env)
        # Every process waits for the others (rank 0 writes the model and card after the last collective) before
        # any destroys the process group: one that tore down gloo while the other still held it aborted with
        # "terminate called without an active exception" (seen once in CI under load).
        barrier()
    except (CliError, OSError, DataError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_ERROR
    finally:
        teardown_distributed()
    if env.is_main:
        print(summary(args, cfg, result), file=sys.stderr if result.interrupted else sys.stdout)
    return EXIT_INTERRUPTED if result.interrupted else 0
