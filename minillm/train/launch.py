"""`python -m minillm.train.launch`: torchrun, with one-line exits instead of the launcher's tracebacks.

It takes torchrun's flags and runs torchrun's own code. The difference: when the job is stopped by Ctrl-C
or SIGTERM, torchrun's agent forwards the signal to the workers (which finish their step, checkpoint and
exit with status 3) and then raises SignalException, a ~30-line traceback with status 1. Here that
becomes one line and status 3, the same as `python train_pretrain.py` stopped by a signal; a worker
that failed gives its own status and its own one-line error, without torchrun's error report.

    python -m minillm.train.launch --standalone --nproc_per_node=2 train_pretrain.py --max_steps 100
"""

from __future__ import annotations

import sys

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import main as torchrun_main

EXIT_INTERRUPTED = 3  # as minillm.cli.EXIT_INTERRUPTED (not imported: the launcher needs no model code)

# torchrun leaves its rendezvous open when a signal stops it, and the rendezvous handler's heartbeat thread
# holds the handler for a moment every 5 s. Had that thread dropped the last reference, the handler's
# finalizer would run in that thread and join it ("cannot join current thread"), a traceback printed while
# the launcher exits. Keeping the interrupt (and through its traceback the handler) until exit prevents it.
_interrupts: list[SignalException] = []


def main(argv: list[str] | None = None) -> int:
    """Run torchrun with `argv`; the exit status of the job."""
    try:
        torchrun_main(argv)
    except SignalException as e:
        _interrupts.append(e)
        print(f"minillm.train.launch: stopped by {e.sigval.name}; each worker saved a checkpoint after its step "
              "(see its message above); continue with the same command plus --resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    except ChildFailedError as e:
        rank, failure = min(e.failures.items())
        print(f"minillm.train.launch: worker {rank} exited with status {failure.exitcode}", file=sys.stderr)
        return failure.exitcode if failure.exitcode > 0 else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
