"""What every command line shares: the one error path (a ``UsageError`` becomes one line and exit
status 2) and the flags more than one command takes (``--num_threads``).

    @command("unet-export")
    def main(argv=None) -> int: ...

``command(prog)`` (or ``run_cli(prog, main, ...)``) runs the command; a ``UsageError`` it raises is printed
as ``<prog>: error: <message>`` and the command returns ``USAGE`` (2). Anything else is a bug and raises.
Under a launcher (mpirun, srun, horovodrun) the ranks have agreed on the error before they raise it
(``unet.distributed.ranks.agree``), so only rank 0 prints it: one line for the job, not one per rank.
An error one rank found alone, where the ranks cannot agree first (an elastic worker restoring its
checkpoint), is raised with ``local=True`` and printed by the rank that found it.

``add_threads_flag`` defines ``--num_threads`` for the trainer, unet-predict, unet-evaluate and
unet-export alike, and ``threads_error`` checks it. A leaf: imports nothing of the package but the
errors; anyone may use it.
"""
from __future__ import annotations

import functools
import os
import sys

from unet.errors import UsageError

USAGE = 2       # the exit status of every usage error, in every command

# the variables in which mpirun (Open MPI, MPICH/Hydra), PMIx launchers and horovodrun give a rank its number
LAUNCHER_RANK_VARS = ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "HOROVOD_RANK")


def launcher_rank(env=os.environ) -> int:
    """This process's rank as the launcher set it (0 outside a launcher)."""
    for k in LAUNCHER_RANK_VARS:
        if k in env:
            return int(env[k])
    return 0


def report(prog: str, error: UsageError) -> None:
    """Print ``<prog>: error: <message>``: on rank 0, or on this rank for an error it found alone."""
    if launcher_rank() == 0 or getattr(error, "local", False):
        sys.stdout.flush()                     # what the command printed before comes first
        print(f"{prog}: error: {error}", file=sys.stderr, flush=True)


def run_cli(prog: str, main, *args, **kwargs) -> int:
    """``main(*args, **kwargs)``'s exit status; ``USAGE`` after reporting a UsageError it raised."""
    try:
        return main(*args, **kwargs)
    except UsageError as e:
        report(prog, e)
        return USAGE


def command(prog: str):
    """Decorator: the command line ``main`` runs through ``run_cli(prog, main, ...)``."""
    def wrap(main):
        @functools.wraps(main)
        def run(*args, **kwargs) -> int:
            return run_cli(prog, main, *args, **kwargs)
        return run
    return wrap


def add_threads_flag(parser, what: str) -> None:
    """``--num_threads``: ``what`` the threads are; 0 (the default) leaves the count to the rule the trainer
    and the engines share (``unet.distributed.ranks.threads_for_rank``)."""
    parser.add_argument("--num_threads", type=int, default=0,
                        help=f"{what}; 0 = the physical cores of the CPUs this process is bound to (hardware "
                             f"threads of a core count once), shared among the ranks bound to the same ones")


def threads_error(num_threads: int) -> str | None:
    """What is wrong with a --num_threads value, or None."""
    return f"--num_threads must be >= 0 (got {num_threads})" if num_threads < 0 else None
