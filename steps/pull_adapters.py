"""Pull adapters from OCI registries into the directory the service reads (`python -m steps.pull_adapters`).

For each ``--adapter NAME=IMAGE`` (``inference.adapters[]``), by tag or by digest:

1. Resolve the manifest (an image index is resolved to its first linux manifest; attestation
   entries are skipped). Its digest is ``sha256`` of the bytes received; a pinned digest must match.
2. Fetch each layer into a content-addressed cache, ``<cache>/blobs/sha256/<hex>``, verifying
   size and sha256 while streaming (a blob appears under its name only once verified). A cached
   blob is re-hashed before use, so a corrupted cache is re-downloaded rather than served.
   Manifests are cached by digest too: pulling by digest after a restart needs no network at
   all; pulling by tag costs one manifest GET and no blob downloads.
3. Build ``<dest>/.<NAME>.partial`` and rename it over ``<dest>/<NAME>``, so the service never sees
   half an adapter. Files are hard links into the cache (copies across filesystems).

Two layouts are understood:

* **Artifacts** (kaiflow's ``push_adapter``, ``oras push``): every layer carries an
  ``org.opencontainers.image.title``; the blob is written under that file name. Titles with a
  path separator or ``..`` are refused.
* **Kaito-style adapter images**: a plain container image (Docker v2 or OCI) whose layers are
  tar archives holding the adapter under ``/data``. oras-py has no notion of image filesystems (its
  ``pull`` would write each layer tarball under its digest), so layers are applied in order here
  with ``tarfile``: regular files under ``data/`` are extracted (the prefix stripped), whiteouts
  (``.wh.<name>``, ``.wh..wh..opq``) are honoured, links and devices are skipped.
  zstd-compressed layers are refused with a clear message: Python 3.11's ``tarfile`` cannot read them.

The default cache is ``<dest>/.oci-cache``: next to the adapters, so it survives exactly as long as
the volume the service reads (an emptyDir survives container restarts in a pod).

Exit codes: a registry that stays unreachable or answers 5xx after the retries exits 1 (the
pipeline retries the step); bad input, 4xx, rejected credentials and corrupt blobs exit 2.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from steps.common import (
    StepError,
    add_common_arguments,
    add_dataclass_arguments,
    dataclass_from_args,
    report_progress,
    run_step,
    write_output,
)
from steps.oci import (
    ANNOTATION_TITLE,
    CHUNK_BYTES,
    DOCKER_MANIFEST_LIST,
    OCI_INDEX,
    ImageRef,
    RegistryClient,
    RegistryError,
    RegistryOptions,
)

log = logging.getLogger("kaiflow.steps.pull_adapters")

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
TAR_LAYER_TYPES = {
    "application/vnd.oci.image.layer.v1.tar",
    "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
    "application/vnd.docker.image.rootfs.diff.tar",
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
}
ZSTD_LAYER_TYPES = {"application/vnd.oci.image.layer.v1.tar+zstd"}
IMAGE_DATA_DIR = "data"


@dataclass
class PullConfig:
    adapter: list[str] = field(metadata={
        "help": "NAME=IMAGE, one per inference.adapters[] entry; IMAGE is registry/repo:tag or registry/repo@sha256:..."})
    dest: str = field(metadata={"help": "directory the service reads; each adapter lands in DEST/NAME/"})
    cache_dir: str | None = field(default=None, metadata={
        "help": "content-addressed blob/manifest cache (default DEST/.oci-cache)"})


@dataclass(frozen=True)
class PulledAdapter:
    name: str
    image: str
    digest: str
    path: str
    downloaded_bytes: int
    cached_bytes: int

    def output(self) -> dict:
        return {"name": self.name, "image": self.image, "digest": self.digest, "path": self.path}


class BlobCache:
    """``blobs/sha256/<hex>`` and ``manifests/sha256/<hex>`` under one directory."""

    def __init__(self, root: Path):
        self.root = root

    def blob_path(self, digest: str) -> Path:
        return self.root / "blobs" / "sha256" / digest.removeprefix("sha256:")

    def manifest_path(self, digest: str) -> Path:
        return self.root / "manifests" / "sha256" / digest.removeprefix("sha256:")

    def verified_blob(self, descriptor: dict) -> Path | None:
        path = self.blob_path(descriptor["digest"])
        if not path.is_file():
            return None
        if "size" in descriptor and path.stat().st_size != descriptor["size"]:
            log.warning("cached blob %s has the wrong size: downloading again", path.name[:12])
            path.unlink()
            return None
        hasher = hashlib.sha256()
        with open(path, "rb") as handle:
            while chunk := handle.read(CHUNK_BYTES):
                hasher.update(chunk)
        if "sha256:" + hasher.hexdigest() != descriptor["digest"]:
            log.warning("cached blob %s is corrupt: downloading again", path.name[:12])
            path.unlink()
            return None
        return path

    def manifest(self, digest: str) -> dict | None:
        path = self.manifest_path(digest)
        if not path.is_file():
            return None
        raw = path.read_bytes()
        if "sha256:" + hashlib.sha256(raw).hexdigest() != digest:
            path.unlink()
            return None
        return json.loads(raw)

    def store_manifest(self, digest: str, raw: bytes) -> None:
        path = self.manifest_path(digest)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(raw)
        tmp.replace(path)


def parse_adapter_args(items: Sequence[str]) -> list[tuple[str, ImageRef, str]]:
    if not items:
        raise StepError("--adapter NAME=IMAGE is required at least once")
    seen: set[str] = set()
    parsed = []
    for item in items:
        name, sep, image = item.partition("=")
        name = name.strip()
        if not sep or not image.strip():
            raise StepError(f"--adapter {item!r}: expected NAME=IMAGE")
        if not NAME_RE.match(name):
            raise StepError(f"--adapter {item!r}: adapter name {name!r} must match {NAME_RE.pattern}")
        if name in seen:
            raise StepError(f"--adapter {item!r}: adapter name {name!r} given twice")
        seen.add(name)
        ref = ImageRef.parse(image, f"--adapter {name}=")
        if not ref.tag and not ref.digest:
            ref = ref.with_tag("latest")
        parsed.append((name, ref, image.strip()))
    return parsed


def _select_from_index(index: dict, image: ImageRef) -> str:
    candidates = [m for m in index.get("manifests", []) if isinstance(m, dict) and m.get("digest")]
    usable = [m for m in candidates if (m.get("platform") or {}).get("os") != "unknown"]
    linux = [m for m in usable if (m.get("platform") or {}).get("os") in (None, "linux")]
    chosen = (linux or usable or [None])[0]
    if chosen is None:
        raise RegistryError(f"{image}: the image index lists no usable manifest")
    return chosen["digest"]


def resolve_manifest(image: ImageRef, cache: BlobCache, options: RegistryOptions,
                     client: RegistryClient | None) -> tuple[dict, str, RegistryClient | None]:
    """(image manifest, its digest, client); a cached digest-pinned manifest needs no registry."""
    reference = image.digest
    manifest = cache.manifest(reference) if reference else None
    digest = reference
    for _hop in range(3):  # index -> manifest; guards against an index of indexes looping
        if manifest is None:
            client = client or RegistryClient(image, options)
            manifest, digest, raw = client.fetch_manifest(digest or image.reference)
            cache.store_manifest(digest, raw)
        media_type = manifest.get("mediaType", "")
        if media_type in (OCI_INDEX, DOCKER_MANIFEST_LIST) or ("manifests" in manifest and "layers" not in manifest):
            digest = _select_from_index(manifest, image)
            manifest = cache.manifest(digest)
            continue
        return manifest, digest, client
    raise RegistryError(f"{image}: nested image indexes deeper than 3 levels")


def _safe_title(title: str, image: ImageRef, digest: str) -> str:
    path = PurePosixPath(title)
    if not title or path.is_absolute() or len(path.parts) != 1 or title in (".", "..") or "\\" in title:
        raise RegistryError(f"{image}: layer {digest[:19]} has title {title!r}, not a plain file name")
    return title


def _place(blob: Path, target: Path) -> None:
    try:
        os.link(blob, target)
    except OSError:
        shutil.copyfile(blob, target)


def _apply_image_layer(blob: Path, staging: Path, image: ImageRef, digest: str) -> int:
    """Extract the ``data/`` part of one image layer into ``staging``; returns files written."""
    written = 0
    try:
        archive = tarfile.open(blob, mode="r:*")
    except tarfile.TarError as exc:
        raise RegistryError(f"{image}: layer {digest[:19]} is not a readable tar archive ({exc})") from None
    with archive:
        for member in archive:
            parts = PurePosixPath(member.name.lstrip("/")).parts
            parts = tuple(p for p in parts if p != ".")
            if len(parts) < 2 or parts[0] != IMAGE_DATA_DIR:
                continue
            relative = parts[1:]
            if any(p == ".." for p in relative):
                raise RegistryError(f"{image}: layer {digest[:19]} has an unsafe path {member.name!r}")
            target = staging.joinpath(*relative)
            base = relative[-1]
            if base == ".wh..wh..opq":
                parent = target.parent
                if parent.exists():
                    for child in parent.iterdir():
                        shutil.rmtree(child) if child.is_dir() else child.unlink()
                continue
            if base.startswith(".wh."):
                gone = target.with_name(base.removeprefix(".wh."))
                if gone.is_dir():
                    shutil.rmtree(gone)
                elif gone.exists():
                    gone.unlink()
                continue
            if member.isdir():
                target.mkdir(parents=True, exist_ok=True)
            elif member.isfile():
                target.parent.mkdir(parents=True, exist_ok=True)
                source = archive.extractfile(member)
                if target.exists():
                    target.unlink()
                with source, open(target, "wb") as out:
                    shutil.copyfileobj(source, out, CHUNK_BYTES)
                written += 1
            else:
                log.warning("%s: skipping %s in layer %s (links and devices are not adapter files)",
                            image, member.name, digest[:19])
    return written


def pull_adapter(name: str, image: ImageRef, dest: Path, cache: BlobCache, options: RegistryOptions) -> PulledAdapter:
    manifest, digest, client = resolve_manifest(image, cache, options, None)
    layers = manifest.get("layers")
    if not isinstance(layers, list) or not layers:
        raise RegistryError(f"{image}: manifest {digest} has no layers")
    downloaded = cached = 0
    blobs: list[tuple[dict, Path]] = []
    for layer in layers:
        if not isinstance(layer, dict) or "digest" not in layer:
            raise RegistryError(f"{image}: manifest {digest} has a malformed layer entry")
        blob = cache.verified_blob(layer)
        if blob is None:
            client = client or RegistryClient(image, options)
            blob = client.download_blob_verified(layer, cache.blob_path(layer["digest"]))
            downloaded += layer.get("size", blob.stat().st_size)
        else:
            cached += layer.get("size", blob.stat().st_size)
        blobs.append((layer, blob))

    staging = dest / f".{name}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        files = 0
        for layer, blob in blobs:
            title = (layer.get("annotations") or {}).get(ANNOTATION_TITLE)
            media_type = layer.get("mediaType", "")
            if title:
                target = staging / _safe_title(title, image, layer["digest"])
                if target.exists():
                    target.unlink()
                _place(blob, target)
                files += 1
            elif media_type in TAR_LAYER_TYPES:
                files += _apply_image_layer(blob, staging, image, layer["digest"])
            elif media_type in ZSTD_LAYER_TYPES:
                raise RegistryError(f"{image}: layer {layer['digest'][:19]} is zstd-compressed; Python 3.11's tarfile "
                                    "cannot read it: rebuild the image with gzip layers")
            else:
                raise RegistryError(f"{image}: layer {layer['digest'][:19]} ({media_type}) has no "
                                    f"{ANNOTATION_TITLE} annotation and is not an image filesystem layer")
        if files == 0 or not any(staging.iterdir()):
            raise RegistryError(f"{image}: no adapter files found (artifact layers with titles, or files under "
                                f"/{IMAGE_DATA_DIR} in an image)")
        if not (staging / "adapter_config.json").is_file():
            log.warning("%s: no adapter_config.json in %s (files: %s)", image, name,
                        ", ".join(sorted(p.name for p in staging.iterdir())))
        final = dest / name
        old = dest / f".{name}.old"
        shutil.rmtree(old, ignore_errors=True)
        if final.exists():
            final.rename(old)
        staging.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info("%s: %s@%s -> %s (%.1f MiB downloaded, %.1f MiB from cache)", name, image.repo, digest, final,
             downloaded / 2**20, cached / 2**20)
    return PulledAdapter(name, str(image), digest, str(final), downloaded, cached)


def pull_adapters(config: PullConfig, options: RegistryOptions | None = None) -> list[PulledAdapter]:
    options = options or RegistryOptions()
    adapters = parse_adapter_args(config.adapter)
    dest = Path(config.dest)
    dest.mkdir(parents=True, exist_ok=True)
    cache = BlobCache(Path(config.cache_dir) if config.cache_dir else dest / ".oci-cache")
    pulled = []
    for done, (name, image, _text) in enumerate(adapters, start=1):
        pulled.append(pull_adapter(name, image, dest, cache, options))
        report_progress(done, len(adapters))
    return pulled


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Pull adapters (OCI artifacts or Kaito-style images) into DEST/NAME/.")
    add_dataclass_arguments(parser, PullConfig)
    add_dataclass_arguments(parser, RegistryOptions)
    add_common_arguments(parser)
    args = parser.parse_args(argv)
    pulled = pull_adapters(dataclass_from_args(PullConfig, args), dataclass_from_args(RegistryOptions, args))
    write_output(args.outputs, "adapters", [p.output() for p in pulled])
    for p in pulled:
        print(f"{p.name}\t{p.digest}\t{p.path}")
    return 0


if __name__ == "__main__":
    sys.exit(run_step(main))
