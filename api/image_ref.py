"""The one image-reference parser: ``[registry/]repository[:tag][@sha256:<hex>]``, read as Docker reads it.

Kaito parses ``inference.adapters[].source.image`` and ``tuning.output.image`` as Docker references,
so kaiflow does too (the grammar of distribution's ``reference.ParseNormalizedNamed``):

* the first path component is a registry host only if it holds a ``.`` or a ``:`` or is
  ``localhost``; otherwise the reference is on Docker Hub: ``myadapter:0.1`` →
  ``docker.io/library/myadapter:0.1``, ``user/x`` → ``docker.io/user/x``;
* hosts keep their port (``127.0.0.1:5000``) and may be bracketed IPv6 addresses;
* repository path components are lower case (``[a-z0-9]`` separated by ``.``, ``_``, ``__`` or
  dashes), the whole name at most 255 characters; tags ``[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}``;
  digests ``sha256:`` and 64 lower-case hex digits (the only algorithm registries serve).

``allow_placeholders=True`` lets upper case and ``_`` through in host and repository: Kaito's own
example Workspaces carry placeholders such as ``ACR_REPO_HERE.azurecr.io/ADAPTER_HERE:0.0.1``
and must validate; a registry refuses such a name when it is used.

Pure and light: errors are ``ValueError`` with a message naming the reference; callers wrap them
(``StepError`` in steps, ``FieldError`` in validation).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["DIGEST_RE", "DOCKER_HUB", "TAG_RE", "ImageRef", "is_digest"]

DOCKER_HUB = "docker.io"
DOCKER_HUB_API = "registry-1.docker.io"
_HUB_ALIASES = ("index.docker.io", "registry-1.docker.io")

DIGEST_RE = re.compile(r"^sha256:[a-f0-9]{64}\Z")
TAG_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}\Z")
_DIGEST_ANY_RE = re.compile(r"^[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9A-Za-z=_-]+\Z")
_LABEL = r"(?:[A-Za-z0-9]|[A-Za-z0-9][A-Za-z0-9-]*[A-Za-z0-9])"
_HOST_RE = re.compile(rf"^(?:{_LABEL}(?:\.{_LABEL})*|\[[0-9A-Fa-f:.]+\])(?::[0-9]+)?\Z")
_HOST_LAX_RE = re.compile(r"^(?:[A-Za-z0-9][A-Za-z0-9._-]*|\[[0-9A-Fa-f:.]+\])(?::[0-9]+)?\Z")
_COMPONENT_RE = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*\Z")
_COMPONENT_LAX_RE = re.compile(r"^[A-Za-z0-9]+(?:(?:[._]|__|-+)[A-Za-z0-9]+)*\Z")
MAX_NAME_LENGTH = 255
_FORM = "[registry/]repository[:tag][@sha256:<64 hex>]"


def is_digest(text: object) -> bool:
    """``sha256:`` + 64 lower-case hex digits, nothing else (safe to use as a file name)."""
    return isinstance(text, str) and DIGEST_RE.match(text) is not None


@dataclass(frozen=True)
class ImageRef:
    """A normalised reference: ``registry`` always set (``docker.io`` for Docker Hub)."""

    registry: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    @classmethod
    def parse(cls, text: str, *, allow_placeholders: bool = False) -> ImageRef:
        """Parse ``text``; ``oci://`` and ``docker://`` prefixes are dropped. ValueError when malformed."""
        if not isinstance(text, str):
            raise ValueError(f"{text!r} is not an OCI image reference: expected a string of the form {_FORM}")
        original = text
        text = text.strip()
        for scheme in ("oci://", "docker://"):
            text = text.removeprefix(scheme)

        def bad(why: str) -> ValueError:
            return ValueError(f"{original!r} is not an OCI image reference of the form {_FORM}: {why}")

        if not text:
            raise bad("it is empty")
        if any(ch.isspace() or ord(ch) < 32 for ch in text):
            raise bad("it contains whitespace or control characters")
        name, at, digest = text.partition("@")
        if at:
            if not DIGEST_RE.match(digest):
                if _DIGEST_ANY_RE.match(digest) and not digest.startswith("sha256:"):
                    raise bad(f"digest {digest!r} uses an algorithm other than sha256")
                raise bad(f"digest {digest!r} is not sha256: followed by 64 lower-case hex digits")
        tag = None
        last_slash = name.rfind("/")
        colon = name.rfind(":")
        if colon > last_slash:
            name, tag = name[:colon], name[colon + 1:]
            if not TAG_RE.match(tag):
                raise bad(f"tag {tag!r} is not [A-Za-z0-9_][A-Za-z0-9_.-]{{0,127}}")
        if not name:
            raise bad("the repository name is missing")
        first, slash, rest = name.partition("/")
        is_host = slash and ("." in first or ":" in first or first == "localhost" or first != first.lower())
        if is_host:
            registry, repository = first, rest
            if not (_HOST_LAX_RE if allow_placeholders else _HOST_RE).match(registry):
                raise bad(f"registry host {registry!r} is not a host name or address with an optional port")
            if registry in _HUB_ALIASES:
                registry = DOCKER_HUB
        else:
            registry, repository = DOCKER_HUB, name
        if registry == DOCKER_HUB and "/" not in repository:
            repository = f"library/{repository}"
        if not repository:
            raise bad("the repository name is missing")
        component_re = _COMPONENT_LAX_RE if allow_placeholders else _COMPONENT_RE
        for component in repository.split("/"):
            if not component_re.match(component):
                if component_re.match(component.lower()):
                    raise bad(f"repository names are lower case (got {component!r})")
                raise bad(f"repository path component {component!r} is not lower-case letters and digits "
                          "separated by '.', '_', '__' or '-'")
        if len(f"{registry}/{repository}") > MAX_NAME_LENGTH:
            raise bad(f"the name is longer than {MAX_NAME_LENGTH} characters")
        return cls(registry, repository, tag, digest or None)

    @property
    def reference(self) -> str:
        """What goes after ``/manifests/``: the digest when pinned, else the tag."""
        if self.digest:
            return self.digest
        if self.tag:
            return self.tag
        raise ValueError(f"{self} has neither tag nor digest")

    @property
    def api_host(self) -> str:
        """The host that serves the registry API (Docker Hub's is not ``docker.io`` itself)."""
        return DOCKER_HUB_API if self.registry == DOCKER_HUB else self.registry

    @property
    def repo(self) -> str:
        """``registry/repository``, without tag or digest."""
        return f"{self.registry}/{self.repository}"

    def with_tag(self, tag: str) -> ImageRef:
        return ImageRef(self.registry, self.repository, tag, None)

    def with_digest(self, digest: str) -> ImageRef:
        return ImageRef(self.registry, self.repository, self.tag, digest)

    def __str__(self) -> str:
        text = self.repo
        if self.tag:
            text += f":{self.tag}"
        if self.digest:
            text += f"@{self.digest}"
        return text
