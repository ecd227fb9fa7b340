"""The prompt box of `labeler browse RUN --model` on the demo model, on CPU, over HTTP
against the real server: the first prompt (it loads the model), then ``--repeats``
prompts each of about 20, 100 and 250 tokens, and the same with a followed feature
(the feature page's request); median and 95th percentile of each, timed from the
request to the last byte of the answer. Run once per torch thread count (the server is
started with ``OMP_NUM_THREADS`` set to it); the load average is printed before and after.

.venv/bin/labeler demo --out /tmp/demo                                   (once)
.venv/bin/python benchmarks/bench_prompt_box.py /tmp/demo/run [--threads 1 2] [--repeats 30]

The texts are the corpus's own words (run.json's corpus_path), cut to the token counts
wanted (measured by the server's answer, so the counts printed are the real ones).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))
URL = re.compile(r"http://127\.0\.0\.1:\d+/")
SIZES = (20, 100, 250)


def start(run: Path, threads: int) -> tuple[subprocess.Popen[str], str]:
    labeler = str(Path(sys.executable).with_name("labeler"))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    env.pop("LABELER_THREADS", None)
    process = subprocess.Popen(
        [labeler, "browse", str(run), "--port", "0", "--model", "--device", "cpu"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env,
    )  # fmt: skip
    assert process.stdout is not None
    for line in process.stdout:
        found = URL.search(line)
        if found:
            return process, found.group(0)
    raise SystemExit(f"labeler browse printed no URL (exit {process.wait()})")


def ask(url: str, body: Mapping[str, object]) -> tuple[float, dict[str, Any]]:
    """One prompt; the seconds until the last byte of its answer, and the answer."""
    request = urllib.request.Request(f"{url}api/prompt", data=json.dumps(body).encode(),
                                     method="POST",
                                     headers={"Content-Type": "application/json"})  # fmt: skip
    began = time.perf_counter()
    with NO_PROXY.open(request, timeout=300) as response:
        data = json.loads(response.read())
    return time.perf_counter() - began, data


def corpus_words(run: Path) -> list[str]:
    info = json.loads((run / "run.json").read_text(encoding="utf-8"))
    words: list[str] = []
    with open(info["corpus_path"], encoding="utf-8") as fh:
        for line in fh:
            words += re.findall(r"[A-Za-z]+|[=+*/.,:?]", line)
            if len(words) > 5000:
                break
    return words


def text_of(url: str, words: list[str], tokens: int) -> tuple[str, int]:
    """A text of the corpus's words with about ``tokens`` tokens, and its token count."""
    n = tokens * 2 // 3
    for _ in range(8):
        text = " ".join(words[:n])
        try:
            _, data = ask(url, {"text": text})
        except urllib.error.HTTPError:  # over the token limit: fewer words
            n = n * 3 // 4
            continue
        got = len(data["tokens"])
        if abs(got - tokens) <= max(2, tokens // 20):
            return text, got
        n = max(1, round(n * tokens / got))
    return text, got


def quantiles(times: list[float]) -> tuple[float, float]:
    ordered = sorted(times)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return statistics.median(ordered), p95


def bench(run: Path, threads: int, repeats: int, feature: str) -> None:
    words = corpus_words(run)
    began = time.perf_counter()
    process, url = start(run, threads)
    started = time.perf_counter() - began
    try:
        first, _ = ask(url, {"text": " ".join(words[:20])})
        print(f"threads {threads}: server up in {started:.2f} s; first prompt (loads the "
              f"model) {1000 * first:.0f} ms")  # fmt: skip
        for size in SIZES:
            text, got = text_of(url, words, size)
            for label, body in (("top", {"text": text}),
                                ("top+feature", {"text": text, "feature": feature})):  # fmt: skip
                times = [ask(url, body)[0] for _ in range(repeats)]
                median, p95 = quantiles(times)
                print(f"  {got:4d} tokens, {label:12s}: median {1000 * median:6.1f} ms, "
                      f"p95 {1000 * p95:6.1f} ms ({repeats} requests)")  # fmt: skip
    finally:
        process.terminate()
        process.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("run", type=Path)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--feature", default="L3F0", help="the followed feature")
    args = parser.parse_args()
    print(f"load average before: {os.getloadavg()}")
    for threads in args.threads:
        bench(args.run, threads, args.repeats, args.feature)
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
