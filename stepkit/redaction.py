"""Keep URL secrets out of everything a step writes: logs, summaries, error lines.

Dataset and artifact URLs are often *signed*: an Azure SAS token (``?sv=...&sig=...``), an S3
presigned query (``X-Amz-Signature=...``), or credentials in the userinfo
(``https://user:token@host/``). Whoever reads a step's log, its ``summary.json`` or the Argo UI
must not be able to reuse them, so every URL a step prints goes through ``redact_url`` (query
values and userinfo become ``***``, parameter names stay so a reader still sees *that* the URL
was signed), and free text that may quote URLs (exception messages, library log records such as
httpx's ``HTTP Request: GET ...``) goes through ``redact_text``. ``install_log_redaction`` puts a
filter on the root handlers so records from any logger are redacted before they are formatted
out. Standard library only.
"""

from __future__ import annotations

import logging
import re
import urllib.parse

MASK = "***"

# scheme://[userinfo@]host...: up to the first character that cannot be part of a URL in prose.
_URL = re.compile(r"\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s'\"<>`]+")
# name=value after "?" (or after "&" inside such a query), wherever it stands; masked values stay masked.
_QUERY_PAIR = re.compile(r"(?<=[?&])([\w.~%-]+)=(?!\*\*\*(?:[&\s'\"#]|$))[^&\s'\"<>`#]*")


def redact_url(url: str) -> str:
    """``url`` without secrets: userinfo and every query value (and the fragment) masked."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:  # e.g. an invalid IPv6 netloc: mask everything after the scheme
        scheme = url.split(":", 1)[0] if ":" in url else ""
        return f"{scheme}://{MASK}" if scheme else MASK
    netloc = parts.netloc
    if "@" in netloc:
        netloc = MASK + "@" + netloc.rpartition("@")[2]
    query = parts.query
    if query:
        pairs = []
        for item in query.split("&"):
            name, eq, _ = item.partition("=")
            pairs.append(f"{name}={MASK}" if eq else (MASK if name else ""))
        query = "&".join(pairs)
    fragment = MASK if parts.fragment else ""
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, query, fragment))


def redact_text(text: str) -> str:
    """Every URL inside ``text`` redacted (see ``redact_url``), and any other ``?name=value`` query
    (a relative ``Location``, a path with a query) masked the same way."""
    text = _URL.sub(lambda m: redact_url(m.group(0)), text)
    return _QUERY_PAIR.sub(lambda m: f"{m.group(1)}={MASK}", text)


class RedactingFilter(logging.Filter):
    """Formats the record's message once, redacted, so no handler can print the raw arguments."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a broken format string: leave it to logging's own error report
            return True
        record.msg, record.args = redact_text(message), None
        if record.exc_info and not record.exc_text:
            record.exc_text = redact_text(logging.Formatter().formatException(record.exc_info))
        elif record.exc_text:
            record.exc_text = redact_text(record.exc_text)
        return True


def install_log_redaction() -> None:
    """Redact every record that reaches the root handlers (idempotent).

    httpcore's debug log dumps raw request and response headers (``Authorization``, signed
    ``Location``s) that no pattern can redact reliably: it is held at INFO, where it is silent.
    """
    logging.getLogger("httpcore").setLevel(max(logging.INFO, logging.getLogger("httpcore").level))
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())
