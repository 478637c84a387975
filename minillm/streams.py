"""Standard output and error that a broken pipe or a closed terminal cannot turn into a crash.

`python train_pretrain.py 2>&1 | tee log`, then Ctrl-C: the shell's SIGINT ends `tee` too, and the trainer's
next line of progress meets a pipe with no reader. Python raises BrokenPipeError there, which would end the
run before its checkpoint. Behind `guard_output()` the first failed write sends that stream to /dev/null
instead, so the checkpoint and the final model are written whatever happened to the terminal.
"""

from __future__ import annotations

import os
import sys
from typing import Any, TextIO


class UnbreakableStream:
    """A text stream that stops writing, silently, once its file fails (EPIPE, EIO), instead of raising."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.broken = False

    def _broke(self) -> None:
        self.broken = True
        try:  # later writes by anything (the interpreter's own flush at exit included) go nowhere
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self.stream.fileno())
            os.close(devnull)
        except (OSError, ValueError):
            pass

    def write(self, text: str) -> int:
        """Write `text`, or drop it once the stream has failed."""
        if not self.broken:
            try:
                return self.stream.write(text)
            except OSError:
                self._broke()
        return len(text)

    def flush(self) -> None:
        """Flush, or do nothing once the stream has failed."""
        if not self.broken:
            try:
                self.stream.flush()
            except OSError:
                self._broke()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


def guard_output() -> None:
    """Wrap sys.stdout and sys.stderr (once) so that writing to them never raises OSError."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is not None and not isinstance(stream, UnbreakableStream):
            setattr(sys, name, UnbreakableStream(stream))
