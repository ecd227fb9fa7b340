"""The heuristic judge: offline, free, deterministic.

Method (documented in docs/heuristic-judge.md):

1. **Activating tokens.** Each top and random example contributes one vote for its
   activating token, normalized (``prompts.normalize_token``).
2. **Explanation.** The tokens covering 80% of the votes (at most six) form the
   feature's *pattern*; the explanation names them, the region where the feature fires
   most, and, for an output feature (step 4), the logit-lens tokens it promotes. With
   ``explain_from`` holding ``outputs``: the logit-lens tokens that dominate (10x the
   tenth listed) whatever the classification, and the tokens steering promotes where
   ``score-outputs`` ran.
3. **Detection.** A snippet is predicted activating when it contains a pattern token.
   Scored as in the paper on 5 top and 5 random positives, each set with 5 corpus
   windows checked to be non-activating; positives are cut to the negatives' width
   around the activating token so length gives nothing away.
4. **Classification** by the taxonomy's cue words (numbers count as math):
   - *output*: two or more of the three most promoted tokens are reasoning cue words
     that stand out (a logit-lens value at least 1.5x the tenth-ranked one; random
     decoder columns have no such outliers);
   - otherwise the category holding at least 60% of the votes wins; a reasoning
     feature is ``input_simple`` with at most three distinct activating tokens and
     ``input_abstract`` with more;
   - otherwise a feature firing (by count) at least 90% inside one corpus domain and
     over-represented there (1.2x its share of corpus tokens) is a domain feature of that type;
   - otherwise uninterpretable.
   Confidence: high at 85% or more of the votes (or three promoted cue words), medium at
   70%, low below.
5. **Fuzzing** (when asked): an example's marks are judged right when every marked
   token is a pattern token.
6. **Intruder** (when asked; the explanation is not used): a token's *keys* are the
   token and, where it is a cue word, its cue group. In a trial, a key found in all windows
   but one points at that window; of the keys that do, the one doing so in the most
   trials wins; a trial without such a key gets a seeded guess.
7. **Resamples** (``label --resamples K``): step 4 again on ``K`` seeded random halves
   of the examples (``judges.resampling``); the label stays step 4 on all of them.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass

from labeler.judges import metrics
from labeler.judges.prompting import SNIPPET_AFTER, SNIPPET_BEFORE
from labeler.judges.resampling import resampled_record, resampling
from labeler.judges.scorers import (
    DEFAULT_SCORERS,
    FuzzItem,
    IntruderTrial,
    explained_hash,
    fuzz_items,
    intruder_score,
    intruder_trials,
)
from labeler.run.schemas import (
    Classification,
    DetectionScore,
    Example,
    FeatureRecord,
    IntruderScore,
    Judgment,
    Resampling,
    Snippet,
)
from prompts import Taxonomy, load_taxonomy, normalize_token, taxonomy_hash

PATTERN_COVERAGE = 0.8
PATTERN_MAX = 6
CATEGORY_SHARE = 0.6
DOMAIN_SHARE = 0.9
DOMAIN_ENRICHMENT = 1.2
OUTLIER_RATIO = 1.5
NAMED_OUTPUT_RATIO = 10.0
N_POSITIVES = 5


@dataclass(frozen=True)
class Votes:
    by_token: Counter[str]
    total: int


def activating_votes(feature: FeatureRecord) -> Votes:
    votes: Counter[str] = Counter()
    for example in feature.examples:
        token = example.tokens[example.highlight]
        votes[normalize_token(token) or token] += 1
    return Votes(votes, sum(votes.values()))


def pattern_of(votes: Votes) -> list[str]:
    pattern: list[str] = []
    covered = 0
    for token, n in votes.by_token.most_common(PATTERN_MAX):
        pattern.append(token)
        covered += n
        if covered >= PATTERN_COVERAGE * votes.total:
            break
    return pattern


def _cue(taxonomy_index: dict[str, tuple[str, str]], token: str) -> tuple[str, str] | None:
    if token in taxonomy_index:
        return taxonomy_index[token]
    if token.replace(".", "", 1).isdigit():
        return ("domain", "math")
    return None


def _window(example: Example) -> list[str]:
    lo = max(0, example.highlight - SNIPPET_BEFORE)
    return example.tokens[lo : example.highlight + SNIPPET_AFTER + 1]


def detection_score(pattern: list[str], snippets: list[Snippet]) -> DetectionScore:
    """A snippet is predicted active when it holds a pattern token."""
    wanted = set(pattern)
    predicted = [any((normalize_token(t) or t) in wanted for t in s.tokens) for s in snippets]
    return metrics.detection_score([s.activating for s in snippets], predicted)


def fuzz_score(pattern: list[str], items: list[FuzzItem]) -> DetectionScore:
    """Marks are judged right when every marked token is a pattern token."""
    wanted = set(pattern)
    predicted = [
        all((normalize_token(it.tokens[i]) or it.tokens[i]) in wanted for i in it.marked)
        for it in items
    ]
    return metrics.detection_score([it.correct for it in items], predicted)


def intruder_picks(
    trials: list[IntruderTrial], cues: dict[str, tuple[str, str]], seed: int
) -> list[int]:
    """The window each trial's intruder is guessed to be (module docstring, step 6)."""

    def keys(token: str) -> set[str]:
        norm = normalize_token(token) or token
        cue = _cue(cues, norm)
        return {norm, f"{cue[0]}/{cue[1]}"} if cue else {norm}

    keyed = [[set().union(*(keys(t) for t in w)) for w in trial.windows] for trial in trials]
    pointers: list[dict[str, int]] = []  # per trial: key -> the one window lacking it
    for windows in keyed:
        size = len(windows)
        counts = Counter(k for w in windows for k in w)
        pointers.append({
            k: next(i for i, w in enumerate(windows) if k not in w)
            for k, n in counts.items() if n == size - 1
        })  # fmt: skip
    strength = Counter(k for found in pointers for k in found)
    rng = random.Random(seed)
    picks: list[int] = []
    for trial, found in zip(trials, pointers, strict=True):
        if found:
            best = max(found, key=lambda k: (strength[k], k))
            picks.append(found[best])
        else:
            picks.append(rng.randrange(len(trial.windows)))
    return picks


def _outlier_floor(feature: FeatureRecord) -> float:
    """A logit-lens value standing out: at least 1.5x the last (tenth) one listed."""
    return OUTLIER_RATIO * feature.top_logit_values[-1] if feature.top_logit_values else 0.0


def _standing_out(feature: FeatureRecord) -> list[str]:
    """The logit lens's top three tokens whose values stand out (none for a random
    decoder column)."""
    floor = _outlier_floor(feature)
    return [
        t
        for t, v in zip(feature.top_logits[:3], feature.top_logit_values[:3], strict=False)
        if v >= floor > 0
    ]


def _dominant_outputs(feature: FeatureRecord) -> list[str]:
    """The logit lens's top three tokens at least ``NAMED_OUTPUT_RATIO`` times the tenth
    one listed: what an explanation from outputs names. On the demo a random decoder
    column's top token is at most 6x its tenth, a planted output feature's over 100x."""
    values = feature.top_logit_values
    if not values or values[-1] <= 0:
        return []
    floor = NAMED_OUTPUT_RATIO * values[-1]
    return [t for t, v in zip(feature.top_logits[:3], values[:3], strict=False) if v >= floor]


def _confidence(share: float) -> str:
    return "high" if share >= 0.85 else "medium" if share >= 0.7 else "low"


def _quote(tokens: list[str]) -> str:
    return ", ".join(f"'{t}'" for t in tokens)


class HeuristicJudge:
    """Token statistics and the taxonomy's cue words; see the module docstring."""

    calls_per_feature = 0

    def __init__(
        self,
        name: str = "heuristic",
        taxonomy: Taxonomy | None = None,
        scorers: tuple[str, ...] = DEFAULT_SCORERS,
        seed: int = 0,
        explain_from: tuple[str, ...] = ("examples",),
        resamples: int = 0,
    ) -> None:
        self.name = name
        self.resamples = resamples
        self.explain_from = tuple(explain_from)
        self.scorers = tuple(scorers)
        self.seed = seed
        self.taxonomy = taxonomy or load_taxonomy()
        self.cues = self.taxonomy.cue_index()
        self.prompt_hash = explained_hash(taxonomy_hash(), self.explain_from)

    def limit_requests(self, n: int) -> None:
        """No requests: nothing to limit."""

    def preflight(self) -> None:
        """Always ready."""

    async def aclose(self) -> None:
        """Holds nothing."""

    async def judge(self, feature: FeatureRecord, negatives: dict[str, list[Snippet]]) -> Judgment:
        votes = activating_votes(feature)
        pattern = pattern_of(votes)
        classification = self.classify(feature, votes)
        by_set: dict[str, DetectionScore] = {}
        pooled: list[Snippet] = []
        for kind in ("top", "random"):
            positives = [
                Snippet(tokens=_window(e), activating=True)
                for e in feature.of_kind(kind)[:N_POSITIVES]
            ]
            snippets = positives + negatives.get(kind, [])
            if positives:
                by_set[kind] = detection_score(pattern, snippets)
                pooled += snippets
        return Judgment(
            feature_id=feature.feature_id,
            judge=self.name,
            prompt_hash=self.prompt_hash,
            explanation=self.explain(feature, pattern, classification),
            detection=detection_score(pattern, pooled),
            detection_by_set=by_set,
            classification=classification,
            fuzz=fuzz_score(pattern, fuzz_items(feature, self.seed))
            if "fuzz" in self.scorers
            else None,
            intruder=self.intruder(feature, negatives.get("intruder", []))
            if "intruder" in self.scorers
            else None,
            resamples=self.resample(feature, classification) if self.resamples else None,
            cost_usd=0.0,
        )

    def resample(self, feature: FeatureRecord, label: Classification) -> Resampling:
        """The classification on each of ``resamples`` seeded halves of the examples,
        against the label (the classification on all of them)."""
        categories: list[str] = []
        for number in range(self.resamples):
            part = resampled_record(feature, feature.examples, self.seed, number)
            categories.append(self.classify(part, activating_votes(part)).category)
        return resampling(categories, label.category)

    def intruder(self, feature: FeatureRecord, intruders: list[Snippet]) -> IntruderScore:
        trials = intruder_trials(feature, intruders, self.seed)
        seed = self.seed * 7919 + feature.layer * 1_000_003 + feature.index
        picks = intruder_picks(trials, self.cues, seed)
        return intruder_score([t.intruder for t in trials], picks)

    def explain(
        self, feature: FeatureRecord, pattern: list[str], classification: Classification
    ) -> str:
        region = max(feature.by_region, key=lambda r: feature.by_region[r])
        text = f"Fires on {_quote(pattern)}, mostly in the {region.replace('_', ' ')} region"
        if "outputs" in self.explain_from:
            named = list(dict.fromkeys(normalize_token(t) for t in _dominant_outputs(feature)))
            if named:
                text += f"; promotes {_quote(named)}"
            if feature.steering_promotes:
                steered = list(
                    dict.fromkeys(normalize_token(t) for t in feature.steering_promotes[:3])
                )
                text += f"; steering it raises {_quote(steered)}"
        elif classification.mechanism == "output":
            text += f"; promotes {_quote([normalize_token(t) for t in feature.top_logits[:3]])}"
        return text + "."

    def classify(self, feature: FeatureRecord, votes: Votes) -> Classification:
        promoted = [_cue(self.cues, normalize_token(t)) for t in _standing_out(feature)]
        promoted_reasoning = [c[1] for c in promoted if c and c[0] == "reasoning"]
        if len(promoted_reasoning) >= 2:
            sub = Counter(promoted_reasoning).most_common(1)[0][0]
            return Classification(
                category="reasoning",
                subcategory=sub,
                mechanism="output",
                confidence="high" if len(promoted_reasoning) == 3 else "medium",
                rationale=f"its top promoted tokens are {sub} cue words",
            )
        groups: Counter[tuple[str, str]] = Counter()
        categories: Counter[str] = Counter()
        for token, n in votes.by_token.items():
            cue = _cue(self.cues, token)
            if cue:
                groups[cue] += n
                categories[cue[0]] += n
        if categories:
            category, mass = categories.most_common(1)[0]
            share = mass / votes.total
            if share >= CATEGORY_SHARE:
                return self._by_category(category, share, groups, votes)
        return self._by_domain_or_uninterpretable(feature)

    def _by_category(
        self, category: str, share: float, groups: Counter[tuple[str, str]], votes: Votes
    ) -> Classification:
        group = max((g for g in groups if g[0] == category), key=lambda g: groups[g])[1]
        confidence = _confidence(share)
        rationale = f"{share:.0%} of its activating tokens are {category} cue words"
        if category == "reasoning":
            distinct = [t for t in votes.by_token if (c := _cue(self.cues, t)) and c[0] == category]
            mechanism = "input_simple" if len(distinct) <= 3 else "input_abstract"
            return Classification(
                category="reasoning", subcategory=group, mechanism=mechanism,
                confidence=confidence, rationale=rationale,
            )  # fmt: skip
        if category == "domain":
            return Classification(
                category="domain", domain_type=group, confidence=confidence, rationale=rationale
            )
        return Classification(category="language", confidence=confidence, rationale=rationale)

    def _by_domain_or_uninterpretable(self, feature: FeatureRecord) -> Classification:
        total = sum(feature.by_domain.values())
        if total:
            domain, count = max(feature.by_domain.items(), key=lambda kv: kv[1])
            share = count / total
            base = feature.corpus_domain_share.get(domain, 1.0)
            enriched = share >= DOMAIN_ENRICHMENT * base
            if share >= DOMAIN_SHARE and enriched and domain in self.taxonomy.domain_types:
                return Classification(
                    category="domain",
                    domain_type=domain,
                    confidence="low",
                    rationale=f"{share:.0%} of its activations are in {domain} traces",
                )
        return Classification(
            category="uninterpretable",
            confidence="medium",
            rationale="its activating tokens share no cue category and no domain",
        )
