"""The prompt box of `labeler browse RUN --model`: the real command on the planted demo
run, over HTTP and in a real headless Chromium. Ground truth: a planted token-set
feature fires on its trigger token and nowhere else. Bad input is a 400 naming its field;
one prompt runs at a time; hostile text in a prompt shows as text and never runs."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from labeler.review.prompt_box import (
    MAX_PROMPT_CHARS,
    MAX_PROMPT_TOKENS,
    TOP_PER_TOKEN,
    PromptBox,
    PromptGate,
)
from labeler.review.web import Request
from tests.conftest import CollectedDemo, Tab
from tests.test_review_web import _start, _stop, http

WORD = "energy"  # a planted domain (science) trigger: several features fire on it alone
TEXT = "so the energy of it is large"
XSS_IMG = '<img src=x onerror="window.__pwned=1">'
XSS_SCRIPT = "</script><script>window.__pwned=1</script>"


@dataclass(frozen=True)
class Prompted:
    url: str
    run: Path
    log: Path
    truth: dict[str, dict[str, Any]]  # the demo's planted features, by id
    at_start: dict[str, Any]  # /api/session before any prompt

    def ask(self, body: object, **headers: str) -> tuple[int, dict[str, str], dict[str, Any]]:
        status, sent, raw = http(f"{self.url}api/prompt", "POST", body, headers)
        return status, sent, json.loads(raw)

    def planted_on(self, word: str) -> set[str]:
        return {
            fid for fid, t in self.truth.items()
            if t["kind"] == "token_set" and word in t["triggers"]
        }  # fmt: skip


@pytest.fixture(scope="module")
def prompted(
    labeled: CollectedDemo, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Prompted]:
    folder = tmp_path_factory.mktemp("prompt")
    run = folder / "run"
    shutil.copytree(labeled.run, run)
    truth = {t["feature_id"]: t for t in json.loads(labeled.paths.ground_truth.read_text())}
    log = folder / "server.log"
    process, url = _start(run, "--port", "0", "--model", "--device", "cpu", stderr=log,
                          command="browse")  # fmt: skip
    try:
        status, _, raw = http(f"{url}api/session")
        assert status == 200, raw
        yield Prompted(url, run, log, truth, json.loads(raw))
    finally:
        _stop(process)


def _position(tokens: list[str], word: str) -> int:
    found = [i for i, t in enumerate(tokens) if t.strip().lower() == word]
    assert len(found) == 1, tokens
    return found[0]


def test_the_model_loads_on_the_first_prompt(prompted: Prompted) -> None:
    assert prompted.at_start["prompt"] is True
    assert prompted.at_start["prompt_model_loaded"] is False
    assert prompted.at_start["prompt_max_chars"] == MAX_PROMPT_CHARS
    status, _, answer = prompted.ask({"text": TEXT})
    assert status == 200, answer
    session = json.loads(http(f"{prompted.url}api/session")[2])
    assert session["prompt_model_loaded"] is True


def test_a_planted_feature_fires_on_its_trigger_token_only(prompted: Prompted) -> None:
    status, _, answer = prompted.ask({"text": TEXT})
    assert status == 200, answer
    tokens = answer["tokens"]
    at = _position(tokens, WORD)
    planted = prompted.planted_on(WORD)
    top = answer["top"][at]
    assert 0 < len(top) <= TOP_PER_TOKEN
    ids = [f["feature_id"] for f in top]
    # ground truth: what fires most on the trigger is planted on it
    assert set(ids) <= planted, set(ids) - planted
    keys = [f["relative"] for f in top]
    assert keys == sorted(keys, reverse=True)
    assert all(f["activation"] > 0 and f["relative"] > 0 for f in top)
    assert answer["heat"][at] == max(keys)
    for i, others in enumerate(answer["top"]):
        if i != at:
            assert not {f["feature_id"] for f in others} & planted, (tokens[i], others)
    # one feature followed: positive on the trigger, zero on every other token
    chosen = ids[0]
    status, _, followed = prompted.ask({"text": TEXT, "feature": chosen})
    assert status == 200, followed
    values = followed["feature"]["activations"]
    assert len(values) == len(tokens)
    assert values[at] > 0
    assert [v for i, v in enumerate(values) if i != at] == [0.0] * (len(values) - 1)
    assert followed["feature"]["peak"]["position"] == at
    assert values[at] == pytest.approx(top[0]["activation"], rel=1e-3)


def test_bad_input_is_a_400_naming_the_field(prompted: Prompted) -> None:
    cases: list[tuple[object, str | None]] = [
        (b"not json", None),
        (b"[1, 2]", None),
        ({"text": "a", "colour": "red"}, "colour"),
        ({}, "text"),
        ({"text": 12}, "text"),
        ({"text": None}, "text"),
        ({"text": "  \n "}, "text"),
        ({"text": "a" * (MAX_PROMPT_CHARS + 1)}, "text"),
        ({"text": " energy" * (MAX_PROMPT_TOKENS + 1)}, "text"),  # under the characters
        ({"text": "a", "feature": 3}, "feature"),
        ({"text": "a", "feature": "energy"}, "feature"),
        ({"text": "a", "feature": "L99F0"}, "feature"),
        ({"text": "a", "feature": "L0F100000"}, "feature"),
    ]
    assert len(" energy" * (MAX_PROMPT_TOKENS + 1)) <= MAX_PROMPT_CHARS
    for body, field in cases:
        status, _, answer = prompted.ask(body)
        assert status == 400, (body, answer)
        assert answer["field"] == field, (body, answer)
        assert answer["error"] and "\n" not in answer["error"]
    status, _, answer = prompted.ask({"text": "a"}, **{"Content-Type": "text/plain"})
    assert status == 415, answer
    status, _, answer = prompted.ask({"text": "a" * 70_000})
    assert status == 413, answer
    status, _, answer = prompted.ask({"text": "a"}, Origin="http://evil.example")
    assert status == 403, answer
    assert http(f"{prompted.url}api/prompt")[0] == 405
    assert prompted.ask({"text": TEXT})[0] == 200  # still answering


def test_one_prompt_at_a_time_without_a_queue() -> None:
    gate = PromptGate()
    first, second, third = object(), object(), object()
    assert gate.admit(first)
    assert not gate.admit(second)
    assert gate.in_flight == 1
    gate.release(second)  # releasing one never admitted changes nothing
    assert not gate.admit(third)
    gate.release(first)
    with gate.held(second) as admitted:
        assert admitted
        with gate.held(third) as also:
            assert not also
    assert gate.in_flight == 0


def test_a_prompt_while_one_runs_is_told_to_retry(labeled: CollectedDemo) -> None:
    from labeler.run.data import RunData

    box = PromptBox.for_run(RunData.open(labeled.run), model=False)
    running = Request("POST", "/api/prompt", body=b'{"text": "a"}',
                      content_type="application/json")  # fmt: skip
    waiting = Request("POST", "/api/prompt", body=b'{"text": "a"}',
                      content_type="application/json")  # fmt: skip
    assert box.admit(running)
    assert not box.admit(waiting)
    refused = box.answer(waiting)
    assert refused.status == 429
    assert ("Retry-After", "1") in refused.headers
    assert "another prompt is running" in json.loads(refused.body)["error"]
    assert box.answer(running).status == 409  # admitted: answered (no model here)
    box.done(running)
    assert box.admit(waiting)


def test_without_model_the_box_is_off_and_the_route_refuses(
    labeled_copy: Path, tmp_path: Path
) -> None:
    process, url = _start(labeled_copy, "--port", "0", stderr=tmp_path / "server.log",
                          command="browse")  # fmt: skip
    try:
        session = json.loads(http(f"{url}api/session")[2])
        assert session["prompt"] is False
        status, _, raw = http(f"{url}api/prompt", "POST", {"text": TEXT})
        assert status == 409
        assert "--model" in json.loads(raw)["error"]
    finally:
        assert _stop(process) == 0


def test_the_catalog_box_links_the_planted_feature(prompted: Prompted, tab: Tab) -> None:
    page = tab.page
    tab.open(prompted.url)
    box = page.locator("#prompt-section")
    assert box.is_visible()
    assert page.locator("#prompt-text").get_attribute("maxlength") == str(MAX_PROMPT_CHARS)
    page.fill("#prompt-text", TEXT)
    page.click("#prompt-run")
    page.wait_for_selector("#prompt-tokens .ptok")
    tokens = page.locator("#prompt-tokens .ptok")
    texts = tokens.all_text_contents()
    at = _position(texts, WORD)
    tokens.nth(at).focus()  # keyboard focus shows its features
    links = page.locator("#prompt-features a")
    links.first.wait_for()
    shown = links.all_text_contents()
    assert shown and set(shown) <= prompted.planted_on(WORD)
    first = shown[0]
    links.first.click()
    page.wait_for_url(f"**/feature/{first}")
    page.wait_for_selector(f"#feature-panel[data-loaded='{first}']")
    assert tab.errors == []


def test_the_feature_page_box_shows_the_feature_on_its_trigger(
    prompted: Prompted, tab: Tab
) -> None:
    feature = sorted(prompted.planted_on(WORD))[0]
    page = tab.page
    tab.open(f"{prompted.url}feature/{feature}")
    page.wait_for_selector("#prompt-section:not([hidden])")
    page.fill("#fprompt-text", TEXT)
    page.click("#fprompt-run")
    page.wait_for_selector("#fprompt-tokens .ptok")
    tokens = page.locator("#fprompt-tokens .ptok")
    texts = tokens.all_text_contents()
    at = _position(texts, WORD)
    values = [float(v or "nan") for v in
              tokens.evaluate_all("els => els.map((e) => e.dataset.value)")]  # fmt: skip
    assert values[at] > 0
    assert [v for i, v in enumerate(values) if i != at] == [0.0] * (len(values) - 1)
    assert "peak" in page.locator("#fprompt-peak").text_content()  # type: ignore[operator]
    assert tab.errors == []


def test_hostile_text_stays_text(prompted: Prompted, tab: Tab) -> None:
    hostile = f"{XSS_IMG} energy {XSS_SCRIPT}"
    page = tab.page
    tab.open(prompted.url)
    page.fill("#prompt-text", hostile)
    page.click("#prompt-run")
    page.wait_for_selector("#prompt-tokens .ptok")
    shown = "".join(page.locator("#prompt-tokens .ptok").all_text_contents())
    assert "<img" in shown and "</script>" in shown
    assert page.locator("#prompt-tokens img, #prompt-tokens script").count() == 0
    feature = sorted(prompted.planted_on(WORD))[0]
    tab.open(f"{prompted.url}feature/{feature}")
    page.wait_for_selector("#prompt-section:not([hidden])")
    page.fill("#fprompt-text", hostile)
    page.click("#fprompt-run")
    page.wait_for_selector("#fprompt-tokens .ptok")
    assert page.locator("#fprompt-tokens img, #fprompt-tokens script").count() == 0
    assert tab.pwned() == "undefined"
    assert tab.errors == []


def test_browse_model_help_names_the_options() -> None:
    from tests.test_review_web import LABELER

    done = subprocess.run([*LABELER, "browse", "--help"], capture_output=True, text=True,
                          timeout=60, check=False)  # fmt: skip
    assert done.returncode == 0
    assert "--model" in done.stdout and "--device" in done.stdout
