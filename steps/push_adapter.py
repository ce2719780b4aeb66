"""Push a tuned adapter to an OCI registry as an artifact (`python -m steps.push_adapter`).

Every file of the tune step's output directory becomes one layer with its own media type and an
``org.opencontainers.image.title`` annotation, under a plain OCI image manifest: the ``oras`` CLI
(`oras pull`) and Kaito's puller read it as they read files pushed with ``oras push``. The manifest
carries the OCI 1.1 ``artifactType`` ``application/vnd.kaito.kaiflow.adapter.v1`` (empty config,
as the image spec advises for artifacts) and the annotations listed in ``ANNOTATION_KEYS``, taken
from ``kaiflow.json`` and ``--annotation k=v``.

Order matters for "nothing half-written reported as success": blobs first (each retried as a
unit), then the manifest under the tag, then the manifest is fetched back and every layer checked
to exist; only then are the ``adapter-digest`` and ``image`` outputs written. A push that fails
part-way leaves unreferenced blobs (garbage the registry collects) but no tag and no outputs.

``--tag auto`` makes a fresh tag for scheduled retuning: UTC time plus the first 12 hex digits of
the content digest (sha256 over the layer descriptors), e.g. ``20261125T143000Z-3f2a9c1b7d4e``.
``--also-tag latest`` points more tags at the same manifest bytes (same digest) afterwards.

Exit codes: a registry that stays unreachable or answers 5xx after the retries exits 1 (the
pipeline retries the step); bad input, 4xx and rejected credentials exit 2.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from stepkit.common import (
    StepError,
    add_common_arguments,
    add_dataclass_arguments,
    dataclass_from_args,
    parse_key_values,
    report_progress,
    run_step,
    write_output,
)
from stepkit.oci import (
    ADAPTER_ANNOTATION_PREFIX,
    ANNOTATION_CREATED,
    ANNOTATION_TITLE,
    EVAL_LOSS_ANNOTATION,
    TAG_RE,
    ImageRef,
    RegistryClient,
    RegistryError,
    RegistryOptions,
    build_manifest,
    parse_image,
    upload_empty_config,
)

log = logging.getLogger("kaiflow.steps.push_adapter")

ARTIFACT_TYPE = "application/vnd.kaito.kaiflow.adapter.v1"

# File name -> layer media type. Files not listed go as application/octet-stream.
MEDIA_TYPES = {
    "adapter_config.json": "application/vnd.kaito.kaiflow.adapter.config.v1+json",
    "adapter_model.safetensors": "application/vnd.kaito.kaiflow.adapter.weights.v1.safetensors",
    "kaiflow.json": "application/vnd.kaito.kaiflow.metadata.v1+json",
    "loss.json": "application/vnd.kaito.kaiflow.loss.v1+json",
    "loss.png": "image/png",
    "tune.log": "text/plain",
}
REQUIRED_FILES = ("adapter_config.json", "adapter_model.safetensors")
DEFAULT_MEDIA_TYPE = "application/octet-stream"

# Manifest annotation -> where its value comes from in kaiflow.json (first key path found wins).
ANNOTATION_KEYS: dict[str, tuple[tuple[str, ...], ...]] = {
    ADAPTER_ANNOTATION_PREFIX + "base-model": (("base_model",), ("baseModel",), ("model",)),
    ADAPTER_ANNOTATION_PREFIX + "preset": (("preset",),),
    ADAPTER_ANNOTATION_PREFIX + "method": (("method",),),
    ADAPTER_ANNOTATION_PREFIX + "dataset-digest": (("dataset_digest",), ("datasetDigest",)),
    ADAPTER_ANNOTATION_PREFIX + "train-loss": (("metrics", "train_loss"),),
    ADAPTER_ANNOTATION_PREFIX + "eval-loss": (("metrics", "eval_loss"),),
    ADAPTER_ANNOTATION_PREFIX + "workspace": (("workspace",),),
}


@dataclass
class PushConfig:
    adapter_dir: str = field(metadata={"help": "directory the tune step wrote (adapter_config.json, "
                                               "adapter_model.safetensors, kaiflow.json, loss.json, loss.png)"})
    image: str = field(metadata={"help": "target reference, registry/repository[:tag] (tuning.output.image)"})
    tag: str | None = field(default=None, metadata={
        "help": "tag to push; 'auto' = UTC timestamp + short content digest (scheduled retuning); "
                "default: the tag in --image"})
    also_tag: list[str] = field(default_factory=list, metadata={
        "help": "one more tag for the same manifest, e.g. latest once the eval gate passed (repeatable)"})
    annotation: list[str] = field(default_factory=list, metadata={
        "help": "extra manifest annotation key=value (repeatable; overrides values from kaiflow.json)"})
    attach: list[str] = field(default_factory=list, metadata={
        "help": "one more file pushed beside the adapter's, under its own name, when it exists (the tune "
                "step's log; repeatable)", "metavar": "FILE"})


@dataclass(frozen=True)
class PushResult:
    image: str
    digest: str
    tags: tuple[str, ...]
    annotations: dict[str, str]
    layers: tuple[dict, ...]


def _dig(document: dict, path: Sequence[str]):
    value = document
    for key in path:
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return value


def read_adapter_metadata(adapter_dir: Path) -> dict:
    path = adapter_dir / "kaiflow.json"
    if not path.exists():
        log.warning("%s is missing: the manifest gets no training annotations", path)
        return {}
    try:
        document = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise StepError(f"--adapter-dir: {path} is not valid JSON ({exc})") from None
    if not isinstance(document, dict):
        raise StepError(f"--adapter-dir: {path} must hold a JSON object")
    return document


def annotations_from(metadata: dict, extra: Sequence[str], created: dt.datetime) -> dict[str, str]:
    annotations = {ANNOTATION_CREATED: created.strftime("%Y-%m-%dT%H:%M:%SZ")}
    for key, paths in ANNOTATION_KEYS.items():
        for path in paths:
            value = _dig(metadata, path)
            if value is None:
                continue
            if isinstance(value, float):
                value = repr(value)
            elif isinstance(value, dict | list):
                value = json.dumps(value, sort_keys=True)
            annotations[key] = str(value)
            break
    annotations.update(parse_key_values(extra, "--annotation"))
    return annotations


def collect_files(adapter_dir: Path) -> list[Path]:
    """The adapter's files: known names first in a fixed order, then the rest sorted; no subdirectories."""
    if not adapter_dir.is_dir():
        raise StepError(f"--adapter-dir {adapter_dir}: not a directory")
    for name in REQUIRED_FILES:
        if not (adapter_dir / name).is_file():
            raise StepError(f"--adapter-dir {adapter_dir}: {name} is missing (is this the tune step's output?)")
    try:
        json.loads((adapter_dir / "adapter_config.json").read_text())
    except (ValueError, UnicodeDecodeError):
        raise StepError(f"--adapter-dir: {adapter_dir / 'adapter_config.json'} is not valid JSON") from None
    known = [adapter_dir / name for name in MEDIA_TYPES if (adapter_dir / name).is_file()]
    others = []
    for path in sorted(adapter_dir.iterdir()):
        if path.name.startswith(".") or path.name in MEDIA_TYPES:
            continue
        if path.is_file():
            others.append(path)
        else:
            log.warning("skipping %s: only the adapter's top-level files are pushed", path)
    return known + others


def content_digest(layers: Sequence[dict]) -> str:
    """sha256 over the layers' (title, digest) pairs: the same files give the same tag suffix."""
    text = "\n".join(f"{layer['annotations'][ANNOTATION_TITLE]} {layer['digest']}" for layer in layers)
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def resolve_tag(image: ImageRef, tag: str | None, layers: Sequence[dict], now: dt.datetime) -> str:
    if image.digest:
        raise StepError(f"--image {image}: push to a tag, not a digest (the digest is the step's output)")
    if tag == "auto":
        return now.strftime("%Y%m%dT%H%M%SZ") + "-" + content_digest(layers).removeprefix("sha256:")[:12]
    chosen = tag or image.tag
    if not chosen:
        raise StepError(f"--image {image} has no tag: add one (…:v1) or pass --tag auto")
    if not TAG_RE.match(chosen):
        raise StepError(f"--tag {chosen!r} is not a valid tag ([A-Za-z0-9_][A-Za-z0-9_.-]{{0,127}})")
    return chosen


def push_adapter(config: PushConfig, options: RegistryOptions | None = None,
                 on_layer: Callable[[int, int], None] | None = None,
                 now: dt.datetime | None = None) -> PushResult:
    """Push the adapter directory; returns only after the manifest was read back and checked."""
    options = options or RegistryOptions()
    adapter_dir = Path(config.adapter_dir)
    image = parse_image(config.image, "--image")
    for extra in config.also_tag:
        if not TAG_RE.match(extra):
            raise StepError(f"--also-tag {extra!r} is not a valid tag")
    files = collect_files(adapter_dir)
    names = {p.name for p in files}
    for extra in map(Path, config.attach):
        if not extra.is_file():
            log.warning("--attach %s: not there, pushed without it", extra)
        elif extra.name in names:
            log.warning("--attach %s: the adapter already has a %s, kept", extra, extra.name)
        else:
            files.append(extra)
            names.add(extra.name)
    now = now or dt.datetime.now(dt.UTC)
    annotations = annotations_from(read_adapter_metadata(adapter_dir), config.annotation, now)

    tag = resolve_tag(image, config.tag, [], now)  # a bad tag fails before any upload
    client = RegistryClient(image, options)
    total = len(files)
    log.info("pushing %d files (%.1f MiB) to %s", total, sum(p.stat().st_size for p in files) / 2**20, image.repo)

    layers = []
    for done, path in enumerate(files, start=1):
        layers.append(client.upload_streamed(path, MEDIA_TYPES.get(path.name, DEFAULT_MEDIA_TYPE), path.name))
        report_progress(done, total + 1)
        if on_layer:
            on_layer(done, total)
    if config.tag == "auto":  # the tag names the content, known once every file was hashed
        tag = resolve_tag(image, config.tag, layers, now)
    target = image.with_tag(tag)
    client.image = target
    config_descriptor = upload_empty_config(client)

    manifest_bytes = build_manifest(layers, ARTIFACT_TYPE, annotations, config_descriptor)
    digest = client.put_manifest(manifest_bytes, tag)
    verify_pushed(client, tag, digest, layers)
    tags = [tag]
    for extra in dict.fromkeys(config.also_tag):
        if extra == tag:
            continue
        client.put_manifest(manifest_bytes, extra)
        verify_pushed(client, extra, digest, layers)
        tags.append(extra)
    report_progress(total + 1, total + 1)
    log.info("pushed %s@%s (tags: %s)", target.repo, digest, ", ".join(tags))
    return PushResult(str(target), digest, tuple(tags), annotations, tuple(layers))


def verify_pushed(client: RegistryClient, tag: str, digest: str, layers: Sequence[dict]) -> None:
    manifest, fetched_digest, _ = client.fetch_manifest(tag)
    if fetched_digest != digest:
        raise RegistryError(f"verifying {client.image.repo}:{tag}: the registry serves {fetched_digest}, "
                            f"pushed {digest} (another push raced this one?)")
    served = {layer["digest"] for layer in manifest.get("layers", [])}
    for layer in layers:
        if layer["digest"] not in served or not client.blob_exists_digest(layer["digest"]):
            raise RegistryError(f"verifying {client.image.repo}:{tag}: layer "
                                f"{layer['annotations'][ANNOTATION_TITLE]} is missing")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Push a tuned adapter to an OCI registry (one layer per file).")
    add_dataclass_arguments(parser, PushConfig)
    add_dataclass_arguments(parser, RegistryOptions)
    add_common_arguments(parser)
    args = parser.parse_args(argv)
    config = dataclass_from_args(PushConfig, args)
    options = dataclass_from_args(RegistryOptions, args)
    result = push_adapter(config, options)
    write_output(args.outputs, "adapter-digest", result.digest)
    write_output(args.outputs, "image", result.image)
    print(f"{result.image}@{result.digest}")
    return 0


if __name__ == "__main__":
    sys.exit(run_step(main))
