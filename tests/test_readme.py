"""docs/library.md's examples run as they are written (from a directory holding the shipped dataset)."""

from __future__ import annotations

import re

import pytest
from conftest import REPO


def library_blocks() -> list[str]:
    """The ```python blocks of docs/library.md."""
    return re.findall(r"```python\n(.*?)```", (REPO / "docs" / "library.md").read_text(encoding="utf-8"), re.S)


def test_the_library_section_has_the_inference_and_training_examples():
    blocks = library_blocks()
    assert len(blocks) == 2 and "generate(" in blocks[0] and "train(model, data, TrainConfig(" in blocks[1]


@pytest.mark.parametrize("index", [0, 1])
def test_library_example_runs(index, tmp_path, monkeypatch, capsys):
    (tmp_path / "dataset").symlink_to(REPO / "dataset")
    monkeypatch.chdir(tmp_path)
    code = library_blocks()[index]
    exec(compile(code, f"docs/library.md example {index}", "exec"), {"__name__": "readme"})
    out = capsys.readouterr().out
    if index == 1:
        first, last = (float(x) for x in out.split()[-3::2])
        assert last < first and (tmp_path / "out" / "lib" / "model.safetensors").is_file()
