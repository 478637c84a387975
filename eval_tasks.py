"""Behavioural evaluations of a saved model on held-out poems: a thin CLI over minillm.eval.tasks.

    python eval_tasks.py --model out/pretrain          # poetry cloze
    python eval_tasks.py --model out/sft               # cloze + following the request (chat models)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from minillm.cli import (
    BAD_INPUT,
    CliError,
    add_inference_flags,
    add_model_flags,
    check_output_file,
    load_trained,
    report,
)
from minillm.data.jsonl import iter_records
from minillm.device import inference_dtype, resolve_device
from minillm.eval.heldout import document_frequency
from minillm.eval.perplexity import read_documents
from minillm.eval.tasks import (
    Rate,
    answer_all,
    cloze_items,
    copies_training_text,
    degeneration,
    known_tunes,
    parse_poem,
    requests,
    run_cloze,
    training_key,
)
from minillm.eval.tool_tasks import run_tool_requests, summarise, tool_requests
from minillm.export.model_card import record_evaluation
from minillm.files import write_json
from minillm.infer.generation import check_sampling
from minillm.infer.poem_tools import RHYME_NEEDS, PoemIndex, poem_tools, rhyme_available

TOOL_KIND_NAMES = {"quote": "quotes the asked clause of a poem (needs search_poems)",
                   "tone": "names a character's level/oblique tone (needs rhyme)",
                   "none": "writing requests answered without a call",
                   "quote_tools_off": "the quote requests with the tools off (from memory)"}
KIND_NAMES = {"tune": "names the requested tune (请以《X》为词牌)",
              "form": "writes the requested form: 4/8 clauses of 5/7 characters (五言/七言 绝句/律诗)",
              "length": "writes the requested line length: every clause 5 or 7 characters (五言/七言)",
              "words": "uses both requested words (要用上…)"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line."""
    p = argparse.ArgumentParser(
        prog="eval_tasks.py",
        description="Poetry cloze (any model: pick a held-out poem's true next line among 4 same-shape lines by "
                    "total log-likelihood) and request following (chat models: greedy answers to prompts built "
                    "from held-out poems, each checked by a stated rule, and for verbatim copies of training "
                    "poems). Deterministic.")
    add_model_flags(p)
    add_inference_flags(p, dtype="float32")  # a metric must not depend on the machine
    p.add_argument("--data", default="dataset/eval.jsonl",
                   help="held-out poems, JSON lines with a rendered poem in \"text\" (default: %(default)s)")
    p.add_argument("--sft_data", default="dataset/sft.jsonl",
                   help="the SFT set: its 词牌 prompts name the tunes (default: %(default)s)")
    p.add_argument("--train_data", default="dataset/pretrain.jsonl",
                   help="training poems a verbatim copy is looked for in, with the SFT answers (default: %(default)s)")
    p.add_argument("--tasks", default="auto",
                   help="cloze, requests and tools, comma-separated; auto: all three for chat models whose tokenizer "
                        "has the tool tokens (cloze and requests for older ones), cloze otherwise")
    p.add_argument("--limit", type=int, default=32,
                   help="prompts per request kind, from the held-out poems in file order (default: %(default)s)")
    p.add_argument("--max_new_tokens", type=int, default=160, help="tokens per answer (default: %(default)s)")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="0: one greedy answer per prompt (default); > 0: sample --samples answers per prompt at this "
                        "temperature, so the rates do not hang on one answer per prompt")
    p.add_argument("--samples", type=int, default=1,
                   help="answers sampled per prompt with --temperature > 0 (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling (default: %(default)s)")
    p.add_argument("--show", type=int, default=2, help="print this many answers of each kind (default: %(default)s)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON to PATH")
    args = p.parse_args(argv)
    if args.limit < 1 or args.max_new_tokens < 1:
        p.error("--limit and --max_new_tokens must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the evaluations and print the rates."""
    args = parse_args(argv)
    try:
        device = resolve_device(args.device)
        dtype = inference_dtype(args.dtype, device)
        # The cloze scores in float32 whatever the weights; generation runs in the weights' dtype.
        model, tokenizer, _ = load_trained(args, device, dtype)
        chat = bool(getattr(model.config, "chat_trained", False))
        auto = ["cloze", "requests"] + (["tools"] if tokenizer.tool_ids else []) if chat else ["cloze"]
        if args.tasks == "auto" and "tools" in auto and not rhyme_available():  # tone requests need the rhyme tool
            auto.remove("tools")
            print(f"note: the tool tasks are skipped: {RHYME_NEEDS}", file=sys.stderr)
        tasks = auto if args.tasks == "auto" else args.tasks.split(",")
        if not set(tasks) <= {"cloze", "requests", "tools"}:
            raise CliError(f"--tasks takes cloze, requests and/or tools, got {args.tasks!r}")
        if "tools" in tasks and not rhyme_available():
            raise CliError(f"--tasks tools: {RHYME_NEEDS}")
        if "tools" in tasks and not tokenizer.tool_ids:
            raise CliError(f"--tasks tools: the tokenizer of {args.model} has no tool-call tokens (it was made "
                           "before tool calling)")
        check_sampling(args.temperature)
        if args.samples < 1 or (args.samples > 1 and args.temperature == 0):
            raise CliError(f"--samples {args.samples}: give 1, or more than 1 with a --temperature > 0 (greedy "
                           "answers to one prompt are all the same)")
        poems = [p for p in (parse_poem(t) for t in read_documents(args.data)) if p is not None]
        tunes = known_tunes([r for _, r in iter_records(args.sft_data)]) if "requests" in tasks else set()
        corpus = training_key(args.train_data, args.sft_data) if "requests" in tasks else ""
        check_output_file(args.json, "--json")  # before minutes of evaluation that a failed write would lose
        if not poems:
            raise CliError(f"--data {args.data} holds no poems (rendered as in dataset/eval.jsonl): nothing to "
                           "evaluate")
        items = cloze_items(poems) if "cloze" in tasks else []
        if "cloze" in tasks and not items:
            raise CliError(f"--data {args.data}: {len(poems)} poems, none with the two or more lines a cloze item "
                           "needs: nothing to evaluate")
    except BAD_INPUT as e:
        return report("eval_tasks.py", e)
    dtype_name = str(dtype).removeprefix("torch.")
    print(f"{args.model}: {'chat' if chat else 'pretrained'} model, {model.num_parameters() / 1e6:.2f}M parameters "
          f"on {device}, weights in {dtype_name}{' quantized to int8' if args.quantize == 'int8' else ''}; "
          f"{len(poems)} held-out poems from {args.data}")
    results: dict[str, object] = {"model": args.model, "dtype": dtype_name, "quantize": args.quantize}
    start = time.perf_counter()
    if "cloze" in tasks:
        with tqdm(total=len(items), desc="cloze", unit="poem", file=sys.stderr) as bar:
            rate = run_cloze(model, tokenizer, items, torch.float32, progress=lambda: bar.update(1))
        print(rate)
        results["cloze"] = {"correct": rate.passed, "n": rate.n, "accuracy": rate.rate}
    if "requests" in tasks:
        # Twice: in the training distribution (the SFT set's wording and word list) and held out (wordings and
        # words no training file holds, minillm/eval/heldout.py); a rate without its held-out twin overstates.
        splits = {"train": requests(poems, tunes, args.limit),
                  "heldout": requests(poems, tunes, args.limit, document_frequency(read_documents(args.train_data)))}
        prompts = list(dict.fromkeys(r.prompt for todo in splits.values() for r in todo))
        with tqdm(total=len(prompts), desc="answers", unit="prompt", file=sys.stderr) as bar:
            answers = answer_all(model, tokenizer, prompts, args.max_new_tokens, progress=bar.update,
                                 temperature=args.temperature, samples=args.samples,
                                 generator=torch.Generator(device).manual_seed(args.seed))
        results["requests"] = {"answers": answers, "temperature": args.temperature, "samples": args.samples,
                               "seed": args.seed}
        for split, todo in splits.items():
            print(f"-- {'the training distribution' if split == 'train' else 'held out: new wordings, open words'}")
            per_kind = {}
            for kind in KIND_NAMES:
                mine = [(r, a) for r in todo if r.kind == kind for a in answers[r.prompt]]
                rate = Rate(f"{kind}: {KIND_NAMES[kind]}", sum(r.check(a) for r, a in mine), len(mine))
                copied = Rate(f"{kind}: copies a training poem verbatim",
                              sum(copies_training_text(a, corpus) for _, a in mine), len(mine))
                print(rate)
                print(f"  {copied}")
                per_kind[kind] = {"passed": rate.passed, "copied": copied.passed, "n": rate.n, "rate": rate.rate}
                for r, a in mine[:args.show]:
                    print(f"  Q: {r.prompt}\n  A: " + a.replace("\n", " / "))
            measured = degeneration([a for r in todo for a in answers[r.prompt]])
            print(f"repetitive answers (a line twice or a phrase three times): {measured['repeats']:.1%} of "
                  f"{measured['n']}; distinct-2 {measured['distinct_2']:.3f}")
            results["requests"]["kinds" if split == "train" else "heldout"] = per_kind
            results["requests"][f"degeneration_{split}"] = measured
    if "tools" in tasks:
        results["tools"] = evaluate_tools(model, tokenizer, poems, args)
    results["seconds"] = time.perf_counter() - start
    print(f"({results['seconds']:.0f} s)")
    if args.json:
        write_json(args.json, results)
    if args.quantize == "none":  # the card describes the model as saved, not a quantized copy of it
        update_card(args.adapter or args.model, results, args.data)
    return 0


def evaluate_tools(model, tokenizer, poems: list, args: argparse.Namespace) -> dict:
    """Tool requests (minillm/eval/tool_tasks.py) in both columns, and the quote requests with the tools off."""
    index = PoemIndex.load((Path(args.train_data), Path(args.data)))
    tools = poem_tools(index)
    train_poems = [p for p in (parse_poem(t) for t in read_documents(args.train_data)) if p is not None]
    tunes = known_tunes([r for _, r in iter_records(args.sft_data)])
    writing = {"train": [r.prompt for r in requests(poems, tunes, args.limit)],
               "heldout": [r.prompt for r in requests(poems, tunes, args.limit,
                                                      document_frequency(read_documents(args.train_data)))]}
    context = model.config.max_position_embeddings
    out: dict[str, object] = {}
    for split, source in (("train", train_poems), ("heldout", poems)):
        # A mix of writing kinds for the no-call requests: every third of tunes, forms and words.
        todo = tool_requests(source, index, args.limit, split == "heldout", writing[split][::3])
        with tqdm(total=len(todo), desc=f"tools ({split})", unit="request", file=sys.stderr) as bar:
            scores = run_tool_requests(model, tokenizer, todo, tools, args.max_new_tokens, context, bar.update)
        rates = summarise(scores, tools)
        quotes = [s.request for s in scores if s.request.kind == "quote"]
        bare = run_tool_requests(model, tokenizer, quotes, {}, args.max_new_tokens, context)
        rates["quote_tools_off"] = {"n": len(bare), "correct": sum(s.correct for s in bare) / max(len(bare), 1)}
        print(f"-- tools, {'the training distribution' if split == 'train' else 'held out: new wordings, titles'}")
        for kind, r in rates.items():
            what = TOOL_KIND_NAMES[kind]
            calls = f"right tool, valid arguments {r['valid_call']:.1%}; " if "valid_call" in r else ""
            print(f"{kind}: {what}: {calls}answer right {r['correct']:.1%} of {r['n']}")
        for s in [s for s in scores if s.request.kind != "none"][:args.show]:
            made = "; ".join(f"{c.name}({c.arguments})" for c in s.run.calls) or "no call"
            print(f"  Q: {s.request.prompt}\n  calls: {made}\n  A: " + s.run.answer.replace("\n", " / "))
        out[split] = rates
    return out


def update_card(model_dir: str, results: dict, data: str) -> None:
    """Put the rates (not the answers) into the model card of a directory minillm trained."""
    rates = {**results, "data": data, "date": time.strftime("%Y-%m-%d")}
    if "requests" in rates:
        rates["requests"] = {k: v for k, v in results["requests"].items() if k != "answers"}
    try:
        card = record_evaluation(model_dir, rates)
    except OSError as e:  # a read-only model directory: the results above stand, the card stays as it was
        print(f"note: the model card of {model_dir} was not updated ({e})")
        return
    if card is not None:
        print(f"model card updated: {card}")


if __name__ == "__main__":
    sys.exit(main())
