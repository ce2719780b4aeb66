"""Serving benchmark: our batching service against a naive one-generate-at-a-time server.

Both sides are the same BentoML service on the same model and the same HTTP code, started the
way ``kaiflow deploy`` starts it, side by side, each level measured on both back to back; only the generate loop differs (``KAIFLOW_ENGINE=batching`` vs
``naive``: one ``model.generate`` per request, in turn). At each concurrency level a fixed number
of streamed ``/v1/chat/completions`` requests is spread over the clients; prompts ask for long
answers and ``max_tokens`` caps them, so every request generates about the same number of tokens.

Reports req/s, generated tokens/s, p50/p99 latency and p50 time to first streamed token, as a
markdown table and (``--json``) raw figures.

    .venv/bin/python bench/serve_bench.py --model smollm2-135m-instruct --clients 1 4 8 --requests 8
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("BENTOML_DO_NOT_TRACK", "True")

TOPICS = ["the sea", "a GPU", "Kubernetes", "autumn", "a robot", "Paris", "a library", "the moon",
          "coffee", "a train", "mountains", "a cat", "winter", "a city", "music", "rain"]


def one_request(client, model: str, prompt: str, max_tokens: int) -> dict[str, float]:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    started = time.perf_counter()
    first = None
    tokens = 0
    with client.stream("POST", "/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            response.read()
            raise RuntimeError(f"{response.status_code}: {response.text[:200]}")
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            for choice in chunk.get("choices", []):
                if first is None and (choice.get("delta") or {}).get("content"):
                    first = time.perf_counter()
    ended = time.perf_counter()
    return {"latency": ended - started, "ttft": (first or ended) - started, "tokens": tokens}


def run_level(url: str, model: str, clients: int, requests: int, max_tokens: int) -> dict[str, float]:
    import httpx

    results: list[dict[str, float]] = []
    errors: list[str] = []
    lock = threading.Lock()
    counter = iter(range(requests))
    barrier = threading.Barrier(clients + 1)

    def worker() -> None:
        with httpx.Client(base_url=url, timeout=600) as client:
            barrier.wait()
            while True:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                prompt = f"Write a long, detailed story about {TOPICS[i % len(TOPICS)]}."
                try:
                    r = one_request(client, model, prompt, max_tokens)
                except Exception as exc:  # counted, reported
                    with lock:
                        errors.append(str(exc))
                    continue
                with lock:
                    results.append(r)

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    barrier.wait()
    started = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    latencies = sorted(r["latency"] for r in results)
    p99_index = min(len(latencies) - 1, max(0, round(0.99 * len(latencies)) - 1))
    return {
        "clients": clients, "requests": len(results), "errors": len(errors), "wall_s": wall,
        "req_per_s": len(results) / wall, "tokens_per_s": sum(r["tokens"] for r in results) / wall,
        "p50_s": statistics.median(latencies), "p99_s": latencies[p99_index],
        "ttft_p50_s": statistics.median(r["ttft"] for r in results),
        "tokens_per_request": statistics.mean(r["tokens"] for r in results),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct", help="preset or model folder")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8], help="concurrency levels")
    parser.add_argument("--requests", type=int, default=8, help="requests per level")
    parser.add_argument("--max-tokens", type=int, default=24, help="tokens per request (cap)")
    parser.add_argument("--engines", nargs="+", default=["batching", "naive"], choices=["batching", "naive"])
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--torch-threads", type=int, default=1,
                        help="KAIFLOW_TORCH_THREADS for both servers (0: torch's default; 1 is steadier on "
                        "a shared machine, see docs/serving.md)")
    parser.add_argument("--json", help="write the raw figures here")
    args = parser.parse_args(argv)

    from steps.local_service import start_local, stop_local

    # Both servers run side by side (an idle one costs no CPU) and each level is measured on one
    # right after the other, so a busy neighbour on a shared machine skews both alike.
    figures: dict[str, list[dict[str, float]]] = {engine: [] for engine in args.engines}
    services = {}
    try:
        for engine in args.engines:
            workdir = Path(tempfile.mkdtemp(prefix=f"serve-bench-{engine}-"))
            services[engine] = (workdir, start_local(
                args.model, workdir, engine=engine, ready_timeout=600,
                extra_env={"KAIFLOW_MAX_BATCH_SIZE": str(args.max_batch_size),
                           "KAIFLOW_TORCH_THREADS": str(args.torch_threads)}))
            run_level(services[engine][1].url, Path(args.model).name, 1, 2, 4)  # warm-up
        for clients in args.clients:
            for engine in args.engines:
                level = run_level(services[engine][1].url, Path(args.model).name, clients, args.requests,
                                  args.max_tokens)
                figures[engine].append(level)
                print(f"{engine:8s} {clients} clients: {level['req_per_s']:.2f} req/s "
                      f"{level['tokens_per_s']:.1f} tok/s p50 {level['p50_s']:.2f}s p99 {level['p99_s']:.2f}s "
                      f"ttft {level['ttft_p50_s']:.2f}s errors {level['errors']}", flush=True)
    finally:
        for workdir, service in services.values():
            stop_local(workdir, service)

    print(f"\nmodel {args.model}, {args.requests} requests per level, max_tokens {args.max_tokens}, "
          f"{os.cpu_count()} CPUs, torch threads {args.torch_threads or 'default'}\n")
    print("| engine | clients | req/s | tokens/s | p50 s | p99 s | TTFT p50 s | errors |")
    print("|---|---|---|---|---|---|---|---|")
    for engine, levels in figures.items():
        for f in levels:
            print(f"| {engine} | {f['clients']} | {f['req_per_s']:.2f} | {f['tokens_per_s']:.1f} | {f['p50_s']:.2f} "
                  f"| {f['p99_s']:.2f} | {f['ttft_p50_s']:.2f} | {f['errors']} |")
    if "batching" in figures and "naive" in figures:
        for ours, naive in zip(figures["batching"], figures["naive"], strict=True):
            print(f"\n{ours['clients']} clients: batching/naive req/s = {ours['req_per_s'] / naive['req_per_s']:.2f}x; "
                  f"batching p99/p50 = {ours['p99_s'] / ours['p50_s']:.2f}", end="")
        print()
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
