"""``labeler export --format neuronpedia``: upload request bodies that Neuronpedia's own
request schemas accept (copied below from its upload, model, source-set and list routes),
carrying each feature's final label, label source and detection score."""

from __future__ import annotations

import gzip
import json
import os
import re
import sqlite3
import subprocess
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Annotated, Any

import polars as pl
import pytest
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from tests.conftest import CollectedDemo
from tests.test_bad_input import LABELER, labeler
from tests.test_first_hour import one_line_error

Name = Annotated[str, Field(pattern=r"^[a-z][a-z0-9.-]*[a-z0-9]$|^[a-z]$", min_length=2,
                            max_length=32)]  # fmt: skip


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def utf16_units(text: str) -> int:
    """A text's length as JavaScript counts it (yup's ``max``): in UTF-16 code units; a
    lone surrogate, which no UTF-16 text holds, fails."""
    return len(text.encode("utf-16-le")) // 2


def at_most_512_units(text: str) -> str:
    if utf16_units(text) > 512:
        raise ValueError(f"{utf16_units(text)} UTF-16 code units, over 512")
    return text


# yup's string().required(): not empty (the import layout's tokens are shown the same way)
Token = Annotated[str, Field(min_length=1)]


# POST /api/feature/upload-batch (apps/webapp/app/api/feature/upload-batch/route.tsx, yup)
class Logit(_Strict):
    token: Token
    value: float


class Explanation(_Strict):
    text: Annotated[str, Field(min_length=1), AfterValidator(at_most_512_units)]
    methodName: str | None = None
    modelName: str | None = None


class Activation(_Strict):
    tokens: Annotated[list[Token], Field(min_length=1, max_length=1024)]
    values: Annotated[list[float], Field(min_length=1, max_length=1024)]
    quantileMax: Annotated[float, Field(le=99_999_999)] | None = None
    quantileMin: Annotated[float, Field(le=99_999_999)] | None = None
    quantileFraction: Annotated[float, Field(ge=0, le=1)] | None = None


class Feature(_Strict):
    index: Annotated[int, Field(ge=0, le=10_000_000)]
    density: Annotated[float, Field(ge=0, le=1)] | None = None
    topLogits: Annotated[list[Logit], Field(max_length=20)] | None = None
    bottomLogits: Annotated[list[Logit], Field(max_length=20)] | None = None
    explanations: list[Explanation] | None = None
    activations: Annotated[list[Activation], Field(min_length=1)]


class UploadBatch(_Strict):
    modelId: str
    source: str
    features: Annotated[list[Feature], Field(min_length=1, max_length=128)]


class NewModel(_Strict):  # POST /api/model/new
    id: Name
    layers: Annotated[int, Field(ge=1, le=127)]
    displayName: Annotated[str, Field(min_length=1, max_length=64)] | None = None


class NewSourceSet(_Strict):  # POST /api/source-set/new
    name: Annotated[str, Field(pattern=r"^[a-z][a-z0-9-]*[a-z0-9]$|^[a-z0-9]$")]
    modelId: str
    description: Annotated[str, Field(max_length=128)] | None = None


class ListFeature(_Strict):
    modelId: str
    layer: str
    index: int
    description: str = ""


class NewList(_Strict):  # POST /api/list/new-with-features
    name: Annotated[str, Field(min_length=1)]
    description: str = ""
    features: list[ListFeature]


TAG = re.compile(r" \[label: ([^;]+); source: (\w+); detection: ([0-9.]+|n/a)\]$")


def test_upload_bodies_pass_neuronpedias_schemas_and_carry_the_final_labels(
    labeled_copy: Path, tmp_path: Path
) -> None:
    out = tmp_path / "np"
    result = labeler("export", labeled_copy, "--format", "neuronpedia", "--model-id",
                     "demo-adapter", "--source-set", "labeler-demo", "--out", out)  # fmt: skip
    assert result.returncode == 0, result.stderr
    # both layouts by default: the bulk-import one (tests/test_neuronpedia_import.py) beside
    layers = {p.name for p in (out / "import" / "demo-adapter").iterdir()}
    assert layers == {f"{layer}-labeler-demo" for layer in range(4)}
    catalog = tmp_path / "catalog.jsonl"
    assert labeler("export", labeled_copy, "--out", catalog, "--with-examples").returncode == 0
    lines = {}
    for text in catalog.read_text(encoding="utf-8").splitlines():
        line = json.loads(text)
        lines[line["feature_id"]] = line
    model = NewModel.model_validate_json((out / "model.json").read_bytes())
    NewSourceSet.model_validate_json((out / "source-set.json").read_bytes())
    assert model.id == "demo-adapter"

    seen: set[str] = set()
    batches = sorted((out / "upload").glob("batch-*.json"), key=lambda p: int(p.stem[6:]))
    assert [p.stem for p in batches] == [f"batch-{n}" for n in range(len(batches))]
    for path in batches:
        body = UploadBatch.model_validate_json(path.read_bytes())
        layer = int(body.source.split("-", 1)[0])
        assert body.source == f"{layer}-labeler-demo" and body.modelId == "demo-adapter"
        assert len({f.index for f in body.features}) == len(body.features)
        for feature in body.features:
            fid = f"L{layer}F{feature.index}"
            line = lines[fid]
            seen.add(fid)
            assert feature.density == line["activation_freq"]
            assert [t.token for t in feature.topLogits or []] == line["top_logits"][:20]
            assert len(feature.activations) == len(line["examples"])
            shown = [e["tokens"] for e in line["examples"]]
            assert [a.tokens for a in feature.activations] == shown
            ok = [j for j in line["judgments"] if j["status"] == "ok"]
            assert len(feature.explanations or []) == len(ok)
            label = line["final_label"]
            for explanation in feature.explanations or []:
                match = TAG.search(explanation.text)
                assert match is not None, explanation.text
                assert match.group(1).split("/")[0].split(",")[0] == label["category"]
                assert match.group(2) == line["label_source"]
    with_examples = {fid for fid, line in lines.items() if line["examples"]}
    assert seen == with_examples and len(seen) > 0

    lists = [NewList.model_validate(x) for x in json.loads((out / "lists.json").read_bytes())]
    by_list = {x.name: {f"L{f.layer.split('-')[0]}F{f.index}" for f in x.features} for x in lists}
    categories = pl.DataFrame([
        {"fid": fid, "category": lines[fid]["final_label"]["category"]} for fid in seen
    ])  # fmt: skip
    for (category,), group in categories.group_by("category"):
        assert by_list[f"labeler-demo: {category}"] == set(group["fid"].to_list())


EMPTY_TOKEN = "\u2400"  # ␀, what an empty token is written as (docs/neuronpedia.md)
# 400 letters of the Mathematical Alphanumeric Symbols block (U+1D44E..U+1D454, italic a-g):
# each one code point, two UTF-16 code units
MATH_ITALIC = "".join(chr(0x1D44E + i % 7) for i in range(400))


def test_texts_fit_neuronpedias_utf16_limit_and_empty_tokens_are_shown(
    labeled_copy: Path, tmp_path: Path
) -> None:
    examples = pl.read_parquet(labeled_copy / "examples.parquet")
    conn = sqlite3.connect(labeled_copy / "labels.sqlite")
    try:
        query = "SELECT feature_id FROM judgments WHERE status = 'ok' AND feature_id LIKE 'L1F%'"
        judged = {r[0] for r in conn.execute(query)}
        feature = min(judged & set(examples["feature_id"]), key=lambda f: int(f[3:]))
        with conn:
            changed = conn.execute(
                "UPDATE judgments SET payload = json_set(payload, '$.explanation', ?) "
                "WHERE feature_id = ? AND status = 'ok'", (MATH_ITALIC, feature),
            ).rowcount  # fmt: skip
    finally:
        conn.close()
    assert changed > 0
    mine = pl.col("feature_id") == feature
    blank = pl.element().str.slice(0, 0)  # every token of the feature's made empty
    examples.with_columns(
        pl.when(mine).then(pl.col("tokens").list.eval(blank)).otherwise("tokens")
    ).write_parquet(labeled_copy / "examples.parquet")
    features = pl.read_parquet(labeled_copy / "features.parquet")
    features.with_columns(
        pl.when(mine).then(pl.col(side).list.eval(blank)).otherwise(side)
        for side in ("top_logits", "bottom_logits")
    ).write_parquet(labeled_copy / "features.parquet")

    out = tmp_path / "np"
    result = labeler("export", labeled_copy, "--format", "neuronpedia", "--model-id", "demo",
                     "--source-set", "tc", "--out", out)  # fmt: skip
    assert result.returncode == 0, result.stderr
    texts: list[str] = []
    for path in (out / "upload").glob("batch-*.json"):
        body = UploadBatch.model_validate_json(path.read_bytes())
        for item in body.features:
            if f"L{body.source.split('-')[0]}F{item.index}" == feature:
                texts += [e.text for e in item.explanations or []]
                shown = {t for a in item.activations for t in a.tokens}
                assert shown == {EMPTY_TOKEN}
                lens = [x.token for x in [*(item.topLogits or []), *(item.bottomLogits or [])]]
                assert set(lens) == {EMPTY_TOKEN}
    assert len(texts) == changed
    for text in texts:
        match = TAG.search(text)
        assert match is not None, text
        kept = text[: match.start()]
        assert kept.endswith("…") and MATH_ITALIC.startswith(kept[:-1])
        # as much of it as fits: one more letter would not
        assert utf16_units(text) + 2 > 512

    # the import layout: the same placeholder, the same limit
    source = out / "import" / "demo" / "1-tc"
    rows = [json.loads(line) for name in ("activations", "explanations", "features")
            for path in (source / name).glob("*.jsonl.gz")
            for line in gzip.decompress(path.read_bytes()).splitlines()]  # fmt: skip
    index = feature.split("F")[1]
    its = [r for r in rows if r["index"] == index]
    tokens = [t for r in its if "tokens" in r for t in r["tokens"]]
    assert tokens and set(tokens) == {EMPTY_TOKEN}
    logits = {t for r in its if "pos_str" in r for t in r["pos_str"] + r["neg_str"]}
    assert logits <= {EMPTY_TOKEN}
    assert "" not in {t for r in rows if "tokens" in r for t in r["tokens"]}
    described = [r["description"] for r in its if "description" in r]
    assert len(described) == changed
    for text in described:
        assert 510 < utf16_units(text) <= 512 and text.endswith("…")
        assert MATH_ITALIC.startswith(text[:-1])


def test_bad_names_are_one_line(labeled_copy: Path, tmp_path: Path) -> None:
    result = labeler("export", labeled_copy, "--format", "neuronpedia", "--model-id", "Bad_ID",
                     "--source-set", "x", "--out", tmp_path / "np")  # fmt: skip
    assert "--model-id 'Bad_ID'" in one_line_error(result)
    result = labeler("export", labeled_copy, "--format", "neuronpedia", "--model-id", "demo")
    assert "--source-set" in one_line_error(result)
    assert not (tmp_path / "np").exists()


# --- labeler push-neuronpedia against a loopback server that checks what it gets ----------


class AddFeature(_Strict):
    modelId: str
    layer: str
    index: str
    description: str


class AddFeatures(_Strict):  # POST /api/list/add-features
    listId: str
    featuresToAdd: Annotated[list[AddFeature], Field(max_length=100)]


class NewListOnly(_Strict):  # POST /api/list/new
    name: Annotated[str, Field(min_length=1)]
    description: str = ""


ROUTES: dict[str, type[BaseModel]] = {
    "/api/model/new": NewModel, "/api/source-set/new": NewSourceSet,
    "/api/feature/upload-batch": UploadBatch, "/api/list/new": NewListOnly,
    "/api/list/add-features": AddFeatures,
}  # fmt: skip
KEY = "np-test-key"


@dataclass
class FakeNeuronpedia:
    received: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    fail_upload_at: int | None = None  # fail the upload request with this position (from 0)
    sign_in_at: int | None = None  # answer it with a sign-in page (200, HTML) instead
    # answer every upload request with this redirect (code, where to) instead
    redirect_uploads: tuple[int, str] | None = None
    uploads: int = 0
    url: str = ""


SIGN_IN_PAGE = b"<!DOCTYPE html><html><body><form>Sign in to Neuronpedia</form></body></html>"


def _serve(state: FakeNeuronpedia) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            pass

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            if self.path == "/api/feature/upload-batch" and state.redirect_uploads:
                code, where = state.redirect_uploads
                self.send_response(code)
                self.send_header("Location", where + self.path)
                self.send_header("Content-Length", "0")
                return self.end_headers()
            if self.path == "/api/feature/upload-batch" and state.uploads == state.sign_in_at:
                state.uploads += 1
                self.send_response(200)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Content-Length", str(len(SIGN_IN_PAGE)))
                self.end_headers()
                self.wfile.write(SIGN_IN_PAGE)
                return None
            model = ROUTES.get(self.path)
            if self.headers.get("x-api-key") != KEY:
                return self._answer(401, {"error": "This endpoint requires authorization."})
            if model is None:
                return self._answer(404, {"error": "no route"})
            try:
                model.model_validate_json(body)
            except ValidationError as exc:
                return self._answer(400, {"error": str(exc).splitlines()[0], "path": ""})
            if self.path == "/api/feature/upload-batch":
                state.uploads += 1
                if state.uploads - 1 == state.fail_upload_at:
                    return self._answer(500, {"error": "Failed to create features."})
            state.received.append((self.path, json.loads(body)))
            if self.path == "/api/list/new":
                return self._answer(200, {"id": f"list{len(state.received)}", "url": "u"})
            self._answer(200, {"message": "ok"})

        def _answer(self, status: int, data: object) -> None:
            text = json.dumps(data).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(text)))
            self.end_headers()
            self.wfile.write(text)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.url = f"http://127.0.0.1:{server.server_port}"
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture
def exported(labeled: CollectedDemo, tmp_path: Path) -> Path:
    out = tmp_path / "np"
    result = labeler("export", labeled.run, "--format", "neuronpedia", "--model-id", "demo",
                     "--source-set", "tc", "--layout", "api", "--out", out)  # fmt: skip
    assert result.returncode == 0, result.stderr
    return out


def push(folder: Path, url: str, key: str | None = KEY) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "NEURONPEDIA_API_KEY"}
    if key is not None:
        env["NEURONPEDIA_API_KEY"] = key
    return subprocess.run([*LABELER, "push-neuronpedia", str(folder), "--url", url],
                          capture_output=True, text=True, env=env, timeout=300)  # fmt: skip


def test_push_sends_everything_once_and_resumes_after_a_failure(exported: Path) -> None:
    state = FakeNeuronpedia(fail_upload_at=2)
    server = _serve(state)
    try:
        first = push(exported, state.url)
        assert "POST /api/feature/upload-batch: HTTP 500: Failed to create features." in (
            one_line_error(first, code=2)
        )
        assert [r for r, _ in state.received][:2] == ["/api/model/new", "/api/source-set/new"]
        assert sum(r == "/api/feature/upload-batch" for r, _ in state.received) == 2
        state.fail_upload_at = None
        second = push(exported, state.url)
        assert second.returncode == 0, second.stderr
    finally:
        server.shutdown()
    batches = sorted((exported / "upload").glob("batch-*.json"))
    uploaded = [b for r, b in state.received if r == "/api/feature/upload-batch"]
    expected = [json.loads(p.read_text()) for p in batches]
    key = lambda body: (body["source"], body["features"][0]["index"])  # noqa: E731
    assert sorted(uploaded, key=key) == sorted(expected, key=key)  # each exactly once
    assert sum(r == "/api/model/new" for r, _ in state.received) == 1
    lists = json.loads((exported / "lists.json").read_text())
    made = [b["name"] for r, b in state.received if r == "/api/list/new"]
    assert made == [x["name"] for x in lists]
    added = [f for r, b in state.received if r == "/api/list/add-features"
             for f in b["featuresToAdd"]]  # fmt: skip
    assert len(added) == sum(len(x["features"]) for x in lists)
    before = len(state.received)
    server = _serve(state)  # a third run has nothing left to send
    try:
        third = push(exported, state.url)
    finally:
        server.shutdown()
    assert third.returncode == 0 and len(state.received) == before
    assert KEY not in (exported / "pushed.jsonl").read_text()


def test_push_without_a_key_is_one_line(exported: Path) -> None:
    assert "NEURONPEDIA_API_KEY is not set" in one_line_error(push(exported, "http://x", None))


@dataclass
class Elsewhere:
    """Another loopback server: records every request it gets and answers each as a
    successful upload would, so that a push that followed a redirect would look done."""

    requests: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)
    url: str = ""


def _serve_elsewhere(state: Elsewhere) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            pass

        def _record(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            self.rfile.read(length)
            state.requests.append((self.command, self.path, dict(self.headers.items())))
            text = json.dumps({"message": "ok", "id": "elsewhere"}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(text)))
            self.end_headers()
            self.wfile.write(text)

        do_GET = do_POST = do_PUT = do_HEAD = _record

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.url = f"http://127.0.0.1:{server.server_port}"
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def logged_steps(folder: Path) -> list[str]:
    path = folder / "pushed.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["step"] for line in path.read_text(encoding="utf-8").splitlines()]


def check_everything_sent_once(folder: Path, state: FakeNeuronpedia) -> None:
    uploaded = [b for r, b in state.received if r == "/api/feature/upload-batch"]
    expected = [json.loads(p.read_text()) for p in (folder / "upload").glob("batch-*.json")]
    key = lambda body: (body["source"], body["features"][0]["index"])  # noqa: E731
    assert sorted(uploaded, key=key) == sorted(expected, key=key)
    lists = json.loads((folder / "lists.json").read_text())
    assert [b["name"] for r, b in state.received if r == "/api/list/new"] == [
        x["name"] for x in lists
    ]


def test_push_follows_no_redirect_and_sends_the_key_nowhere_else(exported: Path) -> None:
    state, elsewhere = FakeNeuronpedia(), Elsewhere()
    servers = [_serve(state), _serve_elsewhere(elsewhere)]
    try:
        for code in (301, 302, 303, 307, 308):
            state.redirect_uploads = (code, elsewhere.url)
            error = one_line_error(push(exported, state.url), code=2)
            assert f"HTTP {code}" in error and f"{elsewhere.url}/api/feature/upload-batch" in error
            assert KEY not in error
            # the model and the source set were made; no upload counts as done
            assert logged_steps(exported) == ["model", "source-set"], code
        assert [r for r in elsewhere.requests if KEY in json.dumps(r)] == []
        assert elsewhere.requests == []  # not even without the key
        state.redirect_uploads = None
        fixed = push(exported, state.url)
        assert fixed.returncode == 0, fixed.stderr
    finally:
        for server in servers:
            server.shutdown()
    check_everything_sent_once(exported, state)
    assert elsewhere.requests == []


def test_a_sign_in_page_is_a_failure_not_a_push(exported: Path) -> None:
    state = FakeNeuronpedia(sign_in_at=1)
    server = _serve(state)
    try:
        error = one_line_error(push(exported, state.url), code=2)
        assert "POST /api/feature/upload-batch" in error and "HTML" in error
        assert logged_steps(exported) == ["model", "source-set", "batch-0"]
        again = push(exported, state.url)
        assert again.returncode == 0, again.stderr
    finally:
        server.shutdown()
    check_everything_sent_once(exported, state)


def test_damaged_log_lines_are_skipped_and_named_never_cutting_later_lines(
    exported: Path,
) -> None:
    state = FakeNeuronpedia()
    server = _serve(state)
    try:
        assert push(exported, state.url).returncode == 0
        log = exported / "pushed.jsonl"
        lines = log.read_text(encoding="utf-8").splitlines()
        assert len(lines) > 4
        # an empty object and a list in the middle; the last line cut off by a kill
        damaged = [*lines[:2], "{}", *lines[2:3], '["step"]', *lines[3:-1], lines[-1][:9]]
        log.write_text("\n".join(damaged), encoding="utf-8")
        before = len(state.received)
        second = push(exported, state.url)
        assert second.returncode == 0, second.stderr
        warned = [line for line in second.stderr.splitlines() if "WARNING" in line]
        assert len(warned) == 3, second.stderr
        for n, warning in zip((3, 5, len(damaged)), warned, strict=True):
            assert f"{log}:{n}:" in warning
        # only the step whose line was cut off is sent again, on a line of its own
        assert len(state.received) == before + 1
        assert state.received[-1] == state.received[before - 1]
        third = push(exported, state.url)
        assert third.returncode == 0 and len(state.received) == before + 1
    finally:
        server.shutdown()
    assert logged_steps_skipping_damage(exported) == [json.loads(x)["step"] for x in lines]


def logged_steps_skipping_damage(folder: Path) -> list[str]:
    steps = []
    for line in (folder / "pushed.jsonl").read_text(encoding="utf-8").splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(entry, dict) and "step" in entry:
            steps.append(entry["step"])
    return steps
