"""The LLM judge: explainer, detection scorer and classifier over one injected backend.

Per feature: one explanation call, then, concurrently, two detection calls (top and
random positives, each mixed with checked negatives), one call per scorer asked for
beyond detection (fuzzing, intruder: ``judges.scorers``) and one classification call;
with ``resamples`` K, K more classification calls on seeded halves of the examples
(``judges.resampling``), made at once as one ``resample`` stage.
A chat backend answers each with a validated JSON object; a likelihood backend (an
open model in-process) detects, fuzzes, picks intruders and classifies by the
likelihood of each allowed answer and generates only the explanation.

Every call goes through the retry policy; an invalid reply is asked again once, then
the feature fails with the reason. Tokens are counted per stage, failed attempts
included, and priced.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

from pydantic import BaseModel, ValidationError

from labeler.errors import JudgeFailure, Reschedule
from labeler.judges.backend import (
    STAGES,
    BackendError,
    ChatBackend,
    InvalidReply,
    LikelihoodBackend,
    OptionScores,
    Prompt,
    Reply,
    Stage,
    TransientError,
)
from labeler.judges.halting import CallLog, SendGuard
from labeler.judges.pricing import PriceTable, Tier
from labeler.judges.prompting import (
    classify_prompt,
    detect_prompt,
    detection_snippets,
    explain_prompt,
    fuzz_prompt,
    intruder_prompt,
    likelihood_classify_prompt,
    likelihood_detect_prompt,
    likelihood_fuzz_prompt,
    likelihood_intruder_prompt,
)
from labeler.judges.ratelimit import RateLimiter
from labeler.judges.replies import (
    ClassificationReply,
    DetectionReply,
    ExplanationReply,
    FuzzReply,
    IntruderReply,
    check_explanation,
    check_intruders,
    validation_reason,
)
from labeler.judges.requests import (
    ApiRequest,
    AwaitingReply,
    BatchReplies,
    KeptReply,
    ReplyCache,
    served_by,
)
from labeler.judges.resampling import resampled_record
from labeler.judges.retry import RetryPolicy, with_retries
from labeler.judges.scorers import (
    DEFAULT_SCORERS,
    FuzzItem,
    IntruderTrial,
    Scorer,
    explained_hash,
    fuzz_items,
    intruder_trials,
)
from labeler.judges.stages import (
    SCORER_STAGES,
    Detection,
    Intrusion,
    StageName,
    StageOutcome,
    add_usage,
    assemble,
)
from labeler.redaction import redact_json
from labeler.run.schemas import (
    Classification,
    FeatureRecord,
    Judgment,
    Snippet,
    Usage,
)
from prompts import CATEGORIES, DOMAIN_TYPES, MECHANISMS, SUBCATEGORIES, Category, prompt_hash

log = logging.getLogger(__name__)

T = TypeVar("T", bound=BaseModel)
V = TypeVar("V")

DETECTION_SETS = ("top", "random")
CALLS_PER_FEATURE = 4  # explain, detect top, detect random, classify; one more per scorer


@dataclass(frozen=True)
class JudgeSettings:
    """What a judge shows the model and how it asks."""

    n_examples: int = 10
    """Top examples shown to the explainer and the classifier."""
    n_logits: int = 15
    """Logit-lens tokens shown to the classifier."""
    n_positives: int = 5
    """Positives per detection set (each set also gets up to 5 checked negatives)."""
    logprobs: bool = False
    """Ask chat backends for token log probabilities, for a detection AUROC (not every
    model offers them: OpenAI's reasoning models do not)."""
    explanation_tokens: int = 48
    """New tokens an in-process model may generate for an explanation."""
    seed: int = 0
    """Seeds the detection sets' order, the fuzzing sets and the intruder trials."""
    scorers: tuple[Scorer, ...] = DEFAULT_SCORERS
    """Scorers every judgment carries: each beyond detection is one more call."""
    resamples: int = 0
    """Classifications more per feature, each on a seeded half of the examples the
    classifier is shown (``judges.resampling``); 0: none."""
    explain_from: tuple[str, ...] = ("examples",)
    """What the explainer sees: the top examples and/or what the feature does to the
    output (``judges.prompting.render_outputs``)."""
    output_allowance: int = 256
    """Output tokens reserved per request by a tokens-per-minute limit until the real
    count is known."""


Pricer = Callable[[Usage, Tier], "float | None"]


@dataclass
class Ledger:
    """What one stage's calls used, per stage, what they cost (None once a price is
    unknown), and the replies it accepted (for the reply cache)."""

    price: Pricer
    usage: dict[str, Usage] = field(default_factory=dict)
    cost: float | None = 0.0
    kept: list[KeptReply] = field(default_factory=list)
    tickets: list[str] = field(default_factory=list)
    """Calls answered (``CallLog`` tickets) whose usage is in this ledger: ended in the
    journal once the stage's outcome, with that usage, is stored."""

    def add(self, stage: Stage, usage: Usage, tier: Tier = "standard") -> None:
        self.usage[stage] = self.usage.get(stage, Usage()) + usage
        part = self.price(usage, tier)
        self.cost = None if self.cost is None or part is None else self.cost + part

    def take(self, other: Ledger) -> None:
        """Add what ``other`` (one call's own ledger) holds."""
        for stage, usage in other.usage.items():
            self.usage[stage] = self.usage.get(stage, Usage()) + usage
        self.cost = None if self.cost is None or other.cost is None else self.cost + other.cost
        self.kept += other.kept
        self.tickets += other.tickets


class LLMJudge:
    """A judge backed by a chat model or an in-process open model."""

    def __init__(
        self,
        name: str,
        backend: ChatBackend | LikelihoodBackend,
        settings: JudgeSettings | None = None,
        retry: RetryPolicy | None = None,
        prices: PriceTable | None = None,
    ) -> None:
        self.name = name
        self.backend = backend
        # a runtime protocol check costs tens of microseconds: made once here
        self._chat = backend if isinstance(backend, ChatBackend) else None
        self._likely = None if self._chat is not None else cast(LikelihoodBackend, backend)
        self.settings = settings or JudgeSettings()
        self.scorers: tuple[Scorer, ...] = self.settings.scorers
        self.resamples = self.settings.resamples
        self.calls_per_feature = (
            CALLS_PER_FEATURE + sum(s in SCORER_STAGES for s in self.scorers) + self.resamples
        )
        """Model calls per feature: explain, two detection sets, classify, one per scorer
        beyond detection and one per resample (a likelihood backend's calls are batches
        of prompts)."""
        self.retry = retry or RetryPolicy()
        self.prices = prices
        self.prompt_hash = explained_hash(prompt_hash(), self.settings.explain_from)
        self._gate: asyncio.Semaphore | None = None
        self.limiter: RateLimiter | None = None
        """Shared requests- and tokens-per-minute limits (set by the executor)."""
        self.replies: ReplyCache | None = None
        """Replies kept earlier, answering a request at no cost (set by the transport)."""
        self.keep_now: Callable[[list[KeptReply]], None] | None = None
        """Keeps replies in the reply cache at once (set by the local transport): a
        resample stage's answered calls, so that a labeler killed before the stage ends
        does not pay for them again."""
        self.batch: BatchReplies | None = None
        """Set by the batch transport: requests are answered from provider batches."""
        self.calls: CallLog | None = None
        """Notes each paid call as it is sent and ends (set by the transport)."""
        self.guard: SendGuard | None = None
        """Cleared before every call and pausing between tries (set by the transport):
        a stopped labeling sends nothing more."""
        self._other_models: set[str] = set()
        """Models a server replied as instead of the one asked for (warned about once)."""

    def limit_requests(self, n: int) -> None:
        """At most ``n`` requests in flight from now on (call inside the running loop)."""
        self._gate = asyncio.Semaphore(n)

    def preflight(self) -> None:
        check = getattr(self.backend, "preflight", None)
        if check is not None:
            check()

    async def aclose(self) -> None:
        await self.backend.aclose()

    def _estimate(self, prompt: Prompt) -> int:
        """Tokens a request may use, for the rate limiter: its text at about four
        characters a token plus the output allowance."""
        return (len(prompt.system) + len(prompt.user)) // 4 + self.settings.output_allowance

    # -- one feature -------------------------------------------------------------------

    async def judge(self, feature: FeatureRecord, negatives: dict[str, list[Snippet]]) -> Judgment:
        """All stages in this process: the explanation, then detection on each set and
        the classification concurrently."""
        explained = await self.run_stage("explain", feature, negatives)
        outcomes = [explained]
        if explained.ok:
            later = [s for s in self.stages(feature) if s != "explain"]
            outcomes += await asyncio.gather(
                *(self.run_stage(s, feature, negatives, explained.explanation) for s in later)
            )
        failed = [o for o in outcomes if not o.ok]
        if failed:
            raise JudgeFailure(
                failed[0].reason or "unknown", add_usage(*(o.usage for o in outcomes))
            )
        return assemble(outcomes)

    def stages(self, feature: FeatureRecord) -> list[StageName]:
        """The stages in ``stages_for``'s order, whatever the judge's name (a test's or
        a library user's judge may carry any)."""
        sets = [kind for kind in DETECTION_SETS if feature.of_kind(kind)]
        detect: list[StageName] = [f"detect_{kind}" for kind in sets]  # type: ignore[misc]
        more = [SCORER_STAGES[s] for s in self.scorers if s in SCORER_STAGES]
        resample: list[StageName] = ["resample"] if self.resamples else []
        return ["explain", *detect, *more, *resample, "classify"]

    async def run_stage(
        self,
        stage: StageName,
        feature: FeatureRecord,
        negatives: dict[str, list[Snippet]],
        explanation: str | None = None,
    ) -> StageOutcome:
        """One stage of one feature; a failure is returned with its reason and usage. With
        a policy that reschedules rate limits, a 429 raises ``Reschedule`` instead."""
        ledger = Ledger(self._price)
        out = StageOutcome(feature_id=feature.feature_id, judge=self.name,
                           prompt_hash=self.prompt_hash, stage=stage, ok=True)  # fmt: skip
        try:
            if stage == "explain":
                out.explanation = await self._explain(feature, ledger)
            elif stage in ("detect_top", "detect_random"):
                if explanation is None:
                    raise ValueError(f"stage {stage} needs the explanation")
                kind = stage.removeprefix("detect_")
                out.detection = await self._detect_set(
                    feature, kind, negatives.get(kind, []), explanation, ledger
                )
            elif stage == "fuzz":
                if explanation is None:
                    raise ValueError("stage fuzz needs the explanation")
                out.detection = await self._fuzz(feature, explanation, ledger)
            elif stage == "intruder":
                out.intrusion = await self._intruder(feature, negatives.get("intruder", []), ledger)
            elif stage == "classify":
                out.classification = await self._classify(feature, ledger)
            elif stage == "resample":
                out.resampled = await self._resample(feature, ledger)
            else:
                raise ValueError(f"an LLM judge has no stage {stage!r}")
        except Reschedule as exc:  # from a rate limiter: what the stage used so far goes too
            self._settled(ledger)
            raise Reschedule(exc.retry_after, ledger.usage, str(exc)) from exc
        except AwaitingReply as wait:  # what the replies in so far cost goes with it
            self._settled(ledger)
            wait.usage, wait.cost_usd = ledger.usage, ledger.cost
            raise
        except TransientError as exc:
            if exc.kind == "rate_limited" and self.retry.reschedule_rate_limits:
                self._settled(ledger)
                raise Reschedule(exc.retry_after, ledger.usage, exc.reason) from exc
            out.ok, out.reason = False, f"{exc.kind}: {exc.stage}: {exc.reason}"
        except BackendError as exc:
            out.ok, out.reason = False, f"{exc.kind}: {exc.stage}: {exc.reason}"
        out.usage = ledger.usage
        out.cost_usd = ledger.cost
        out.kept = ledger.kept  # accepted replies, kept even when another call failed
        out.hold(ledger.tickets)
        return out

    def _settled(self, ledger: Ledger) -> None:
        """The ledger's calls end here: their usage leaves with an exception that carries
        it to where it is stored (a transport without a journal)."""
        if self.calls is not None:
            for ticket in ledger.tickets:
                self.calls.end(ticket)
        ledger.tickets.clear()

    def cost(self, usage: dict[str, Usage], tier: Tier = "standard") -> float | None:
        return self._price(sum(usage.values(), Usage()), tier)

    def _price(self, usage: Usage, tier: Tier) -> float | None:
        if self.prices is None:
            return None
        if usage == Usage(calls=usage.calls, cached_replies=usage.cached_replies):
            return 0.0  # no tokens: a reply from the cache, or a call refused before use
        return self.prices.cost(self.name, usage, tier)

    @property
    def tier(self) -> Tier:
        """The price tier of this judge's synchronous calls."""
        return self._chat.tier if self._chat is not None else "standard"

    # -- calls ---------------------------------------------------------------------------

    async def _clear(self) -> None:
        if self.guard is not None:
            await self.guard.clear()

    async def _call(
        self,
        stage: Stage,
        ledger: Ledger,
        call: Callable[[], Awaitable[V]],
        estimate: int = 0,
    ) -> V:
        """One request through the gate, the rate limiter (``estimate``: tokens the request
        is expected to use) and the retry policy."""

        async def noted() -> V:
            await self._clear()
            if self.calls is None or not estimate:  # a free call (local models): none
                return await call()
            # a call cancelled or killed before its reply stays noted as unanswered, and
            # so does an answered one until its stage's outcome (its usage) is stored
            ticket = self.calls.begin(self.name, stage, estimate)
            try:
                result = await call()
            except BackendError:  # answered: what it used comes with the error
                ledger.tickets.append(ticket)
                raise
            ledger.tickets.append(ticket)
            return result

        async def limited() -> V:
            if self.limiter is None:
                return await noted()
            await self.limiter.acquire(estimate)
            used = 0
            try:
                result = await noted()
                used = _tokens_used(result)
                return result
            except BackendError as exc:
                used = exc.usage.total_input + exc.usage.output_tokens
                raise
            finally:
                await self.limiter.settle(estimate, used)

        async def gated() -> V:
            if self._gate is None:
                return await limited()
            async with self._gate:
                return await limited()

        try:
            pause = asyncio.sleep if self.guard is None else self.guard.pause
            return await with_retries(gated, self.retry, f"{self.name} {stage}", sleep=pause)
        except BackendError as exc:
            ledger.add(stage, exc.usage, self.tier)
            exc.stage = stage
            raise

    async def _ask(
        self,
        prompt: Prompt,
        schema: type[T],
        ledger: Ledger,
        check: Callable[[Reply[T]], V],
        logprobs: bool = False,
    ) -> V:
        """A structured call whose reply passes ``check``; an invalid reply is asked once
        more, then raised. A reply kept in the reply cache answers at no cost; an
        accepted reply is kept in the ledger for the cache."""
        backend = self._chat
        assert backend is not None
        request = backend.request(prompt, schema, logprobs=logprobs)
        if self.replies is not None and (cached := self.replies.lookup(request)) is not None:
            try:
                answer = check(backend.parse(request, cached, schema))
            except (InvalidReply, ValueError, ValidationError):
                pass  # an entry that no longer passes (a changed check): ask the model
            else:
                ledger.add(prompt.stage, Usage(cached_replies=1))
                return answer
        last: InvalidReply | None = None
        for ask in range(2):
            raw, tier = await self._fetch(request, ask, prompt, ledger)
            # a key the model repeated goes no further: not into a later prompt (where an
            # explanation is quoted), so the same prompts are asked again from the kept,
            # redacted reply, and not into anything stored
            raw = redact_json(raw)
            try:
                reply = backend.parse(request, raw, schema)
            except InvalidReply as exc:
                ledger.add(prompt.stage, exc.usage, tier)
                last = exc
                continue
            ledger.add(prompt.stage, reply.usage, tier)
            try:
                answer = check(reply)
            except (ValueError, ValidationError) as exc:
                last = InvalidReply(_first_error(exc))
                continue
            self._keep(request, raw, ledger)
            return answer
        assert last is not None
        again = type(last)(f"invalid reply twice; last: {last.reason}")
        again.stage = prompt.stage
        raise again

    def _keep(self, request: ApiRequest, raw: dict[str, Any], ledger: Ledger) -> None:
        """Keep an accepted reply for the reply cache, unless it names another model than
        the one asked for (a server answering with whatever model it has loaded): kept,
        it would answer this model's request with that model's reply."""
        if served_by(request.model, raw):
            ledger.kept.append(
                KeptReply(key=request.key, provider=request.provider, model=request.model,
                          endpoint=request.endpoint, reply=raw)
            )  # fmt: skip
            return
        served = str(raw.get("model"))
        if served not in self._other_models:
            self._other_models.add(served)
            log.warning(
                "%s: asked for model %r, the server replied as %r: such replies are not "
                "kept in the reply cache", self.name, request.model, served,
            )  # fmt: skip

    async def _fetch(
        self, request: ApiRequest, ask: int, prompt: Prompt, ledger: Ledger
    ) -> tuple[dict[str, Any], Tier]:
        """The provider's reply to the ``ask``-th asking of ``request`` and the tier it is
        billed at: from the batch transport's results, or from a call now."""
        backend = self._chat
        assert backend is not None
        if self.batch is not None:
            try:
                return self.batch.reply(request, ask), "batch"
            except BackendError as exc:
                ledger.add(prompt.stage, exc.usage, "batch")
                exc.stage = prompt.stage
                raise
        raw = await self._call(
            prompt.stage, ledger, lambda: backend.send(request), self._estimate(prompt)
        )
        return raw, backend.tier_of(raw)

    # -- stages ------------------------------------------------------------------------------

    async def _explain(self, feature: FeatureRecord, ledger: Ledger) -> str:
        prompt = explain_prompt(feature, self.settings.n_examples, self.settings.explain_from)
        if self._likely is not None:
            return await self._generate_explanation(prompt, ledger)
        return await self._ask(
            prompt, ExplanationReply, ledger, lambda r: check_explanation(r.parsed.explanation)
        )

    async def _generate_explanation(self, prompt: Prompt, ledger: Ledger) -> str:
        backend = self._likely
        assert backend is not None
        last = ""
        for _ in range(2):
            reply = await self._call(
                "explain",
                ledger,
                lambda: backend.generate(prompt, self.settings.explanation_tokens),
            )
            ledger.add("explain", reply.usage)
            text = _explanation_from_text(reply.text)
            try:
                return check_explanation(text)
            except ValueError as exc:
                last = str(exc)
        again = InvalidReply(f"invalid reply twice; last: {last}")
        again.stage = "explain"
        raise again

    async def _detect_set(
        self,
        feature: FeatureRecord,
        kind: str,
        negatives: list[Snippet],
        explanation: str,
        ledger: Ledger,
    ) -> Detection:
        positives = feature.of_kind(kind)[: self.settings.n_positives]
        offset = DETECTION_SETS.index(kind)
        seed = self.settings.seed * 7919 + feature.layer * 1_000_003 + feature.index + offset
        snippets = detection_snippets(positives, negatives, seed)
        predicted, probs = await self._detect(explanation, snippets, ledger)
        return Detection(truth=[s.activating for s in snippets], predicted=predicted, probs=probs)

    async def _detect(
        self, explanation: str, snippets: list[Snippet], ledger: Ledger
    ) -> tuple[list[bool], list[float] | None]:
        if self._likely is not None:
            prompts = [likelihood_detect_prompt(explanation, s) for s in snippets]
            return await self._yes_no_by_likelihood("detect", prompts, ledger)

        def check(reply: Reply[DetectionReply]) -> tuple[list[bool], list[float] | None]:
            return _yes_no_answers(reply, reply.parsed.activating, len(snippets), "snippets")

        return await self._ask(
            detect_prompt(explanation, snippets),
            DetectionReply,
            ledger,
            check,
            logprobs=self.settings.logprobs,
        )

    async def _fuzz(self, feature: FeatureRecord, explanation: str, ledger: Ledger) -> Detection:
        """Whether each fuzzing example's marks are the activating tokens; truth: they
        are (``scorers.fuzz_items``). Scored as detection is."""
        items = fuzz_items(feature, self.settings.seed)
        truth = [it.correct for it in items]
        if not items:
            return Detection(truth=[], predicted=[], probs=None)
        if self._likely is not None:
            guessed, likely = await self._fuzz_by_likelihood(explanation, items, ledger)
            return Detection(truth=truth, predicted=guessed, probs=likely)

        def check(reply: Reply[FuzzReply]) -> tuple[list[bool], list[float] | None]:
            return _yes_no_answers(reply, reply.parsed.correct, len(items), "examples")

        predicted, probs = await self._ask(
            fuzz_prompt(explanation, items), FuzzReply, ledger, check,
            logprobs=self.settings.logprobs,
        )  # fmt: skip
        return Detection(truth=truth, predicted=predicted, probs=probs)

    async def _fuzz_by_likelihood(
        self, explanation: str, items: list[FuzzItem], ledger: Ledger
    ) -> tuple[list[bool], list[float]]:
        prompts = [likelihood_fuzz_prompt(explanation, it) for it in items]
        return await self._yes_no_by_likelihood("fuzz", prompts, ledger)

    async def _yes_no_by_likelihood(
        self, stage: Stage, prompts: list[Prompt], ledger: Ledger
    ) -> tuple[list[bool], list[float]]:
        """An in-process model's answer to each prompt: " yes" over " no" by likelihood,
        with the probability of " yes"."""
        backend = self._likely
        assert backend is not None
        scores = await self._call(
            stage, ledger, lambda: backend.score_options(prompts, [" yes", " no"])
        )
        ledger.add(stage, scores.usage)
        p_yes = [_softmax(row)[0] for row in scores.logprobs]
        return [p > 0.5 for p in p_yes], p_yes

    async def _intruder(
        self, feature: FeatureRecord, intruders: list[Snippet], ledger: Ledger
    ) -> Intrusion:
        """The window picked as the intruder in each trial (0-based), without the
        explanation; a feature without trials (too few examples or intruders) asks
        nothing."""
        trials = intruder_trials(feature, intruders, self.settings.seed)
        truth = [t.intruder for t in trials]
        if not trials:
            return Intrusion(truth=[], picked=[])
        if self._likely is not None:
            return Intrusion(truth=truth, picked=await self._pick_by_likelihood(trials, ledger))
        sizes = [len(t.windows) for t in trials]
        picked = await self._ask(
            intruder_prompt(trials), IntruderReply, ledger,
            lambda r: check_intruders(r.parsed.intruders, sizes),
        )  # fmt: skip
        return Intrusion(truth=truth, picked=picked)

    async def _pick_by_likelihood(self, trials: list[IntruderTrial], ledger: Ledger) -> list[int]:
        """Per trial, the window number " 1".." N" the model finds likeliest; trials of
        one size share a call."""
        backend = self._likely
        assert backend is not None
        picked: dict[int, int] = {}
        for size in sorted({len(t.windows) for t in trials}):
            at = [i for i, t in enumerate(trials) if len(t.windows) == size]
            prompts = [likelihood_intruder_prompt(trials[i]) for i in at]
            options = [f" {n}" for n in range(1, size + 1)]

            def score(
                prompts: list[Prompt] = prompts, options: list[str] = options
            ) -> Awaitable[OptionScores]:
                return backend.score_options(prompts, options)

            scores = await self._call("intruder", ledger, score)
            ledger.add("intruder", scores.usage)
            for i, row in zip(at, scores.logprobs, strict=True):
                picked[i] = row.index(max(row))
        return [picked[i] for i in range(len(trials))]

    async def _classify(
        self, feature: FeatureRecord, ledger: Ledger, stage: Stage = "classify"
    ) -> Classification:
        """The classification; ``stage``: what its calls count under (``resample`` for a
        resample's)."""
        if self._likely is not None:
            return await self._classify_by_likelihood(feature, ledger, stage)
        prompt = classify_prompt(feature, self.settings.n_examples, self.settings.n_logits)
        prompt = dataclasses.replace(prompt, stage=stage)

        def check(reply: Reply[ClassificationReply]) -> Classification:
            return Classification.model_validate(reply.parsed.model_dump())

        return await self._ask(prompt, ClassificationReply, ledger, check)

    async def _resample(self, feature: FeatureRecord, ledger: Ledger) -> list[Category]:
        """The category of each resample's classification, asked all at once (each its
        own request: a reply kept earlier answers it at no cost). Every call is waited
        for, so that what each used is counted; then the first failure is raised. In the
        batch transport, the requests not answered yet go out together: the first
        ``AwaitingReply`` carries the others."""
        if not self.resamples:
            raise ValueError("stage resample asked of a judge built without resamples")
        shown = feature.of_kind("top")[: self.settings.n_examples]
        parts = [
            resampled_record(feature, shown, self.settings.seed, number)
            for number in range(self.resamples)
        ]
        ledgers = [Ledger(ledger.price) for _ in parts]

        async def one(part: FeatureRecord, own: Ledger) -> Classification:
            answer = await self._classify(part, own, "resample")
            if self.keep_now is not None and own.kept:
                self.keep_now(own.kept)
            return answer

        try:
            answers = await asyncio.gather(
                *(one(part, own) for part, own in zip(parts, ledgers, strict=True)),
                return_exceptions=True,
            )
        finally:
            for own in ledgers:
                ledger.take(own)
        failures = [a for a in answers if isinstance(a, BaseException)]
        waits = [a for a in failures if isinstance(a, AwaitingReply)]
        others = [a for a in failures if not isinstance(a, AwaitingReply)]
        if others:
            raise others[0]
        if waits:
            waits[0].others = waits[1:]
            raise waits[0]
        return [a.category for a in answers if isinstance(a, Classification)]

    async def _choose(
        self,
        feature: FeatureRecord,
        question: str,
        options: tuple[str, ...],
        ledger: Ledger,
        stage: Stage = "classify",
    ) -> list[tuple[str, float]]:
        """The options by probability (softmax of each option's mean token log-probability)."""
        backend = self._likely
        assert backend is not None
        prompt = likelihood_classify_prompt(
            feature, self.settings.n_examples, self.settings.n_logits, question
        )
        spoken = [" " + o.replace("_", " ") for o in options]
        scores = await self._call(stage, ledger, lambda: backend.score_options([prompt], spoken))
        ledger.add(stage, scores.usage)
        probs = _softmax(scores.logprobs[0])
        return sorted(zip(options, probs, strict=True), key=lambda kv: -kv[1])

    async def _classify_by_likelihood(
        self, feature: FeatureRecord, ledger: Ledger, stage: Stage = "classify"
    ) -> Classification:
        ranked = await self._choose(
            feature, f"Which category fits this feature best: {', '.join(CATEGORIES)}?",
            CATEGORIES, ledger, stage,
        )  # fmt: skip
        (category, p), (runner_up, p2) = ranked[0], ranked[1]
        confidence = "high" if p >= 0.8 else "medium" if p >= 0.5 else "low"
        rationale = (
            f"Chosen by answer likelihood: {category} (p={p:.2f}) over {runner_up} (p={p2:.2f})."
        )
        subcategory = mechanism = domain_type = None
        if category == "reasoning":
            subcategory = (await self._choose(
                feature, f"Which kind of reasoning: {', '.join(SUBCATEGORIES)}?",
                SUBCATEGORIES, ledger, stage,
            ))[0][0]  # fmt: skip
            mechanism = (await self._choose(
                feature, f"Which mechanism: {', '.join(MECHANISMS)}?", MECHANISMS, ledger, stage
            ))[0][0]  # fmt: skip
        elif category == "domain":
            domain_type = (await self._choose(
                feature, f"Which domain: {', '.join(DOMAIN_TYPES)}?", DOMAIN_TYPES, ledger, stage
            ))[0][0]  # fmt: skip
        return Classification.model_validate(
            {
                "category": category,
                "subcategory": subcategory,
                "mechanism": mechanism,
                "domain_type": domain_type,
                "confidence": confidence,
                "rationale": rationale,
            }
        )


def _yes_no_answers(
    reply: Reply[Any], answers: list[bool], expected: int, noun: str
) -> tuple[list[bool], list[float] | None]:
    """One answer per item shown, or the reply is invalid; the probabilities of "true"
    where the backend gave one per item."""
    if len(answers) != expected:
        raise ValueError(f"{len(answers)} answers for {expected} {noun}")
    probs = reply.true_probs
    return answers, probs if probs is not None and len(probs) == expected else None


def _tokens_used(result: object) -> int:
    """Tokens a call's result used: a reply object's usage, or the usage counts of a
    provider's JSON reply (their input counts include the cached part, except
    Anthropic's, whose cache reads and writes are counted apart)."""
    if isinstance(result, dict):
        counts = result.get("usage")
        if not isinstance(counts, dict):
            return 0
        fields = ("prompt_tokens", "completion_tokens", "input_tokens", "output_tokens",
                  "cache_read_input_tokens", "cache_creation_input_tokens")  # fmt: skip
        return sum(int(v) for k, v in counts.items() if k in fields and isinstance(v, int))
    usage = getattr(result, "usage", None)
    return usage.total_input + usage.output_tokens if isinstance(usage, Usage) else 0


def _softmax(values: list[float]) -> list[float]:
    top = max(values)
    weights = [math.exp(v - top) for v in values]
    total = sum(weights)
    return [w / total for w in weights]


def _explanation_from_text(text: str) -> str:
    """The explanation in a generated text: a JSON object's field if the model wrote one,
    else the first non-empty line."""
    try:
        return ExplanationReply.model_validate_json(text.strip()).explanation
    except ValidationError:
        pass
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else ""


def _first_error(exc: ValueError | ValidationError) -> str:
    return validation_reason(exc) if isinstance(exc, ValidationError) else str(exc)


__all__ = ["CALLS_PER_FEATURE", "STAGES", "JudgeSettings", "LLMJudge"]
