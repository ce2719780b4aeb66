"""Kubernetes names derived from user-given ones (Secret names, Workspace names).

A Secret name is a DNS-1123 *subdomain* (``acr.push`` is fine), but a volume name must be a
DNS-1123 *label*: no dots, at most 63 characters. ``dns1123_label`` maps any text to a valid label
that stays the same for the same text; when it had to change the text (a character replaced,
cut to length) it appends a short hash of the original, so ``acr.push`` and ``acr-push`` do not
collide on one volume name.
"""

from __future__ import annotations

import hashlib
import re

DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
MAX_LABEL = 63
HASH_CHARS = 8


def is_dns1123_label(name: str) -> bool:
    return len(name) <= MAX_LABEL and bool(DNS1123_LABEL.match(name))


def dns1123_label(text: str) -> str:
    """``text`` itself when it is a valid label, else a stable valid label with a hash suffix."""
    if is_dns1123_label(text):
        return text
    digest = hashlib.sha256(text.encode()).hexdigest()[:HASH_CHARS]
    cleaned = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    cleaned = cleaned[: MAX_LABEL - HASH_CHARS - 1].rstrip("-")
    return f"{cleaned}-{digest}" if cleaned else digest
