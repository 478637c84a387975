"""Mutation testing: does the suite catch small, plausible bugs? (issue 51, item 3)

Each mutation below changes a few characters of the library (a mask shifted by one, a sign, a normaliser, a
missing escape) in a scratch copy of the repository, then runs the tests named for its concept there. A
mutation is caught when those tests fail; one they pass is a hole in the suite, printed as MISSED. The script
never touches the working tree.

    python bench/mutations.py                 # all mutations; prints a table (--json PATH: also as JSON)
    python bench/mutations.py --only grpo     # those whose name contains "grpo"
    python bench/mutations.py --list          # the mutations and their tests, without running them

A mutation whose `old` text is no longer in its file is reported STALE (the code moved: update the list).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Mutation:
    """One small bug: replace `old` by `new` in `file`, then run `tests` (pytest arguments) there."""

    name: str
    concept: str
    file: str
    old: str
    new: str
    tests: tuple[str, ...]


MUTATIONS = [
    # --- model cards, templates, exports (rounds 3 and 4) ---------------------------------------------------
    Mutation("card-bpb-from-loss", "cards", "minillm/export/model_card.py",
             "rows.append((\"held-out bits per byte\", f\"{run['eval_bits_per_byte']:.4f}",
             "rows.append((\"held-out bits per byte\", f\"{run['eval_loss']:.4f}", ("tests/test_model_card.py",)),
    Mutation("card-fixed-fence", "cards", "minillm/export/model_card.py",
             'fence = "`" * max(3, max((len(r) for r in re.findall("`+", text)), default=0) + 1)',
             'fence = "```"', ("tests/test_model_card.py",)),
    Mutation("card-cells-unescaped", "cards", "minillm/export/model_card.py",
             'text = text.replace("|", "\\\\|")', "text = text", ("tests/test_model_card.py",)),
    Mutation("chatml-user-text-special", "templates", "minillm/data/tokenizer.py",
             "piece_ids = self.encode(piece.text)", "piece_ids = self.encode(piece.text, allow_special=True)",
             ("tests/test_tokenizer.py", "tests/test_chat_template.py")),
    Mutation("chatml-mask-shifted", "masks", "minillm/data/conversation.py",
             'text("assistant\\n")\n            reply', 'text("assistant\\n", learned=True)\n            reply',
             ("tests/test_tokenizer.py", "tests/test_data.py")),
    Mutation("tool-result-learned", "masks", "minillm/data/conversation.py",
             'text("\\n" + m["content"] + "\\n")', 'text("\\n" + m["content"] + "\\n", learned=True)',
             ("tests/test_tool_format.py", "-k", "mask")),
    Mutation("template-message-text-as-control", "templates", "minillm/data/template_render.py",
             "out.append((shown, True))", "out.append((shown, False))", ("tests/test_chat_template.py",)),
    Mutation("template-no-output-cap", "templates", "minillm/data/template_render.py",
             "if size > self.max_chars:", "if False:", ("tests/test_chat_template.py",)),
    Mutation("modelfile-unquoted-stop", "exports", "minillm/export/gguf.py",
             "        quoted = modelfile_value(stop)\n", "        quoted = f'\"{stop}\"'\n",
             ("tests/test_gguf_export.py", "-k", "modelfile or end_marker")),
    Mutation("host-prefix-accepted", "serving", "minillm/infer/server.py",
             "match = _HOST.fullmatch(header.strip().lower())", "match = _HOST.match(header.strip().lower())",
             ("tests/test_serve.py", "-k", "host")),
    Mutation("bearer-case-sensitive", "serving", "minillm/infer/server.py",
             'if scheme.lower() != "bearer"', 'if scheme != "Bearer"', ("tests/test_serve.py", "-k", "bearer")),
    # --- losses ---------------------------------------------------------------------------------------------
    Mutation("dpo-beta-dropped", "losses", "minillm/train/dpo.py",
             "loss_B = -F.logsigmoid(beta * (chosen_ratio_B - rejected_ratio_B))",
             "loss_B = -F.logsigmoid(chosen_ratio_B - rejected_ratio_B)", ("tests/test_dpo.py", "-k", "not process")),
    Mutation("grpo-mask-shifted", "masks", "minillm/train/objective.py",
             "mask_NT[i, begin - 1:end - 1] = 1.0", "mask_NT[i, begin:end] = 1.0",
             ("tests/test_grpo.py", "-k", "not processes")),
    Mutation("grpo-stop-token-unlearned", "masks", "minillm/train/objective.py",
             "mask_NT[i, begin - 1:end - 1] = 1.0", "mask_NT[i, begin - 1:end - 2] = 1.0",
             ("tests/test_grpo.py", "-k", "not processes")),
    Mutation("grpo-population-std", "losses", "minillm/train/grpo.py",
             "rewards_BG.std(dim=1, keepdim=True)", "rewards_BG.std(dim=1, keepdim=True, unbiased=False)",
             ("tests/test_grpo.py", "-k", "not processes")),
    Mutation("grpo-dr-normaliser", "losses", "minillm/train/grpo.py",
             "loss_N = summed_N / max_new_tokens", "loss_N = summed_N / tokens_N",
             ("tests/test_grpo.py", "-k", "not processes")),
    Mutation("grpo-kl-sign", "losses", "minillm/train/grpo.py",
             "delta_NT = ref_logp_NT - logp_NT", "delta_NT = logp_NT - ref_logp_NT",
             ("tests/test_grpo.py", "-k", "not processes")),
    Mutation("moe-aux-without-E", "losses", "minillm/model/moe.py",
             "return num_experts * torch.sum((counts_E / rows) * (probs_E / rows))",
             "return torch.sum((counts_E / rows) * (probs_E / rows))", ("tests/test_moe.py", "-k", "not ddp")),
    Mutation("moe-z-unsquared", "losses", "minillm/model/moe.py",
             "torch.logsumexp(s.logits_NE, dim=-1) ** 2", "torch.logsumexp(s.logits_NE, dim=-1).abs()",
             ("tests/test_moe.py", "-k", "not ddp")),
    Mutation("moe-load-softmax", "losses", "minillm/model/moe.py",
             "return counts_E / counts_E.sum()", "return counts_E.softmax(0)", ("tests/test_moe.py", "-k", "not ddp")),
    Mutation("bits-per-byte-in-nats", "losses", "minillm/eval/perplexity.py",
             "return mean_nll * tokens / (n_bytes * math.log(2))", "return mean_nll * tokens / n_bytes",
             ("tests/test_evaluation.py", "tests/test_model_card.py")),
    # --- rewards --------------------------------------------------------------------------------------------
    Mutation("poem-reward-allows-repeats", "rewards", "minillm/eval/rewards.py",
             "and len(set(body)) == len(body) and len(set(chars)) >= len(chars) / 2 and not repeats(body)",
             "and len(set(chars)) >= len(chars) / 2", ("tests/test_grpo.py", "-k", "reward or composite")),
    Mutation("poem-reward-phrases-unchecked", "rewards", "minillm/eval/rewards.py",
             "len(set(chars)) >= len(chars) / 2 and not repeats(body)", "len(set(chars)) >= len(chars) / 2",
             ("tests/test_grpo.py", "-k", "reward or composite or repetitive")),
    Mutation("poem-reward-restating-allowed", "rewards", "minillm/eval/rewards.py",
             "\n                 and not restates(request, text))", ")",
             ("tests/test_grpo.py", "-k", "reward or composite or repetitive")),
    Mutation("reward-weight-ignored", "rewards", "minillm/train/grpo.py",
             "return sum(v * w for v, (_, w) in zip(values, self.rewards.values())), values",
             "return sum(values), values", ("tests/test_grpo.py", "-k", "not processes")),
    # --- sampling -------------------------------------------------------------------------------------------
    Mutation("temperature-multiplies", "sampling", "minillm/infer/generation.py",
             "logits_BV.float() / temperature", "logits_BV.float() * temperature",
             ("tests/test_generation.py",)),
    Mutation("top-p-off-by-one", "sampling", "minillm/infer/generation.py",
             "drop_sorted_BV = (cum_BV - sorted_BV.softmax(-1)) >= top_p", "drop_sorted_BV = cum_BV >= top_p",
             ("tests/test_generation.py",)),
    Mutation("repetition-penalty-inverted", "sampling", "minillm/infer/generation.py",
             "penalised = torch.where(logits_BV > 0, logits_BV / penalty, logits_BV * penalty)",
             "penalised = torch.where(logits_BV > 0, logits_BV * penalty, logits_BV / penalty)",
             ("tests/test_generation.py",)),
    Mutation("top-k-keeps-one-more", "sampling", "minillm/infer/generation.py",
             "kth_B1 = torch.topk(logits_BV, top_k, dim=-1).values[:, -1:]",
             "kth_B1 = torch.topk(logits_BV, min(top_k + 1, logits_BV.shape[-1]), dim=-1).values[:, -1:]",
             ("tests/test_generation.py",)),
    Mutation("top-p-drops-the-best", "sampling", "minillm/infer/generation.py",
             "drop_sorted_BV[:, 0] = False", "pass", ("tests/test_generation.py", "tests/test_faults.py")),
    # --- masks and losses, more ---------------------------------------------------------------------------
    Mutation("example-mask-unshifted", "masks", "minillm/data/datasets.py",
             "return ids_T[:-1].clone(), ids_T[1:].clone(), learn_T[1:].clone()",
             "return ids_T[:-1].clone(), ids_T[1:].clone(), learn_T[:-1].clone()", ("tests/test_data.py",)),
    Mutation("dpo-prompt-learned", "masks", "minillm/data/preference.py",
             "rows.append((ids, [0] * len(prompt_ids) + learn[len(prompt_ids):]))", "rows.append((ids, learn))",
             ("tests/test_dpo.py", "-k", "not process")),
    Mutation("loss-mean-over-all-tokens", "losses", "minillm/model/loss.py",
             "return _weighted_nll_sum(logits_BTV, labels_BT, weight_BT) / weight_BT.sum().clamp(min=1.0)",
             "return _weighted_nll_sum(logits_BTV, labels_BT, weight_BT) / labels_BT.numel()",
             ("tests/test_model.py", "tests/test_data.py")),
    # --- rewards and checks, more -------------------------------------------------------------------------
    Mutation("copy-check-threshold", "rewards", "minillm/eval/tasks.py",
             "def copies_training_text(answer: str, corpus_key: str, min_chars: int = 10)",
             "def copies_training_text(answer: str, corpus_key: str, min_chars: int = 40)",
             ("tests/test_tasks.py", "tests/test_grpo.py", "-k", "not processes")),
    Mutation("words-check-any", "rewards", "minillm/eval/tasks.py",
             'return lambda answer: all(w in "".join(answer_body(answer)) for w in (w1, w2))',
             'return lambda answer: any(w in "".join(answer_body(answer)) for w in (w1, w2))',
             ("tests/test_tasks.py", "tests/test_grpo.py", "-k", "not processes")),
    Mutation("tune-check-whole-title", "rewards", "minillm/eval/tasks.py",
             'return lambda answer: answer_title(answer).split("·")[0] == tune',
             "return lambda answer: answer_title(answer) == tune", ("tests/test_tasks.py",)),
    Mutation("form-accepts-six-clauses", "rewards", "minillm/eval/tasks.py",
             "len(parts) not in (4, 8)", "len(parts) not in (4, 6, 8)", ("tests/test_tasks.py",)),
    # --- cards and templates, more ------------------------------------------------------------------------
    Mutation("card-shows-stale-results", "cards", "minillm/export/model_card.py",
             'if evaluation.get("weights_sha256") != sha256_file(weights_file(model_dir)):', "if False:",
             ("tests/test_model_card.py",)),
    Mutation("template-end-marker-unlearned", "templates", "minillm/data/template_render.py",
             "spans.append((len(before), len(before) + (max(ends) if ends else len(turn))))",
             "spans.append((len(before), len(before) + (min(ends) - 1 if ends else len(turn))))",
             ("tests/test_chat_template.py",)),
    Mutation("template-refusal-is-a-limit", "templates", "minillm/data/chat_template.py",
             'kind = {"refused": TemplateRefused}.get(reply["error"], TemplateLimit)', "kind = TemplateLimit",
             ("tests/test_chat_template.py", "tests/test_serve.py", "-k", "hostile or template")),
    Mutation("dpo-logps-averaged", "losses", "minillm/train/dpo.py",
             "return (logp_BT * mask_BT.float()).sum(dim=-1)",
             "return (logp_BT * mask_BT.float()).sum(dim=-1) / mask_BT.float().sum(dim=-1).clamp(min=1)",
             ("tests/test_dpo.py", "-k", "not process")),
    Mutation("chunked-loss-denominator", "losses", "minillm/model/loss.py",
             "    return total / weight_BT.sum().clamp(min=1.0)", "    return total / labels_BT.numel()",
             ("tests/test_memory_options.py", "tests/test_model.py")),
    Mutation("words-reward-max", "rewards", "minillm/eval/rewards.py",
             "(check_words(w1, w1)(answer) + check_words(w2, w2)(answer)) / 2",
             "max(check_words(w1, w1)(answer), check_words(w2, w2)(answer))",
             ("tests/test_grpo.py", "-k", "reward or composite")),
    Mutation("ended-reward-anywhere", "rewards", "minillm/eval/rewards.py",
             "return float(answer.endswith(END))", "return float(END in answer)",
             ("tests/test_grpo.py", "-k", "reward or composite")),
    Mutation("length-reward-unchecked", "rewards", "minillm/eval/rewards.py",
             'fields["kind"] == "form" and check_line_length(fields["form"])(_text(answer)))',
             'fields["kind"] == "form")',
             ("tests/test_grpo.py", "-k", "reward or composite")),
    Mutation("choices-share-a-seed", "sampling", "minillm/infer/openai_api.py",
             "Sampling(s.temperature, s.top_p, (s.seed + i) % 2**63)", "Sampling(s.temperature, s.top_p, s.seed)",
             ("tests/test_serve.py", "-k", "choices or seed")),
    Mutation("grpo-prompt-with-padding", "masks", "minillm/train/grpo.py",
             "prompts = [[row[mask > 0].tolist() for row, mask in zip(x_BT, m_BT)]",
             "prompts = [[row.tolist() for row, mask in zip(x_BT, m_BT)]", ("tests/test_grpo.py", "-k", "not processes")),
    Mutation("card-cloze-uncentered", "cards", "minillm/export/model_card.py",
             'centered = (cloze["accuracy"] - 0.25) / 0.75', 'centered = cloze["accuracy"] - 0.25',
             ("tests/test_model_card.py",)),
    # --- tools, agentic RL, distillation, speculative decoding (round 5) -----------------------------------
    Mutation("tool-needless-call-free", "rewards", "minillm/eval/rewards.py",
             'return -penalty - MISUSE * bool(getattr(answer, "calls", ()))', "return -penalty",
             ("tests/test_tool_rollouts.py", "tests/test_grpo.py", "-k", "reward or composite or tool")),
    Mutation("tool-rollout-result-learned", "masks", "minillm/infer/tool_rollouts.py",
             "row.sampled.append((start, len(row.ids)))", "row.sampled.append((row.prompt_length, len(row.ids)))",
             ("tests/test_tool_rollouts.py",)),
    Mutation("grpo-iteration-ratio-against-itself", "losses", "minillm/train/grpo.py",
             "old_NT = logp_NT.detach() if out.old_logp_NT is None else out.old_logp_NT.to(device)",
             "old_NT = logp_NT.detach()", ("tests/test_grpo.py", "-k", "iteration")),
    Mutation("jsd-mixture-weights-swapped", "losses", "minillm/train/distill.py",
             "torch.logaddexp(log_p + math.log(beta), log_q + math.log1p(-beta))",
             "torch.logaddexp(log_p + math.log1p(-beta), log_q + math.log(beta))",
             ("tests/test_distill.py", "-k", "generalized_jsd")),
    Mutation("jsd-gradient-without-softmax-centring", "losses", "minillm/train/distill.py",
             "q * (pull - (q * pull).sum(-1, keepdim=True))", "q * pull",
             ("tests/test_distill.py", "-k", "generalized_jsd")),
    Mutation("speculative-accept-inverted", "sampling", "minillm/infer/speculative.py",
             "if u * float(q_V[t]) < float(p_TV[i, t]):", "if u * float(p_TV[i, t]) < float(q_V[t]):",
             ("tests/test_speculative.py",)),
    Mutation("speculative-residual-unclamped", "sampling", "minillm/infer/speculative.py",
             "residual_V = (p_TV[i] - q_V.to(p_TV.device)).clamp_min(0)", "residual_V = (p_TV[i] - q_V.to(p_TV.device)).abs()",
             ("tests/test_speculative.py",)),
    # --- eighth session: batched speculation, batch invariance, the teacher cache -----------------------------
    Mutation("speculation-batch-no-rollback", "sampling", "minillm/infer/serving.py",
             "self.cache.lengths[b] -= k - kept", "pass",
             ("tests/test_speculative.py", "-k", "share_the_batch")),
    Mutation("rows-always-independent", "serving", "minillm/model/linear.py",
             "        if any(not torch.equal(module(x[:m])[:1], first) for m in range(2, rows + 1)):\n            return False",
             "        pass", ("tests/test_serve.py", "-k", "row_count")),
    Mutation("slot-tokens-not-causal", "serving", "minillm/model/kv_cache.py",
             "> L + torch.arange(w, device=q_BHTD.device)[:, None]", "> L + w - 1",
             ("tests/test_speculative.py", "-k", "slot_cache")),
    Mutation("teacher-cache-checksum-ignored", "distillation", "minillm/train/teacher_cache.py",
             'meta.get("sha256") == sha256_file(bin_path)', "True",
             ("tests/test_distill.py", "-k", "corrupted")),
    Mutation("teacher-cache-tail-unnormalised", "distillation", "minillm/train/teacher_cache.py",
             "tail_N1 = (rest_N1 / (vocab - k)).log().float()", "tail_N1 = rest_N1.log().float()",
             ("tests/test_distill.py", "-k", "top_k_cache")),
    # --- model, optimizer, schedule (the golden curve's concepts) -----------------------------------------
    Mutation("rmsnorm-eps-outside", "model", "minillm/model/model.py",
             "x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)",
             "x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True)) + self.eps",
             ("tests/test_model.py", "tests/test_golden_curve.py")),
    Mutation("adamw-betas", "optimizer", "minillm/train/optim.py", "betas=(0.9, 0.95)", "betas=(0.9, 0.999)",
             ("tests/test_golden_curve.py",)),
    Mutation("cosine-floor", "schedule", "minillm/train/schedule.py", "min_lr = lr / 10", "min_lr = lr / 20",
             ("tests/test_schedule.py", "tests/test_golden_curve.py")),
    Mutation("warmup-off-by-one", "schedule", "minillm/train/schedule.py",
             "return lr * step / warmup_steps", "return lr * (step + 1) / warmup_steps",
             ("tests/test_schedule.py", "tests/test_golden_curve.py")),
    Mutation("horizon-not-restored", "schedule", "minillm/train/trainer.py",
             "schedule.restore(state.horizon_steps)", "pass", ("tests/test_levers.py", "-k", "resumes_exactly")),
    Mutation("no-clipping", "optimizer", "minillm/train/trainer.py",
             'clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf"))',
             'clip_grad_norm_(params, float("inf"))', ("tests/test_golden_curve.py",)),
]


def scratch_copy(target: Path) -> None:
    """The repository's tracked and untracked (not ignored) files, copied to `target`."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True,
                           check=True).stdout.decode().split("\0")
    for name in filter(None, files):
        source = ROOT / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)
    for built in ("dataset/pretrain.tokens.bin", "dataset/pretrain.tokens.bin.json"):  # caches, if built
        if (ROOT / built).is_file():
            shutil.copy2(ROOT / built, target / built)


def run_one(m: Mutation, work: Path, timeout: float) -> tuple[str, float]:
    """('caught' | 'MISSED' | 'STALE' | 'TIMEOUT', seconds) for one mutation applied in `work`."""
    path = work / m.file
    original = path.read_text(encoding="utf-8")
    if original.count(m.old) != 1:
        return "STALE", 0.0
    path.write_text(original.replace(m.old, m.new), encoding="utf-8")
    start = time.perf_counter()
    try:
        done = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *m.tests],
                              cwd=work, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, "PYTHONPATH": str(work), "PYTHONDONTWRITEBYTECODE": "1"})
        # 1: tests failed (caught); 0: they passed (missed); 5: the selection ran nothing (missed as well);
        # anything else (a collection error the mutant caused) is caught, with its code shown.
        verdict = {0: "MISSED", 1: "caught", 5: "NO TESTS"}.get(done.returncode, f"caught ({done.returncode})")
    except subprocess.TimeoutExpired:
        verdict = "TIMEOUT"  # counted as caught: the mutant did not pass
    finally:
        path.write_text(original, encoding="utf-8")
    return verdict, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    """Run the mutations; exit status 1 if any was missed."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], prog="bench/mutations.py")
    p.add_argument("--only", default="", help="run the mutations whose name or concept contains this text")
    p.add_argument("--timeout", type=float, default=900, help="seconds per mutation's tests (default: %(default)s)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON to PATH")
    p.add_argument("--list", action="store_true", help="list the mutations and their tests, run nothing")
    args = p.parse_args(argv)
    chosen = [m for m in MUTATIONS if args.only in m.name or args.only in m.concept]
    if args.list:
        for m in chosen:
            print(f"{m.name:34} {m.concept:10} {m.file}  ->  pytest {' '.join(m.tests)}")
        return 0
    results = []
    with tempfile.TemporaryDirectory(prefix="minillm-mutants-") as d:
        work = Path(d)
        scratch_copy(work)
        where = subprocess.run([sys.executable, "-c", "import minillm; print(minillm.__file__)"], cwd=work,
                               capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(work)}).stdout
        if not where.startswith(str(work)):
            raise SystemExit(f"the scratch copy imports minillm from {where.strip()}, not from {work}")
        for m in chosen:
            verdict, seconds = run_one(m, work, args.timeout)
            results.append({"name": m.name, "concept": m.concept, "file": m.file, "verdict": verdict,
                            "seconds": round(seconds, 1)})
            print(f"{verdict:8} {m.name:34} {m.concept:10} {seconds:6.1f} s", flush=True)
    caught = sum(r["verdict"].startswith("caught") or r["verdict"] == "TIMEOUT" for r in results)
    ran = sum(r["verdict"] != "STALE" for r in results)
    print(f"caught {caught} of {ran} mutations" + (f" ({ran - caught} missed)" if caught < ran else ""))
    if args.json:
        Path(args.json).write_text(json.dumps({"caught": caught, "ran": ran, "results": results}, indent=1) + "\n")
    return 0 if caught == ran else 1


if __name__ == "__main__":
    sys.exit(main())
