"""Image references for the steps: the one parser (``api.image_ref``), its errors as ``StepError``."""

from __future__ import annotations

from api.image_ref import DIGEST_RE, TAG_RE, ImageRef, is_digest
from stepkit.common import StepError

__all__ = ["DIGEST_RE", "TAG_RE", "ImageRef", "is_digest", "parse_image"]


def parse_image(text: str, what: str = "--image") -> ImageRef:
    """``ImageRef.parse`` with a ``StepError`` (exit 2) naming the flag or row ``what``."""
    try:
        return ImageRef.parse(text)
    except ValueError as exc:
        raise StepError(f"{what}: {exc}") from None
