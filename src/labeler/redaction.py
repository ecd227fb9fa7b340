"""Keys kept out of everything the labeler stores, logs, queues or exports.

A provider's error text may echo the key it was sent ("Incorrect API key provided:
sk-..."), and that text becomes a failure's reason. Every configured key (the value of
an environment variable whose name says it holds a secret) and anything shaped like a
provider key is replaced by ``[REDACTED]`` wherever text leaves the process: the label
store, log records, Redis payloads and the catalog. A provider's reply is stored too
(the reply cache, batch results), and a model may repeat a key it saw in its prompt, so
:func:`redact_json` cleans every string of a reply before it is kept.
"""

from __future__ import annotations

import json
import logging
import os
import re
from functools import lru_cache
from typing import Any

MARK = "[REDACTED]"
SECRET_NAME = re.compile(r"(API_KEY|_TOKEN|_SECRET|PASSWORD)$|^(OPENAI|ANTHROPIC)_.*KEY", re.I)
# OpenAI (sk-..., sk-proj-...), Anthropic (sk-ant-...), Hugging Face (hf_...), and a bearer
# token in an echoed header
KEY_SHAPES = re.compile(
    r"\bsk-[A-Za-z0-9][A-Za-z0-9_\-]{14,}"
    r"|\bhf_[A-Za-z0-9]{20,}"
    r"|(?<=Bearer )[A-Za-z0-9._\-]{12,}"
)
MIN_SECRET_LEN = 6


def configured_secrets() -> tuple[str, ...]:
    """Values of the environment's secret-named variables, longest first."""
    return _secrets(tuple(sorted(os.environ.items())))


@lru_cache(maxsize=8)
def _secrets(items: tuple[tuple[str, str], ...]) -> tuple[str, ...]:
    found = {v for k, v in items if SECRET_NAME.search(k) and len(v) >= MIN_SECRET_LEN}
    return tuple(sorted(found, key=len, reverse=True))


def redact(text: str) -> str:
    """``text`` with every configured key and every key-shaped string replaced."""
    for secret in configured_secrets():
        if secret in text:
            text = text.replace(secret, MARK)
    return KEY_SHAPES.sub(MARK, text)


def redact_optional(text: str | None) -> str | None:
    return None if text is None else redact(text)


def redact_json(value: Any) -> Any:
    """``value`` (a decoded JSON document) with every string redacted, keys included.

    Strings are cleaned one by one rather than in the serialized text, so the result
    is still the same document; one search of the serialized text first tells whether
    there is anything to clean, which there almost never is."""
    text = json.dumps(value, ensure_ascii=False)
    escaped = (json.dumps(s, ensure_ascii=False)[1:-1] for s in configured_secrets())
    if any(s in text for s in escaped) or KEY_SHAPES.search(text):
        return _redact_value(value)
    return value


def _redact_value(value: Any) -> Any:
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {redact(str(k)): _redact_value(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_redact_value(v) for v in value]
    return value


class RedactingFilter(logging.Filter):
    """Formats a record's message and traceback with the keys replaced (attach it to
    handlers, so that records of every logger pass through it)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        record.msg, record.args = redact(message), None
        if record.exc_info:
            formatter = logging.Formatter()
            record.exc_text = redact(formatter.formatException(record.exc_info))
            record.exc_info = None
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True


def redact_handlers(logger: logging.Logger | None = None) -> None:
    """Put a :class:`RedactingFilter` on every handler of ``logger`` (the root logger by
    default) that has none yet."""
    target = logger or logging.getLogger()
    for handler in target.handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())
