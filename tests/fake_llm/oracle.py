"""A rule-based "model" answering the labeler's prompts from their text alone.

It imitates the heuristic judge (``labeler.judges.heuristic``) on what a prompt shows:
the marked ``<<token>>`` of each example, the promoted tokens with their logit-lens
values and the share of activations by domain. The task is read from the first line of
the user text (``TASK: EXPLAIN`` / ``TASK: DETECT`` / ``TASK: CLASSIFY`` / ``TASK: FUZZ``
/ ``TASK: INTRUDER``).

:func:`biased_oracle` is the same oracle with a scripted bias in its classifier: it
calls a third of the reasoning features ``language``, and on fewer examples than a full
view (``label --resamples``) it does so only for about 70% of the subsets, so that its
resampled answers disagree where it is wrong.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from functools import cache
from typing import Any

from labeler.judges.heuristic import intruder_picks
from labeler.judges.scorers import IntruderTrial
from prompts import load_taxonomy, normalize_token
from tests.fake_llm.server import FakeAnswer, FakeRequest

PATTERN_COVERAGE = 0.8
PATTERN_MAX = 6
CATEGORY_SHARE = 0.6
DOMAIN_SHARE = 0.9
OUTLIER_RATIO = 1.5
P_TRUE = 0.9
P_FALSE = 0.1

_EXAMPLE_HEADER = re.compile(r"^Example \d+ \(activation [^)]*\):$")
_MARK_START = re.compile(r"<<")
_MARKED = re.compile(r"<<(.*?)>>(?!>)")
_FIRST_ACTIVE = re.compile(r'^Active tokens: "(.*?)" [-+0-9.e]+(?:, |$)')
_PROMOTED = re.compile(r'"(.*?)" ([+-](?:inf|nan|[0-9.]+(?:e[+-]?\d+)?))(?=, "|$)')
_DOMAIN_SHARE = re.compile(r"^(.+) (\d+(?:\.\d+)?)%$")
_SNIPPET = re.compile(r"^Snippet (\d+): ?(.*)$")
_FUZZ_EXAMPLE = re.compile(r"^Example (\d+): ?(.*)$")
_TRIAL = re.compile(r"^Trial (\d+):$")
_WINDOW = re.compile(r"^Window (\d+): ?(.*)$")
# how the oracle cuts a window's text back into tokens: words with their leading space,
# and every other character alone (close to how the planted model's tokenizer cuts)
_TOKEN = re.compile(r" ?\w+|\s|[^\w\s]")
_QUOTED = re.compile(r"'(.+?)'(?=[,.;:)!?]|\s|$)")
DESCRIPTION_PREFIX = 'A feature is described as: "'


@cache
def _cues() -> dict[str, tuple[str, str]]:
    return load_taxonomy().cue_index()


def _cue(token: str) -> tuple[str, str] | None:
    cues = _cues()
    if token in cues:
        return cues[token]
    if token.replace(".", "", 1).isdigit():
        return ("domain", "math")
    return None


def _unvisible(token: str) -> str:
    """Undo the prompt's rendering of newlines as ``\\n``."""
    return token.replace("\\n", "\n")


def _vote_key(token: str) -> str:
    raw = _unvisible(token)
    return normalize_token(raw) or raw


def _visible(token: str) -> str:
    return token.replace("\n", "\\n")


# --- reading the prompt ---------------------------------------------------------------------


def _marked_token(window: str, first_active: str | None) -> str | None:
    """The ``<<token>>`` of an example window. Text can hold ``<<`` itself (code), so
    every candidate is tried: the one matching the most active token wins, else the
    shortest."""
    candidates: list[str] = []
    for start in _MARK_START.finditer(window):
        match = _MARKED.match(window, start.start())
        if match:
            candidates.append(match.group(1))
    if not candidates:
        return None
    if first_active is not None:
        for candidate in candidates:
            if candidate.strip() == first_active:
                return candidate
    return min(candidates, key=len)


def marked_tokens(user: str) -> list[str]:
    """The marked token of every example, as shown (newlines as ``\\n``)."""
    lines = user.split("\n")
    found: list[str] = []
    for i, line in enumerate(lines):
        if not _EXAMPLE_HEADER.match(line) or i + 1 >= len(lines):
            continue
        active = _FIRST_ACTIVE.match(lines[i + 2]) if i + 2 < len(lines) else None
        token = _marked_token(lines[i + 1], active.group(1) if active else None)
        if token is not None:
            found.append(token)
    return found


def votes_of(user: str) -> Counter[str]:
    return Counter(_vote_key(t) for t in marked_tokens(user))


def pattern_of(votes: Counter[str]) -> list[str]:
    total = sum(votes.values())
    pattern: list[str] = []
    covered = 0
    for token, n in votes.most_common(PATTERN_MAX):
        pattern.append(token)
        covered += n
        if covered >= PATTERN_COVERAGE * total:
            break
    return pattern


def promoted_tokens(user: str) -> list[tuple[str, float]]:
    """The ``Promoted tokens`` line's tokens with their values (empty without values)."""
    for line in user.split("\n"):
        if line.startswith("Promoted tokens"):
            _, _, listed = line.partition("): ")
            return [(token, float(value)) for token, value in _PROMOTED.findall(listed)]
    return []


def domain_shares(user: str) -> dict[str, float]:
    for line in user.split("\n"):
        _, sep, listed = line.partition("; by domain: ")
        if not sep:
            continue
        shares: dict[str, float] = {}
        for item in listed.rstrip(".").split(", "):
            match = _DOMAIN_SHARE.match(item.strip())
            if match:
                shares[match.group(1).replace(" ", "_")] = float(match.group(2)) / 100
        return shares
    return {}


def description_of(user: str) -> str:
    for line in user.split("\n"):
        if line.startswith(DESCRIPTION_PREFIX):
            text = line[len(DESCRIPTION_PREFIX) :]
            return text[:-1] if text.endswith('"') else text
    return ""


def quoted_tokens(description: str) -> list[str]:
    return _QUOTED.findall(description)


def snippets_of(user: str) -> list[str]:
    return [m.group(2) for line in user.split("\n") if (m := _SNIPPET.match(line))]


# --- the three tasks ------------------------------------------------------------------------


def _quote(tokens: list[str]) -> str:
    return ", ".join(f"'{_visible(t)}'" for t in tokens)


OUTPUTS_HEADER = "What it does to the model's output:"
STEERED_PREFIX = "Tokens made more likely when the feature is steered: "
NAMED_OUTPUT_RATIO = 10.0


def steered_tokens(user: str) -> list[str]:
    for line in user.split("\n"):
        if line.startswith(STEERED_PREFIX):
            return re.findall(r'"(.*?)"(?=, "|$)', line[len(STEERED_PREFIX) :])
    return []


def explain(user: str) -> FakeAnswer:
    """The marked tokens; with the outputs section (``--explain-from outputs``), also the
    logit lens's dominant tokens (10x the last listed, as the heuristic judge names them)
    and the first tokens steering raises."""
    pattern = pattern_of(votes_of(user))
    parts = [f"Fires on {_quote(pattern)}"] if pattern else []
    if OUTPUTS_HEADER in user:
        promoted = promoted_tokens(user)
        floor = NAMED_OUTPUT_RATIO * promoted[-1][1] if promoted else 0.0
        named = list(dict.fromkeys(_vote_key(t) for t, v in promoted[:3] if v >= floor > 0))
        if named:
            parts.append(f"promotes {_quote(named)}")
        steered = list(dict.fromkeys(_vote_key(t) for t in steered_tokens(user)[:3]))
        if steered:
            parts.append(f"steering it raises {_quote(steered)}")
    text = "; ".join(parts) + "." if parts else "No recognizable pattern."
    return FakeAnswer({"explanation": text})


def _token_regex(token: str) -> re.Pattern[str]:
    before = r"(?<!\w)" if re.match(r"\w", token) else ""
    after = r"(?!\w)" if re.search(r"\w$", token) else ""
    return re.compile(before + re.escape(token) + after, re.IGNORECASE)


def detect(user: str) -> FakeAnswer:
    patterns = [_token_regex(t) for t in quoted_tokens(description_of(user))]
    activating = [any(p.search(s) for p in patterns) for s in snippets_of(user)]
    return FakeAnswer({"activating": activating}, [P_TRUE if a else P_FALSE for a in activating])


def _confidence(share: float) -> str:
    return "high" if share >= 0.85 else "medium" if share >= 0.7 else "low"


def _classification(
    category: str,
    confidence: str,
    rationale: str,
    subcategory: str | None = None,
    mechanism: str | None = None,
    domain_type: str | None = None,
) -> dict[str, Any]:
    return {
        "category": category,
        "subcategory": subcategory,
        "mechanism": mechanism,
        "domain_type": domain_type,
        "confidence": confidence,
        "rationale": rationale[0].upper() + rationale[1:] + ".",
    }


def classify(user: str) -> FakeAnswer:
    promoted = promoted_tokens(user)
    floor = OUTLIER_RATIO * promoted[-1][1] if promoted else 0.0
    promoted_reasoning: list[str] = []
    for token, value in promoted[:3]:
        cue = _cue(normalize_token(_unvisible(token))) if value >= floor > 0 else None
        if cue and cue[0] == "reasoning":
            promoted_reasoning.append(cue[1])
    if len(promoted_reasoning) >= 2:
        sub = Counter(promoted_reasoning).most_common(1)[0][0]
        return FakeAnswer(
            _classification(
                "reasoning",
                "high" if len(promoted_reasoning) == 3 else "medium",
                f"its top promoted tokens are {sub} cue words",
                subcategory=sub,
                mechanism="output",
            )
        )
    votes = votes_of(user)
    total = sum(votes.values())
    groups: Counter[tuple[str, str]] = Counter()
    categories: Counter[str] = Counter()
    for token, n in votes.items():
        cue = _cue(token)
        if cue:
            groups[cue] += n
            categories[cue[0]] += n
    if categories:
        category, mass = categories.most_common(1)[0]
        share = mass / total
        if share >= CATEGORY_SHARE:
            group = max((g for g in groups if g[0] == category), key=lambda g: groups[g])[1]
            confidence = _confidence(share)
            rationale = f"{share:.0%} of its activating tokens are {category} cue words"
            if category == "reasoning":
                distinct = [t for t in votes if (c := _cue(t)) and c[0] == "reasoning"]
                mechanism = "input_simple" if len(distinct) <= 3 else "input_abstract"
                return FakeAnswer(
                    _classification(
                        "reasoning", confidence, rationale, subcategory=group, mechanism=mechanism
                    )
                )
            if category == "domain":
                return FakeAnswer(
                    _classification("domain", confidence, rationale, domain_type=group)
                )
            return FakeAnswer(_classification(category, confidence, rationale))
    shares = domain_shares(user)
    if shares:
        domain, share = max(shares.items(), key=lambda kv: kv[1])
        if share >= DOMAIN_SHARE and domain in load_taxonomy().domain_types:
            return FakeAnswer(
                _classification(
                    "domain",
                    "low",
                    f"{share:.0%} of its activations are in {domain} traces",
                    domain_type=domain,
                )
            )
    return FakeAnswer(
        _classification(
            "uninterpretable", "medium", "its activating tokens share no cue category and no domain"
        )
    )


def fuzz(user: str) -> FakeAnswer:
    """Marks are right when every marked token is one the description quotes (the
    heuristic judge's rule, ``fuzz_score``)."""
    quoted = {_vote_key(t) for t in quoted_tokens(description_of(user))}
    correct: list[bool] = []
    for line in user.split("\n"):
        match = _FUZZ_EXAMPLE.match(line)
        if match:
            marked = _MARKED.findall(match.group(2))
            correct.append(bool(marked) and all(_vote_key(t) in quoted for t in marked))
    return FakeAnswer({"correct": correct}, [P_TRUE if c else P_FALSE for c in correct])


def trials_of(user: str) -> list[list[str]]:
    """Each trial's windows, as shown."""
    trials: list[list[str]] = []
    for line in user.split("\n"):
        if _TRIAL.match(line):
            trials.append([])
        elif (match := _WINDOW.match(line)) and trials:
            trials[-1].append(match.group(2))
    return trials


def intruder(user: str) -> FakeAnswer:
    """The heuristic judge's rule (``intruder_picks``) on the windows cut back into
    tokens; numbered from 1 as the prompt numbers them."""
    trials = [
        IntruderTrial(windows=[_TOKEN.findall(_unvisible(w)) for w in windows], intruder=0)
        for windows in trials_of(user)
    ]
    picks = intruder_picks(trials, _cues(), seed=len(user))
    return FakeAnswer({"intruders": [p + 1 for p in picks]})


TASKS = {
    "TASK: EXPLAIN": explain,
    "TASK: DETECT": detect,
    "TASK: CLASSIFY": classify,
    "TASK: FUZZ": fuzz,
    "TASK: INTRUDER": intruder,
}


# --- a biased classifier ---------------------------------------------------------------------

BIASED_ONE_IN = 3
"""One reasoning feature in this many is mislabeled ``language`` by the biased oracle."""
BIASED_SUBSET_SHARE = 0.7
"""Shown fewer examples than a full view, the biased oracle keeps its mislabel on about
this share of the subsets (and answers as the oracle on the others)."""
FULL_VIEW = 10
"""Examples a full classification prompt shows (``--n-examples``' default)."""
_FEATURE_LINE = re.compile(r"^Feature (\S+) \(layer \d+\)\.$", re.MULTILINE)


def _stable(text: str) -> int:
    """A hash of ``text`` that is the same in every process (unlike ``hash``)."""
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")


def feature_shown(user: str) -> str:
    """The feature's identity as a classification prompt shows it (``Feature L3/12``)."""
    match = _FEATURE_LINE.search(user)
    return match.group(1) if match else ""


def biased_feature(feature_id: str) -> bool:
    """Whether the biased oracle mislabels this feature (when it is a reasoning one)."""
    return _stable(f"biased:{feature_id}") % BIASED_ONE_IN == 0


def biased_classify(user: str) -> FakeAnswer:
    """The oracle's classification, but a reasoning feature chosen by
    :func:`biased_feature` is called ``language``: always on a full view, and on a
    subset of its examples (a resample) for about ``BIASED_SUBSET_SHARE`` of subsets,
    chosen by a hash of the prompt (the feature and the examples shown)."""
    answer = classify(user)
    feature = feature_shown(user)
    if answer.content["category"] != "reasoning" or not biased_feature(feature):
        return answer
    shown = marked_tokens(user)
    # the examples shown (their windows, not only their activations, which a planted
    # feature may share) decide a subset's answer
    if len(shown) < FULL_VIEW and _stable(user) % 100 >= round(100 * BIASED_SUBSET_SHARE):
        return answer
    return FakeAnswer(
        _classification("language", "medium", "its activating tokens are ordinary words")
    )


BIASED_TASKS = TASKS | {"TASK: CLASSIFY": biased_classify}


def _answer(request: FakeRequest, tasks: dict[str, Any]) -> FakeAnswer:
    first = request.user.lstrip().split("\n", 1)[0].strip()
    task = tasks.get(first)
    if task is None:
        raise ValueError(f"the oracle does not know the task {first!r}")
    answer: FakeAnswer = task(request.user)
    return answer


def biased_oracle(request: FakeRequest) -> FakeAnswer:
    """:func:`oracle` with the biased classifier (:func:`biased_classify`): a scripted
    judge that is wrong on some reasoning features and unsure there when resampled."""
    return _answer(request, BIASED_TASKS)


def oracle(request: FakeRequest) -> FakeAnswer:
    """Answer an EXPLAIN, DETECT, CLASSIFY, FUZZ or INTRUDER prompt; anything else raises ValueError
    (the server answers 500)."""
    return _answer(request, TASKS)


__all__ = ["biased_feature", "biased_oracle", "oracle"]
