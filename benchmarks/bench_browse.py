"""`labeler browse` at the paper's scale: building the index of a synthetic run of 229,376
features (benchmarks/synthetic_run.py), start-up with the index current, the first page,
the latency of searches over HTTP, as the page asks for them, and of decisions, with
searches sent while decisions are being made.

.venv/bin/python benchmarks/synthetic_run.py --out /tmp/synthetic-229k     (once)
.venv/bin/python benchmarks/bench_browse.py /tmp/synthetic-229k [--queries 100] [--starts 5]
    [--decisions 100] [--no-build]

--decisions appends that many decisions (reviewer "bench") to the run's label store, on
seeded features of every layer: each POST is timed, then the catalog's first answer
after it (which brings the decided feature's row up to date); then searches are timed
alone and while another client sends decisions back to back.

The queries are seeded: a word (or two) of the run's explanations, typed as a prefix a
third of the time, half of them with a filter (category, layer, detection or frequency)
and a fifth of them sorted by detection or frequency; each is timed from the request to
the last byte of the answer. Then ten of the features found are opened (their page's
data, as the feature page fetches it).

Then typing: every prefix, from one letter up, of label words (``hesitation``,
``planning``, ``verification``, ``self_correction``) and of seeded words of the
explanations, each sent as the page sends it while one types (a search per prefix).
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sqlite3
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlencode

NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))
URL = re.compile(r"http://127\.0\.0\.1:\d+/")


def start(run: Path, *args: str) -> tuple[subprocess.Popen[str], str, float]:
    """`labeler browse RUN --port 0`, its URL and the seconds until it printed it."""
    labeler = str(Path(sys.executable).with_name("labeler"))
    began = time.perf_counter()
    process = subprocess.Popen([labeler, "browse", str(run), "--port", "0", *args],
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                               text=True)  # fmt: skip
    assert process.stdout is not None
    for line in process.stdout:
        found = URL.search(line)
        if found:
            return process, found.group(0), time.perf_counter() - began
    raise SystemExit(f"labeler browse printed no URL (exit {process.wait()})")


def get(url: str) -> tuple[float, bytes]:
    began = time.perf_counter()
    with NO_PROXY.open(url, timeout=60) as response:
        body = response.read()
    return time.perf_counter() - began, body


def post(url: str, body: dict[str, object]) -> float:
    """A decision sent as the review page sends it; the seconds until its answer."""
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})  # fmt: skip
    began = time.perf_counter()
    with NO_PROXY.open(request, timeout=60) as response:
        response.read()
        assert response.status == 201, response.status
    return time.perf_counter() - began


def stop(process: subprocess.Popen[str]) -> None:
    process.send_signal(2)
    process.wait(timeout=60)


def queries(index: Path, n: int, seed: int) -> list[dict[str, object]]:
    conn = sqlite3.connect(index)
    words = sorted({
        w.lower()
        for (text,) in conn.execute(
            "SELECT explanation FROM features WHERE explanation IS NOT NULL LIMIT 20000")
        for w in re.findall(r"[A-Za-z]{4,}", text)
    })  # fmt: skip
    layers = [r[0] for r in conn.execute("SELECT DISTINCT layer FROM features")]
    conn.close()
    rng = random.Random(seed)
    out: list[dict[str, object]] = []
    for _ in range(n):
        picked = rng.sample(words, 2 if rng.random() < 0.3 else 1)
        if rng.random() < 1 / 3:
            picked[-1] = picked[-1][: max(3, len(picked[-1]) // 2)]
        params: dict[str, object] = {"q": " ".join(picked)}
        if rng.random() < 0.5:
            params |= rng.choice([
                {"category": rng.choice(["reasoning", "domain", "language", "uninterpretable"])},
                {"layer": rng.choice(layers)},
                {"detection_min": 0.8},
                {"frequency_min": 1e-4},
            ])  # fmt: skip
        if rng.random() < 0.2:
            params |= {"sort": rng.choice(["detection", "frequency"]), "order": "desc"}
        out.append(params)
    return out


LABEL_WORDS = ("hesitation", "planning", "verification", "self_correction")


def typed_words(index: Path, n_words: int, seed: int) -> list[str]:
    """The label words and ``n_words`` seeded words of the explanations."""
    conn = sqlite3.connect(index)
    words = sorted({
        w.lower()
        for (text,) in conn.execute(
            "SELECT explanation FROM features WHERE explanation IS NOT NULL LIMIT 20000")
        for w in re.findall(r"[A-Za-z]{6,}", text)
    })  # fmt: skip
    conn.close()
    return [*LABEL_WORDS, *random.Random(seed).sample(words, min(n_words, len(words)))]


def pct(values: list[float], q: float) -> float:
    return sorted(values)[min(len(values) - 1, round(q * (len(values) - 1)))]


def summary(label: str, seconds: list[float]) -> str:
    ms = [1000 * t for t in seconds]
    return (f"{label}: median {statistics.median(ms):.1f} ms, 95th percentile "
            f"{pct(ms, 0.95):.1f} ms, max {max(ms):.1f} ms (of {len(ms)})")  # fmt: skip


def decisions(url: str, run: Path, n: int, asked: list[dict[str, object]], seed: int) -> None:
    """Decision latency; a layer's first catalog page before a decision and right after
    it (which brings the decided feature's row up to date); searches alone, while another
    client decides five times a second, and while it decides back to back."""
    with sqlite3.connect(run / "labels.sqlite") as conn:
        planned = conn.execute("SELECT feature_id, layer FROM planned").fetchall()
    rng = random.Random(seed)
    categories = ["reasoning", "domain", "language", "uninterpretable"]

    def body(i: int) -> tuple[str, int, dict[str, object]]:
        category = categories[i % 4]
        extra = {"domain_type": "math"} if category == "domain" else {}
        feature, layer = rng.choice(planned)
        return feature, layer, {"category": category, "reviewer": "bench", **extra}

    posted, before, after = [], [], []
    for i in range(n):
        feature, layer, decision = body(i)
        before.append(get(f"{url}api/catalog?layer={layer}&per_page=1")[0])
        posted.append(post(f"{url}api/feature/{feature}/decision", decision))
        after.append(get(f"{url}api/catalog?layer={layer}&per_page=1")[0])
    print(summary("decisions (POST /api/feature/ID/decision)", posted))
    print(summary("a layer's first page, nothing to catch up with", before))
    print(summary("the same right after a decision in that layer (its row refreshed)", after))

    print(summary("searches alone", [get(f"{url}api/catalog?{urlencode(p)}")[0] for p in asked]))
    for pause, how in ((0.2, "five times a second"), (0.0, "back to back")):
        during, sent = searches_while_deciding(url, asked, pause, body)
        print(summary(f"the same searches while another client decides {how}", during))
        print(summary(f"  its {len(sent)} decisions", sent))


def searches_while_deciding(
    url: str,
    asked: list[dict[str, object]],
    pause: float,
    body: Callable[[int], tuple[str, int, dict[str, object]]],
) -> tuple[list[float], list[float]]:
    """The searches' times while another thread sends a decision every ``pause`` seconds
    (0: back to back), and those decisions' times. With a pause the searches come 20 a
    second, as from a person typing, so that they meet the decisions."""
    busy = threading.Event()
    sent: list[float] = []

    def decide() -> None:
        i = 0
        while not busy.wait(pause):
            feature, _, decision = body(i)
            sent.append(post(f"{url}api/feature/{feature}/decision", decision))
            i += 1

    other = threading.Thread(target=decide)
    other.start()
    try:
        during = []
        for params in asked:
            during.append(get(f"{url}api/catalog?{urlencode(params)}")[0])
            time.sleep(0.05 if pause else 0.0)
    finally:
        busy.set()
        other.join()
    return during, sent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--starts", type=int, default=5)
    parser.add_argument("--decisions", type=int, default=0)
    parser.add_argument("--no-build", action="store_true", help="skip timing a --rebuild")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    index = args.run / "browse-index.sqlite"

    if not args.no_build:
        process, url, built = start(args.run, "--rebuild")
        stop(process)
        size = index.stat().st_size
        print(f"index build (start-up with --rebuild): {built:.1f} s, {size / 2**20:.0f} MiB")

    startups, firsts, pages = [], [], []
    for _ in range(args.starts):
        process, url, took = start(args.run)
        first, _ = get(f"{url}api/catalog")
        page, _ = get(url)
        startups.append(took)
        firsts.append(first)
        pages.append(page)
        stop(process)
    print(f"start-up, index current: median {statistics.median(startups):.2f} s "
          f"(of {args.starts}); first page of the catalog: median "
          f"{1000 * statistics.median(firsts):.0f} ms, the HTML page "
          f"{1000 * statistics.median(pages):.1f} ms")  # fmt: skip

    process, url, _ = start(args.run)
    try:
        asked = queries(index, args.queries, args.seed)
        get(f"{url}api/facets")
        times, hits, found = [], [], []
        for params in asked:
            took, body = get(f"{url}api/catalog?{urlencode(params)}")
            times.append(took)
            answer = json.loads(body)
            hits.append(answer["total"])
            found += [f["feature_id"] for f in answer["features"][:1]]
        opened = [get(f"{url}api/feature/{fid}")[0] for fid in found[:10]]
        whole = typed_words(index, 4, args.seed)
        typed = [word[:end] for word in whole for end in range(1, len(word) + 1)]
        typing, typed_hits = [], []
        for prefix in typed:
            took, body = get(f"{url}api/catalog?{urlencode({'q': prefix})}")
            typing.append(took)
            typed_hits.append(json.loads(body)["total"])
        if args.decisions:
            decisions(url, args.run, args.decisions, asked, args.seed)
    finally:
        stop(process)
    ms = [1000 * t for t in times]
    print(f"{len(ms)} searches: median {statistics.median(ms):.0f} ms, 95th percentile "
          f"{pct(ms, 0.95):.0f} ms, max {max(ms):.0f} ms; matches per search: median "
          f"{statistics.median(hits):,.0f}, max {max(hits):,}")  # fmt: skip
    print(f"a feature's page data (/api/feature/ID, the review page's view): median "
          f"{1000 * statistics.median(opened):.0f} ms over {len(opened)}")  # fmt: skip
    print(summary(f"typing: each prefix of {', '.join(whole)}", typing))
    slowest = sorted(zip(typing, typed, typed_hits, strict=True), reverse=True)[:3]
    print("  slowest: " + "; ".join(f"{p!r} {1000 * t:.0f} ms ({h:,} matches)"
                                    for t, p, h in slowest))  # fmt: skip
    empty = [p for p, h in zip(typed, typed_hits, strict=True) if h == 0]
    print(f"  prefixes that found nothing: {len(empty)} of {len(typed)}"
          + (f" ({', '.join(empty[:8])})" if empty else ""))  # fmt: skip


if __name__ == "__main__":
    main()
