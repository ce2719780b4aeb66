"""api.image_ref: the one image-reference parser, Docker's normalisation, and its callers."""

from __future__ import annotations

import pytest

from api.image_ref import ImageRef, is_digest

DIGEST = "sha256:" + "0123456789abcdef" * 4


@pytest.mark.parametrize(("text", "registry", "repository", "tag", "digest"), [
    # Docker short references, as `docker pull` and Kaito read them
    ("myadapter:0.1", "docker.io", "library/myadapter", "0.1", None),
    ("myadapter", "docker.io", "library/myadapter", None, None),
    ("user/x", "docker.io", "user/x", None, None),
    ("user/x:v2", "docker.io", "user/x", "v2", None),
    ("index.docker.io/user/x", "docker.io", "user/x", None, None),
    ("docker.io/ubuntu", "docker.io", "library/ubuntu", None, None),
    # registry hosts: a dot, a port, or localhost
    ("127.0.0.1:5000/adapters/tiny:v1", "127.0.0.1:5000", "adapters/tiny", "v1", None),
    ("localhost/x", "localhost", "x", None, None),
    ("localhost:5000/x:latest", "localhost:5000", "x", "latest", None),
    ("myacr.azurecr.io/a/b/c", "myacr.azurecr.io", "a/b/c", None, None),
    ("[::1]:5000/a/b:t", "[::1]:5000", "a/b", "t", None),
    ("ghcr.io/org/my-adapter__v2.x:2026.1_rc-1", "ghcr.io", "org/my-adapter__v2.x", "2026.1_rc-1", None),
    # digests, with and without tag; schemes oras and skopeo write
    (f"ghcr.io/org/a@{DIGEST}", "ghcr.io", "org/a", None, DIGEST),
    (f"ghcr.io/org/a:v1@{DIGEST}", "ghcr.io", "org/a", "v1", DIGEST),
    (f"a@{DIGEST}", "docker.io", "library/a", None, DIGEST),
    ("oci://ghcr.io/org/adapter:2026.1", "ghcr.io", "org/adapter", "2026.1", None),
    ("docker://ghcr.io/org/adapter", "ghcr.io", "org/adapter", None, None),
    ("  127.0.0.1:5000/x:v1\n", "127.0.0.1:5000", "x", "v1", None),
])
def test_references(text, registry, repository, tag, digest):
    ref = ImageRef.parse(text)
    assert (ref.registry, ref.repository, ref.tag, ref.digest) == (registry, repository, tag, digest)
    assert ImageRef.parse(str(ref)) == ref, "the normalised form parses back to itself"


@pytest.mark.parametrize(("text", "why"), [
    ("", "empty"),
    ("not an image", "whitespace"),
    ("Registry.io/UPPER:v1", "lower case"),
    ("UPPER", "lower case"),
    ("registry.io/x:bad tag", "whitespace"),
    ("registry.io/x:-bad", "tag '-bad'"),
    ("registry.io/x:" + "t" * 129, "tag"),
    ("registry.io/x@sha256:short", "64 lower-case hex"),
    ("registry.io/x@sha256:" + "A" * 64, "64 lower-case hex"),
    ("registry.io/x@sha512:" + "a" * 128, "other than sha256"),
    ("registry.io/x@sha256:../../etc", "64 lower-case hex"),
    ("registry.io//x", "path component ''"),
    ("registry.io/x/", "path component ''"),
    ("registry.io/-x", "path component '-x'"),
    ("registry.io/x..y", "path component"),
    ("bad_host.io/x", "registry host"),
    ("-host.io/x", "registry host"),
    ("host.io:port/x", "registry host"),
    ("registry.io/", "repository name is missing"),
    (":tag", "repository name is missing"),
    ("registry.io/x\x00y", "control"),
    ("r.io/" + "a" * 260, "longer than 255"),
])
def test_bad_references_say_why(text, why):
    with pytest.raises(ValueError, match="not an OCI image reference") as error:
        ImageRef.parse(text)
    assert why in str(error.value)


def test_placeholders_pass_only_when_asked():
    placeholder = "ACR_REPO_HERE.azurecr.io/ADAPTER_HERE:0.0.1"
    ref = ImageRef.parse(placeholder, allow_placeholders=True)
    assert (ref.registry, ref.repository, ref.tag) == ("ACR_REPO_HERE.azurecr.io", "ADAPTER_HERE", "0.0.1")
    with pytest.raises(ValueError):
        ImageRef.parse(placeholder)
    with pytest.raises(ValueError, match="whitespace"):
        ImageRef.parse("not an image", allow_placeholders=True)


def test_reference_parts():
    ref = ImageRef.parse("myadapter:0.1")
    assert str(ref) == "docker.io/library/myadapter:0.1"
    assert ref.repo == "docker.io/library/myadapter"
    assert ref.api_host == "registry-1.docker.io"
    assert ref.reference == "0.1"
    assert ref.with_digest(DIGEST).reference == DIGEST
    assert str(ref.with_tag("v2")) == "docker.io/library/myadapter:v2"
    assert ImageRef.parse("127.0.0.1:5000/x").api_host == "127.0.0.1:5000"
    with pytest.raises(ValueError, match="neither tag nor digest"):
        _ = ImageRef.parse("127.0.0.1:5000/x").reference


@pytest.mark.parametrize(("text", "expected"), [
    (DIGEST, True), ("sha256:" + "a" * 63, False), ("/abs/path", False), ("sha256:../../x", False),
    ("sha256:" + "a" * 64 + "\n", False), (None, False), (12, False),
])
def test_is_digest(text, expected):
    assert is_digest(text) is expected


def test_validation_and_pipeline_use_the_parser():
    from api.workspace_validation import _check_image
    from pipelines.dags import PipelineError, _repository

    assert list(_check_image("myadapter:0.1", "x")) == []
    assert list(_check_image("ACR_REPO_HERE.azurecr.io/ADAPTER_HERE:0.0.1", "x")) == []
    [error] = _check_image("registry.io/x@sha256:short", "inference.adapters[0].source.image")
    assert error.path == "inference.adapters[0].source.image" and "64 lower-case hex" in error.message
    assert _repository("127.0.0.1:5000/kaiflow/tiny:v1") == "127.0.0.1:5000/kaiflow/tiny"
    assert _repository(f"myregistry.azurecr.io/adapters/phi@{DIGEST}") == "myregistry.azurecr.io/adapters/phi"
    assert _repository("myadapter:0.1") == "docker.io/library/myadapter"
    with pytest.raises(PipelineError, match="tuning.output.image"):
        _repository("not an image")
