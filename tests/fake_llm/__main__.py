"""``python -m tests.fake_llm --port N --latency 0.2``: the fake LLM server with the
oracle responder, in the foreground (for benchmarks run in a separate process)."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from types import FrameType

from tests.fake_llm.oracle import oracle
from tests.fake_llm.server import FakeLLMServer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.fake_llm", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0: any free port")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds before each reply")
    args = parser.parse_args(argv)
    done = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        done.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    with FakeLLMServer(oracle, latency=args.latency, port=args.port, host=args.host) as server:
        sys.stdout.write(f"listening on {server.base_url}\n")
        sys.stdout.flush()
        while not done.wait(0.5):
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
