"""The prompt box of ``labeler browse RUN --model``: a text through the run's model, and
which features fire on each of its tokens.

:class:`PromptModel` loads the run's adapter model (run.json's ``adapter_path``, with the
checkpoint's own tokenizer) on the first prompt only, on the device asked for (auto, cpu
or cuda), and reads a text:

- its tokens, laid out as the run's corpus was (a plain text as is, no BOS; a text
  already in the run's chat format, ``params.chat_format``, split at its markers) and
  shown as the review page shows tokens (:func:`labeler.review.tokens.shown_tokens`);
- per token, the features that fire most across every collected layer, at most
  ``TOP_PER_TOKEN``, ranked by the activation relative to the feature's largest on the
  run's corpus (``act_max`` of features.parquet): a weak feature at its maximum outranks
  a strong one at a tenth of its own. A feature that never fired on the corpus
  (``act_max`` 0) has no relative value and comes after the others;
- for one feature, its activation on every token.

A text is at most ``MAX_PROMPT_CHARS`` characters and ``MAX_PROMPT_TOKENS`` tokens; a
longer one is refused, never cut. The forward pass runs under ``torch.inference_mode``
and stops after the last collected layer.

:class:`PromptBox` is what the catalog server (:class:`labeler.review.browse_web.CatalogApp`)
answers ``POST /api/prompt`` with: the request checked (every refusal a 400 naming its
``field``), one prompt at a time (:class:`PromptGate`: a request that arrives while one is
being answered gets 429 at once, it does not wait), answered on a lane of its own so that
neither the store's thread nor a search waits for the model.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl

from collectors.run_format import FEATURES, parse_feature_id
from labeler.errors import USER_ERRORS, UserError
from labeler.review.tokens import Pieces, shown_tokens
from labeler.review.web import Request, Response, error_response, json_response
from labeler.run.data import RunData

log = logging.getLogger(__name__)

PROMPT_PATH = "/api/prompt"
MAX_PROMPT_CHARS = 2_000
MAX_PROMPT_TOKENS = 256
TOP_PER_TOKEN = 8
PROMPT_FIELDS = ("text", "feature")
RANKED_BY = (
    "activation relative to the feature's largest activation on the run's corpus "
    "(act_max); features that never fired there come last"
)
DEVICES = ("auto", "cpu", "cuda")
_DEAD_KEY = 1e-9  # a feature with act_max 0 ranks by activation * this, after the others


class BadPrompt(UserError):
    """A prompt request the server refuses (``status``: 400, or 415 for a body that is
    not sent as JSON); ``field`` names what is wrong (None: the body as a whole)."""

    def __init__(self, message: str, field: str | None, status: int = 400) -> None:
        super().__init__(message)
        self.field = field
        self.status = status


@dataclass(frozen=True)
class PromptRequest:
    """A checked request: the text and, optionally, one feature to follow."""

    text: str
    feature: str | None = None


@dataclass(frozen=True)
class FeatureTable:
    """What the prompt box needs of features.parquet: each feature's ``act_max``."""

    act_max: dict[tuple[int, int], float]
    layers: list[int]
    width: int

    @classmethod
    def read(cls, run: RunData) -> FeatureTable:
        table = pl.read_parquet(run.folder / FEATURES, columns=["layer", "index", "act_max"])
        act_max = {
            (int(layer), int(index)): float(value or 0.0)
            for layer, index, value in table.iter_rows()
        }
        return cls(act_max, sorted(run.info.layers), run.info.n_features_per_layer)

    def check_feature(self, value: object) -> str | None:
        """``value`` as a feature id of this run (None for none); BadPrompt otherwise."""
        if value is None:
            return None
        if not isinstance(value, str):
            raise BadPrompt(
                f"feature: must be a feature id such as L0F12, not {type(value).__name__}",
                "feature",
            )
        try:
            layer, index = parse_feature_id(value)
        except ValueError:
            raise BadPrompt(
                f"feature: {value[:40]!r} is not a feature id of the form L{{layer}}F{{index}}",
                "feature",
            ) from None
        if (layer, index) not in self.act_max:
            layers = ", ".join(str(la) for la in self.layers)
            raise BadPrompt(
                f"feature: {value} is not in this run (layers {layers}; features 0 to "
                f"{self.width - 1} a layer)",
                "feature",
            )
        return value


def parse_request(body: bytes, content_type: str, table: FeatureTable) -> PromptRequest:
    """The request body checked: a JSON object with ``text`` and optionally ``feature``."""
    if content_type.split(";")[0].strip().lower() != "application/json":
        raise BadPrompt("send the prompt as JSON (Content-Type: application/json)", None, 415)
    try:
        data = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadPrompt(f"the body is not JSON: {exc}", None) from None
    except RecursionError:
        raise BadPrompt("the body is nested too deeply; send {text, feature}", None) from None
    if not isinstance(data, dict):
        raise BadPrompt("the body must be a JSON object: {text, feature}", None)
    unknown = sorted(set(data) - set(PROMPT_FIELDS))
    if unknown:
        raise BadPrompt(
            f"unknown field {unknown[0]!r}; expected {', '.join(PROMPT_FIELDS)}", unknown[0]
        )
    if "text" not in data:
        raise BadPrompt("text: missing; send the text to read", "text")
    text = data["text"]
    if not isinstance(text, str):
        raise BadPrompt(f"text: must be a string, not {type(text).__name__}", "text")
    if not text.strip():
        raise BadPrompt("text: empty; type a text to read", "text")
    if len(text) > MAX_PROMPT_CHARS:
        raise BadPrompt(
            f"text: {len(text):,} characters, over the limit of {MAX_PROMPT_CHARS:,}", "text"
        )
    return PromptRequest(text, table.check_feature(data.get("feature")))


class PromptGate:
    """One prompt at a time, without a queue: ``admit`` says at once whether a request
    may go on (and, if so, holds the gate for it until ``release``)."""

    def __init__(self, limit: int = 1) -> None:
        self.limit = limit
        self._lock = threading.Lock()
        self._held: set[int] = set()

    @property
    def in_flight(self) -> int:
        with self._lock:
            return len(self._held)

    def admit(self, key: object) -> bool:
        with self._lock:
            if len(self._held) >= self.limit:
                return False
            self._held.add(id(key))
            return True

    def holds(self, key: object) -> bool:
        with self._lock:
            return id(key) in self._held

    def release(self, key: object) -> None:
        with self._lock:
            self._held.discard(id(key))

    @contextlib.contextmanager
    def held(self, key: object) -> Iterator[bool]:
        """Within the block, whether ``key`` was admitted; released after it."""
        admitted = self.admit(key)
        try:
            yield admitted
        finally:
            if admitted:
                self.release(key)


class _LastLayerDone(Exception):
    """Raised from the sink once the last collected layer has run."""


@dataclass
class _Loaded:
    source: Any  # an AdapterModel or NeuronModel (collectors.source.FeatureSource)
    tokenizer: Any
    units: dict[int, np.ndarray]  # layer -> the feature index of each recorded column
    act_max: dict[int, Any]  # layer -> torch tensor [columns] on the model's device
    pieces: Pieces


@dataclass(frozen=True)
class Reading:
    """A text as the model read it."""

    token_ids: list[int]
    tokens: list[str]  # as shown
    top: list[list[dict[str, Any]]]  # per token, the features that fire most
    feature: list[float] | None  # the followed feature's activation on each token


class PromptModel:
    """The run's model, loaded on the first :meth:`read` only."""

    def __init__(
        self,
        run: RunData,
        table: FeatureTable,
        device: str = "auto",
        on_load: Callable[[str], object] | None = None,
    ) -> None:
        if device not in DEVICES:
            raise UserError(f"--device {device}: choose {', '.join(DEVICES)}")
        if device == "cuda":  # asked for by name: say now, not at the first prompt
            import torch

            if not torch.cuda.is_available():
                raise UserError("--device cuda: no CUDA device is available here")
        self.run = run
        self.table = table
        self.device = device
        self.on_load = on_load
        self._loaded: _Loaded | None = None
        self._lock = threading.Lock()

    @property
    def loaded(self) -> bool:
        return self._loaded is not None

    def _load(self) -> _Loaded:
        with self._lock:
            if self._loaded is None:
                self._loaded = self._load_now()
            return self._loaded

    def _load_now(self) -> _Loaded:
        import torch

        info = self.run.info
        where = f"{self.run.folder / 'run.json'}: adapter_path {info.adapter_path}"
        say = f"loading the model for the prompt box ({info.adapter_path}, --device {self.device})"
        log.info("%s", say)
        if self.on_load is not None:
            self.on_load(say)
        started = time.perf_counter()
        source: Any
        try:
            if info.unit == "neuron":
                from collectors.neurons import load_neuron_model

                per_layer = info.params.neurons or info.n_features_per_layer
                source, tokenizer, _ = load_neuron_model(
                    info.adapter_path, per_layer, info.params.seed, device=self.device
                )
            else:
                from adapters.branch import load_adapter

                source, tokenizer, _ = load_adapter(info.adapter_path, device=self.device)
        except USER_ERRORS as exc:
            raise UserError(f"{where}: the model could not be loaded: {exc}") from None
        if source.n_layers <= max(self.table.layers):
            raise UserError(
                f"{where}: the model has {source.n_layers} layers, the run collected layers "
                f"up to {max(self.table.layers)}"
            )
        units: dict[int, np.ndarray] = {}
        act_max: dict[int, Any] = {}
        for layer in self.table.layers:
            cols = source.units(layer).cpu().numpy().astype(np.int64)
            units[layer] = cols
            values = [self.table.act_max.get((layer, int(i)), 0.0) for i in cols]
            act_max[layer] = torch.tensor(values, dtype=torch.float32, device=source.device)
        seconds = time.perf_counter() - started
        log.info("model loaded in %.1f s on %s", seconds, source.device)
        if self.on_load is not None:
            self.on_load(f"model loaded in {seconds:.1f} s on {source.device}")
        return _Loaded(source, tokenizer, units, act_max, Pieces.near(info.adapter_path))

    def tokenize(self, text: str) -> list[int]:
        """The text's token ids as the run's corpus was laid out; BadPrompt over the cap."""
        from collectors.corpus import Trace, tokenize_traces

        loaded = self._load()
        trace = Trace(1, "", "", "prompt", kind="text", text=text)
        try:
            corpus = tokenize_traces([trace], loaded.tokenizer, 4 * MAX_PROMPT_CHARS + 16,
                                     self.run.info.params.chat_format)  # fmt: skip
        except USER_ERRORS as exc:
            raise BadPrompt(f"text: {exc}", "text") from None
        ids = [int(i) for i in corpus.token_ids]
        if len(ids) > MAX_PROMPT_TOKENS:
            raise BadPrompt(
                f"text: {len(ids):,} tokens, over the limit of {MAX_PROMPT_TOKENS}; shorten it",
                "text",
            )
        return ids

    def read(self, text: str, feature: str | None = None) -> Reading:
        """Read ``text``: its tokens, the top features per token and, with ``feature``,
        that feature's activation on every token."""
        import torch

        ids = self.tokenize(text)
        loaded = self._load()
        source = loaded.source
        layers = self.table.layers
        last = max(layers)
        want = parse_feature_id(feature) if feature is not None else None
        candidates: list[tuple[Any, Any, Any, int]] = []  # (keys, columns, acts, layer)
        followed: list[float] | None = None

        def sink(layer: int, features: torch.Tensor) -> None:
            nonlocal followed
            acts = features[0].float()  # [seq, columns]
            limit = loaded.act_max[layer]
            keys = torch.where(limit > 0, acts / limit.clamp(min=1e-30), acts * _DEAD_KEY)
            k = min(TOP_PER_TOKEN, keys.shape[1])
            top = keys.topk(k, dim=1)
            picked = acts.gather(1, top.indices)
            candidates.append((top.values.cpu(), top.indices.cpu(), picked.cpu(), layer))
            if want is not None and want[0] == layer:
                column = int(np.flatnonzero(loaded.units[layer] == want[1])[0])
                followed = [max(0.0, float(v)) for v in acts[:, column].cpu()]
            if layer == last:
                raise _LastLayerDone

        input_ids = torch.tensor([ids], dtype=torch.long, device=source.device)
        decoder = source.model.get_decoder()
        with (
            torch.inference_mode(),
            source.recording(layers, sink),
            contextlib.suppress(_LastLayerDone),
        ):
            decoder(input_ids=input_ids, use_cache=False)
        strings = loaded.tokenizer.batch_decode([[i] for i in ids])
        return Reading(
            token_ids=ids,
            tokens=shown_tokens(strings, loaded.pieces.of(ids)),
            top=self._merge(candidates, len(ids), loaded),
            feature=followed,
        )

    def _merge(
        self, candidates: list[tuple[Any, Any, Any, int]], n_tokens: int, loaded: _Loaded
    ) -> list[list[dict[str, Any]]]:
        """Each token's ``TOP_PER_TOKEN`` strongest features over all layers' candidates."""
        out: list[list[dict[str, Any]]] = []
        for position in range(n_tokens):
            found: list[tuple[float, dict[str, Any]]] = []
            for keys, columns, acts, layer in candidates:
                for key, column, act in zip(
                    keys[position].tolist(), columns[position].tolist(), acts[position].tolist(),
                    strict=True,
                ):  # fmt: skip
                    if act <= 0:
                        continue
                    index = int(loaded.units[layer][column])
                    limit = self.table.act_max.get((layer, index), 0.0)
                    found.append((key, {
                        "feature_id": f"L{layer}F{index}",
                        "layer": layer,
                        "index": index,
                        "activation": round(float(act), 4),
                        "relative": round(float(act) / limit, 4) if limit > 0 else None,
                    }))  # fmt: skip
            found.sort(key=lambda pair: (-pair[0], pair[1]["layer"], pair[1]["index"]))
            out.append([entry for _, entry in found[:TOP_PER_TOKEN]])
        return out


class PromptBox:
    """``POST /api/prompt`` for the catalog server: the checks, the gate, the answer.
    ``model`` None: the server was started without --model and refuses (409)."""

    def __init__(self, table: FeatureTable, model: PromptModel | None) -> None:
        self.table = table
        self.model = model
        self.gate = PromptGate()

    @classmethod
    def for_run(
        cls, run: RunData, model: bool, device: str = "auto",
        on_load: Callable[[str], object] | None = None,
    ) -> PromptBox:  # fmt: skip
        table = FeatureTable.read(run)
        return cls(table, PromptModel(run, table, device, on_load) if model else None)

    def session(self) -> dict[str, object]:
        """What ``/api/session`` adds: whether the pages show the box, and the limits."""
        return {
            "prompt": self.model is not None,
            "prompt_model_loaded": self.model is not None and self.model.loaded,
            "prompt_max_chars": MAX_PROMPT_CHARS,
            "prompt_max_tokens": MAX_PROMPT_TOKENS,
        }

    def admit(self, request: Request) -> bool:
        """On the HTTP thread, before the request goes to a lane: whether it may be
        answered now (it then holds the gate until :meth:`done`)."""
        return self.gate.admit(request)

    def done(self, request: Request) -> None:
        self.gate.release(request)

    def answer(self, request: Request) -> Response:
        """The answer to an admitted request (a refused one: 429)."""
        if not self.gate.holds(request):
            return Response(
                429, "application/json; charset=utf-8",
                json.dumps({"error": "another prompt is running; try again"}).encode(),
                headers=(("Retry-After", "1"),),
            )  # fmt: skip
        if self.model is None:
            return error_response(
                409, "the prompt box needs the model: start labeler browse with --model"
            )
        try:
            asked = parse_request(request.body, request.content_type, self.table)
            reading = self.model.read(asked.text, asked.feature)
        except BadPrompt as exc:
            return error_response(exc.status, str(exc), field=exc.field)
        except USER_ERRORS as exc:
            return error_response(503, str(exc), field=None)
        return json_response(200, self._payload(reading, asked))

    def _payload(self, reading: Reading, asked: PromptRequest) -> dict[str, Any]:
        heat = [max((f["relative"] or 0.0 for f in token), default=0.0) for token in reading.top]
        data: dict[str, Any] = {
            "tokens": reading.tokens,
            "token_ids": reading.token_ids,
            "top": reading.top,
            "heat": [round(h, 4) for h in heat],
            "ranked_by": RANKED_BY,
            "top_per_token": TOP_PER_TOKEN,
        }
        if asked.feature is not None and reading.feature is not None:
            layer, index = parse_feature_id(asked.feature)
            limit = self.table.act_max.get((layer, index), 0.0)
            values = [round(v, 4) for v in reading.feature]
            peak = int(np.argmax(values)) if values else 0
            data["feature"] = {
                "feature_id": asked.feature,
                "activations": values,
                "act_max": limit,
                "relative": [round(v / limit, 4) if limit > 0 else None for v in values],
                "peak": {"position": peak, "token": reading.tokens[peak],
                         "activation": values[peak]},
            }  # fmt: skip
        return data
