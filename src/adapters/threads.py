"""How many threads torch uses when a command loads a model.

torch starts one thread per core of the machine. On a machine that other work shares,
that is slower than fewer threads (on 2 shared cores, collect and score-outputs ran 3-4
times slower than with one thread). So, unless the user says how many:

1. ``LABELER_THREADS`` (or ``labeler --threads N``), when set, is used;
2. else ``OMP_NUM_THREADS``, when set, is left as torch read it;
3. else the cores this process may use (``os.sched_getaffinity``) less the 1-minute
   load average, at least 1 and at most torch's default.

The choice is said once per process on stderr, as a warning where it differs from
torch's default and otherwise at ``-v``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass

from adapters.errors import AdapterError

log = logging.getLogger(__name__)

THREADS_ENV = "LABELER_THREADS"


@dataclass(frozen=True)
class ThreadChoice:
    threads: int
    reason: str
    """Where the number came from, in words."""
    automatic: bool
    """Chosen from the cores and the load, not set by the user."""


def free_cores(cpus: int, load: float, default: int) -> int:
    """The cores not busy with other work: ``cpus`` less the 1-minute ``load`` (rounded
    to the nearest whole core), at least 1 and at most torch's ``default``."""
    return max(1, min(default, cpus, int(cpus - load + 0.5)))


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _load() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:  # no load average on this system
        return 0.0


def choose_threads(environ: Mapping[str, str], cpus: int, load: float,
                   default: int) -> ThreadChoice:  # fmt: skip
    """The thread count for torch given the environment, the usable cores, the 1-minute
    load and torch's default thread count."""
    asked = environ.get(THREADS_ENV, "").strip()
    if asked:
        if not asked.isdigit() or int(asked) < 1:
            raise AdapterError(f"{THREADS_ENV}={asked}: not a number of threads; set it to "
                               "a whole number of 1 or more, or unset it")  # fmt: skip
        return ThreadChoice(int(asked), f"{THREADS_ENV}={asked}", automatic=False)
    if environ.get("OMP_NUM_THREADS", "").strip():
        return ThreadChoice(default, f"OMP_NUM_THREADS={environ['OMP_NUM_THREADS']}", False)
    threads = free_cores(cpus, load, default)
    reason = f"{cpus} usable cores, 1-minute load {load:.1f}"
    return ThreadChoice(threads, reason, automatic=True)


_chosen: ThreadChoice | None = None


def configure_torch_threads() -> ThreadChoice:
    """Set torch's thread count once per process (later calls return the first choice)
    and say it: a warning where it differs from torch's default, else an info line."""
    global _chosen
    if _chosen is not None:
        return _chosen
    import torch

    default = torch.get_num_threads()
    choice = choose_threads(os.environ, _usable_cpus(), _load(), default)
    if choice.threads != default:
        torch.set_num_threads(choice.threads)
    level = logging.WARNING if choice.automatic and choice.threads != default else logging.INFO
    log.log(level, "torch threads: %d (%s; torch's default %d; set %s to choose)",
            torch.get_num_threads(), choice.reason, default, THREADS_ENV)  # fmt: skip
    _chosen = choice
    return choice
