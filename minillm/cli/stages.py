"""What each stage after pretraining adds to the training scripts: its flags and its objective (DPO, GRPO,
distillation)."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

from minillm.cli.loading import CliError, check_same_tokenizer, resolve_path
from minillm.cli.training_data import data_kind
from minillm.data.jsonl import DataError
from minillm.data.prompts import PromptDataset, prompt_requests
from minillm.data.tokenizer import Tokenizer
from minillm.eval.rewards import REWARDS, build_rewards
from minillm.infer.poem_tools import select_tools
from minillm.model.hf import CONFIG_NAME, WEIGHTS_INDEX_NAME, WEIGHTS_NAME
from minillm.model.model import MiniLLM
from minillm.train.config import TrainConfig
from minillm.train.distill import Distillation
from minillm.train.dpo import DPO
from minillm.train.grpo import CISPO_EPSILON_HIGH, GRPO, LOSS_TYPES, SCALE_REWARDS
from minillm.train.objective import LanguageModeling, Objective

MAX_TURNS = 8  # calling turns per GRPO completion: each is a round of sampling and tool runs
MAX_ITERATIONS = 16  # updates per rollout: past a few, the ratio is clipped nearly everywhere and the steps are wasted


def add_stage_flags(p: argparse.ArgumentParser, kind: str) -> None:
    """The flags of train_dpo.py, train_grpo.py or train_distill.py (kind 'dpo', 'grpo', 'distill'); none for
    pretraining and SFT."""
    if kind == "distill":
        g = p.add_argument_group("distillation (a frozen teacher's distribution; TRL GKDConfig's names)")
        g.add_argument("--teacher_model", required=True, metavar="DIR",
                       help="The teacher: a model directory in the Hugging Face Llama/Qwen2/Qwen3/Qwen3-MoE layout "
                            "with this tokenizer, frozen, never saved with the student")
        g.add_argument("--alpha", type=float, default=0.5,
                       help="loss = alpha x divergence + (1 - alpha) x cross-entropy; 1 is TRL's GKD loss alone "
                            "(default: %(default)s)")
        g.add_argument("--beta", type=float, default=0.5,
                       help="The generalized JSD's interpolation: 0 the forward KL(teacher || student), 1 the reverse "
                            "KL(student || teacher) (default: %(default)s)")
        g.add_argument("--temperature", type=float, default=0.9,
                       help="Both distributions at this temperature, and the on-policy samples' (default: %(default)s)")
        g.add_argument("--lmbda", type=float, default=0.0,
                       help="Share of the micro-batches of chats whose answers the student samples itself, on the "
                            "batched engine, for the teacher to score (on-policy GKD; TRL's default 0.5) "
                            "(default: %(default)s)")
        g.add_argument("--max_new_tokens", type=int, default=128,
                       help="Token budget of an on-policy answer (default: %(default)s)")
        g.add_argument("--teacher_topk", type=int, default=None, metavar="K",
                       help="Run the teacher once over the data before training and keep each position's K likeliest "
                            "ids (the rest of the mass spread evenly) on disk, read every epoch instead of running it "
                            "(default: off, the teacher runs every step)")
        g.add_argument("--teacher_cache", default=None, metavar="DIR",
                       help="Folder of the --teacher_topk caches, checksummed, one per teacher, data, K and "
                            "temperature (default: .minillm-teacher/ beside --data_path)")
        return
    if kind not in ("dpo", "grpo"):
        return
    if kind == "dpo":
        g = p.add_argument_group("DPO (sigmoid loss on summed response log-probs against a frozen reference)")
        g.add_argument("--beta", type=float, default=0.1,
                       help="How far the policy may move from the reference: the implicit reward is beta x the "
                            "log-prob ratio (default: %(default)s)")
        g.add_argument("--precompute_ref_logps", action="store_true",
                       help="Compute the reference's log-probs once before training (the same numbers, one forward "
                            "pass per pair instead of one per step; the reference model then leaves memory)")
    else:
        g = p.add_argument_group("GRPO (sampled completions scored by verifiable rewards; --batch_size counts prompts)")
        g.add_argument("--group_size", type=int, default=8,
                       help="Completions sampled per prompt; advantages compare them (default: %(default)s)")
        g.add_argument("--temperature", type=float, default=1.0,
                       help="Sampling temperature of the completions, and of the log-probs in the loss "
                            "(default: %(default)s)")
        g.add_argument("--max_new_tokens", type=int, default=160,
                       help="Token budget of a completion (default: %(default)s)")
        g.add_argument("--epsilon", type=float, default=0.2,
                       help="Clipping range of the probability ratio (default: %(default)s)")
        g.add_argument("--epsilon_high", type=float, default=None,
                       help="Upper clipping range (clip-higher; DAPO uses 0.28); with cispo, the cap on the importance "
                            f"weight (default: --epsilon; cispo: {CISPO_EPSILON_HIGH:g})")
        g.add_argument("--loss_type", choices=LOSS_TYPES, default="grpo",
                       help="TRL's names. grpo: mean over each completion's tokens, then over completions; dr_grpo: "
                            "each completion's token sum / max_new_tokens; bnpo: token mean over the micro-batch; "
                            "dapo: token mean over the optimizer step; cispo: dapo's mean of the clipped importance "
                            "weight (no gradient) x advantage x log-prob (default: %(default)s)")
        g.add_argument("--num_iterations", type=int, default=1,
                       help="Optimizer steps on each step's rollouts (TRL's name): the first samples them, the next "
                            "ones update on them again, the ratio taken against the sampling policy's log-probs, and "
                            "use the same prompts (default: %(default)s)")
        g.add_argument("--kl_correction", action="store_true",
                       help="Multiply the KL term by the probability ratio (TRL's use_bias_correction_kl, its default): "
                            "the unbiased reverse-KL gradient; off, the plain k3 estimator's gradient")
        g.add_argument("--scale_rewards", choices=SCALE_REWARDS, default="group",
                       help="Divide each advantage (reward - group mean) by the std of its group's rewards, of the "
                            "step's rewards (batch), or by nothing (none) (default: %(default)s)")
        g.add_argument("--kl_beta", type=float, default=0.0,
                       help="Weight of the k3 KL penalty to the frozen reference; 0 needs no reference "
                            "(default: %(default)s)")
        g.add_argument("--reward", default="composite",
                       help=f"Rewards and weights, e.g. composite or request:1,ended:0.25; from {', '.join(REWARDS)} "
                            "(minillm/eval/rewards.py) (default: %(default)s)")
        g.add_argument("--log_completions", nargs="?", type=int, const=1, default=0, metavar="N",
                       help="Every N steps (alone: every step), write the step's sampled completions to "
                            "out_dir/completions.jsonl with its step, request, rewards and advantage (rank 0's; "
                            "trimmed on --resume like metrics.jsonl), and show the last ones when the run ends")
        g.add_argument("--tools", default=None, metavar="NAMES",
                       help="Offer these tools (comma-separated, or all: search_poems, rhyme) in every prompt and run "
                            "the calls completions make: a completion becomes a trajectory of up to --max_turns "
                            "calling turns, with the tools' results in it but not learned (default: none)")
        g.add_argument("--max_turns", type=int, default=2,
                       help="With --tools: assistant turns per completion that may call before one must answer; "
                            "each turn samples up to --max_new_tokens (default: %(default)s)")
        g.add_argument("--reward_corpus", default="dataset/pretrain.jsonl,dataset/sft.jsonl",
                       help="Training poems and SFT set whose verbatim copies the novel reward refuses "
                            "(default: %(default)s)")
    g.add_argument("--ref_model", default=None, metavar="DIR",
                   help="Reference model directory (default: the --init_from model; with --lora the base model with "
                        "the adapters off, no second copy)")


def _finite(value: float, flag: str, low: float, low_open: bool, high: float = math.inf) -> None:
    ok = math.isfinite(value) and (value > low if low_open else value >= low) and value <= high
    if not ok:
        bound = f"{'>' if low_open else '>='} {low:g}" + (f" and <= {high:g}" if math.isfinite(high) else "")
        raise ValueError(f"{flag} must be a finite number {bound}, got {value!r}")


def check_stage_flags(args, kind: str) -> None:
    """Refuse a post-training flag value that cannot train (nan, inf, out of range) before anything loads."""
    if kind == "dpo":
        _finite(args.beta, "--beta", 0, low_open=True)
    elif kind == "distill":
        check_model_dir(args.teacher_model, "--teacher_model")
        _finite(args.alpha, "--alpha", 0, low_open=False, high=1)
        _finite(args.beta, "--beta", 0, low_open=False, high=1)
        _finite(args.temperature, "--temperature", 0, low_open=True)
        _finite(args.lmbda, "--lmbda", 0, low_open=False, high=1)
        if args.lmbda and data_kind("distill", args) != "sft":
            raise ValueError(f"--lmbda {args.lmbda:g}: on-policy distillation samples answers to prompts, and "
                             f"{args.data_path} holds documents; give chats, or --lmbda 0")
        if args.max_new_tokens < 1:
            raise ValueError(f"--max_new_tokens must be >= 1, got {args.max_new_tokens}")
        if args.teacher_topk is not None and args.teacher_topk < 1:
            raise ValueError(f"--teacher_topk must be >= 1 (the ids kept per position), got {args.teacher_topk}")
    elif kind == "grpo":
        _finite(args.kl_beta, "--kl_beta", 0, low_open=False)
        _finite(args.temperature, "--temperature", 0, low_open=True)
        _finite(args.epsilon, "--epsilon", 0, low_open=True, high=1)
        if args.epsilon_high is not None:
            _finite(args.epsilon_high, "--epsilon_high", 0, low_open=True)
        if args.group_size < 2:
            raise ValueError(f"--group_size must be >= 2 (advantages compare completions), got {args.group_size}")
        if args.max_new_tokens < 1:
            raise ValueError(f"--max_new_tokens must be >= 1, got {args.max_new_tokens}")
        if not 1 <= args.max_turns <= MAX_TURNS:
            raise ValueError(f"--max_turns must be in [1, {MAX_TURNS}], got {args.max_turns}")
        if args.log_completions < 0:
            raise ValueError(f"--log_completions must be >= 1 (0: off), got {args.log_completions}")
        if not 1 <= args.num_iterations <= MAX_ITERATIONS:
            raise ValueError(f"--num_iterations must be in [1, {MAX_ITERATIONS}], got {args.num_iterations}")
        if args.tools is not None:
            try:
                select_tools(args.tools)
            except ValueError as e:
                raise ValueError(f"--tools: {e}") from None
        build_rewards(args.reward, None, None, parse_only=True)


def check_stage_context(args, kind: str, model: MiniLLM) -> None:
    """GRPO's prompts and completions must fit the model's positions: --max_length + --max_new_tokens."""
    if kind == "grpo" and args.max_length + args.max_new_tokens > model.config.max_position_embeddings:
        raise CliError(f"--max_length {args.max_length} + --max_new_tokens {args.max_new_tokens} exceeds the "
                       f"model's context of {model.config.max_position_embeddings} tokens "
                       "(max_position_embeddings); lower one of them")


def check_model_dir(directory: str | Path, flag: str) -> None:
    """A second model's directory holds a config and weights (checked as the flags are parsed)."""
    directory = Path(directory)
    if not (directory / CONFIG_NAME).is_file():
        raise ValueError(f"{flag} {directory}: no model there (no {CONFIG_NAME})")
    if not any((directory / name).is_file() for name in (WEIGHTS_NAME, WEIGHTS_INDEX_NAME)):
        raise ValueError(f"{flag} {directory}: no weights there (no {WEIGHTS_NAME})")


def _frozen_model(directory: Path, flag: str, args, tokenizer: Tokenizer) -> MiniLLM:
    """A second model (a reference, a teacher) that must share the tokenizer, loaded in float32."""
    check_model_dir(directory, flag)
    check_same_tokenizer(tokenizer, args.tokenizer or args.init_from or "the tokenizer", directory, flag)
    model = MiniLLM.from_pretrained(directory, dtype=torch.float32)
    if model.config.vocab_size < tokenizer.vocab_size:
        raise ValueError(f"{flag} {directory} has vocab_size {model.config.vocab_size}, fewer than the "
                         f"tokenizer's {tokenizer.vocab_size} tokens; use a model trained with this tokenizer")
    return model


def _reference(args, tokenizer: Tokenizer) -> MiniLLM | None:
    """The reference model --ref_model (or --init_from) names; None with --lora and no --ref_model."""
    if args.lora and not args.ref_model:
        return None
    return _frozen_model(Path(args.ref_model or args.init_from), "--ref_model", args, tokenizer)


def _corpus(spec: str) -> tuple[Path, Path]:
    """The two files of --reward_corpus, resolved against the repository when relative."""
    paths = [resolve_path(p) for p in spec.split(",")]
    if len(paths) != 2 or not all(p is not None and p.is_file() for p in paths):
        raise CliError(f"--reward_corpus {spec}: expected two existing files, TRAIN.jsonl,SFT.jsonl")
    return paths[0], paths[1]


def build_objective(kind: str, args, cfg: TrainConfig, tokenizer: Tokenizer, is_main: bool, dataset=None
                    ) -> Objective:
    """Language modelling for pretraining and SFT; DPO, GRPO or distillation for their scripts (GRPO's rewards read
    what each prompt asks for from the dataset's "request" fields)."""
    if kind not in ("dpo", "grpo", "distill"):
        return LanguageModeling()
    if cfg.loss_chunk:
        raise CliError(f"--loss_chunk applies to the language-modelling loss; {kind.upper()} needs the whole logits")
    if kind == "grpo" and cfg.fsdp:
        raise CliError("--fsdp with GRPO is not supported: each process decodes its rollouts for as many steps as its "
                       "own completions need, and a sharded model would wait on the others; use DDP (no --fsdp)")
    if kind == "distill":
        teacher = _frozen_model(Path(args.teacher_model), "--teacher_model", args, tokenizer)
        data = Path(args.data_path)
        cache = args.teacher_cache or (data if data.is_dir() else data.parent) / ".minillm-teacher"
        return Distillation(teacher, alpha=args.alpha, beta=args.beta, temperature=args.temperature,
                            lmbda=args.lmbda, max_new_tokens=args.max_new_tokens, stop_ids=tokenizer.stop_ids,
                            topk=args.teacher_topk, cache_dir=cache if args.teacher_topk else None, verbose=is_main)
    if kind == "dpo":
        return DPO(args.beta, _reference(args, tokenizer), precompute=args.precompute_ref_logps,
                   batch_size=cfg.batch_size, verbose=is_main)
    known = prompt_requests(dataset) if isinstance(dataset, PromptDataset) else None
    try:
        rewards = build_rewards(args.reward, *_corpus(args.reward_corpus), known=known)
    except ValueError as e:
        raise DataError(f"{cfg.data_path}: {e}") from None
    reference = _reference(args, tokenizer) if args.kl_beta else None
    tools = select_tools(args.tools) if args.tools else None
    if tools and not tokenizer.tool_ids and tokenizer.template is None:
        raise CliError("--tools: this tokenizer has no tool-call tokens (it was made before tool calling)")
    return GRPO(rewards, tokenizer, group_size=args.group_size, temperature=args.temperature,
                max_new_tokens=args.max_new_tokens, epsilon=args.epsilon, loss_type=args.loss_type,
                kl_beta=args.kl_beta, reference=reference, epsilon_high=args.epsilon_high,
                scale_rewards=args.scale_rewards, kl_correction=args.kl_correction,
                log_completions=args.log_completions, tools=tools, max_turns=args.max_turns,
                num_iterations=args.num_iterations)
