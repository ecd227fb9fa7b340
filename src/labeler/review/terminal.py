"""``labeler review RUN --reviewer NAME``: the disputed features one at a time in the
terminal, a key each (no Enter in a terminal; one key a line from a pipe).

Keys: ``r`` ``d`` ``l`` ``u`` decide the category (then a subcategory and mechanism, or
a domain type, by number, and a note); ``s`` skips (asked to confirm: a skip is recorded
as "looked at, left undecided"); ``b`` or ← goes back to the previous feature, whose
decision another key changes (a later decision supersedes: the store is append-only);
``n`` or → goes on without recording anything; ``j`` shows or hides the judges' answers
(hidden at first, so that the reviewer forms a view from the examples); ``q`` quits.

The queue starts with the features an audit drew, in draw order; for one nobody has
decided, the screen says why the judges stay hidden (an audit measures them) and a skip
is confirmed with a warning: it stops the audit's estimate at that feature.
"""

from __future__ import annotations

import sys
from contextlib import AbstractContextManager, nullcontext, suppress
from dataclasses import dataclass, field

from rich.console import Console
from rich.text import Text

from labeler.labeling.store import LabelStore
from labeler.reporting.disputes import DisputeRules
from labeler.review.keys import ENTER, ESCAPE, LEFT, RIGHT, Keys, TerminalKeys, keys_from
from labeler.review.queue import (
    FeatureView,
    QueueItem,
    feature_view,
    record_decision,
    review_queue,
)
from labeler.review.screen import feature_lines, safe, wrapped
from labeler.run.data import RunData
from labeler.run.schemas import ReviewDecision
from prompts import CATEGORIES, DOMAIN_TYPES, MECHANISMS, SUBCATEGORIES

KEYS = {c[0]: c for c in CATEGORIES}
MAIN_KEYS = Text.assemble(
    ("r", "bold"), " reasoning  ", ("d", "bold"), " domain  ", ("l", "bold"), " language  ",
    ("u", "bold"), " uninterpretable  ", ("j", "bold"), " judges\n",
    ("s", "bold"), " skip  ", ("b", "bold"), " back  ", ("n", "bold"), " next  ",
    ("q", "bold"), " quit > ",
)  # fmt: skip
PIPE_ROWS = 1000  # the rows a feature may take when the output is not a terminal: all


def skip_warning(view: FeatureView) -> str | None:
    """What skipping an audited feature nobody has decided does to the audit."""
    if view.audit is None or not view.blind:
        return None
    return (f"A skip stops audit {view.audit.audit_id}'s estimate at this feature until "
            "someone decides it. ")  # fmt: skip


class _Cancel(Exception):
    """Esc while choosing the details of a decision: back to the feature."""


@dataclass
class Screen:
    """Draws a feature and the keys: in a terminal the whole screen each time; elsewhere
    (a pipe) the feature once, then each prompt on a line of its own."""

    console: Console
    live: bool
    _drawn: tuple[str, int, bool, int] | None = None

    def draw(
        self,
        view: FeatureView,
        position: str,
        reviewer: str,
        judges: bool,
        message: str,
        prompt: Text,
        version: int,
    ) -> None:
        width = max(self.console.width, 20)
        footer = [
            line for part in prompt.split("\n") for line in wrapped(part, self.console, width)
        ]
        if message:
            footer = [*wrapped(Text(message), self.console, width), *footer]
        if not self.live:
            key = (view.feature_id, version, judges, len(view.reviews))
            if key != self._drawn:
                lines = feature_lines(view, self.console, width, PIPE_ROWS, position, reviewer,
                                      judges)  # fmt: skip
                for line in lines:
                    self._print(line)
                self._drawn = key
            for line in footer:
                self._print(line)
            return
        rows = max(self.console.height - len(footer), 5)
        self.console.clear()
        for line in feature_lines(view, self.console, width, rows, position, reviewer, judges):
            self._print(line)
        for i, line in enumerate(footer):
            self._print(line, end="" if i == len(footer) - 1 else "\n")

    def _print(self, line: Text, end: str = "\n") -> None:
        self.console.print(line, end=end, soft_wrap=False, no_wrap=True, crop=True,
                           overflow="ellipsis", highlight=False, markup=False)  # fmt: skip

    def say(self, message: str) -> None:
        if self.live:
            self.console.print()
        self.console.print(message, markup=False, highlight=False)


@dataclass
class Review:
    """One reviewer's pass over the queue."""

    run: RunData
    store: LabelStore
    rules: DisputeRules
    reviewer: str
    queue: list[QueueItem]
    keys: Keys
    screen: Screen
    position: int = 0
    judges: bool = False
    message: str = ""
    outcome: dict[str, str] = field(default_factory=dict)  # feature: its latest action here
    _views: dict[str, FeatureView] = field(default_factory=dict)
    _version: int = 0

    @property
    def view(self) -> FeatureView:
        fid = self.queue[self.position].feature_id
        if fid not in self._views:
            self._views[fid] = feature_view(self.run, self.store, fid, self.rules)
        return self._views[fid]

    def draw(self, prompt: Text) -> None:
        where = f"{self.position + 1} of {len(self.queue)}"
        self.screen.draw(self.view, where, self.reviewer, self.judges, self.message, prompt,
                         self._version)  # fmt: skip
        self.message = ""

    def ask(self, prompt: Text) -> str:
        self.draw(prompt)
        return self.keys.key()

    def run_through(self) -> None:
        """Until every feature has been decided or skipped here, or the reviewer quits."""
        while True:
            key = self.ask(MAIN_KEYS)
            if key == "q":
                return
            if key == "j":
                self.judges = not self.judges
            elif key in ("b", LEFT):
                self.go(-1)
            elif key in ("n", RIGHT):
                self.go(1)
            elif key == "s":
                if self.confirm_skip() and not self.advance():
                    return
            elif key in KEYS:
                try:
                    fields = self.details(KEYS[key])
                except _Cancel:
                    self.message = "not saved"
                    continue
                self.save(fields)
                if not self.advance():
                    return
            else:
                self.message = f"unknown choice {key!r}: r d l u decide, s skips, b n move, q quits"

    def go(self, step: int) -> None:
        target = self.position + step
        if not 0 <= target < len(self.queue):
            self.message = (
                "this is the first feature" if target < 0
                else "this is the last feature: decide, skip (s), go back (b) or quit (q)"
            )  # fmt: skip
            return
        self.position = target
        self.judges = False

    def advance(self) -> bool:
        """On to the next feature not yet decided or skipped here (after this one, then
        from the start); False when there is none."""
        n = len(self.queue)
        for step in range(1, n + 1):
            i = (self.position + step) % n
            if self.queue[i].feature_id not in self.outcome:
                self.position = i
                self.judges = False
                return True
        return False

    def confirm_skip(self) -> bool:
        fid = self.view.feature_id
        prompt = Text.assemble(
            f"skip {safe(fid)}? It is recorded that you looked at it and left it undecided. ",
            skip_warning(self.view) or "",
            ("s", "bold"), " or ", ("y", "bold"), " skips, any other key goes back > ",
        )  # fmt: skip
        if self.ask(prompt) not in ("s", "y"):
            self.message = "not skipped"
            return False
        self.save({"feature_id": fid, "reviewer": self.reviewer, "action": "skip"})
        return True

    def choose(self, what: str, options: tuple[str, ...], optional: bool) -> str | None:
        listing = "  ".join(f"{i} {o}" for i, o in enumerate(options, 1))
        unset = "Enter leaves it unset, " if optional else ""
        prompt = Text(f"{what}: {listing}\n{unset}Esc goes back > ")
        while True:
            answer = self.ask(prompt)
            if answer == ESCAPE:
                raise _Cancel
            if answer == ENTER and optional:
                return None
            if answer.isdigit() and 1 <= int(answer) <= len(options):
                return options[int(answer) - 1]
            if answer in options:
                return answer
            self.message = f"unknown {what} {answer!r}"

    def details(self, category: str) -> dict[str, object]:
        """The decision's fields once its category is chosen (Esc: _Cancel)."""
        fields: dict[str, object] = {
            "feature_id": self.view.feature_id, "reviewer": self.reviewer, "category": category,
        }  # fmt: skip
        if category == "reasoning":
            fields["subcategory"] = self.choose("subcategory", SUBCATEGORIES, optional=True)
            fields["mechanism"] = self.choose("mechanism", MECHANISMS, optional=True)
        elif category == "domain":
            fields["domain_type"] = self.choose("domain type", DOMAIN_TYPES, optional=False)
        note = Text(f"{category}: a note (Enter: none) > ")
        fields["note"] = self.keys.line(lambda: self.draw(note)).strip()
        return fields

    def save(self, fields: dict[str, object]) -> ReviewDecision:
        held = skip_warning(self.view) if fields.get("action") == "skip" else None
        stored = record_decision(self.store, fields)
        self.outcome[stored.feature_id] = stored.action
        self._views.pop(stored.feature_id, None)
        self._version += 1
        what = "skipped" if stored.action == "skip" else f"saved: {stored.category}"
        self.message = safe(f"{stored.feature_id} {what} by {self.reviewer}")
        if held:
            self.message += f". {held.strip()}"
        return stored


def review_in_terminal(
    run: RunData,
    store: LabelStore,
    rules: DisputeRules,
    reviewer: str,
    include_decided: bool,
    console: Console,
    keys: Keys | None = None,
) -> None:
    """Walk the queue with ``keys`` (default: single keys from a terminal on standard
    input, else one key a line); decisions go to ``store`` as they are made."""
    queue = review_queue(store, rules, include_decided)
    if not queue:
        console.print("nothing to review: no audited or disputed feature is waiting for a decision")
        return
    keys = keys if keys is not None else keys_from(sys.stdin)
    screen = Screen(console, live=keys.live and console.is_terminal)
    review = Review(run, store, rules, reviewer, queue, keys, screen)
    mode: AbstractContextManager[object] = keys if isinstance(keys, TerminalKeys) else nullcontext()
    try:
        with mode, suppress(EOFError):  # the end of the input, or Ctrl-D: as q
            review.run_through()
    finally:
        decided = sum(1 for a in review.outcome.values() if a == "decide")
        skipped = len(review.outcome) - decided
        if review.message and not screen.live:
            console.print(review.message, markup=False, highlight=False)
        screen.say(
            safe(f"{decided} decided and {skipped} skipped by {reviewer}; decisions are in "
                 f"{store.path}")
        )  # fmt: skip
