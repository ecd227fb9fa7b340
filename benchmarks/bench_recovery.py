"""How long the stages of a SIGKILLed Celery worker wait before they run elsewhere, with
the fleet's default settings (900 s time limit, one-hour visibility timeout).

Two `celery worker` processes (threads pool, concurrency 8) label a run through
`labeler label --executor celery` against the loopback fake LLM at a fixed latency; once
the doomed worker has finished some stages it is killed with SIGKILL. For every stage it
held, the time from the kill until the survivor received it is read from the workers'
logs; the worst of them is the recovery time of that repeat.

.venv/bin/python benchmarks/bench_recovery.py [--latency 0.3] [--per-layer 20] [--repeats 3]
"""

from __future__ import annotations

import argparse
import datetime as dt
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from tests.fake_llm import FakeLLMServer, oracle  # noqa: E402
from tests.fleet import Worker, fleet_env, reap, start_driver  # noqa: E402
from tests.redis_server import RedisServer  # noqa: E402

from bench_judges import build_run  # noqa: E402

JUDGE = "openai:bench"
RECEIVED = re.compile(
    r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}): INFO/\w+\] Task labeler\.stage\[([0-9a-f-]+)\] "
    r"received",
    re.M,
)
SUCCEEDED = re.compile(r"Task labeler\.stage\[([0-9a-f-]+)\] succeeded")


def received(log: Path) -> dict[str, float]:
    found: dict[str, float] = {}
    for stamp, task_id in RECEIVED.findall(log.read_text(errors="replace")):
        found.setdefault(task_id, dt.datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp())
    return found


def one_repeat(base: Path, root: Path, fake: FakeLLMServer, per_layer: int) -> tuple[float, int]:
    run = root / "run"
    shutil.copytree(base, run)
    with RedisServer(root / "redis") as redis_server:
        env = fleet_env(redis_server.url)
        env.pop("LABELER_TASK_TIME_LIMIT")
        env.pop("LABELER_VISIBILITY_TIMEOUT")
        doomed_log, survivor_log = root / "doomed.log", root / "survivor.log"
        doomed = Worker("doomed", env, doomed_log, concurrency=8).wait_ready()
        try:
            with Worker("survivor", env, survivor_log, concurrency=8):
                args = [str(run), "--judge", JUDGE, "--base-url", f"{fake.base_url}/v1",
                        "--sample-per-layer", str(per_layer)]  # fmt: skip
                driver = start_driver(args, env, root / "driver.log")
                while len(SUCCEEDED.findall(doomed_log.read_text())) < 20:
                    time.sleep(0.1)
                doomed.kill()
                killed_at = time.time()
                client = redis_server.client()
                done = {t.decode() for k in client.keys("labeler:run:*:done")
                        for t in client.hkeys(k)}  # fmt: skip
                client.close()
                finished = set(SUCCEEDED.findall(doomed_log.read_text())) | done
                held = set(received(doomed_log)) - finished
                if driver.wait(300) != 0:
                    raise SystemExit((root / "driver.log").read_text()[-3000:])
        finally:
            doomed.stop()
            reap()
        elsewhere = received(survivor_log)
        return max(elsewhere[t] - killed_at for t in held), len(held)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latency", type=float, default=0.3)
    parser.add_argument("--per-layer", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, FakeLLMServer(oracle, args.latency) as fake:
        base = build_run(Path(tmp) / "base")
        times = []
        for i in range(args.repeats):
            seconds, n_held = one_repeat(base, Path(tmp) / f"r{i}", fake, args.per_layer)
            fake.reset()
            times.append(seconds)
            print(f"repeat {i + 1}: {n_held} stages held by the killed worker; all running "
                  f"elsewhere {seconds:.1f} s after the kill")  # fmt: skip
        print(f"median {statistics.median(times):.1f} s (runs: "
              f"{', '.join(f'{t:.1f}' for t in times)})")  # fmt: skip


if __name__ == "__main__":
    main()
