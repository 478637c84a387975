"""The model card (README.md) every training run writes, and eval_tasks.py updates (issue 31, part 3)."""

from __future__ import annotations

import json
import math

import pytest
from conftest import REPO, TINY_ARGS, head_lines, load_script, run_train_cli, stage_defaults

from minillm.data.tokenizer import load_tokenizer
from minillm.eval.perplexity import read_documents
from minillm.export.model_card import CARD_NAME, EVAL_RESULTS, TRAIN_RESULTS

huggingface_hub = pytest.importorskip("huggingface_hub")


def card_metadata(model_dir) -> dict:
    """The card's YAML front matter as the Hugging Face Hub library parses it."""
    return huggingface_hub.ModelCard.load(model_dir / CARD_NAME).data.to_dict()


@pytest.fixture(scope="module")
def eval_docs(tmp_path_factory):
    """40 held-out poems: enough text for a bits-per-byte figure, quick to score."""
    return head_lines(REPO / "dataset" / "eval.jsonl", 40, tmp_path_factory.mktemp("eval") / "eval.jsonl")


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, corpus, eval_docs):
    """A 6-step tiny pretraining run with held-out documents: its out_dir (what it printed: ../stdout.txt)."""
    import contextlib
    import io

    from minillm.cli import main

    out = tmp_path_factory.mktemp("card") / "pretrain"
    flags = ["--data_path", corpus, "--eval_data", eval_docs, "--out_dir", out, "--max_length", "32",
             "--batch_size", "2", "--max_steps", "6", "--save_every", "0", "--license", "apache-2.0", *TINY_ARGS]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main("pretrain", stage_defaults("pretrain"), [str(a) for a in flags]) == 0
    (out.parent / "stdout.txt").write_text(printed.getvalue())
    return out


def test_the_done_line_gives_the_held_out_loss_in_nats_and_bits_per_byte(pretrained):
    run = json.loads((pretrained / TRAIN_RESULTS).read_text())
    done = (pretrained.parent / "stdout.txt").read_text().strip().splitlines()[-1]
    assert done.startswith("done: 6 steps")
    assert (f", held-out loss {run['eval_loss']:.4f} ({run['eval_bits_per_byte']:.3f} bits/byte); model in "
            f"{pretrained}") in done


def test_pretraining_card_metadata_and_recipe(pretrained):
    out = pretrained
    meta = card_metadata(out)
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation"
    assert meta["license"] == "apache-2.0"
    assert set(meta["tags"]) == {"minillm", "pretrain", "llama"}
    assert "base_model" not in meta and "language" not in meta  # a new model; data outside dataset/
    run = json.loads((out / TRAIN_RESULTS).read_text())
    # Packed pretraining: a block of max_length tokens is max_length - 1 inputs; a step is batch_size blocks.
    assert (run["steps"], run["tokens"]) == (6, 6 * 2 * 31)
    assert run["command"].startswith("python train_pretrain.py --data_path ") and "--max_steps 6" in run["command"]
    card = (out / CARD_NAME).read_text()
    assert "| steps | 6 |" in card and "| tokens | 372 input positions |" in card
    assert f"{run['eval_loss']:.4f} nats/token" in card
    assert "Not evaluated yet: `python eval_tasks.py --model" in card


def test_card_bits_per_byte_equal_eval_ppl(pretrained, eval_docs, tmp_path):
    """The card's held-out bits per byte is what eval_ppl.py measures in the same windows."""
    out = pretrained
    report = tmp_path / "ppl.json"
    eval_ppl = load_script("eval_ppl.py")
    assert eval_ppl.main(["--model", str(out), "--data", str(eval_docs), "--max_length", "32", "--stride", "32",
                          "--json", str(report)]) == 0
    measured = json.loads(report.read_text())["bits_per_byte"]
    run = json.loads((out / TRAIN_RESULTS).read_text())
    assert math.isclose(run["eval_bits_per_byte"], measured, rel_tol=1e-5), (run["eval_bits_per_byte"], measured)
    # And by hand, from the loss: sum of NLLs over the documents' UTF-8 bytes.
    texts = read_documents(eval_docs)
    tokens = sum(len(d) + 1 for d in load_tokenizer(out).encode_batch(texts))
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    assert math.isclose(run["eval_bits_per_byte"], run["eval_loss"] * tokens / (n_bytes * math.log(2)), rel_tol=1e-9)


def test_eval_tasks_updates_the_card_until_the_weights_change(pretrained, tmp_path):
    out = pretrained
    eval_tasks = load_script("eval_tasks.py")
    assert eval_tasks.main(["--model", str(out), "--json", str(tmp_path / "tasks.json")]) == 0
    result = json.loads((tmp_path / "tasks.json").read_text())
    cloze = result["cloze"]
    card = (out / CARD_NAME).read_text()
    centered = (cloze["accuracy"] - 0.25) / 0.75
    assert (f"| poetry cloze (4 choices) | {cloze['accuracy']:.1%} (centered {centered:+.1%}) | (held-out poems) | "
            f"{cloze['n']} |") in card
    assert (out / EVAL_RESULTS).is_file()
    # Other weights in the directory (a run continued since): the results are not shown as this model's.
    weights = out / "model.safetensors"
    original = weights.read_bytes()
    try:
        weights.write_bytes(original[:-4] + bytes(4))
        assert eval_tasks.main(["--model", str(out), "--tasks", "cloze", "--json", str(tmp_path / "t2.json")]) == 0
        weights.write_bytes(original[:-8] + bytes(8))
        from minillm.export.model_card import write_card

        write_card(out)
        card = (out / CARD_NAME).read_text()
        assert "poetry cloze" not in card and "are of earlier weights" in card
    finally:
        weights.write_bytes(original)


def test_overwrite_drops_the_old_runs_results(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    base = ["--data_path", corpus, "--eval_data", "", "--out_dir", out, "--max_length", "32", "--batch_size", "2",
            "--save_every", "0", *TINY_ARGS]
    assert run_train_cli("pretrain", *base, "--max_steps", "2", capsys=capsys)[0] == 0
    (out / EVAL_RESULTS).write_text(json.dumps({"cloze": {"accuracy": 0.9, "n": 10}}))
    assert run_train_cli("pretrain", *base, "--max_steps", "3", "--overwrite", capsys=capsys)[0] == 0
    assert not (out / EVAL_RESULTS).exists()
    assert json.loads((out / TRAIN_RESULTS).read_text())["steps"] == 3
    assert "Not evaluated yet" in (out / CARD_NAME).read_text()


def test_resumed_run_card_counts_the_whole_run(corpus, tmp_path, capsys):
    base = ["--data_path", corpus, "--eval_data", "", "--max_length", "32", "--batch_size", "2", "--max_steps", "5",
            *TINY_ARGS]
    assert run_train_cli("pretrain", *base, "--out_dir", tmp_path / "whole", capsys=capsys)[0] == 0
    # The same run cut after a checkpoint at step 2 (a SIGINT would do the same), then resumed to the end.
    from minillm.train import trainer

    original = trainer.Checkpointer.save
    calls = []

    def save_then_stop(self, step, *a):
        path = original(self, step, *a)
        calls.append(step)
        if step == 2:
            raise KeyboardInterrupt
        return path

    cut = tmp_path / "cut"
    trainer.Checkpointer.save = save_then_stop
    try:
        with pytest.raises(KeyboardInterrupt):
            run_train_cli("pretrain", *base, "--out_dir", cut, "--save_every", "2", capsys=capsys)
    finally:
        trainer.Checkpointer.save = original
    assert not (cut / CARD_NAME).exists()  # no card for an unfinished run
    assert run_train_cli("pretrain", *base, "--out_dir", cut, "--resume", capsys=capsys)[0] == 0
    whole, resumed = (json.loads((d / TRAIN_RESULTS).read_text()) for d in (tmp_path / "whole", cut))
    assert (resumed["steps"], resumed["tokens"]) == (whole["steps"], whole["tokens"]) == (5, 5 * 2 * 31)


def test_lora_adapter_card_names_its_base(pretrained, corpus, tmp_path, capsys):
    base = pretrained
    out = tmp_path / "adapter"
    assert run_train_cli("pretrain", "--data_path", corpus, "--eval_data", "", "--out_dir", out, "--max_length",
                         "32", "--batch_size", "2", "--max_steps", "2", "--init_from", base, "--lora",
                         "--language", "zh", "en", capsys=capsys)[0] == 0
    meta = card_metadata(out)
    assert meta["library_name"] == "peft" and meta["base_model"] == str(base)
    assert meta["language"] == ["zh", "en"] and "lora" in meta["tags"]
    card = (out / CARD_NAME).read_text()
    assert f'PeftModel.from_pretrained(base, "{out}")' in card
    assert f"--model {base} --adapter {out}" in card


def test_outside_checkpoint_keeps_its_own_readme(tiny_sft_dir, tmp_path):
    """eval_tasks.py writes no results or card into a directory minillm did not train."""
    readme = tiny_sft_dir / CARD_NAME
    readme.write_text("their card\n")
    eval_tasks = load_script("eval_tasks.py")
    assert eval_tasks.main(["--model", str(tiny_sft_dir), "--tasks", "cloze", "--limit", "1"]) == 0
    assert readme.read_text() == "their card\n" and not (tiny_sft_dir / EVAL_RESULTS).exists()
    readme.unlink()


# --- issue 44, item 3: flag values cannot break the card's markdown ------------------------------------------

def markdown_tokens(text: str):
    """The card as a CommonMark parser (markdown-it, GFM tables on) reads it: its block and inline tokens."""
    markdown_it = pytest.importorskip("markdown_it")
    tokens = markdown_it.MarkdownIt("commonmark").enable("table").parse(text)
    inline = [child for t in tokens if t.children for child in t.children]
    return tokens, inline


def test_hostile_flag_values_stay_code_in_the_card(corpus, tmp_path, capsys):
    """Issue 44, item 3: a value with backticks or HTML ended the command's code fence and injected markdown and
    HTML into the model's README.md. Mutations caught: the fixed ``` fence, unescaped table cells and title."""
    import shutil

    hostile = "x```\n```\n<script>alert(1)</script>\n# Injected | cell `y`"  # a line of ``` closes a ``` fence
    data = tmp_path / "poems ``` <img src=x onerror=alert(1)> |.jsonl"
    shutil.copy(corpus, data)
    out = tmp_path / "run ``` <b>bold</b> # [link](http://evil)"
    code, _, err = run_train_cli("pretrain", "--data_path", data, "--eval_data", "", "--out_dir", out,
                                 "--max_length", "32", "--batch_size", "2", "--max_steps", "2", *TINY_ARGS,
                                 capsys=capsys)
    assert code == 0, err
    run = json.loads((out / TRAIN_RESULTS).read_text())
    run["command"] += " --note " + hostile  # any text the command line may hold
    (out / TRAIN_RESULTS).write_text(json.dumps(run))
    from minillm.export.model_card import write_card

    text = write_card(out).read_text()
    tokens, inline = markdown_tokens(text)
    html = [t.content for t in tokens + inline if t.type.startswith("html")]
    assert html == ["<!-- written by minillm: rewritten from train_results.json and eval_results.json -->\n"]
    headings = [tokens[i + 1].content for i, t in enumerate(tokens) if t.type == "heading_open"]
    assert headings == [out.name, "Training", "Evaluation", "Use"]
    fences = [t for t in tokens if t.type == "fence"]
    assert fences[0].info == "bash" and fences[0].content == run["command"] + "\n"
    cells = {t.content for t in inline if t.type == "code_inline"}
    assert str(data) in cells
    cells_per_row, count = [], 0
    for t in tokens:  # every row of the training table keeps its two cells: no pipe split one
        if t.type in ("td_open", "th_open"):
            count += 1
        elif t.type == "tr_close":
            cells_per_row, count = [*cells_per_row, count], 0
    assert cells_per_row and set(cells_per_row) == {2}
    assert card_metadata(out)["tags"]  # the front matter still parses


@pytest.mark.parametrize("flags, needle", [
    (["--language", "zh", "`x`"], "--language '`x`' is not a language code"),
    (["--language", "<b>en</b>"], "is not a language code"),
    (["--language", "english"], "is not a language code"),
    (["--license", "MIT <script>"], "--license 'MIT <script>' is not a license identifier"),
])
def test_card_metadata_flags_take_codes_only(corpus, tmp_path, capsys, flags, needle):
    code, _, err = run_train_cli("pretrain", "--data_path", corpus, "--out_dir", tmp_path / "o", "--max_steps", "1",
                                 *TINY_ARGS, *flags, capsys=capsys)
    assert code == 2 and needle in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()


def test_every_number_in_the_card_is_the_one_in_its_file(pretrained, eval_docs, tmp_path):
    """Issue 51: the card could report bits/byte from the wrong field and no test read it back. Each number of
    the training table is read from the rendered markdown and compared with train_results.json, and bits per
    byte also with an independent computation from the loss and the held-out text."""
    import re

    out = tmp_path / "copy"
    import shutil

    shutil.copytree(pretrained, out)
    from minillm.export.model_card import write_card

    run = json.loads((out / TRAIN_RESULTS).read_text())
    # Distinct values in every field, so that any field shown in another's place is seen.
    run.update(steps=1234, tokens=56789, train_seconds=4321.0, eval_loss=run["eval_loss"] + 0.1234)
    texts = read_documents(eval_docs)
    tokens = sum(len(d) + 1 for d in load_tokenizer(out).encode_batch(texts))
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    run["eval_bits_per_byte"] = run["eval_loss"] * tokens / (n_bytes * math.log(2))
    (out / TRAIN_RESULTS).write_text(json.dumps(run))
    card = write_card(out).read_text()
    table = dict(re.findall(r"^\| ([^|]+?) \| (.+?) \|$", card, re.M))
    assert table["steps"] == "1,234" and table["tokens"] == "56,789 input positions"
    assert table["training time"] == "4,321 s"
    assert float(table["held-out loss"].split()[0]) == pytest.approx(run["eval_loss"], abs=5e-5)
    shown_bpb = float(table["held-out bits per byte"].split()[0])
    assert shown_bpb == pytest.approx(run["eval_bits_per_byte"], abs=5e-5)
    assert shown_bpb != pytest.approx(float(table["held-out loss"].split()[0]), abs=1e-3)
    assert table["model"].startswith(f"{run['parameters'] / 1e6:.2f}M parameters")


def test_the_card_shows_each_request_rate_beside_its_held_out_twin(pretrained, tmp_path):
    """Issue 45: a rate without its held-out column is not the model's ability; the card shows both, and the
    degeneration measure of each split, from eval_results.json."""
    import re
    import shutil

    from minillm.export.model_card import record_evaluation

    out = tmp_path / "copy"
    shutil.copytree(pretrained, out)
    kinds = {"tune": {"rate": 0.75, "n": 4}, "words": {"rate": 0.5, "n": 4}}
    held = {"tune": {"rate": 0.25, "n": 4}, "words": {"rate": 0.0, "n": 4}}
    record_evaluation(out, {"date": "2026-12-06", "dtype": "float32", "data": "dataset/eval.jsonl",
                            "requests": {"kinds": kinds, "heldout": held,
                                         "degeneration_train": {"repeats": 0.125, "n": 8, "distinct_2": 0.875},
                                         "degeneration_heldout": {"repeats": 0.5, "n": 8, "distinct_2": 0.625}},
                            "tools": {"train": {"quote": {"n": 4, "valid_call": 1.0, "correct": 0.75},
                                                "quote_tools_off": {"n": 4, "correct": 0.0}},
                                      "heldout": {"quote": {"n": 4, "valid_call": 0.5, "correct": 0.25},
                                                  "quote_tools_off": {"n": 4, "correct": 0.25}}}})
    card = (out / CARD_NAME).read_text()
    rows = dict((a, (b, c)) for a, b, c in re.findall(r"^\| ([^|]+?) \| ([^|]+?) \| ([^|]+?) \| \d+ \|$", card, re.M))
    assert rows["names the requested tune"] == ("75.0%", "25.0%")
    assert rows["uses both requested words"] == ("50.0%", "0.0%")
    assert rows["repetitive answers (a line twice, or a phrase three times)"] == ("12.5%", "50.0%")
    assert rows["distinct-2 (distinct character bigrams)"] == ("0.875", "0.625")
    assert rows["tools, quote a poem's clause (search): right tool, valid arguments"] == ("100.0%", "50.0%")
    assert rows["tools, quote a poem's clause (search): answer right"] == ("75.0%", "25.0%")
    assert rows["tools, quote with the tools off: answer right"] == ("0.0%", "25.0%")
    assert "| task | training wordings | held out | n |" in card


def test_a_post_trained_card_shows_its_starting_models_results_beside_its_own(pretrained, tmp_path):
    """Issue 47, item 4: eval_tasks before and after on the card of a run that started from another model (its
    --init_from, whose own eval_results.json is of its present weights and measured the same way)."""
    import re
    import shutil

    from minillm.export.model_card import record_evaluation

    base, after = tmp_path / "sft", tmp_path / "grpo"
    shutil.copytree(pretrained, base)
    shutil.copytree(pretrained, after)
    run = json.loads((after / TRAIN_RESULTS).read_text())
    (after / TRAIN_RESULTS).write_text(json.dumps({**run, "stage": "grpo", "base_model": str(base)}))

    def results(tune: float, held: float, data: str = "dataset/eval.jsonl") -> dict:
        return {"date": "2026-12-07", "dtype": "float32", "data": data,
                "requests": {"kinds": {"tune": {"rate": tune, "n": 4}}, "heldout": {"tune": {"rate": held, "n": 4}}}}

    record_evaluation(base, results(0.5, 0.25))
    record_evaluation(after, results(1.0, 0.75))
    card = (after / CARD_NAME).read_text()
    row = re.search(r"^\| names the requested tune \| (.+) \| 4 \|$", card, re.M).group(1).split(" | ")
    assert row == ["100.0%", "75.0%", "50.0%", "25.0%"] and f"started from (`{base}`" in card
    record_evaluation(after, results(1.0, 0.75, data="other.jsonl"))  # measured otherwise: no column beside
    assert "before:" not in (after / CARD_NAME).read_text()
    record_evaluation(after, results(1.0, 0.75))
    (base / "model.safetensors").write_bytes((base / "model.safetensors").read_bytes() + b" ")  # trained since
    record_evaluation(after, results(1.0, 0.75))
    assert "before:" not in (after / CARD_NAME).read_text()
