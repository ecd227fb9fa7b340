"""The browser review: the real `labeler review RUN --web --port 0` command, driven by a
real headless Chromium (Debian's /usr/bin/chromium through playwright) and by plain HTTP.

Markup planted into a token, a judge's rationale, a note and a reviewer name must show as
text and never run."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import polars as pl
import pytest

from collectors.run_format import EXAMPLES
from labeler.labeling.store import LabelStore
from labeler.reporting.disputes import DisputeRules
from labeler.review.queue import review_queue
from labeler.run.schemas import ReviewDecision
from tests.conftest import CollectedDemo, Tab

if TYPE_CHECKING:
    pass

LABELER = [sys.executable, "-c", "from labeler.cli import main; main()"]
XSS_SCRIPT = "<script>window.__pwned=1</script>"
XSS_IMG = '<img src=x onerror="window.__pwned=2">'
XSS_RATIONALE = 'it fires on <img src=x onerror="window.__pwned=3"> everywhere'
XSS_NAME = '<img src=x onerror="window.__pwned=4">'
NAME_KEY = "labeler.review.reviewer"
NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@dataclass(frozen=True)
class Served:
    url: str
    run: Path
    queue: list[str]  # the disputed features at the start, most informative first

    @property
    def planted(self) -> str:
        """The feature whose example and rationale carry markup."""
        return self.queue[0]


def _start(
    run: Path, *args: str, stderr: Path, deaf: bool = False, command: str = "review"
) -> tuple[subprocess.Popen[str], str]:
    """`labeler review RUN --web ...` (or `labeler browse RUN ...` with ``command``) and
    the URL it prints once it answers (after any other lines); ``deaf``: started
    with SIGINT ignored and blocked, as a script's background job or a thread that blocks
    signals would start it."""

    def deafen() -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})

    with stderr.open("w") as err:
        process = subprocess.Popen(
            [*LABELER, command, str(run), *(["--web"] if command == "review" else []), *args],
            stdout=subprocess.PIPE, stderr=err, text=True, env={**os.environ, "COLUMNS": "200"},
            preexec_fn=deafen if deaf else None,
        )  # fmt: skip
    assert process.stdout is not None
    line = lines = ""
    while (found := re.search(r"http://127\.0\.0\.1:\d+/", line)) is None:
        line = process.stdout.readline()
        lines += line
        if not line:
            break
    if found is None:
        process.kill()
        process.wait()
        pytest.fail(f"no URL from `labeler {command}`: {lines!r}\n{stderr.read_text()}")
    return process, found.group(0)


def _stop(process: subprocess.Popen[str]) -> int:
    """Ctrl-C, as a user stops it; its exit status."""
    process.send_signal(signal.SIGINT)
    try:
        return process.wait(timeout=30)  # slack for a loaded machine
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def served(labeled: CollectedDemo, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """A copy of the labeled demo run with markup planted into its most disputed feature,
    served by the real command without --reviewer."""
    run = tmp_path_factory.mktemp("review-web") / "run"
    shutil.copytree(labeled.run, run)
    store = LabelStore(run / "labels.sqlite")
    try:
        queue = [item.feature_id for item in review_queue(store, DisputeRules())]
        assert len(queue) >= 5, f"the demo run has too few disputed features: {queue}"
        with store.conn:
            store.conn.execute(
                "UPDATE judgments SET payload = json_set(payload, '$.classification.rationale', ?)"
                " WHERE feature_id = ? AND status = 'ok'",
                (XSS_RATIONALE, queue[0]),
            )
    finally:
        store.close()
    examples = pl.read_parquet(run / EXAMPLES)
    target = (pl.col("feature_id") == queue[0]) & (pl.col("kind") == "top") & (pl.col("rank") == 0)
    row = examples.filter(target).row(0, named=True)
    tokens = list(row["tokens"])
    free = [i for i in range(len(tokens)) if i != row["highlight"]]
    tokens[free[0]], tokens[free[1]] = XSS_SCRIPT, XSS_IMG
    planted = pl.lit(pl.Series([tokens], dtype=pl.List(pl.String)))
    examples = examples.with_columns(
        pl.when(target).then(planted).otherwise(pl.col("tokens")).alias("tokens")
    )
    examples.write_parquet(run / EXAMPLES)
    _plant_byte_tokens(run, queue)
    ids = run.parent / "scored.txt"
    ids.write_text(f"{queue[0]}\n", encoding="utf-8")
    scored = subprocess.run([*LABELER, "score-outputs", str(run), "--features", str(ids)],
                            capture_output=True, text=True, timeout=300, check=False)  # fmt: skip
    assert scored.returncode == 0, scored.stderr
    process, url = _start(run, "--port", "0", stderr=run.parent / "server.log")
    try:
        yield Served(url, run, queue)
    finally:
        _stop(process)


def _plant_byte_tokens(run: Path, features: list[str]) -> None:
    """The demo's fitted unembedding leaves byte tokens (never in the corpus) out of every
    logit lens: put a lone continuation byte and a control byte at the end of these
    features' promoted tokens, as a model with a byte-level vocabulary shows them."""
    from adapters.tokenizer_loading import load_tokenizer
    from collectors.run_format import FEATURES, read_run_info

    tokenizer = load_tokenizer(Path(read_run_info(run).adapter_path))
    lone = next(i for i in range(len(tokenizer)) if tokenizer.decode([i]) == "\ufffd")
    control = next(i for i in range(len(tokenizer)) if tokenizer.decode([i]) == "\x07")
    table = pl.read_parquet(run / FEATURES)
    planted = pl.col("feature_id").is_in(features)
    table = table.with_columns(
        pl.when(planted).then(pl.col("top_logits").list.head(8).list.concat(
            pl.lit(pl.Series([[tokenizer.decode([lone]), tokenizer.decode([control])]])))
        ).otherwise(pl.col("top_logits")).alias("top_logits"),
        pl.when(planted).then(pl.col("top_logit_ids").list.head(8).list.concat(
            pl.lit(pl.Series([[lone, control]], dtype=pl.List(pl.Int64))).cast(
                table.schema["top_logit_ids"]))
        ).otherwise(pl.col("top_logit_ids")).alias("top_logit_ids"),
    )  # fmt: skip
    table.write_parquet(run / FEATURES)


def http(
    url: str, method: str = "GET", body: object = None, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    data = (
        None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    )
    sent = {"Content-Type": "application/json"} if body is not None else {}
    request = urllib.request.Request(url, data=data, method=method, headers=sent | (headers or {}))
    try:
        with NO_PROXY.open(request, timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def decide(
    served: Served, feature_id: str, body: object, **headers: str
) -> tuple[int, dict[str, Any]]:
    status, _, raw = http(f"{served.url}api/feature/{feature_id}/decision", "POST", body, headers)
    return status, json.loads(raw)


def reviews(served: Served, feature_id: str) -> list[ReviewDecision]:
    store = LabelStore(served.run / "labels.sqlite")
    try:
        return store.reviews(feature_id)
    finally:
        store.close()


def test_decide_with_the_keyboard(served: Served, tab: Tab) -> None:
    page = tab.page
    tab.open(served.url)
    rows = page.locator("#queue tbody tr")
    assert rows.count() == len(served.queue)
    assert rows.first.get_attribute("data-feature-id") == served.planted
    rows.first.locator("a").click()
    page.wait_for_selector(f"#feature-panel[data-loaded='{served.planted}']")
    assert page.url == f"{served.url}feature/{served.planted}"

    # the planted markup is text in token spans, heat-shaded, with the activation on hover
    for markup in (XSS_SCRIPT, XSS_IMG):
        token = page.locator(".tok").filter(has_text=markup)
        assert token.count() == 1 and token.first.is_visible()
        assert token.first.text_content() == markup
        assert token.first.get_attribute("title", timeout=1000) is not None
    assert page.locator("img").count() == 0
    assert tab.pwned() == "undefined"
    activating = page.locator(".example").first.locator(".tok.hl")
    assert activating.count() == 1
    assert "(the activating token)" in (activating.get_attribute("title") or "")
    assert "rgb(" in activating.evaluate("e => e.style.backgroundColor")
    assert page.locator("#top-logits .logit").count() > 0

    # the judges' answers are not on the page until j
    assert page.locator(".judge-rationale").count() == 0
    assert XSS_RATIONALE not in page.inner_text("body")
    page.keyboard.press("j")
    rationale = page.locator(".judge-rationale").first
    rationale.wait_for(state="visible")
    assert XSS_RATIONALE in rationale.inner_text()
    assert tab.pwned() == "undefined"

    # l, Enter: the server asks for a name (no --reviewer), the page asks once, saves, moves on
    page.keyboard.press("l")
    page.keyboard.press("Enter")
    page.wait_for_selector("#name-dialog[open]")
    page.fill("#name-input", "alice")
    page.keyboard.press("Enter")
    toast = page.locator("#toast")
    toast.wait_for(state="visible")
    assert f"{served.planted} saved as language by alice" in toast.inner_text()
    page.wait_for_url(f"{served.url}feature/{served.queue[1]}")
    page.wait_for_selector(f"#feature-panel[data-loaded='{served.queue[1]}']")
    assert page.locator(".judge-rationale").count() == 0  # hidden again on the next feature
    assert [(r.reviewer, r.action, r.category) for r in reviews(served, served.planted)] == [
        ("alice", "decide", "language")
    ]
    assert page.evaluate(f"localStorage.getItem('{NAME_KEY}')") == "alice"
    assert page.locator("#reviewer-name").inner_text() == "alice"
    assert page.locator(f"#queue tr[data-feature-id='{served.planted}']").count() == 0
    assert tab.errors == []


def test_skip_then_reasoning_with_selects_by_keyboard(served: Served, tab: Tab) -> None:
    page = tab.page
    tab.open(served.url)
    page.evaluate(f"localStorage.setItem('{NAME_KEY}', 'dora')")
    skipped, decided = served.queue[2], served.queue[3]
    tab.open(f"{served.url}feature/{skipped}")
    page.wait_for_selector(f"#feature-panel[data-loaded='{skipped}']")
    page.keyboard.press("s")
    page.locator("#toast", has_text=f"{skipped} skipped by dora").wait_for()
    page.wait_for_selector(f"#feature-panel[data-loaded='{decided}']")
    assert [(r.reviewer, r.action, r.category) for r in reviews(served, skipped)] == [
        ("dora", "skip", None)
    ]
    assert page.locator(f"#queue tr[data-feature-id='{skipped}']").count() == 1  # still open

    page.keyboard.press("r")
    assert page.evaluate("document.activeElement.id") == "subcategory"
    page.keyboard.press("ArrowDown")
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") == "mechanism"
    page.keyboard.press("ArrowDown")
    page.keyboard.press("Escape")
    page.keyboard.press("n")
    page.keyboard.type(f"looks like a plan {XSS_SCRIPT}")
    page.keyboard.press("Enter")
    page.locator("#toast", has_text=f"{decided} saved as reasoning").wait_for()
    page.wait_for_selector(f"#feature-panel[data-loaded='{served.queue[4]}']")
    [stored] = reviews(served, decided)
    assert (stored.reviewer, stored.category, stored.subcategory, stored.mechanism) == (
        "dora", "reasoning", "hesitation", "output",
    )  # fmt: skip
    assert stored.note == f"looks like a plan {XSS_SCRIPT}"

    page.keyboard.press("ArrowLeft")  # the one before in the queue: the skipped one
    page.wait_for_url(f"{served.url}feature/{skipped}")
    tab.open(f"{served.url}feature/{decided}")  # the note shows as text
    page.wait_for_selector(f"#feature-panel[data-loaded='{decided}']")
    assert XSS_SCRIPT in page.locator("#review-list .note").inner_text()
    page.keyboard.press("?")
    assert page.locator("#help-dialog").is_visible()
    page.keyboard.press("Escape")
    assert not page.locator("#help-dialog").is_visible()
    assert tab.pwned() == "undefined"
    assert tab.errors == []


def test_two_reviewers_are_both_kept_and_their_disagreement_shown(served: Served, tab: Tab) -> None:
    feature = served.queue[4]
    status, first = decide(served, feature, {"reviewer": "bob", "category": "language"})
    assert status == 201, first
    assert first["decision"]["reviewer"] == "bob" and first["disagreement"] is False
    status, second = decide(served, feature, {
        "reviewer": XSS_NAME, "category": "reasoning", "subcategory": "planning",
        "mechanism": "", "note": XSS_SCRIPT,
    })  # fmt: skip
    assert status == 201, second
    assert second["decision"]["mechanism"] is None
    assert [r["reviewer"] for r in second["reviews"]] == ["bob", XSS_NAME]
    assert second["disagreement"] is True
    assert [(r.reviewer, r.category) for r in reviews(served, feature)] == [
        ("bob", "language"), (XSS_NAME, "reasoning"),
    ]  # fmt: skip

    status, _, raw = http(f"{served.url}api/feature/{feature}")
    view = json.loads(raw)
    assert status == 200 and view["disagreement"] is True and len(view["reviews"]) == 2

    tab.open(f"{served.url}feature/{feature}")
    page = tab.page
    page.wait_for_selector(f"#feature-panel[data-loaded='{feature}']")
    warning = page.locator("#disagreement")
    assert warning.is_visible()
    assert "Reviewers disagree" in warning.inner_text()
    assert "bob: language" in warning.inner_text()
    assert f"{XSS_NAME}: reasoning" in warning.inner_text()
    assert page.locator("#review-list .reviewer").all_inner_texts() == ["bob", XSS_NAME]
    assert page.locator("img").count() == 0
    assert tab.pwned() == "undefined"

    page.check("#show-decided")  # the queue with decided features names who decided
    row = page.locator(f"#queue tr[data-feature-id='{feature}']")
    row.wait_for()
    assert "bob" in row.inner_text()
    assert tab.errors == []


def test_unknown_features_and_bad_decisions(served: Served, tab: Tab) -> None:
    status, headers, body = http(f"{served.url}feature/L99F99999")
    assert status == 404 and headers["Content-Type"].startswith("text/html")
    status, headers, body = http(f"{served.url}api/feature/L99F99999")
    assert status == 404 and headers["Content-Type"].startswith("application/json")
    assert "L99F99999" in json.loads(body)["error"]
    for path in ("nope", "api/nope", "feature/a/b", "api/feature/"):
        assert http(served.url + path)[0] == 404, path
    assert http(f"{served.url}api/feature/{served.queue[1]}/decision")[0] == 405
    assert http(f"{served.url}api/queue", "DELETE")[0] == 405

    feature = served.queue[1]
    before = reviews(served, feature)
    status, answer = decide(served, feature, {"reviewer": "x", "category": "magic"})
    assert status == 400 and "category" in answer["error"], answer
    status, answer = decide(served, feature, {"category": "language"})
    assert status == 400 and answer["field"] == "reviewer" and "reviewer" in answer["error"]
    status, answer = decide(served, feature, {"reviewer": "x", "category": "language", "x": 1})
    assert status == 400 and "'x'" in answer["error"]
    status, answer = decide(served, feature, {"reviewer": "x", "category": "domain",
                                              "subcategory": "planning"})  # fmt: skip
    assert status == 400 and "subcategory" in answer["error"]
    assert decide(served, "L99F99999", {"reviewer": "x", "category": "language"})[0] == 404
    assert decide(served, feature, b"{not json")[0] == 400
    assert decide(served, feature, ["language"])[0] == 400
    ok = {"reviewer": "x", "category": "language"}
    assert decide(served, feature, ok, Origin="http://evil.example")[0] == 403
    assert decide(served, feature, ok, **{"Content-Type": "text/plain"})[0] == 415
    assert http(f"{served.url}api/queue", headers={"Host": "evil.example"})[0] == 403
    assert reviews(served, feature) == before

    page = tab.page
    response = page.goto(f"{served.url}feature/L99F99999")
    assert response is not None and response.status == 404
    page.wait_for_selector("#feature-panel[data-loaded='L99F99999']")
    assert "No such feature" in page.locator("#not-found").inner_text()
    assert "L99F99999" in page.locator("#not-found").inner_text()
    assert not page.locator("#decision").is_visible()
    first = page.locator("#queue tbody tr").first.get_attribute("data-feature-id")
    page.keyboard.press("ArrowRight")  # back into the queue, at its start
    page.wait_for_url(f"{served.url}feature/{first}")
    assert tab.errors == []


def test_api_queue_headers_and_no_tracebacks(served: Served) -> None:
    status, headers, body = http(served.url)
    assert status == 200
    policy = headers["Content-Security-Policy"]
    assert "default-src 'none'" in policy and "connect-src 'self'" in policy
    nonce = re.search(r"script-src 'nonce-([^']+)'", policy)
    assert nonce is not None
    page = body.decode()
    # every script and style element carries the answer's nonce, and nothing else does
    tags = page.count("<script") + page.count("<style")
    assert tags >= 2 and page.count(f'nonce="{nonce.group(1)}"') == tags
    assert "__CSP_NONCE__" not in page
    assert "innerHTML" not in page and "insertAdjacentHTML" not in page
    assert headers["X-Content-Type-Options"] == "nosniff"

    status, headers, body = http(f"{served.url}api/queue?include_decided=1")
    items = json.loads(body)
    assert status == 200 and headers["X-Content-Type-Options"] == "nosniff"
    assert {i["feature_id"] for i in items} == set(served.queue)
    assert set(items[0]) == {"feature_id", "reasons", "score", "categories", "min_detection",
                             "decided_by", "explanation", "audit"}  # fmt: skip
    assert all(i["audit"] is None for i in items)  # no audit drawn: the disputes alone
    assert http(f"{served.url}api/queue?include_decided=maybe")[0] == 400
    status, _, body = http(f"{served.url}api/session")
    assert status == 200 and json.loads(body)["reviewer"] == ""
    status, _, body = http(f"{served.url}api/feature/%ZZ")
    assert status == 404 and b"Traceback" not in body


def test_ctrl_c_ends_it_cleanly_and_a_busy_port_is_a_clear_error(
    served: Served, tmp_path: Path
) -> None:
    busy = served.url.rsplit(":", 1)[1].strip("/")
    result = subprocess.run(
        [*LABELER, "review", str(served.run), "--web", "--port", busy],
        capture_output=True, text=True, timeout=60, check=False,
        env={**os.environ, "COLUMNS": "200"},
    )  # fmt: skip
    assert result.returncode == 2, result.stdout
    assert f"--port {busy}" in result.stderr and "--port 0" in result.stderr

    process, url = _start(served.run, "--port", "0", "--reviewer", "erin",
                          stderr=tmp_path / "server.log")  # fmt: skip
    try:
        assert process.stdout is not None
        port = url.rstrip("/").rsplit(":", 1)[1]  # how to reach it from another machine
        assert f"ssh -L {port}:127.0.0.1:{port} " in process.stdout.readline()
        status, _, body = http(f"{url}api/session")
        assert status == 200 and json.loads(body)["reviewer"] == "erin"
    finally:
        assert _stop(process) == 0
    assert "Traceback" not in (tmp_path / "server.log").read_text()


def _contrast(color: str, background: str) -> float:
    """The WCAG contrast ratio of two CSS ``rgb(...)`` colours."""

    def luminance(css: str) -> float:
        r, g, b = (int(x) / 255 for x in re.findall(r"[\d.]+", css)[:3])
        linear = [c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4 for c in (r, g, b)]
        return 0.2126 * linear[0] + 0.7152 * linear[1] + 0.0722 * linear[2]

    light, dark = sorted((luminance(color), luminance(background)), reverse=True)
    return (light + 0.05) / (dark + 0.05)


_COLOURS = """k => {
  let e = k, bg = "rgba(0, 0, 0, 0)";
  while (e && /rgba\\(.*, 0\\)$/.test(bg = getComputedStyle(e).backgroundColor)) {
    e = e.parentElement;
  }
  return [getComputedStyle(k).color, bg];
}"""


def test_the_chosen_category_keeps_readable_key_hints(served: Served, tab: Tab) -> None:
    page = tab.page
    feature = served.queue[-1]
    tab.open(f"{served.url}feature/{feature}")
    page.wait_for_selector(f"#feature-panel[data-loaded='{feature}']")
    for key, category, number in (("l", "language", "3"), ("u", "uninterpretable", "4")):
        page.keyboard.press(key)
        pressed = page.locator(".cat[aria-pressed=true]")
        assert pressed.count() == 1 and pressed.get_attribute("data-category") == category
        hints = pressed.locator("kbd")
        assert hints.all_inner_texts() == [key, number]
        for hint in hints.all():
            color, background = hint.evaluate(_COLOURS)
            assert _contrast(color, background) >= 4.5, (category, color, background)
    assert reviews(served, feature) == []  # choosing is not saving
    assert tab.errors == []


def test_enter_pressed_before_the_queue_loads_starts_the_review(served: Served, tab: Tab) -> None:
    page = tab.page
    held: list[Any] = []
    page.route("**/api/queue*", lambda route: held.append(route))
    page.goto(served.url)  # loaded; the queue's request is held back
    for _ in range(500):
        if held:
            break
        page.wait_for_timeout(20)
    assert held, "the page never asked for the queue"
    page.keyboard.press("Enter")
    assert page.locator("#toast").is_hidden()  # not "The queue is empty"
    assert page.get_attribute("body", "data-ready") is None
    held[0].continue_()
    page.wait_for_selector("body[data-ready=true]")
    first = page.locator("#queue tbody tr").first.get_attribute("data-feature-id")
    page.wait_for_selector(f"#feature-panel[data-loaded='{first}']")  # Enter took effect
    assert page.url == f"{served.url}feature/{first}"
    toast = page.locator("#toast")
    assert toast.is_hidden() or "empty" not in toast.inner_text()
    assert tab.errors == []


def test_special_and_byte_tokens_read_as_names_and_bytes(served: Served, tab: Tab) -> None:
    """The demo's tokens are decoded one at a time: its examples hold the DeepSeek markers
    and (planted by the fixture) its logit lens lone bytes of multi-byte characters (``�``)
    and control bytes."""
    raw_bytes = re.compile("[\ufffd\x00-\x08\x0b-\x1f\x7f]")
    chosen = None
    for feature in served.queue:
        view = json.loads(http(f"{served.url}api/feature/{feature}")[2])
        lens = view["top_logits"] + view["bottom_logits"]
        tokens = {t for e in view["examples"] for t in e["tokens"]}
        if "<｜begin▁of▁sentence｜>" in tokens and any(raw_bytes.search(t) for t in lens):
            chosen = view
            break
    assert chosen is not None, "no disputed demo feature with a marker and a byte token"
    shown_lens = chosen["top_logits_shown"] + chosen["bottom_logits_shown"]
    assert not any(raw_bytes.search(t) for t in shown_lens)
    assert any(re.search(r"<0x[0-9A-F]{2}>", t) for t in shown_lens), shown_lens

    page = tab.page
    tab.open(f"{served.url}feature/{chosen['feature_id']}")
    page.wait_for_selector(f"#feature-panel[data-loaded='{chosen['feature_id']}']")
    texts = page.locator(".tok").all_text_contents()
    assert "‹bos›" in texts and "‹Assistant›" in texts and "‹think›" in texts
    assert not any("｜" in t or "▁" in t or raw_bytes.search(t) for t in texts)
    bos = page.locator(".tok.special", has_text="‹bos›").first
    assert 'stored as "<｜begin▁of▁sentence｜>"' in (bos.get_attribute("title") or "")
    chips = page.locator("#top-logits .logit, #bottom-logits .logit").all_text_contents()
    assert chips == shown_lens
    assert not any(raw_bytes.search(t) for t in chips)
    assert page.locator(".lens .logit.bytes").count() >= 1
    assert tab.errors == []


def test_the_queue_has_an_explanation_column_once_asked_for(served: Served, tab: Tab) -> None:
    items = json.loads(http(f"{served.url}api/queue?include_decided=1")[2])
    store = LabelStore(served.run / "labels.sqlite")
    try:
        judged = store.judgments("heuristic")  # the demo run's only judge
    finally:
        store.close()
    for item in items:
        stored = judged[item["feature_id"]].judgment
        assert stored is not None and item["explanation"] == stored.explanation

    page = tab.page
    tab.open(served.url)
    header = page.locator("#queue th.explanation-col")
    assert header.is_hidden()  # the judges' words stay out of sight until asked for
    page.check("#show-explanations")
    assert header.is_visible()
    explained = {item["feature_id"]: item["explanation"] for item in items}
    rows = page.locator("#queue tbody tr")
    assert rows.count() > 0
    for row in rows.all():
        cell = row.locator("td.explanation")
        assert cell.is_visible()
        assert cell.text_content() == explained[row.get_attribute("data-feature-id") or ""]
    tab.open(served.url)  # remembered in this browser
    assert page.locator("#queue th.explanation-col").is_visible()
    assert tab.errors == []


def test_deep_nesting_and_oversized_bodies_are_refused_in_one_line(served: Served) -> None:
    feature = served.queue[1]
    before = reviews(served, feature)
    deep = b"[" * 60_000 + b"]" * 4_000
    in_note = b'{"reviewer": "x", "category": "language", "note": ' + b"[" * 30_000 + b"}"
    for body in (deep, in_note):
        status, answer = decide(served, feature, body)
        assert status == 400, answer
        assert "nested too deeply" in answer["error"] and "\n" not in answer["error"]
    status, answer = decide(served, feature, {"reviewer": "x", "category": "language",
                                              "note": {"a": [1]}})  # fmt: skip
    assert status == 400 and answer["field"] == "note" and "an object" in answer["error"]
    big = {"reviewer": "x", "category": "language", "note": "a" * 70_000}
    status, answer = decide(served, feature, big)
    assert status == 413 and "\n" not in answer["error"], answer
    assert reviews(served, feature) == before
    assert http(f"{served.url}api/session")[0] == 200  # still serving


def test_ctrl_c_stops_it_even_when_started_with_sigint_ignored_and_blocked(
    served: Served, tmp_path: Path
) -> None:
    process, url = _start(served.run, "--port", "0", stderr=tmp_path / "server.log", deaf=True)
    assert http(f"{url}api/session")[0] == 200
    assert _stop(process) == 0


def test_the_feature_page_shows_its_output_score(served: Served, tab: Tab) -> None:
    """The planted feature was steered (`labeler score-outputs`); another was not."""
    tab.open(f"{served.url}feature/{served.planted}")
    shown = tab.page.locator(".steer #output-score")
    shown.wait_for()
    words = shown.inner_text()
    assert words.startswith("Steering: "), words
    assert "changes the log-probability of its tokens by" in words
    assert shown.locator("span.logit").count() == 5  # the tokens it promotes most
    status, _, body = http(f"{served.url}api/feature/{served.planted}")
    score = json.loads(body)["output_score"]
    assert status == 200 and score["promoted"] and 0 < score["p_value"] <= 1
    tab.open(f"{served.url}feature/{served.queue[1]}")
    assert "No output score yet" in tab.page.locator("#output-score").inner_text()
