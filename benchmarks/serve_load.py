"""Load test of `chatforge serve` on loopback: N requests from C concurrent clients, streaming and not.

Starts `chatforge serve` as its own process on a free 127.0.0.1 port with one model (default models/sft, else a
tiny random model), as a deployment runs it: the load generator's own Python (HTTP clients, parsing streamed
chunks) would otherwise share the server's interpreter lock and slow its engine thread. It then measures a
single-client serial baseline (each request alone: a lone request's latency), then the concurrent load, in the
same run. Prints tokens/s, p50/p95 latency and first-token latency (streamed requests) and the ratios against
the baseline; asserts zero 5xx. Bounded in count and time. The targets (issue 16) and the figures:
docs/serving.md, "Load".

It also says whether the figures can be trusted: the machine's load average before the run (other work on the
cores makes the engine share one with the load generator, and the ratios read low), and, during the load, how
much of a core the engine, the server's event loop and the load generator each used (from /proc, on Linux) and
how many rows the engine had active and queued (from /health): an engine below ~90% of a core with rows
queued is starved, not saturated.

Last, the engine's floor on this machine: the model loaded in this process (same torch threads as the server),
a decode step of `clients` rows timed against a step of one row. Under a closed loop of `clients` clients, even
with every row in every step and nothing to prefill, a request takes that ratio times a lone request's steps:
the mean latency ratio cannot fall below it, whatever the scheduler does (docs/serving.md, "The step floor").

    python benchmarks/serve_load.py [--model DIR] [--requests 200] [--clients 20] [--max-tokens 64] [--max-batch 32]
                                    [--ignore-eos]    # replies of exactly max_tokens tokens
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

PROMPTS = ["Hello! How are you today?", "What is your favorite food?", "Can you tell me a joke?",
           "Let us go for a walk in the park.", "What do computers do?"]


def tiny_random_model(folder: Path) -> Path:
    """A small random Llama with a tokenizer trained on PROMPTS: enough to load the server, not to chat."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from chatforge.tokenization import train_tokenizer

    tokenizer = train_tokenizer(PROMPTS * 20, vocab_size=300, min_frequency=2)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@contextlib.contextmanager
def server_process(model: Path, max_batch: int, max_queue: int, scratch: Path,
                   startup_timeout_s: float = 120) -> Iterator[tuple[str, int]]:
    """`chatforge serve` serving `model` as "bench" in a child process; yields its base URL and process id."""
    import httpx

    from chatforge.serving.local import LOOPBACK, free_port

    port = free_port()
    command = [sys.executable, "-m", "chatforge.cli", "serve", "--model", f"bench={model}", "--host", LOOPBACK,
               "--port", str(port), "--max-batch", str(max_batch), "--max-queue", str(max_queue),
               "--data-dir", str(scratch / "data")]
    log_path = scratch / "server.log"
    with open(log_path, "w") as log:
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://{LOOPBACK}:{port}"
    try:
        deadline = time.monotonic() + startup_timeout_s
        while True:
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"chatforge serve did not start; its output:\n{log_path.read_text()[-2000:]}")
            time.sleep(0.2)
        yield url, server.pid
    finally:
        server.terminate()
        server.wait(timeout=30)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process, all its threads (Linux /proc; 0 elsewhere)."""
    with contextlib.suppress(OSError):
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return 0.0


def engine_pids(server_pid: int) -> list[int]:
    """The server's model engine processes (its multiprocessing children; the resource tracker uses no CPU)."""
    with contextlib.suppress(OSError):
        return [int(child) for child in Path(f"/proc/{server_pid}/task/{server_pid}/children").read_text().split()]
    return []


class LoadWatch:
    """CPU shares of the engine(s), the server's event loop and this load generator over the load, and the mean
    active and queued rows that /health reports meanwhile."""

    def __init__(self, url: str, server_pid: int):
        self.url, self.pids = url, {"engine": engine_pids(server_pid), "server": [server_pid], "client": [os.getpid()]}
        self.rows: list[tuple[int, int]] = []

    def cpu(self) -> dict[str, float]:
        return {name: sum(map(cpu_seconds, pids)) for name, pids in self.pids.items()}

    async def sample_rows(self, client) -> None:
        while True:
            health = (await client.get(f"{self.url}/health")).json()["models"]["bench"]
            self.rows.append((health["active"], health["queued"]))
            await asyncio.sleep(0.1)

    async def around(self, load):
        """Runs the `load` coroutine; returns its result and prints what was busy meanwhile."""
        import httpx

        before, start = self.cpu(), time.perf_counter()
        async with httpx.AsyncClient(timeout=30) as client:
            sampler = asyncio.ensure_future(self.sample_rows(client))
            try:
                result = await load
            finally:
                sampler.cancel()
        wall, after = time.perf_counter() - start, self.cpu()
        shares = ", ".join(f"{name} {100 * (after[name] - before[name]) / wall:.0f}%" for name in after)
        active, queued = (sum(values) / max(1, len(self.rows)) for values in zip(*self.rows or [(0, 0)]))
        print(f"during the load: CPU (share of one core) {shares}; engine rows active {active:.1f}, queued "
              f"{queued:.1f} on average")
        return result


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))]


async def one_request(client, url: str, index: int, max_tokens: int, stream_every: int, ignore_eos: bool) -> dict:
    """Send request `index` (every `stream_every`-th one streams); returns status, latency and tokens."""
    body = {"messages": [{"role": "user", "content": PROMPTS[index % len(PROMPTS)]}], "max_tokens": max_tokens,
            "seed": index, "ignore_eos": ignore_eos}
    start = time.perf_counter()
    if index % stream_every == 0:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
        tokens, first_token = 0, None
        async with client.stream("POST", url, json=body) as response:
            async for line in response.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    return {"status": 500, "latency": time.perf_counter() - start, "tokens": 0}
                if first_token is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                    first_token = time.perf_counter() - start
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
        return {"status": response.status_code, "latency": time.perf_counter() - start, "tokens": tokens,
                "first_token": first_token}
    response = await client.post(url, json=body)
    tokens = response.json()["usage"]["completion_tokens"] if response.status_code == 200 else 0
    return {"status": response.status_code, "latency": time.perf_counter() - start, "tokens": tokens}


async def run_load(base_url: str, requests: int, clients: int, max_tokens: int, stream_every: int,
                   ignore_eos: bool = False) -> tuple[list, float]:
    import httpx

    url = f"{base_url}/v1/chat/completions"
    pending = iter(range(requests))
    results: list[dict] = []

    async def client_loop(client) -> None:
        for index in pending:  # a shared iterator: each request goes to exactly one client
            results.append(await one_request(client, url, index, max_tokens, stream_every, ignore_eos))

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(clients)))
        return results, time.perf_counter() - start


def summary(name: str, results: list[dict], wall: float) -> dict:
    latencies = [r["latency"] for r in results]
    tokens = sum(r["tokens"] for r in results)
    first_tokens = [r["first_token"] for r in results if r.get("first_token") is not None]
    figures = {
        "requests": len(results), "wall_s": wall, "p50_s": percentile(latencies, 0.5),
        "p95_s": percentile(latencies, 0.95), "tokens": tokens, "tokens_per_s": tokens / wall,
        "requests_per_s": len(results) / wall,
        "first_token_p50_s": percentile(first_tokens, 0.5) if first_tokens else None,
        "first_token_p95_s": percentile(first_tokens, 0.95) if first_tokens else None,
        "status": {str(s): sum(r["status"] == s for r in results) for s in sorted({r["status"] for r in results})},
    }
    first = (f"{figures['first_token_p50_s']:.3f}s/{figures['first_token_p95_s']:.3f}s" if first_tokens else "-")
    print(f"{name:<28} {len(results):>4} req  wall {wall:6.1f}s  p50 {figures['p50_s']:.3f}s  "
          f"p95 {figures['p95_s']:.3f}s  first token p50/p95 {first}  {figures['tokens_per_s']:7.1f} tok/s  "
          f"{figures['requests_per_s']:5.2f} req/s  status {figures['status']}")
    return figures


def decode_step_seconds(model_dir: Path, rows: int, steps: int = 15) -> float:
    """Median wall seconds of a decode step of `rows` rows of the model in `model_dir`, in this process."""
    import statistics

    from chatforge.inference.batch import DecodingBatch
    from chatforge.inference.loading import load_model
    from chatforge.inference.prompting import prompt_ids, stop_ids
    from chatforge.inference.sampling import Row, SamplingParams

    model, tokenizer = load_model(model_dir)
    batch = DecodingBatch(model, tokenizer.pad_token_id, stop_ids(tokenizer), tokenizer.all_special_ids)
    batch.add([Row(prompt_ids(tokenizer, [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]),
                   SamplingParams(max_new_tokens=steps + 2), seed=i, ignore_eos=True) for i in range(rows)])
    batch.step()  # first-call costs
    seconds = []
    for _ in range(steps):
        start = time.perf_counter()
        batch.step()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="model dir (default models/sft, else a tiny random model)")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--baseline-requests", type=int, default=20, help="sequential single-client requests")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--max-batch", type=int, default=32, help="chatforge serve --max-batch")
    parser.add_argument("--ignore-eos", action="store_true",
                        help="fixed-length replies of max_tokens tokens (the API's ignore_eos, as vLLM's benchmark)")
    parser.add_argument("--stream-every", type=int, default=2, help="every k-th request streams (default: half)")
    parser.add_argument("--time-limit", type=float, default=600, help="seconds for the whole run")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        model = args.model or (Path("models/sft") if Path("models/sft").is_dir() else None)
        model = (model or tiny_random_model(Path(scratch) / "tiny")).resolve()
        length = "fixed-length (ignore_eos)" if args.ignore_eos else "replies end at the end of turn"
        print(f"model {model}; {args.requests} requests from {args.clients} clients, max_tokens {args.max_tokens}, "
              f"{length}, every {args.stream_every}th streams; baseline: {args.baseline_requests} sequential requests")
        print(f"machine load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores before the run (other work "
              "on the cores makes the ratios read low)")
        with server_process(model, args.max_batch, max(64, args.clients), Path(scratch)) as (url, server_pid):

            async def both():
                knobs = (args.max_tokens, args.stream_every, args.ignore_eos)
                await run_load(url, 2, 1, *knobs)  # first-call costs
                baseline = await run_load(url, args.baseline_requests, 1, *knobs)
                load = await LoadWatch(url, server_pid).around(run_load(url, args.requests, args.clients, *knobs))
                return baseline, load

            (base_results, base_wall), (load_results, load_wall) = asyncio.run(
                asyncio.wait_for(both(), timeout=args.time_limit))
        # the server is gone: nothing else on the cores
        one_row, loaded = decode_step_seconds(model, 1), decode_step_seconds(model, args.clients)
    base = summary("baseline: 1 client, serial", base_results, base_wall)
    load = summary(f"load: {args.clients} clients", load_results, load_wall)
    print(f"ratio load/baseline: throughput {load['tokens_per_s'] / base['tokens_per_s']:.2f}x tokens/s, "
          f"{load['requests_per_s'] / base['requests_per_s']:.2f}x req/s; "
          f"p50 latency {load['p50_s'] / base['p50_s']:.2f}x "
          f"a lone request's, first token p50 {load['first_token_p50_s'] / base['first_token_p50_s']:.2f}x")
    print(f"engine floor: a decode step of {args.clients} rows takes {1000 * loaded:.1f} ms against "
          f"{1000 * one_row:.1f} ms for 1 row ({loaded / one_row:.2f}x): under {args.clients} clients the mean latency "
          f"is at least {loaded / one_row:.2f}x a lone request's on this machine, whatever the scheduler does")
    server_errors = sum(r["status"] >= 500 for r in base_results + load_results)
    assert len(load_results) == args.requests, f"{len(load_results)} of {args.requests} requests finished"
    assert server_errors == 0, f"{server_errors} responses were 5xx"
    print("zero 5xx: ok")


if __name__ == "__main__":
    main()
