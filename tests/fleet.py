"""Real fleet processes for tests and benchmarks: ``celery worker`` subprocesses and
``labeler label --executor celery`` drivers, all talking to a private Redis."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType

ALL_QUEUES = ",".join(
    f"{stage}.{provider}"
    for stage in ("explain", "score", "classify", "label")
    for provider in ("openai", "anthropic", "local", "heuristic")
)
BIN = Path(sys.executable).parent
_STARTED: list[subprocess.Popen[bytes]] = []


def reap() -> None:
    """Kill every worker and driver a test started and left running (a failed test
    leaves them behind)."""
    while _STARTED:
        process = _STARTED.pop()
        if process.poll() is None:
            process.kill()
            process.wait(10)


def fleet_env(redis_url: str, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        LABELER_REDIS_URL=redis_url,
        LABELER_TASK_TIME_LIMIT="8",
        LABELER_VISIBILITY_TIMEOUT="12",
        OPENAI_API_KEY="sk-fleet-test-key",
        PYTHONUNBUFFERED="1",
    )
    env.pop("OPENAI_BASE_URL", None)
    env.update(extra)
    return env


class Worker:
    """One ``celery -A workers worker`` process (threads pool)."""

    def __init__(
        self,
        name: str,
        env: dict[str, str],
        log: Path,
        queues: str = ALL_QUEUES,
        concurrency: int = 8,
        pool: str = "threads",
    ) -> None:
        self.name = name
        self.log = log
        command = [
            str(BIN / "celery"), "-A", "workers", "worker", "-Q", queues, "--pool", pool,
            "--concurrency", str(concurrency), "-n", f"{name}@%h", "--without-gossip",
            "--without-mingle", "-l", "info",
        ]  # fmt: skip
        self._out = log.open("wb")
        self.process = subprocess.Popen(command, env=env, stdout=self._out, stderr=self._out)
        _STARTED.append(self.process)

    def wait_ready(self, timeout: float = 60) -> Worker:
        deadline = time.monotonic() + timeout
        while b" ready." not in self.log.read_bytes():
            if self.process.poll() is not None:
                raise RuntimeError(f"worker {self.name} exited:\n{self.text()[-3000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"worker {self.name} not ready:\n{self.text()[-3000:]}")
            time.sleep(0.1)
        return self

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def kill(self) -> None:
        """SIGKILL the whole worker: no warm shutdown, nothing acknowledged."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGQUIT)  # cold shutdown, unacked work stays queued
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self._out.close()

    def __enter__(self) -> Worker:
        return self.wait_ready()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def start_driver(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """``labeler label ... --executor celery`` in its own process."""
    with log.open("ab") as out:
        process = subprocess.Popen(
            [str(BIN / "labeler"), "label", *args, "--executor", "celery"],
            env=env, stdout=out, stderr=out,
        )  # fmt: skip
    _STARTED.append(process)
    return process


def run_driver(
    args: list[str], env: dict[str, str], log: Path, timeout: float = 300, expect: int = 0
) -> str:
    """Run a driver to its end; its output, once it exited with ``expect``."""
    process = start_driver(args, env, log)
    try:
        process.wait(timeout)
    finally:
        if process.poll() is None:
            process.kill()
    text = log.read_text(errors="replace")
    if process.returncode != expect:
        raise AssertionError(f"driver exited {process.returncode}:\n{text[-4000:]}")
    return text
