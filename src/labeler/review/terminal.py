"""``labeler review RUN --reviewer NAME``: the disputed features one at a time in the
terminal. The judges' answers stay hidden until asked for (``j``), so the reviewer forms
a view from the examples first."""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape
from rich.text import Text

from labeler.labeling.store import LabelStore
from labeler.reporting.disputes import DisputeRules
from labeler.review.queue import FeatureView, feature_view, record_decision, review_queue
from labeler.run.data import RunData
from labeler.run.schemas import Example
from prompts import CATEGORIES, DOMAIN_TYPES, MECHANISMS, SUBCATEGORIES

N_TOP, N_RANDOM = 8, 4
KEYS = {c[0]: c for c in CATEGORIES}
PROMPT = "[r]easoning [d]omain [l]anguage [u]ninterpretable  [j]udges [s]kip [q]uit > "


class _Quit(Exception):
    pass


def _heat(example: Example, peak: float) -> Text:
    """The example's tokens, shaded by activation; the activating token underlined."""
    text = Text()
    for i, (token, act) in enumerate(zip(example.tokens, example.acts, strict=True)):
        strength = 0.0 if peak <= 0 else max(0.0, min(1.0, act / peak))
        style = f"on rgb({255},{int(255 - 175 * strength)},{int(255 - 175 * strength)})"
        if strength > 0:
            style = "black " + style
        if i == example.highlight:
            style += " bold underline"
        text.append(
            token.replace("\n", "⏎"), style=style if strength > 0 or i == example.highlight else ""
        )
    text.append(f"   ({example.activation:.2f})", style="dim")
    return text


def show_feature(view: FeatureView, console: Console, position: str) -> None:
    console.rule(f"{view.feature_id}  ({position})")
    console.print(
        f"layer {view.layer}, index {view.index}; active on {view.count:,} tokens "
        f"({view.frequency:.3%}); disputed: {', '.join(view.reasons) or 'no'}",
        markup=False,
        highlight=False,
    )
    console.print(Text("promotes: ") + Text(" ".join(view.top_logits), style="green"))
    console.print(Text("demotes:  ") + Text(" ".join(view.bottom_logits), style="red"))
    peak = max((e.activation for e in view.examples), default=0.0)
    for kind, n in (("top", N_TOP), ("random", N_RANDOM), ("quantile", N_RANDOM)):
        chosen = [e for e in view.examples if e.kind == kind][:n]
        if chosen:
            console.print(f"[bold]{kind} examples[/bold]")
            for example in chosen:
                console.print(_heat(example, peak))
    earlier = sum(1 for r in view.reviews if r.action == "decide")
    if earlier:
        console.print(f"{earlier} earlier decision(s), shown with the judges (j)")


def show_judges(view: FeatureView, console: Console) -> None:
    """The judges' answers and earlier reviewers' decisions (hidden until asked for)."""
    for review in view.reviews:
        if review.action == "decide":
            console.print(
                Text(
                    f"earlier: {review.reviewer} decided {review.category} "
                    f"({review.decided_at}) {review.note}",
                    style="yellow",
                )
            )
    for answer in view.judges:
        if answer.status != "ok":
            console.print(Text(f"{answer.judge}: failed ({answer.failure_reason})"))
            continue
        detail = answer.subcategory or answer.domain_type or ""
        detection = "-" if answer.detection is None else f"{answer.detection:.2f}"
        console.print(
            Text.assemble(
                (f"{answer.judge}: ", "bold"),
                f"{answer.category} {detail} ",
                f"({answer.confidence} confidence, detection {detection})\n",
                f"   {answer.explanation}\n   why: {answer.rationale}",
            )
        )


def _ask(console: Console, prompt: str) -> str:
    try:
        return console.input(escape(prompt)).strip()
    except EOFError:
        raise _Quit from None


def _choose(console: Console, what: str, options: tuple[str, ...], optional: bool) -> str | None:
    listing = "  ".join(f"{i}={o}" for i, o in enumerate(options, 1))
    while True:
        answer = _ask(
            console, f"{what}: {listing}" + (" (Enter: unset)" if optional else "") + " > "
        )
        if not answer and optional:
            return None
        if answer.isdigit() and 1 <= int(answer) <= len(options):
            return options[int(answer) - 1]
        if answer in options:
            return answer
        console.print(f"unknown {what} {answer!r}", markup=False, highlight=False)


def _decide(view: FeatureView, reviewer: str, console: Console) -> dict[str, object] | None:
    """The reviewer's decision on one feature, or None to skip it."""
    while True:
        key = _ask(console, PROMPT).lower()
        if key == "q":
            raise _Quit
        if key == "j":
            show_judges(view, console)
            continue
        if key == "s":
            return None
        if key in KEYS:
            break
        console.print(f"unknown choice {key!r}", markup=False, highlight=False)
    fields: dict[str, object] = {
        "feature_id": view.feature_id,
        "reviewer": reviewer,
        "category": KEYS[key],
    }
    if KEYS[key] == "reasoning":
        fields["subcategory"] = _choose(console, "subcategory", SUBCATEGORIES, optional=True)
        fields["mechanism"] = _choose(console, "mechanism", MECHANISMS, optional=True)
    elif KEYS[key] == "domain":
        fields["domain_type"] = _choose(console, "domain type", DOMAIN_TYPES, optional=False)
    fields["note"] = _ask(console, "note (Enter: none) > ")
    return fields


def review_in_terminal(
    run: RunData,
    store: LabelStore,
    rules: DisputeRules,
    reviewer: str,
    include_decided: bool,
    console: Console,
) -> None:
    queue = review_queue(store, rules, include_decided)
    if not queue:
        console.print("nothing to review: no disputed feature is waiting for a decision")
        return
    decided = skipped = 0
    try:
        for position, item in enumerate(queue, 1):
            view = feature_view(run, store, item.feature_id, rules)
            show_feature(view, console, f"{position} of {len(queue)}")
            fields = _decide(view, reviewer, console)
            if fields is None:
                record_decision(
                    store, {"feature_id": view.feature_id, "reviewer": reviewer, "action": "skip"}
                )
                skipped += 1
                continue
            stored = record_decision(store, fields)
            decided += 1
            console.print(
                f"saved: {stored.feature_id} {stored.category} by {reviewer}",
                markup=False,
                highlight=False,
            )
    except _Quit:
        pass
    console.print(
        f"{decided} decided and {skipped} skipped by {reviewer}; decisions are in {store.path}",
        markup=False,
        highlight=False,
    )
