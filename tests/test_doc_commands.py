"""Every command README.md and docs/ show (code blocks and inline code) parses with its script's own argparse: a
renamed or removed flag fails here, not in a reader's terminal (issue 50). Nothing runs: parsing stops the script.
Every link and repository path they name exists, and every benchmark takes --help and --json."""

from __future__ import annotations

import argparse
import inspect
import json
import re
import runpy
import shlex
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, load_script

from minillm.device import cpu_flags, describe_machine

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "bench" / "README.md"]


class Parsed(Exception):
    """Raised by the patched parse_args once the command line parsed."""


def commands() -> list[tuple[str, str, list[str]]]:
    """(document, script, arguments) of each `python X.py ...` or `torchrun ... X.py ...` shown."""
    found = []
    for doc in DOCS:
        text = doc.read_text(encoding="utf-8")
        lines = [ln for block in re.findall(r"```(?:bash|sh)\n(.*?)```", text, re.S)
                 for ln in block.replace("\\\n", " ").splitlines()]
        lines += re.findall(r"`((?:python|torchrun) [^`]+)`", text)
        for line in lines:
            line = re.split(r"\s+#", line)[0].strip()
            for part in re.split(r"&&|\|\||;|\|", line):
                words = shlex.split(part)
                if not words or words[0] not in ("python", "torchrun"):
                    continue
                script = next((w for w in words if w.endswith(".py")), None)
                # The user's scripts: the repository's top level and bench/ (dataset/ and tests/ scripts do work
                # when run; they are the maintainers'). "..." stands for flags left out.
                if script is not None and (REPO / script).is_file() and script.count("/") <= (
                        1 if script.startswith("bench/") else 0):
                    found.append((doc.name, script, [w for w in words[words.index(script) + 1:] if w != "..."]))
    return found


def parse(script: str, argv: list[str]) -> None:
    """Run the script's own parsing of argv; raises SystemExit (argparse's error) or returns once it parsed."""
    name = script.removesuffix(".py").split("/")[-1]
    if script.startswith("train_"):
        from minillm.cli import main

        defaults = runpy.run_path(str(REPO / script))["DEFAULTS"]
        entry = lambda: main(name.removeprefix("train_"), defaults, argv)  # noqa: E731
    elif script.startswith("bench/"):  # a benchmark's main() reads sys.argv, or takes argv
        sys.path.insert(0, str(REPO / "bench"))
        main = runpy.run_path(str(REPO / script))["main"]
        sys.argv = [script, *argv]
        entry = (lambda: main(argv)) if inspect.signature(main).parameters else main
    else:
        entry = lambda: load_script(script).main(argv)  # noqa: E731
    with pytest.raises(Parsed):
        entry()


def test_the_documents_show_commands():
    shown = commands()
    assert len(shown) > 30 and {s for _, s, _ in shown} >= {"train_pretrain.py", "train_sft.py", "generate.py",
                                                           "serve.py", "export_gguf.py", "train_distill.py"}


@pytest.mark.parametrize("doc, script, argv", commands(), ids=lambda x: x if isinstance(x, str) else " ".join(x))
def test_each_shown_command_parses(doc, script, argv, monkeypatch):
    monkeypatch.setattr(sys, "argv", list(sys.argv))  # restored after a benchmark's main() reads it
    real = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        real(self, args, namespace)
        raise Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    parse(script, argv)


def test_a_stale_flag_is_caught(monkeypatch, capsys):
    """The check fails for a flag the script does not have."""
    real = argparse.ArgumentParser.parse_args
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args",
                        lambda self, args=None, namespace=None: (real(self, args, namespace), (_ for _ in ()).throw(Parsed)))
    with pytest.raises(SystemExit):
        parse("generate.py", ["--model", "out/sft", "--no_such_flag"])
    assert "unrecognized arguments: --no_such_flag" in capsys.readouterr().err


def headings(path: Path) -> list[str]:
    """The Markdown headings of a file and its bold-led paragraphs and items ("- **Name.** ..."), lower-cased."""
    return [line.lower() for line in path.read_text(encoding="utf-8").splitlines()
            if re.match(r"#|(- )?\*\*", line)]


def citations(doc: Path) -> list[tuple[Path, str]]:
    """(file, section) of each result section a document cites: `bench/RESULTS.md, "Section"`,
    `docs/page.md, "Section"` or `[page](page.md), "Section"`, and `"Section" below` in the document itself."""
    text = doc.read_text(encoding="utf-8")
    found = [(doc, name) for name in re.findall(r'"([^"]+)" below', text)]
    found += [(REPO / target, name) for target, name in
              re.findall(r'(?<![\w/.(])((?:bench|docs)/\w+\.md), "([^"]+)"', text)]
    found += [((doc.parent / target).resolve(), name) for target, name in  # a link, relative to the document
              re.findall(r'\]\(([\w/.]+\.md)\), "([^"]+)"', text)]
    return found


def test_every_file_and_results_section_the_documents_name_exists():
    """The paths README names (minillm/..., bench/..., dataset/..., tests/..., evals/...) exist, and each
    result section it cites (`bench/RESULTS.md, "Section"`, `docs/rl.md, "Section"`, `"Section" below`) is a
    heading of that file."""
    for doc in [*DOCS, REPO / "bench" / "RESULTS.md", REPO / "dataset" / "README.md"]:
        text = doc.read_text(encoding="utf-8")
        paths = set(re.findall(r"(?<![\w/.:-])((?:minillm|bench|dataset|tests|evals)/[\w/.-]*\w)", text))
        written = (".tokens.bin", ".tokens.bin.json")  # caches a run writes beside the data, not shipped files
        missing = sorted(p for p in paths if not (REPO / p).exists() and "*" not in p and not p.endswith(written))
        # RESULTS.md is a record: it names probes since removed (and where git keeps them)
        assert doc.name == "RESULTS.md" or not missing, f"{doc.name} names files that do not exist: {missing}"
        cited = citations(doc)
        assert cited or doc != REPO / "README.md"
        unknown = [(str(f.relative_to(REPO)), name) for f, name in cited
                   if not f.is_file() or not any(name.lower() in h for h in headings(f))]
        assert not unknown, f"{doc.relative_to(REPO)} cites sections that are not headings there: {unknown}"


DATE = re.compile(r"20\d\d-\d\d-\d\d")
MACHINE = re.compile(r"avx2|avx512|\bamx\b|H100|H200|A100|GPU", re.I)
COMMAND = re.compile(r"(?:python |torchrun |`)[\w/]+\.py\b|pytest")
RESULT_ROW = re.compile(r"^\|.*\d%|^\|.*\d\.\d+ ", re.M)


def sections(path: Path) -> list[tuple[str, str]]:
    """(heading, text) of each level-2 section of a Markdown file, its subsections included."""
    parts = re.split(r"^(## .*)$", path.read_text(encoding="utf-8"), flags=re.M)
    return list(zip(parts[1::2], parts[2::2]))


def test_every_result_names_its_date_machine_and_command():
    """Issue 50: no number without its command, date and machine. Each section of bench/RESULTS.md, and each
    section of README and docs/ that holds a table of results, names a date, the machine's CPU flags (or its
    GPU) and a command."""
    checked = 0
    for doc in [REPO / "bench" / "RESULTS.md", REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        for heading, body in sections(doc):
            if doc.parent.name != "bench" and not RESULT_ROW.search(body):
                continue
            text = heading + body
            lacks = [what for what, pattern in (("date", DATE), ("machine", MACHINE), ("command", COMMAND))
                     if not pattern.search(text)]
            assert not lacks, f"{doc.relative_to(REPO)}, {heading!r} gives results without its {', '.join(lacks)}"
            checked += 1
    assert checked > 30


def test_every_link_in_the_documents_resolves():
    """Each Markdown link to a file, [text](path), points at a file or folder of the repository."""
    assert (REPO / "docs").is_dir() and len(DOCS) > 10
    for doc in DOCS:
        links = re.findall(r"\]\(([^)\s]+)\)", doc.read_text(encoding="utf-8"))
        local = [link.split("#")[0] for link in links if not re.match(r"[a-z]+://|#|mailto:", link)]
        broken = [link for link in local if not (doc.parent / link).exists()]
        assert local and not broken, f"{doc.relative_to(REPO)} links to missing files: {broken}"


def test_every_benchmark_takes_help_and_json():
    """bench/README.md lists every benchmark, and each has an argparse command line with --json."""
    listed = set(re.findall(r"`(\w+\.py)`", (REPO / "bench" / "README.md").read_text(encoding="utf-8"))) - {"common.py"}
    scripts = {p.name for p in (REPO / "bench").glob("*.py")} - {"common.py"}
    assert listed == scripts, (sorted(scripts - listed), sorted(listed - scripts))
    for name in sorted(scripts):
        source = (REPO / "bench" / name).read_text(encoding="utf-8")
        assert "argparse.ArgumentParser(" in source and ("add_json_flag(" in source or '"--json"' in source), name


def test_the_benchmarks_random_models_fit_the_shipped_tokenizer(monkeypatch):
    """bench/eval_throughput.py stopped at once when the tool-call tokens grew the tokenizer past the benchmark
    shapes' vocabulary of 6,400: the CPU shapes take the shipped tokenizer's size, as train_pretrain.py does."""
    monkeypatch.syspath_prepend(str(REPO / "bench"))
    configs = runpy.run_path(str(REPO / "bench" / "common.py"))["CONFIGS"]
    shipped = json.loads((REPO / "minillm" / "assets" / "tokenizer.json").read_text(encoding="utf-8"))
    size = len(shipped["model"]["vocab"]) + sum(t["id"] >= len(shipped["model"]["vocab"])
                                                 for t in shipped["added_tokens"])
    assert size == 6404 and configs["pretrain"].vocab_size == configs["default"].vocab_size == size


def test_a_benchmark_json_record_holds_its_tables_and_machine(tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(REPO / "bench"))
    common = runpy.run_path(str(REPO / "bench" / "common.py"))
    common["print_table"](["side", "tokens/s"], [["minillm", "10"], ["transformers", "9"]])
    out = tmp_path / "r.json"
    common["write_json"](str(out), ratio=1.11)
    record = json.loads(out.read_text(encoding="utf-8"))
    assert record["tables"] == [{"header": ["side", "tokens/s"], "rows": [["minillm", "10"], ["transformers", "9"]]}]
    assert record["ratio"] == 1.11 and record["cpu_flags"] == cpu_flags() and record["date"][:2] == "20"
    assert record["machine"] == describe_machine(torch.device("cpu"))


def test_the_short_commands_run_as_written(tmp_path, tiny_sft_dir, monkeypatch, capsys):
    """The quick commands the documents show (perplexity, one generated answer, the GGUF export) run as written in
    a directory whose out/pretrain and out/sft are tiny models: exit 0, something written. Commands naming models
    or files the sandbox lacks (adapters, checkpoints, placeholders), the interactive chat and the long evaluations
    and trainings are parsed only (above)."""
    import shutil

    for name in ("pretrain", "sft"):
        shutil.copytree(tiny_sft_dir, tmp_path / "out" / name)
        config = json.loads((tmp_path / "out" / name / "config.json").read_text())
        config["max_position_embeddings"] = 1024  # the default SFT model's 768-token context holds a tool prompt
        config["minillm"]["trained_context"] = 768
        (tmp_path / "out" / name / "config.json").write_text(json.dumps(config))
    (tmp_path / "dataset").symlink_to(REPO / "dataset")
    monkeypatch.chdir(tmp_path)
    ran = set()
    for _, script, argv in commands():
        model = argv[argv.index("--model") + 1] if "--model" in argv else None
        runnable = script in ("eval_ppl.py", "export_gguf.py") or (script == "generate.py" and "--prompt" in argv)
        paths = [a for a in argv if a.startswith("out/") or a.endswith(".jsonl")]
        if not runnable or model is None or not all(Path(p).exists() for p in paths):
            continue
        key = (script, tuple(argv))
        if key in ran:
            continue
        ran.add(key)
        extra = ["--force"] if script == "export_gguf.py" else []  # a second export of the same model
        assert load_script(script).main([*argv, *extra]) == 0, (script, argv, capsys.readouterr().err)
        out = capsys.readouterr().out
        assert out.strip() or script == "export_gguf.py", (script, argv)
    assert {s for s, _ in ran} == {"eval_ppl.py", "generate.py", "export_gguf.py"} and len(ran) >= 5
    assert (tmp_path / "out" / "sft-f16.gguf").is_file()
