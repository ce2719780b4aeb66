"""Push/pull throughput of a 50 MiB adapter vs a plain HTTP PUT/GET of the same bytes.

Starts a private `docker-registry` (filesystem storage in a temp dir) on 127.0.0.1, then per round:

* kaiflow push: ``steps.push_adapter.push_adapter`` of an adapter directory whose
  ``adapter_model.safetensors`` is SIZE MiB of fresh random bytes (plus the small files), including
  hashing, manifest, tagging and the read-back verification;
* plain PUT: httpx ``POST /blobs/uploads/`` + one monolithic ``PUT ?digest=`` of SIZE MiB of other
  fresh random bytes (digest computed before the clock starts);
* kaiflow pull: ``steps.pull_adapters.pull_adapters`` into an empty dest and empty cache
  (manifest, streamed download, sha256 check, placement);
* plain GET: httpx streaming ``GET /blobs/<digest>`` into a file, no verification;
* plain PUT/GET (requests): the same with ``requests`` (what oras-py uses underneath), to show
  how much of the difference is the HTTP client rather than the step.

Fresh bytes each round keep the registry's blob de-duplication out of the numbers. Prints the
sizes moved, then per operation the median of ROUNDS (default 3) in seconds and MiB/s with every
run's time and the median CPU time this process spent on it (the client's share; the registry's
is not counted), and the ratios kaiflow/plain of the medians.

    python bench/oci_bench.py [--size-mib 50] [--rounds 3]      (what `make bench` runs)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import requests

from local_runner.local_registry import RegistryProcess
from steps import pull_adapters as pull
from steps import push_adapter as push
from stepkit.oci import RegistryOptions

ADAPTER_CONFIG = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 8, "lora_alpha": 16,
                  "target_modules": ["q_proj", "v_proj"], "base_model_name_or_path": "bench"}


def make_adapter(path: Path, size: int) -> int:
    """An adapter directory the push step accepts: PEFT config, metadata, SIZE fresh random bytes of weights."""
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text(json.dumps(ADAPTER_CONFIG))
    (path / "kaiflow.json").write_text(json.dumps({"base_model": "bench", "method": "lora"}))
    (path / "adapter_model.safetensors").write_bytes(os.urandom(size))
    return sum(p.stat().st_size for p in path.iterdir())


def plain_put(client: httpx.Client, base: str, repository: str, data: bytes, digest: str) -> None:
    started = client.post(f"{base}/v2/{repository}/blobs/uploads/")
    started.raise_for_status()
    location = started.headers["location"]
    if location.startswith("/"):
        location = base + location
    separator = "&" if "?" in location else "?"
    done = client.put(f"{location}{separator}digest={digest}", content=data,
                      headers={"Content-Type": "application/octet-stream"})
    done.raise_for_status()


def requests_put(session: requests.Session, base: str, repository: str, data: bytes, digest: str) -> None:
    started = session.post(f"{base}/v2/{repository}/blobs/uploads/")
    started.raise_for_status()
    location = started.headers["location"]
    if location.startswith("/"):
        location = base + location
    separator = "&" if "?" in location else "?"
    session.put(f"{location}{separator}digest={digest}", data=data,
                headers={"Content-Type": "application/octet-stream"}).raise_for_status()


def requests_get(session: requests.Session, base: str, repository: str, digest: str, target: Path) -> None:
    with session.get(f"{base}/v2/{repository}/blobs/{digest}", stream=True) as response:
        response.raise_for_status()
        with open(target, "wb") as out:
            for chunk in response.iter_content(1 << 20):
                out.write(chunk)


def plain_get(client: httpx.Client, base: str, repository: str, digest: str, target: Path) -> None:
    with client.stream("GET", f"{base}/v2/{repository}/blobs/{digest}") as response:
        response.raise_for_status()
        with open(target, "wb") as out:
            for chunk in response.iter_bytes(1 << 20):
                out.write(chunk)


def run(size_mib: int, rounds: int) -> tuple[dict[str, list[float]], dict[str, list[float]], int]:
    size = size_mib << 20
    times: dict[str, list[float]] = {"kaiflow push": [], "plain PUT": [], "requests PUT": [],
                                     "kaiflow pull": [], "plain GET": [], "requests GET": []}
    cpu: dict[str, list[float]] = {name: [] for name in times}
    options = RegistryOptions(insecure=True)
    with tempfile.TemporaryDirectory(prefix="oci-bench-") as tmp, RegistryProcess(Path(tmp) / "registry") as registry:
        base = registry.url
        with httpx.Client(timeout=120) as client, requests.Session() as session:
            for round_ in range(rounds):
                work = Path(tmp) / f"round{round_}"
                adapter = work / "adapter"
                adapter_bytes = make_adapter(adapter, size)
                image = f"{registry.host}/bench/adapter:r{round_}"

                started, cpu_started = time.perf_counter(), time.process_time()
                result = push.push_adapter(push.PushConfig(str(adapter), image), options)
                times["kaiflow push"].append(time.perf_counter() - started)
                cpu["kaiflow push"].append(time.process_time() - cpu_started)

                data = os.urandom(size)
                digest = "sha256:" + hashlib.sha256(data).hexdigest()
                started, cpu_started = time.perf_counter(), time.process_time()
                plain_put(client, base, "bench/plain", data, digest)
                times["plain PUT"].append(time.perf_counter() - started)
                cpu["plain PUT"].append(time.process_time() - cpu_started)

                other = os.urandom(size)
                other_digest = "sha256:" + hashlib.sha256(other).hexdigest()
                started, cpu_started = time.perf_counter(), time.process_time()
                requests_put(session, base, "bench/plain", other, other_digest)
                times["requests PUT"].append(time.perf_counter() - started)
                cpu["requests PUT"].append(time.process_time() - cpu_started)

                dest = work / "pulled"
                started, cpu_started = time.perf_counter(), time.process_time()
                pull.pull_adapters(pull.PullConfig([f"a={registry.host}/bench/adapter@{result.digest}"], str(dest)),
                                   options)
                times["kaiflow pull"].append(time.perf_counter() - started)
                cpu["kaiflow pull"].append(time.process_time() - cpu_started)
                assert (dest / "a" / "adapter_model.safetensors").stat().st_size == size

                started, cpu_started = time.perf_counter(), time.process_time()
                plain_get(client, base, "bench/plain", digest, work / "plain.bin")
                times["plain GET"].append(time.perf_counter() - started)
                cpu["plain GET"].append(time.process_time() - cpu_started)

                started, cpu_started = time.perf_counter(), time.process_time()
                requests_get(session, base, "bench/plain", other_digest, work / "plain2.bin")
                times["requests GET"].append(time.perf_counter() - started)
                cpu["requests GET"].append(time.process_time() - cpu_started)
                shutil.rmtree(work)
    return times, cpu, adapter_bytes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-mib", type=int, default=50, help="size of adapter_model.safetensors in MiB")
    parser.add_argument("--rounds", type=int, default=3, help="rounds; the median is reported")
    args = parser.parse_args(argv)
    times, cpu, adapter_bytes = run(args.size_mib, args.rounds)
    median = {name: statistics.median(values) for name, values in times.items()}
    rate = {name: args.size_mib / value for name, value in median.items()}
    print(f"oci_bench: adapter {adapter_bytes} bytes ({adapter_bytes / 2**20:.1f} MiB: adapter_model.safetensors "
          f"{args.size_mib} MiB + adapter_config.json + kaiflow.json); plain PUT/GET move {args.size_mib} MiB blobs; "
          f"median of {args.rounds} rounds; local docker-registry on 127.0.0.1")
    for name in times:
        runs = " ".join(f"{value:.3f}" for value in times[name])
        print(f"  {name:13s} median {median[name]:6.3f} s  {rate[name]:7.1f} MiB/s  client CPU "
              f"{statistics.median(cpu[name]) * 1000:5.0f} ms   (runs: {runs} s)")
    print(f"  median ratio kaiflow/plain (httpx): push {rate['kaiflow push'] / rate['plain PUT']:.2f}  "
          f"pull {rate['kaiflow pull'] / rate['plain GET']:.2f}")
    cpu_median = {name: statistics.median(values) for name, values in cpu.items()}
    print(f"  median client CPU kaiflow/plain (httpx): push {cpu_median['kaiflow push'] / cpu_median['plain PUT']:.2f}  "
          f"pull {cpu_median['kaiflow pull'] / cpu_median['plain GET']:.2f}  (this process only, not the registry's; "
          "steadier than wall time on a busy machine)")
    print(f"  median ratio kaiflow/requests:      push {rate['kaiflow push'] / rate['requests PUT']:.2f}  "
          f"pull {rate['kaiflow pull'] / rate['requests GET']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
