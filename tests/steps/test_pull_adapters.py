"""steps.pull_adapters against real `docker-registry` processes: artifacts, Kaito-style images, cache."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from pathlib import Path

import pytest

from steps import pull_adapters as pull
from steps import push_adapter as push
from stepkit.common import RetryableError, run_step
from stepkit.oci import (
    DOCKER_MANIFEST,
    OCI_INDEX,
    ImageRef,
    RegistryClient,
    RegistryError,
    RegistryOptions,
    build_manifest,
    file_descriptor,
    upload_empty_config,
)
from tests.fixtures.registry import make_adapter_dir

INSECURE = RegistryOptions(insecure=True, attempts=2, backoff_s=0.05, timeout_s=5)


def push_dir(registry, adapter: Path, repository: str, tag: str = "v1") -> push.PushResult:
    return push.push_adapter(push.PushConfig(str(adapter), f"{registry.host}/{repository}:{tag}"), INSECURE)


def assert_same_files(pulled: Path, original: Path) -> None:
    assert sorted(p.name for p in pulled.iterdir()) == sorted(p.name for p in original.iterdir())
    for path in original.iterdir():
        assert (pulled / path.name).read_bytes() == path.read_bytes(), path.name


def test_pull_by_tag_and_digest_byte_identical_with_outputs(oci_registry, tune_output_dir, tmp_path):
    result = push_dir(oci_registry, tune_output_dir, "adapters/pull-me")
    dest, outputs = tmp_path / "adapters", tmp_path / "outputs"
    code = run_step(pull.main, ["--adapter", f"by-tag={oci_registry.host}/adapters/pull-me:v1",
                                "--adapter", f"by-digest={oci_registry.host}/adapters/pull-me@{result.digest}",
                                "--dest", str(dest), "--insecure", "--outputs", str(outputs)])
    assert code == 0
    assert_same_files(dest / "by-tag", tune_output_dir)
    assert_same_files(dest / "by-digest", tune_output_dir)
    listed = json.loads((outputs / "adapters").read_text())
    assert [(a["name"], a["digest"], a["path"]) for a in listed] == [
        ("by-tag", result.digest, str(dest / "by-tag")), ("by-digest", result.digest, str(dest / "by-digest"))]
    assert not list(dest.glob(".*.partial"))


def test_cache_means_no_download_after_restart(registry_factory, tmp_path):
    registry = registry_factory()
    adapter = make_adapter_dir(tmp_path / "adapter", weights_bytes=512 * 1024)
    result = push_dir(registry, adapter, "adapters/cached")
    dest = tmp_path / "dest"
    config = pull.PullConfig([f"a={registry.host}/adapters/cached:v1"], str(dest))
    first = pull.pull_adapters(config, INSECURE)[0]
    assert first.downloaded_bytes > 512 * 1024 and first.cached_bytes == 0

    again = pull.pull_adapters(config, INSECURE)[0]  # by tag: one manifest GET, no blobs
    assert again.downloaded_bytes == 0 and again.cached_bytes == first.downloaded_bytes

    registry.stop()  # by digest the cache is enough: no registry at all
    pinned = pull.PullConfig([f"a={registry.host}/adapters/cached@{result.digest}"], str(dest))
    offline = pull.pull_adapters(pinned, INSECURE)[0]
    assert offline.downloaded_bytes == 0 and offline.digest == result.digest
    assert_same_files(dest / "a", adapter)

    # a corrupted cache entry is detected by its hash and fetched again
    blob = pull.BlobCache(dest / ".oci-cache").blob_path(file_descriptor(adapter / "loss.json", "x")["digest"])
    blob.unlink()  # the hard link into dest/a keeps the old inode; write a fresh corrupt file
    blob.write_bytes(b"[" + b" " * (len((adapter / "loss.json").read_bytes()) - 2) + b"]")
    registry.start()
    repaired = pull.pull_adapters(config, INSECURE)[0]
    assert repaired.downloaded_bytes == (adapter / "loss.json").stat().st_size
    assert_same_files(dest / "a", adapter)


def test_blobs_larger_than_the_answer_cap_round_trip(oci_registry, tmp_path):
    """A HEAD of a blob declares the blob's length: only bodies actually read are capped at 4 MiB."""
    adapter = make_adapter_dir(tmp_path / "adapter", weights_bytes=6 << 20, seed=3)
    push_dir(oci_registry, adapter, "adapters/large")
    pull.pull_adapters(pull.PullConfig([f"l={oci_registry.host}/adapters/large:v1"], str(tmp_path / "d")), INSECURE)
    assert_same_files(tmp_path / "d" / "l", adapter)


# 64 KiB is hashed in the receiving thread, 6 MiB on the writer thread (stepkit.oci.client.THREADED_HASH_BYTES)
@pytest.mark.parametrize("weights_bytes", [64 * 1024, 6 << 20])
def test_corrupt_blob_in_registry_storage_is_refused(registry_factory, tmp_path, weights_bytes):
    registry = registry_factory()
    adapter = make_adapter_dir(tmp_path / "adapter", seed=7, weights_bytes=weights_bytes)
    push_dir(registry, adapter, "adapters/tampered")
    digest = file_descriptor(adapter / "adapter_model.safetensors", "x")["digest"].removeprefix("sha256:")
    stored = registry.storage / "docker/registry/v2/blobs/sha256" / digest[:2] / digest / "data"
    data = bytearray(stored.read_bytes())
    data[-1] ^= 0xFF
    stored.write_bytes(bytes(data))
    dest = tmp_path / "dest"
    with pytest.raises(RegistryError, match="arrived with sha256") as error:
        pull.pull_adapters(pull.PullConfig([f"t={registry.host}/adapters/tampered:v1"], str(dest)), INSECURE)
    assert not isinstance(error.value, RetryableError), "corrupt on every attempt: exit 2, a retry would not help"
    assert not (dest / "t").exists()
    assert not list(dest.glob(".oci-cache/blobs/sha256/*.part"))


def _tar_gz(entries: dict[str, bytes | None]) -> bytes:
    """A gzip'd layer tarball; a None value makes a directory entry."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for name, content in entries.items():
            info = tarfile.TarInfo(name)
            if content is None:
                info.type = tarfile.DIRTYPE
                info.mode = 0o755
                archive.addfile(info)
            else:
                info.size = len(content)
                info.mode = 0o644
                archive.addfile(info, io.BytesIO(content))
    return gzip.compress(buffer.getvalue(), mtime=0)


def push_kaito_style_image(registry, repository: str, adapter: Path, tmp_path: Path) -> str:
    """A Docker v2 image as `docker build` of `FROM scratch` + `COPY adapter/ /data/` would give,
    plus a second layer that deletes a file (whiteout), pushed as a plain image (no titles)."""
    files = {f"data/{p.name}": p.read_bytes() for p in adapter.iterdir()}
    layer_one = _tar_gz({"data/": None, **files, "data/stale.txt": b"old", "etc/hostname": b"x"})
    layer_two = _tar_gz({"data/.wh.stale.txt": b""})
    client = RegistryClient(ImageRef.parse(f"{registry.host}/{repository}:v1"), INSECURE)
    layers, diff_ids = [], []
    for index, blob in enumerate((layer_one, layer_two)):
        path = tmp_path / f"layer{index}.tar.gz"
        path.write_bytes(blob)
        layers.append(file_descriptor(path, "application/vnd.docker.image.rootfs.diff.tar.gzip"))
        diff_ids.append("sha256:" + hashlib.sha256(gzip.decompress(blob)).hexdigest())
        client.upload_file(path, layers[-1])
    config_path = tmp_path / "config.json"
    config_path.write_text(json.dumps({"architecture": "amd64", "os": "linux", "config": {},
                                       "rootfs": {"type": "layers", "diff_ids": diff_ids}}))
    config = file_descriptor(config_path, "application/vnd.docker.container.image.v1+json")
    client.upload_file(config_path, config)
    manifest = json.dumps({"schemaVersion": 2, "mediaType": DOCKER_MANIFEST, "config": config,
                           "layers": layers}).encode()
    return client.put_manifest(manifest, "v1", media_type=DOCKER_MANIFEST)


def test_kaito_style_image_with_files_under_data(oci_registry, tune_output_dir, tmp_path):
    digest = push_kaito_style_image(oci_registry, "adapters/kaito-image", tune_output_dir, tmp_path)
    dest = tmp_path / "dest"
    pulled = pull.pull_adapters(pull.PullConfig([f"k={oci_registry.host}/adapters/kaito-image:v1"], str(dest)),
                                INSECURE)
    assert pulled[0].digest == digest
    assert_same_files(dest / "k", tune_output_dir)  # stale.txt whited out, etc/ ignored


def test_image_index_resolves_to_its_manifest(oci_registry, tune_output_dir, tmp_path):
    result = push_dir(oci_registry, tune_output_dir, "adapters/indexed", tag="single")
    client = RegistryClient(ImageRef.parse(f"{oci_registry.host}/adapters/indexed:multi"), INSECURE)
    _, _, raw = client.fetch_manifest(result.digest)
    index = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [
        {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": result.digest, "size": len(raw),
         "platform": {"os": "linux", "architecture": "amd64"}}]}).encode()
    client.put_manifest(index, "multi", media_type=OCI_INDEX)
    pulled = pull.pull_adapters(pull.PullConfig([f"i={oci_registry.host}/adapters/indexed:multi"], str(tmp_path)),
                                INSECURE)
    assert pulled[0].digest == result.digest
    assert_same_files(tmp_path / "i", tune_output_dir)


def test_unsafe_layer_title_is_refused(oci_registry, tmp_path, capsys):
    evil = tmp_path / "evil"
    evil.write_bytes(b"pwned")
    client = RegistryClient(ImageRef.parse(f"{oci_registry.host}/adapters/evil:v1"), INSECURE)
    layer = file_descriptor(evil, "application/octet-stream", "../../escaped")
    client.upload_file(evil, layer)
    config = upload_empty_config(client)
    client.put_manifest(build_manifest([layer], push.ARTIFACT_TYPE, {}, config), "v1")
    dest = tmp_path / "dest"
    code = run_step(pull.main, ["--adapter", f"e={oci_registry.host}/adapters/evil:v1", "--dest", str(dest),
                                "--insecure", "--outputs", str(tmp_path / "o")])
    assert code == 2 and "'../../escaped', not a plain file name" in capsys.readouterr().err
    assert not (tmp_path / "escaped").exists() and not (dest / "e").exists()


def test_missing_repository_and_tag_are_named(oci_registry, tune_output_dir, tmp_path, capsys):
    push_dir(oci_registry, tune_output_dir, "adapters/has-tags")
    for image, expected in [
        (f"{oci_registry.host}/adapters/never-pushed:v1", "repository adapters/never-pushed does not exist"),
        (f"{oci_registry.host}/adapters/has-tags:v9", "has no 'v9' (tags: v1)"),
    ]:
        code = run_step(pull.main, ["--adapter", f"x={image}", "--dest", str(tmp_path / "d"), "--insecure",
                                    "--outputs", str(tmp_path / "o")])
        err = capsys.readouterr().err
        assert code == 2
        assert expected in err and oci_registry.host in err
    assert not (tmp_path / "o").exists()


def test_pull_with_basic_auth_and_wrong_password(oci_registry_auth, tune_output_dir, tmp_path, capsys):
    good = oci_registry_auth.write_docker_config(tmp_path / "good.json")
    push.push_adapter(push.PushConfig(str(tune_output_dir), f"{oci_registry_auth.host}/adapters/private:v1"),
                      RegistryOptions(insecure=True, docker_config=str(good)))
    args = ["--adapter", f"p={oci_registry_auth.host}/adapters/private:v1", "--dest", str(tmp_path / "d"),
            "--insecure", "--outputs", str(tmp_path / "o")]
    assert run_step(pull.main, [*args, "--docker-config", str(good)]) == 0
    assert_same_files(tmp_path / "d" / "p", tune_output_dir)

    bad = oci_registry_auth.write_docker_config(tmp_path / "bad.json", password="wrong-password-42")
    assert run_step(pull.main, [*args, "--docker-config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "401" in err and "adapters/private" in err and "wrong-password-42" not in err


@pytest.mark.parametrize(("adapter", "expected"), [
    ("noequals", "--adapter: expected KEY=VALUE, got 'noequals'"),
    ("../x=127.0.0.1:1/a/b:v1", "adapter name '../x'"),
    ("a=not a ref", "--adapter a=: 'not a ref' is not an OCI image reference"),
    ("a=", "is empty"),
])
def test_bad_adapter_arguments(adapter, expected, tmp_path, capsys):
    code = run_step(pull.main, ["--adapter", adapter, "--dest", str(tmp_path), "--outputs", str(tmp_path / "o")])
    assert code == 2 and expected in capsys.readouterr().err


def test_duplicate_names_refused(tmp_path, capsys):
    code = run_step(pull.main, ["--adapter", "a=127.0.0.1:1/x/y:v1", "--adapter", "a=127.0.0.1:1/x/z:v1",
                                "--dest", str(tmp_path), "--outputs", str(tmp_path / "o")])
    assert code == 2 and "given twice" in capsys.readouterr().err


@pytest.mark.slow
def test_real_peft_adapter_round_trip_loads_and_generates_the_same(oci_registry, tmp_path):
    """A real LoRA adapter on the tiny model survives push + pull: PEFT loads it and the logits match."""
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    from presets.materialize import resolve_model

    torch.manual_seed(0)
    base_path = resolve_model("kaiflow-tiny-test")
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_path),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:  # non-zero B so the adapter changes the output
                parameter.normal_(0, 0.5)
    adapter = tmp_path / "tuned"
    model.save_pretrained(adapter)
    make_adapter_dir(tmp_path / "meta")  # kaiflow.json, loss.json, loss.png beside the real weights
    for name in ("kaiflow.json", "loss.json", "loss.png"):
        (adapter / name).write_bytes((tmp_path / "meta" / name).read_bytes())
    (adapter / "README.md").unlink(missing_ok=True)

    push_dir(oci_registry, adapter, "adapters/real-peft")
    dest = tmp_path / "dest"
    pull.pull_adapters(pull.PullConfig([f"real={oci_registry.host}/adapters/real-peft:v1"], str(dest)), INSECURE)
    assert_same_files(dest / "real", adapter)

    ids = torch.tensor([[1, 5, 9, 3]])
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path), str(dest / "real"))
    model.eval()
    loaded.eval()
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, loaded(ids).logits, atol=1e-5)
        base_logits = AutoModelForCausalLM.from_pretrained(base_path)(ids).logits
        assert not torch.allclose(base_logits, loaded(ids).logits, atol=1e-3)
