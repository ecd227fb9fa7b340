"""Peak memory of reading and tokenizing a corpus with one very long line, as `labeler
collect` does before the model runs.

A corpus of the planted demo's traces plus one conversation whose thinking is SIZE_MB of
text is read and tokenized with the demo's tokenizer (as collect loads it) at
`--max-length 1024`, in a fresh process each time; its peak resident memory
(ru_maxrss) is reported against the same corpus without the long line.

.venv/bin/python benchmarks/bench_long_line.py [--size-mb 50] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

_MEASURE = """
import resource, sys
from pathlib import Path
from adapters.tokenizer_loading import load_tokenizer
from collectors.corpus import read_traces, tokenize_traces
tokenizer = load_tokenizer(sys.argv[1])
corpus = tokenize_traces(list(read_traces(Path(sys.argv[2]))), tokenizer, 1024)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, corpus.n_tokens,
      corpus.n_truncated)
"""


def _peak(checkpoint: Path, corpus: Path) -> tuple[float, int, int]:
    out = subprocess.run([sys.executable, "-c", _MEASURE, str(checkpoint), str(corpus)],
                         capture_output=True, text=True, check=True, cwd=REPO)  # fmt: skip
    mib, tokens, truncated = out.stdout.split()
    return float(mib), int(tokens), int(truncated)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=float, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    from collectors.demo_model import build_demo

    with tempfile.TemporaryDirectory() as tmp:
        paths = build_demo(Path(tmp) / "demo", seed=0)
        base = paths.corpus.read_text()
        sentence = "Wait, let me check that step again: 12 + 30 = 42, so the sum holds. "
        thinking = sentence * int(args.size_mb * 1_000_000 / len(sentence))
        long_line = json.dumps({"conversations": [
            {"from": "human", "value": "Add 12 and 30."},
            {"from": "gpt", "value": f"<think>\n{thinking}\n</think>\n\n42"},
        ], "domain": "math"})  # fmt: skip
        with_long = Path(tmp) / "long.jsonl"
        with_long.write_text(base + long_line + "\n")
        rows = {}
        for name, corpus in (("demo corpus", paths.corpus), ("+ one long line", with_long)):
            runs = [_peak(paths.checkpoint, corpus) for _ in range(args.repeats)]
            rows[name] = (statistics.median(r[0] for r in runs), runs[0][1], runs[0][2])
        line_mb = len(long_line.encode()) / 1e6
        print(f"long line: {line_mb:.1f} MB; max length 1024; median of {args.repeats}")
        for name, (mib, tokens, truncated) in rows.items():
            print(f"{name:>16}: peak RSS {mib:,.0f} MiB, {tokens:,} tokens, {truncated} truncated")
        extra = rows["+ one long line"][0] - rows["demo corpus"][0]
        print(f"the long line costs {extra:,.0f} MiB ({extra / line_mb:.1f} MiB per MB of line)")


if __name__ == "__main__":
    main()
