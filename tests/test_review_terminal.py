"""The terminal review through the real command in a pseudo-terminal of 80x24: single
keys without Enter, every screen within 24 lines of 80 columns with the feature's header
and logit lens on it, no token broken across lines, skips confirmed, going back to change
a decision (the later one counts)."""

from __future__ import annotations

import fcntl
import os
import re
import select
import struct
import subprocess
import termios
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from rich.cells import cell_len

from labeler.labeling.store import LabelStore
from labeler.reporting.disputes import DisputeRules
from labeler.reporting.final_labels import human_labels
from labeler.reporting.label_table import review_frame
from labeler.review.queue import FeatureView, feature_view, review_queue
from labeler.run.data import RunData
from labeler.run.schemas import ReviewDecision
from tests.test_bad_input import LABELER

ROWS, COLS = 24, 80
CLEAR = "\x1b[2J"
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)")
WAIT_S = 60.0
LEFT, RIGHT = "\x1b[D", "\x1b[C"
PROMPT_ENDS = ("quit > ", "goes back > ", "(Enter: none) > ")  # a screen is drawn in full


class Terminal:
    """A process on the slave side of a pseudo-terminal; what it writes is collected."""

    def __init__(self, args: list[str], rows: int, cols: int) -> None:
        master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
        env = {**os.environ, "COLUMNS": str(cols), "LINES": str(rows), "TERM": "xterm-256color"}
        for name in ("NO_COLOR", "FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE"):
            env.pop(name, None)
        self.process = subprocess.Popen(
            args, stdin=slave, stdout=slave, stderr=slave, env=env, close_fds=True
        )
        os.close(slave)
        self.master = master
        self.output = ""
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            try:
                ready, _, _ = select.select([self.master], [], [], 0.5)
                if not ready:
                    if self.process.poll() is not None:
                        return
                    continue
                data = os.read(self.master, 65536)
            except OSError:  # the other side closed
                return
            if not data:
                return
            with self._lock:
                self.output += data.decode("utf-8", errors="replace")

    def send(self, keys: str) -> None:
        os.write(self.master, keys.encode())

    def screens(self) -> list[str]:
        """Everything drawn after each clearing of the screen, without escape codes."""
        with self._lock:
            parts = self.output.split(CLEAR)[1:]
        return [ANSI.sub("", part) for part in parts]

    def next_screen(self, after: int, contains: str = "") -> str:
        """The first screen drawn after screen number ``after`` that is complete (ends
        with one of the prompts) and holds ``contains``; fails with what was drawn."""
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            for screen in self.screens()[after:]:
                if screen.endswith(PROMPT_ENDS) and contains in screen:
                    return screen
            if self.process.poll() is not None and not self._reader.is_alive():
                break
            time.sleep(0.05)
        pytest.fail(
            f"no screen with {contains!r}; last output:\n{ANSI.sub('', self.output)[-3000:]}"
        )

    def finish(self) -> str:
        """Wait for the process to end; all it wrote, without escape codes."""
        try:
            assert self.process.wait(timeout=WAIT_S) == 0, ANSI.sub("", self.output)[-3000:]
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait()
            self._reader.join(timeout=5)
            os.close(self.master)
        return ANSI.sub("", self.output)


@pytest.fixture
def terminal(labeled_copy: Path) -> Iterator[Terminal]:
    term = Terminal([*LABELER, "review", str(labeled_copy), "--reviewer", "ann"], ROWS, COLS)
    try:
        yield term
    finally:
        if term.process.poll() is None:
            term.process.kill()
            term.process.wait()


def _views(run: Path) -> list[FeatureView]:
    store = LabelStore(run / "labels.sqlite")
    try:
        data, rules = RunData.open(run), DisputeRules()
        return [feature_view(data, store, q.feature_id, rules) for q in review_queue(store, rules)]
    finally:
        store.close()


def check_layout(screen: str, view: FeatureView, position: str) -> list[str]:
    """The screen fits 24x80, starts with the feature's header and logit lens, and every
    example line shows whole tokens of one of its examples; its lines."""
    lines = screen.replace("\r\n", "\n").split("\n")
    assert len(lines) <= ROWS, screen
    assert all(cell_len(line) <= COLS for line in lines), screen
    drawn = "\n".join(lines)
    assert not re.search("[\ufffd\x00-\x08\x0b-\x1f\x7f]|<｜", drawn), drawn  # see review.tokens
    assert view.feature_id in lines[0] and f"({position})" in lines[0], lines[0]
    assert lines[1].startswith(f"layer {view.layer}, index {view.index};")
    for line, label, shown in (
        (lines[2], "promotes ", view.top_logits_shown),
        (lines[3], "demotes  ", view.bottom_logits_shown),
    ):
        assert line.startswith(label), line
        tokens = line[len(label) :].removesuffix(" …")
        assert any(tokens == " ".join(shown[:n]) for n in range(1, len(shown) + 1)), (line, shown)
    windows = ["".join(e.shown) for e in view.examples]
    example_lines = [
        line for line in lines if re.match(r"(top|random|quantile) +-?\d+\.\d\d ", line)
    ]
    assert example_lines, screen
    for line in example_lines:
        body = line.split(" ", 1)[1].lstrip().split(" ", 1)[1]  # after the kind and activation
        cut = body.removeprefix("…").removesuffix("…")
        assert any(cut in w for w in windows), line
        for example in view.examples:  # it starts and ends at token edges of its example
            joined = "".join(example.shown)
            if cut not in joined:
                continue
            edges = {0}
            for token in example.shown:
                edges.add(max(edges) + len(token))
            start = joined.index(cut)
            if start in edges and start + len(cut) in edges:
                break
        else:
            pytest.fail(f"a token is cut in {line!r}")
    return lines


def test_single_keys_in_a_pseudo_terminal_fit_80x24(terminal: Terminal, labeled_copy: Path) -> None:
    views = _views(labeled_copy)
    assert len(views) >= 4
    first, second, third = views[0].feature_id, views[1].feature_id, views[2].feature_id
    n = len(views)

    screen = terminal.next_screen(0, f"(1 of {n})")
    check_layout(screen, views[0], f"1 of {n}")
    assert "why:" not in screen  # the judges stay hidden until j
    seen = len(terminal.screens())

    terminal.send("x")  # not a key: said so, nothing recorded
    screen = terminal.next_screen(seen, "unknown choice 'x'")
    check_layout(screen, views[0], f"1 of {n}")  # the message takes an example's line
    seen = len(terminal.screens())

    terminal.send("j")
    screen = terminal.next_screen(seen, "why:")
    lines = screen.replace("\r\n", "\n").split("\n")
    assert len(lines) <= ROWS and all(cell_len(line) <= COLS for line in lines), screen
    assert first in lines[0] and lines[2].startswith("promotes ")
    seen = len(terminal.screens())

    terminal.send("l")  # language, then a note typed as a line
    terminal.next_screen(seen, "language: a note")
    seen = len(terminal.screens())
    terminal.send("looks like plain text\r")
    screen = terminal.next_screen(seen, f"(2 of {n})")
    check_layout(screen, views[1], f"2 of {n}")
    assert f"{first} saved: language by ann" in screen
    seen = len(terminal.screens())

    terminal.send("s")  # a skip is confirmed; any other key leaves it
    terminal.next_screen(seen, "s or y")
    seen = len(terminal.screens())
    terminal.send("k")
    terminal.next_screen(seen, "not skipped")
    seen = len(terminal.screens())
    terminal.send("s")
    terminal.next_screen(seen, "s or y")
    seen = len(terminal.screens())
    terminal.send("y")
    screen = terminal.next_screen(seen, f"(3 of {n})")
    check_layout(screen, views[2], f"3 of {n}")
    seen = len(terminal.screens())

    terminal.send("b")  # back twice, to the first feature, and change its decision
    terminal.next_screen(seen, f"(2 of {n})")
    seen = len(terminal.screens())
    terminal.send(LEFT)
    screen = terminal.next_screen(seen, f"(1 of {n})")
    assert "you decided language" in check_layout(screen, views[0], f"1 of {n}")[4]
    seen = len(terminal.screens())
    terminal.send("d")
    terminal.next_screen(seen, "domain type:")
    seen = len(terminal.screens())
    terminal.send("2")
    terminal.next_screen(seen, "domain: a note")
    seen = len(terminal.screens())
    terminal.send("\r")
    terminal.next_screen(seen, f"(3 of {n})")  # on to the first one not yet done
    seen = len(terminal.screens())
    terminal.send(RIGHT)
    terminal.next_screen(seen, f"(4 of {n})")
    terminal.send("q")
    output = terminal.finish()
    assert "1 decided and 1 skipped by ann" in output

    store = LabelStore(labeled_copy / "labels.sqlite")
    try:
        assert [(r.action, r.category, r.domain_type, r.note) for r in store.reviews(first)] == [
            ("decide", "language", None, "looks like plain text"),
            ("decide", "domain", "science", ""),
        ]
        assert [(r.action, r.reviewer) for r in store.reviews(second)] == [("skip", "ann")]
        assert store.reviews(third) == []
        final = human_labels(review_frame(store))
    finally:
        store.close()
    (row,) = final.filter(final["feature_id"] == first).iter_rows(named=True)
    assert (row["category"], row["reviewers_disagree"]) == ("domain", False)  # the later one


def test_keys_piped_one_a_line_still_work(labeled_copy: Path) -> None:
    views = _views(labeled_copy)
    first = views[0].feature_id
    result = subprocess.run(
        [*LABELER, "review", str(labeled_copy), "--reviewer", "bo"],
        input="s\ny\nb\nr\n4\n\na plan\nq\n", capture_output=True, text=True,
        timeout=120, check=False, env={**os.environ, "COLUMNS": str(COLS)},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    drawn = [line for line in result.stdout.splitlines() if "decisions are in" not in line]
    assert all(cell_len(line) <= COLS for line in drawn), result.stdout
    assert "1 decided and 0 skipped by bo" in result.stdout
    store = LabelStore(labeled_copy / "labels.sqlite")
    try:
        reviews = [(r.action, r.category, r.subcategory, r.mechanism, r.note)
                   for r in store.reviews(first)]  # fmt: skip
    finally:
        store.close()
    assert reviews == [
        ("skip", None, None, None, ""),
        ("decide", "reasoning", "planning", None, "a plan"),
    ]


TITLE_AND_CLEAR = "\x1b]0;pwned\x07\x1b[2J"


def test_foreign_text_cannot_drive_the_terminal(labeled_copy: Path) -> None:
    """Escape sequences in a judge's explanation and rationale, a reviewer's name and
    note are drawn as text: no window title, no cleared screen, no bell."""
    views = _views(labeled_copy)
    target = views[0].feature_id
    store = LabelStore(labeled_copy / "labels.sqlite")
    try:
        with store.transaction():
            store.conn.execute(
                "UPDATE judgments SET payload = json_set(payload, '$.explanation', ?,"
                " '$.classification.rationale', ?) WHERE feature_id = ? AND status = 'ok'",
                (f"fires on {TITLE_AND_CLEAR}waiting", f"because{TITLE_AND_CLEAR}", target),
            )
        name, note = f"eve{TITLE_AND_CLEAR}", f"see{TITLE_AND_CLEAR}"
        store.add_review(
            ReviewDecision(feature_id=target, reviewer=name, category="language", note=note)
        )
    finally:
        store.close()
    args = [*LABELER, "review", str(labeled_copy), "--reviewer", "ann", "--include-decided"]
    term = Terminal(args, ROWS, COLS)
    try:
        term.next_screen(0, f"{target}  (1 of")
        seen = len(term.screens())
        term.send("j")
        screen = term.next_screen(seen, "why:")
        term.send("q")
        term.finish()
    finally:
        if term.process.poll() is None:
            term.process.kill()
            term.process.wait()
    for shown in ("fires on ]0;pwned[2Jwaiting", "because]0;pwned[2J", "eve]0;pwned[2J"):
        assert shown in screen, screen
    assert "\x07" not in term.output and "\x1b]" not in term.output
    assert all(s.lstrip().startswith(f"── {target}") for s in term.screens()), term.screens()
