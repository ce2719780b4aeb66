"""Pull adapters from OCI registries into the directory the service reads (`python -m steps.pull_adapters`).

For each ``--adapter NAME=IMAGE`` (``inference.adapters[]``), by tag or by digest:

1. Resolve the manifest (an image index is resolved to its first linux manifest; attestation
   entries are skipped). Its digest is ``sha256`` of the bytes received; a pinned digest must match.
2. Fetch each layer into a content-addressed cache, ``<cache>/blobs/sha256/<hex>`` (the small
   ones at the same time as the largest, each distinct digest once), verifying size and sha256
   while streaming (a blob appears under its name only once verified). A cached
   blob is re-hashed before use, so a corrupted cache is re-downloaded rather than served.
   Manifests are cached by digest too: pulling by digest after a restart needs no network at
   all; pulling by tag costs one manifest GET and no blob downloads.
3. Build the adapter in a fresh ``<dest>/.<NAME>.<random>.partial`` and swap it with
   ``<dest>/<NAME>`` in one step (``renameat2(RENAME_EXCHANGE)``; two renames where the filesystem
   cannot exchange), so the service never sees half an adapter. Files are hard links into the
   cache (copies across filesystems).

A registry is untrusted input. Before anything touches the disk: every digest (layers, index
entries) must be ``sha256:<64 hex>`` and every cache path stays under the cache; declared sizes
must be byte counts whose sum fits ``--max-bytes`` (default 4 GiB), a blob is cut off at its
declared size, image layers are decompressed as a stream counted against ``--max-bytes``
(a gzip bomb stops there) and hold at most 20,000 entries; manifests and other answers are read
with a 4 MiB cap. File names (titles, tar paths, whiteout targets) must be plain names without
``..``, separators or control characters, and whiteouts act only inside the adapter being built.
Each such refusal exits 2 naming the image and layer, and leaves ``DEST`` as it was.

Two layouts are understood:

* **Artifacts** (kaiflow's ``push_adapter``, ``oras push``): every layer carries an
  ``org.opencontainers.image.title``; the blob is written under that file name. Titles with a
  path separator or ``..`` are refused.
* **Kaito-style adapter images**: a plain container image (Docker v2 or OCI) whose layers are
  tar archives holding the adapter under ``/data``. oras-py has no notion of image filesystems (its
  ``pull`` would write each layer tarball under its digest), so layers are applied in order here
  with ``tarfile``: regular files under ``data/`` are extracted (the prefix stripped), whiteouts
  (``.wh.<name>``, ``.wh..wh..opq``) are honoured inside the adapter, links and devices are skipped.
  zstd-compressed layers are refused with a clear message: Python 3.11's ``tarfile`` cannot read them.

The default cache is ``<dest>/.oci-cache``: next to the adapters, so it survives exactly as long as
the volume the service reads (an emptyDir survives container restarts in a pod).

Exit codes: a registry that stays unreachable or answers 5xx after the retries exits 1 (the
pipeline retries the step); bad input, 4xx, rejected credentials and corrupt blobs exit 2.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import ctypes
import errno
import gzip
import hashlib
import logging
import os
import re
import shutil
import sys
import tarfile
import tempfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO

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
    ANNOTATION_TITLE,
    CHUNK_BYTES,
    DOCKER_MANIFEST_LIST,
    OCI_INDEX,
    ImageRef,
    RegistryClient,
    RegistryError,
    RegistryOptions,
    is_digest,
    parse_image,
    parse_json_object,
)

log = logging.getLogger("kaiflow.steps.pull_adapters")

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}\Z")
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
# The largest LoRA adapters (70B models, rank 64, every linear layer, fp16) are ~1.6 GB; 4 GiB
# leaves room and still stops a decompression bomb long before it fills a node's disk.
DEFAULT_MAX_BYTES = 4 << 30
# tarfile keeps every member header in memory (~1 KB each); an adapter has a handful of files, a
# distroless base layer a few thousand entries.
MAX_LAYER_ENTRIES = 20_000
PARALLEL_BLOBS = 4  # small blobs fetched beside the largest one
WHITEOUT = ".wh."
OPAQUE_WHITEOUT = ".wh..wh..opq"
GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


@dataclass
class PullConfig:
    adapter: list[str] = field(metadata={
        "help": "NAME=IMAGE, one per inference.adapters[] entry; IMAGE is registry/repo:tag or registry/repo@sha256:..."})
    dest: str = field(metadata={"help": "directory the service reads; each adapter lands in DEST/NAME/"})
    cache_dir: str | None = field(default=None, metadata={
        "help": "content-addressed blob/manifest cache (default DEST/.oci-cache)"})
    max_bytes: int = field(default=DEFAULT_MAX_BYTES, metadata={
        "metavar": "N",
        "help": "most bytes one adapter may download, and most its layers may expand to when extracted "
                "(default 4 GiB); a registry that declares or sends more is refused"})


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


def _inside(root: Path, path: Path) -> bool:
    """``path`` (made absolute, ``..`` folded) lies under ``root``. Lexical on purpose: the
    directories checked are ours (cache, staging) and hold no links a layer could have made."""
    root_text = os.path.abspath(root)
    return os.path.commonpath([root_text, os.path.abspath(path)]) == root_text


class BlobCache:
    """``blobs/sha256/<hex>`` and ``manifests/sha256/<hex>`` under one directory.

    Every digest a registry names is checked against ``sha256:<64 hex>`` before it becomes a
    path, and the path is checked to stay under the cache: a registry must not be able to point
    the cache's "delete a bad entry" at a file outside it (``/abs/path``, ``sha256:../../x``).
    """

    def __init__(self, root: Path):
        self.root = root

    def _path(self, kind: str, digest: object) -> Path:
        if not is_digest(digest):
            raise RegistryError(f"digest {str(digest)[:80]!r} is not sha256:<64 lower-case hex>")
        path = self.root / kind / "sha256" / digest.removeprefix("sha256:")
        if not _inside(self.root, path):
            raise RegistryError(f"cache path for {digest} leaves the cache {self.root}")
        return path

    def blob_path(self, digest: str) -> Path:
        return self._path("blobs", digest)

    def manifest_path(self, digest: str) -> Path:
        return self._path("manifests", digest)

    def verified_blob(self, descriptor: dict) -> Path | None:
        path = self.blob_path(descriptor["digest"])
        if not path.is_file():
            return None
        if path.stat().st_size != descriptor["size"]:
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
        return parse_json_object(raw, f"cached manifest {digest}")

    def store_manifest(self, digest: str, raw: bytes) -> None:
        path = self.manifest_path(digest)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(raw)
        tmp.replace(path)


def parse_adapter_args(items: Sequence[str]) -> list[tuple[str, ImageRef, str]]:
    if not items:
        raise StepError("--adapter NAME=IMAGE is required at least once")
    pairs = parse_key_values(items, "--adapter")
    names = [item.partition("=")[0].strip() for item in items]
    for name in names:
        if names.count(name) > 1:
            raise StepError(f"--adapter: adapter name {name!r} given twice")
    parsed = []
    for name, image in pairs.items():
        if not NAME_RE.match(name):
            raise StepError(f"--adapter {name}=...: adapter name {name!r} must match {NAME_RE.pattern}")
        ref = parse_image(image, f"--adapter {name}=")
        if not ref.tag and not ref.digest:
            ref = ref.with_tag("latest")
        parsed.append((name, ref, image))
    return parsed


def _select_from_index(index: dict, image: ImageRef) -> str:
    entries = index.get("manifests")
    candidates = [m for m in entries if isinstance(m, dict) and m.get("digest")] if isinstance(entries, list) else []
    usable = [m for m in candidates if (m.get("platform") or {}).get("os") != "unknown"]
    linux = [m for m in usable if (m.get("platform") or {}).get("os") in (None, "linux")]
    chosen = (linux or usable or [None])[0]
    if chosen is None:
        raise RegistryError(f"{image}: the image index lists no usable manifest")
    if not is_digest(chosen["digest"]):
        raise RegistryError(f"{image}: the image index names manifest digest {str(chosen['digest'])[:80]!r}, "
                            "not sha256:<64 lower-case hex>")
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


def _check_layers(manifest: dict, image: ImageRef, digest: str) -> list[dict]:
    """The manifest's layer descriptors, each checked before any of it is trusted."""
    layers = manifest.get("layers")
    if not isinstance(layers, list) or not layers:
        raise RegistryError(f"{image}: manifest {digest} has no layers")
    for index, layer in enumerate(layers):
        where = f"{image}: manifest {digest} layers[{index}]"
        if not isinstance(layer, dict):
            raise RegistryError(f"{where} is not an object")
        if not is_digest(layer.get("digest")):
            raise RegistryError(f"{where}: digest {str(layer.get('digest'))[:80]!r} is not sha256:<64 lower-case hex>")
        size = layer.get("size")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise RegistryError(f"{where}: size {size!r} is not a byte count")
        if not isinstance(layer.get("mediaType", ""), str):
            raise RegistryError(f"{where}: mediaType is not a string")
        annotations = layer.get("annotations")
        if annotations is not None and not isinstance(annotations, dict):
            raise RegistryError(f"{where}: annotations is not an object")
    return layers


def _unsafe_name(name: str) -> str | None:
    """Why ``name`` cannot be one path component of an adapter file, or None when it can."""
    if not name:
        return "it is empty"
    if name in (".", ".."):
        return "it names a directory, not a file"
    if "/" in name or "\\" in name:
        return "it holds a path separator"
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in name):
        return "it holds a control character"
    if len(name.encode("utf-8", "surrogateescape")) > 255:
        return "it is longer than 255 bytes"
    return None


def _safe_title(title: object, image: ImageRef, digest: str) -> str:
    why = _unsafe_name(title) if isinstance(title, str) else "it is not a string"
    if why:
        raise RegistryError(f"{image}: layer {digest[:19]} has title {str(title)[:80]!r}, not a plain file name ({why})")
    return title


def _place(blob: Path, target: Path) -> None:
    try:
        os.link(blob, target)
    except OSError:
        shutil.copyfile(blob, target)


class ByteBudget:
    """Bytes one adapter may still download or write (``--max-bytes``)."""

    def __init__(self, limit: int, image: ImageRef):
        self.limit = limit
        self.image = image
        self.spent = 0

    def spend(self, count: int, what: str) -> None:
        self.check_room(count, what)
        self.spent += count

    def check_room(self, count: int, what: str) -> None:
        if self.spent + count > self.limit:
            raise RegistryError(f"{self.image}: {what} goes past --max-bytes {self.limit} "
                                f"({self.spent + count} bytes); raise --max-bytes if the adapter really is this large")


class _CountingReader:
    """A read-only stream that charges every byte read (decompressed) to a budget."""

    def __init__(self, inner: IO[bytes], budget: ByteBudget, what: str):
        self.inner, self.budget, self.what = inner, budget, what

    def read(self, size: int = -1) -> bytes:
        data = self.inner.read(size)
        self.budget.spend(len(data), self.what)
        return data


def _apply_image_layer(blob: Path, staging: Path, image: ImageRef, digest: str, budget: ByteBudget) -> int:
    """Extract the ``data/`` part of one image layer into ``staging``; returns files written.

    The layer is read as a stream (gzip decompressed here so every decompressed byte is counted
    against ``--max-bytes``); names are checked before they touch the disk, whiteouts apply only
    inside ``staging``.
    """
    what = f"layer {digest[:19]} expanded"
    written = entries = 0
    with open(blob, "rb") as raw:
        magic = raw.read(4)
        raw.seek(0)
        if magic == ZSTD_MAGIC:
            raise RegistryError(f"{image}: layer {digest[:19]} is zstd-compressed; Python 3.11's tarfile cannot read it: "
                                "rebuild the image with gzip layers")
        stream: IO[bytes] = gzip.GzipFile(fileobj=raw, mode="rb") if magic[:2] == GZIP_MAGIC else raw
        try:
            with tarfile.open(fileobj=_CountingReader(stream, budget, what), mode="r|") as archive:
                for member in archive:
                    entries += 1
                    if entries > MAX_LAYER_ENTRIES:
                        raise RegistryError(f"{image}: layer {digest[:19]} has more than {MAX_LAYER_ENTRIES} entries")
                    written += _apply_member(archive, member, staging, image, digest, budget)
        except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as exc:
            raise RegistryError(f"{image}: layer {digest[:19]} is not a readable tar archive "
                                f"({exc.__class__.__name__}: {str(exc)[:200]})") from None
    return written


def _apply_member(archive: tarfile.TarFile, member: tarfile.TarInfo, staging: Path, image: ImageRef, digest: str,
                  budget: ByteBudget) -> int:
    parts = tuple(p for p in PurePosixPath(member.name.lstrip("/")).parts if p != ".")
    if len(parts) < 2 or parts[0] != IMAGE_DATA_DIR:
        return 0
    relative = parts[1:]
    unsafe = f"{image}: layer {digest[:19]} has an unsafe path {member.name[:200]!r}"
    for part in relative:
        why = _unsafe_name(part)
        if why:
            raise RegistryError(f"{unsafe} ({why})")
    base = relative[-1]
    target = staging.joinpath(*relative)
    if base == OPAQUE_WHITEOUT:  # hide everything lower layers put in this directory
        parent = target.parent
        if parent.is_dir():
            for child in parent.iterdir():
                shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
        return 0
    if base.startswith(WHITEOUT):
        hidden = base.removeprefix(WHITEOUT)
        why = _unsafe_name(hidden) or ("it is a whiteout of a whiteout" if hidden.startswith(WHITEOUT) else None)
        if why:
            raise RegistryError(f"{unsafe} (whiteout of {hidden[:80]!r}: {why})")
        gone = target.with_name(hidden)
        if not _inside(staging, gone) or gone == staging:
            raise RegistryError(f"{unsafe} (its whiteout reaches outside the adapter)")
        if gone.is_dir() and not gone.is_symlink():
            shutil.rmtree(gone)
        elif gone.exists() or gone.is_symlink():
            gone.unlink()
        return 0
    if not _inside(staging, target):
        raise RegistryError(f"{unsafe} (it reaches outside the adapter)")
    try:
        if member.isdir():
            target.mkdir(parents=True, exist_ok=True)
            return 0
        if not member.isfile():
            log.warning("%s: skipping %s in layer %s (links and devices are not adapter files)",
                        image, member.name[:200], digest[:19])
            return 0
        # the stream counts these bytes as they are read; refusing early spares writing them
        budget.check_room(member.size, f"layer {digest[:19]} file {member.name[:200]!r}")
        target.parent.mkdir(parents=True, exist_ok=True)
        source = archive.extractfile(member)
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        elif target.exists() or target.is_symlink():
            target.unlink()
        with source, open(target, "wb") as out:
            shutil.copyfileobj(source, out, CHUNK_BYTES)
    except (NotADirectoryError, FileExistsError, IsADirectoryError) as exc:
        raise RegistryError(f"{image}: layer {digest[:19]} entry {member.name[:200]!r} conflicts with an earlier "
                            f"entry ({exc.strerror})") from None
    return 1


_RENAME_EXCHANGE = 2


def _exchange(first: Path, second: Path) -> bool:
    """Swap two paths in one step (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd = -100
    if renameat2(at_fdcwd, os.fsencode(first), at_fdcwd, os.fsencode(second), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(second))


def _replace_dir(staging: Path, final: Path) -> None:
    """Put ``staging`` at ``final``: readers see the old adapter or the new one, never a mix or nothing
    (an exchange of the two names; two renames where the filesystem cannot exchange)."""
    if not final.exists() and not final.is_symlink():
        staging.rename(final)
        return
    if _exchange(staging, final):
        shutil.rmtree(staging) if staging.is_dir() else staging.unlink()
        return
    old = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".old", dir=final.parent))
    final.rename(old / final.name)
    staging.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def _download_all(client: RegistryClient, layers: list[dict], cache: BlobCache, max_bytes: int) -> dict[str, Path]:
    """Fetch the distinct blobs ``layers`` name into the cache, concurrently; digest -> path.

    The largest is streamed in this thread, the small ones (config, adapter_config.json, ...) at
    the same time on other connections: each costs a registry round trip, not bandwidth, so
    fetched one after another they add their latencies to the pull (bench/oci_bench.py). Every
    blob is checked as before (size cut-off, sha256); the first error is raised once all have
    stopped, so no download outlives the pull.
    """
    ordered = sorted(layers, key=lambda layer: layer["size"], reverse=True)

    def fetch(layer: dict) -> Path:
        return client.download_blob_verified(layer, cache.blob_path(layer["digest"]), max_bytes=max_bytes)

    if len(ordered) == 1:
        return {ordered[0]["digest"]: fetch(ordered[0])}
    results: dict[str, Path] = {}
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(PARALLEL_BLOBS, len(ordered) - 1),
                                               thread_name_prefix="blob") as pool:
        others = {pool.submit(fetch, layer): layer["digest"] for layer in ordered[1:]}
        try:
            results[ordered[0]["digest"]] = fetch(ordered[0])
        except BaseException:
            for future in others:
                future.cancel()
            concurrent.futures.wait(others)
            raise
        for future in concurrent.futures.as_completed(others):
            results[others[future]] = future.result()
    return results


def pull_adapter(name: str, image: ImageRef, dest: Path, cache: BlobCache, options: RegistryOptions,
                 max_bytes: int = DEFAULT_MAX_BYTES) -> PulledAdapter:
    manifest, digest, client = resolve_manifest(image, cache, options, None)
    layers = _check_layers(manifest, image, digest)
    declared = sum(layer["size"] for layer in layers)
    if declared > max_bytes:
        raise RegistryError(f"{image}: its layers declare {declared} bytes, more than --max-bytes {max_bytes}")
    downloaded = cached = 0
    found: dict[str, Path] = {}
    missing: dict[str, dict] = {}  # digest -> descriptor: a blob two layers share is fetched once
    for layer in layers:
        if layer["digest"] in found or layer["digest"] in missing:
            continue
        blob = cache.verified_blob(layer)
        if blob is None:
            missing[layer["digest"]] = layer
            downloaded += layer["size"]
        else:
            found[layer["digest"]] = blob
            cached += layer["size"]
    if missing:
        client = client or RegistryClient(image, options)
        found.update(_download_all(client, list(missing.values()), cache, max_bytes))
    blobs = [(layer, found[layer["digest"]]) for layer in layers]

    budget = ByteBudget(max_bytes, image)  # bytes image layers expand to (artifact files are their downloads)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".partial", dir=dest))
    try:
        files = 0
        for layer, blob in blobs:
            title = (layer.get("annotations") or {}).get(ANNOTATION_TITLE)
            media_type = layer.get("mediaType", "")
            if title is not None:
                target = staging / _safe_title(title, image, layer["digest"])
                if target.is_dir():
                    shutil.rmtree(target)
                elif target.exists():
                    target.unlink()
                _place(blob, target)
                files += 1
            elif media_type in TAR_LAYER_TYPES:
                files += _apply_image_layer(blob, staging, image, layer["digest"], budget)
            elif media_type in ZSTD_LAYER_TYPES:
                raise RegistryError(f"{image}: layer {layer['digest'][:19]} is zstd-compressed; Python 3.11's tarfile "
                                    "cannot read it: rebuild the image with gzip layers")
            else:
                raise RegistryError(f"{image}: layer {layer['digest'][:19]} ({media_type[:100]}) has no "
                                    f"{ANNOTATION_TITLE} annotation and is not an image filesystem layer")
        if files == 0 or not any(staging.iterdir()):
            raise RegistryError(f"{image}: no adapter files found (artifact layers with titles, or files under "
                                f"/{IMAGE_DATA_DIR} in an image)")
        if not (staging / "adapter_config.json").is_file():
            log.warning("%s: no adapter_config.json in %s (files: %s)", image, name,
                        ", ".join(sorted(p.name for p in staging.iterdir())))
        staging.chmod(0o755)  # mkdtemp makes it 0700; the service may run as another user
        final = dest / name
        _replace_dir(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info("%s: %s@%s -> %s (%.1f MiB downloaded, %.1f MiB from cache)", name, image.repo, digest, final,
             downloaded / 2**20, cached / 2**20)
    return PulledAdapter(name, str(image), digest, str(final), downloaded, cached)


def pull_adapters(config: PullConfig, options: RegistryOptions | None = None) -> list[PulledAdapter]:
    options = options or RegistryOptions()
    adapters = parse_adapter_args(config.adapter)
    if config.max_bytes <= 0:
        raise StepError(f"--max-bytes {config.max_bytes}: must be a positive number of bytes")
    dest = Path(config.dest)
    dest.mkdir(parents=True, exist_ok=True)
    cache = BlobCache(Path(config.cache_dir) if config.cache_dir else dest / ".oci-cache")
    pulled = []
    for done, (name, image, _text) in enumerate(adapters, start=1):
        pulled.append(pull_adapter(name, image, dest, cache, options, config.max_bytes))
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
