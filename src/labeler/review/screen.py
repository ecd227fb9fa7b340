"""The terminal review's screen: one feature laid out to fit the terminal, 80x24 and up.

Every line is cut to the width at a token's edge (``…`` marks the cut), never wrapped by
the terminal, so no token is split across lines. From the top: the feature's title and
place in the queue, its statistics and why it is disputed (or its place in an audit,
with a line saying why the judges stay hidden: an audit measures them), the logit lens (a line each
way), the reviewer's own earlier decision; then one line per example (the tokens around
the activating one, shaded by activation), or the judges' answers when asked for; at
the bottom the keys. The examples fill what the other lines leave of the height.

Text that is not this program's own (judges' answers, reviewer names and notes, feature
ids, anything read from a file) goes through :func:`safe` before it is drawn: a judge's
reply can hold escape sequences that would retitle the window or clear the screen.
Tokens are shown by :mod:`labeler.review.tokens`, which makes their control characters
visible.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from rich.cells import cell_len
from rich.console import Console
from rich.text import Text

from labeler.review.queue import BLIND_WHY, FeatureView, JudgeAnswer, ShownExample
from labeler.run.schemas import ReviewDecision

KIND_QUOTAS = (("top", 8), ("random", 4), ("quantile", 4))
ELLIPSIS = "…"
PROMOTED, DEMOTED = "black on rgb(218,251,225)", "black on rgb(255,235,233)"
_LEFT_SHARE = 0.6  # of an example line's room, for the tokens before the activating one
# C0 and C1 control characters and DEL (ESC starts a terminal command, C1's CSI and OSC
# are one-byte forms of ESC [ and ESC ]), and the bidirectional overrides and isolates
# that make text show in another order than it reads
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def safe(text: object) -> str:
    """Foreign text as it may be written to a terminal: whitespace controls (newline,
    tab, carriage return) become spaces, every other control character is dropped."""
    return _CONTROL.sub(lambda m: " " if m.group() in "\t\n\r\x0b\x0c" else "", str(text))


def fit(text: Text, width: int) -> Text:
    """``text`` cut to ``width`` cells (``…`` at the cut)."""
    text = text.copy()
    text.truncate(width, overflow="ellipsis")
    return text


def wrapped(text: Text, console: Console, width: int) -> list[Text]:
    """``text`` wrapped at spaces to ``width`` cells (a word longer than a line is cut)."""
    return [fit(line, width) for line in text.wrap(console, width, overflow="ellipsis")]


def heat_style(act: float, peak: float, highlight: bool) -> str:
    """A token's shading: the stronger its activation the redder; the activating token
    bold and underlined."""
    strength = 0.0 if peak <= 0 else max(0.0, min(1.0, act / peak))
    fade = int(255 - 175 * strength)
    style = f"black on rgb(255,{fade},{fade})" if strength > 0 else ""
    return f"{style} bold underline".strip() if highlight else style


def whole_tokens(tokens: Sequence[tuple[str, str]], width: int, sep: str = " ") -> Text:
    """As many whole tokens (text, style) as fit in ``width`` cells, left to right, with
    ``…`` where some are left out."""
    text = Text()
    if sum(cell_len(t) for t, _ in tokens) + cell_len(sep) * max(len(tokens) - 1, 0) <= width:
        for i, (token, style) in enumerate(tokens):
            text.append(sep if i else "")
            text.append(token, style=style)
        return text
    used = 0
    for i, (token, style) in enumerate(tokens):
        gap = cell_len(sep) if i else 0
        if used + gap + cell_len(token) + cell_len(sep) + 1 > width:
            if used + gap + 1 <= width:
                text.append((sep if i else "") + ELLIPSIS, style="dim")
            break
        if i:
            text.append(sep)
        text.append(token, style=style)
        used += gap + cell_len(token)
    return text


def window(example: ShownExample, peak: float, width: int) -> Text:
    """The example's tokens around the activating one, whole tokens only, within
    ``width`` cells; ``…`` at an end where tokens are left out."""
    tokens = example.shown
    if not tokens:
        return Text()
    h = min(max(example.highlight, 0), len(tokens) - 1)
    cells = [cell_len(t) for t in tokens]
    room = width - 2  # one cell each side for ``…``
    if cells[h] >= room:
        middle = Text(tokens[h], style=heat_style(example.acts[h], peak, True))
        return fit(middle, width)
    lo, hi, used = h, h + 1, cells[h]
    left_room = max(int(room * _LEFT_SHARE) - used, 0)
    while lo > 0 and cells[lo - 1] <= left_room and used + cells[lo - 1] <= room:
        lo -= 1
        used += cells[lo]
        left_room -= cells[lo]
    while hi < len(tokens) and used + cells[hi] <= room:
        used += cells[hi]
        hi += 1
    while lo > 0 and used + cells[lo - 1] <= room:  # room left over on the right
        lo -= 1
        used += cells[lo]
    text = Text(ELLIPSIS if lo > 0 else "", style="dim")
    for i in range(lo, hi):
        text.append(tokens[i], style=heat_style(example.acts[i], peak, i == h))
    if hi < len(tokens):
        text.append(ELLIPSIS, style="dim")
    return text


def chosen_examples(view: FeatureView, rows: int) -> list[ShownExample]:
    """Up to ``rows`` examples: the top ones first, then random and quantile ones (spread
    over the quantiles, highest first); each kind gives up rows in turn when the screen
    is short, the one with the most first."""
    by_kind = {kind: [e for e in view.examples if e.kind == kind] for kind, _ in KIND_QUOTAS}
    by_kind["quantile"].sort(key=lambda e: (-(e.quantile or 0), e.rank))
    counts = {kind: min(quota, len(by_kind[kind])) for kind, quota in KIND_QUOTAS}
    while sum(counts.values()) > max(rows, 0):
        largest = max(counts, key=lambda kind: counts[kind])
        counts[largest] -= 1
    chosen: list[ShownExample] = []
    for kind, _ in KIND_QUOTAS:
        pool, n = by_kind[kind], counts[kind]
        if kind == "quantile" and n and len(pool) > n:  # evenly spread over the pool
            pool = [pool[round(i * (len(pool) - 1) / max(n - 1, 1))] for i in range(n)]
        chosen.extend(pool[:n])
    return chosen


def example_lines(view: FeatureView, width: int, rows: int) -> list[Text]:
    peak = max((e.activation for e in view.examples), default=0.0)
    lines = []
    for example in chosen_examples(view, rows):
        head = Text(f"{example.kind:<8.8} {example.activation:6.2f} ", style="dim")
        lines.append(head + window(example, peak, width - cell_len(head.plain)))
    if not view.examples:
        lines.append(Text("no examples were kept for this feature", style="dim"))
    return lines


def lens_line(label: str, tokens: Sequence[str], style: str, width: int) -> Text:
    head = Text(f"{label:<9}")
    return head + whole_tokens([(t, style) for t in tokens], width - len(head.plain))


def title_line(view: FeatureView, position: str, width: int) -> Text:
    title = Text.assemble(("── ", "dim"), (safe(view.feature_id), "bold"), f"  ({position}) ")
    return fit(title + Text("─" * max(width - cell_len(title.plain), 0), style="dim"), width)


def own_status(view: FeatureView, reviewer: str) -> Text | None:
    """The reviewer's own latest decision or skip, and how many decisions others made."""
    mine = [r for r in view.reviews if r.reviewer == reviewer]
    others = sum(1 for r in view.reviews if r.reviewer != reviewer and r.action == "decide")
    parts: list[str] = []
    if mine:
        parts.append(f"you {_done(mine[-1])}; r d l u change it")
    if others:
        parts.append(f"{others} decision(s) by others, shown with the judges (j)")
    return Text("; ".join(parts), style="yellow") if parts else None


def _done(review: ReviewDecision) -> str:
    when = safe(review.decided_at[:16].replace("T", " "))  # to the minute, UTC
    if review.action == "skip":
        return f"skipped it ({when})"
    label = " / ".join(
        safe(x)
        for x in (review.category, review.subcategory, review.mechanism, review.domain_type)
        if x
    )
    return f"decided {label} ({when})"


def resampled(answer: JudgeAnswer) -> str:
    """How often the classifier gave the same category on resampled examples (``label
    --resamples``), as ``, agrees in 4 of 5 resamples``; empty when not asked."""
    share = answer.resample_confidence
    if share is None:
        return ""
    if answer.resamples:
        return f", agrees in {round(share * answer.resamples)} of {answer.resamples} resamples"
    return f", {share:.2f} resampled"


def judge_lines(view: FeatureView, console: Console, width: int) -> list[Text]:
    """The judges' answers and other reviewers' decisions, wrapped to ``width``."""
    blocks: list[Text] = []
    for review in view.reviews:
        if review.action == "decide":
            note = f": {safe(review.note)}" if review.note else ""
            blocks.append(Text(f"{safe(review.reviewer)} {_done(review)}{note}", style="yellow"))
    for answer in view.judges:
        judge = safe(answer.judge)
        if answer.status != "ok":
            blocks.append(Text(f"{judge}: failed ({safe(answer.failure_reason)})"))
            continue
        detail = answer.subcategory or answer.domain_type or ""
        detection = "-" if answer.detection is None else f"{answer.detection:.2f}"
        blocks.append(
            Text.assemble(
                (f"{judge}: ", "bold"),
                safe(f"{answer.category} {detail} ".replace("  ", " ")),
                f"({safe(answer.confidence)} confidence{resampled(answer)}, detection {detection})",
            )
        )
        blocks.append(Text(f"  {safe(answer.explanation)}"))
        blocks.append(Text(f"  why: {safe(answer.rationale)}", style="dim"))
    if not view.judges:
        blocks.append(Text("no judge has answered for this feature", style="dim"))
    return [line for block in blocks for line in wrapped(block, console, width)]


def feature_lines(
    view: FeatureView,
    console: Console,
    width: int,
    rows: int,
    position: str,
    reviewer: str,
    judges: bool,
) -> list[Text]:
    """The feature in at most ``rows`` lines of ``width`` cells: the header and the lens
    always, then the examples (or the judges) in what is left."""
    why = (f"{view.audit.text} (blind)" if view.blind and view.audit
           else f"disputed: {safe(', '.join(view.reasons)) or 'no'}")  # fmt: skip
    meta = Text(
        f"layer {view.layer}, index {view.index}; active on {view.count:,} tokens "
        f"({view.frequency:.3%}); {why}"
    )
    lines = [
        title_line(view, position, width),
        fit(meta, width),
        lens_line("promotes", view.top_logits_shown, PROMOTED, width),
        lens_line("demotes", view.bottom_logits_shown, DEMOTED, width),
    ]
    if view.blind and view.audit and not judges:
        lines.extend(wrapped(Text(
            f"{view.audit.text}: the judges' labels are hidden ({BLIND_WHY}); j shows them",
            style="yellow"), console, width))  # fmt: skip
    status = own_status(view, reviewer)
    if status is not None:
        lines.append(fit(status, width))
    room = rows - len(lines)
    if judges:
        body = judge_lines(view, console, width)
        if len(body) > room:
            body = [*body[: max(room - 1, 0)], Text("… (a taller terminal shows more)", "dim")]
        lines.extend(body[: max(room, 0)])
    else:
        lines.extend(example_lines(view, width, room))
    return lines[: max(rows, 4)]
