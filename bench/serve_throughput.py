"""serve.py under load: one request at a time (--max_batch 1) vs continuous batching, then a soak.

For each mode a server runs as its own process (`python serve.py ...`), and 1, 4 and 16 concurrent
streaming clients each send --requests requests (greedy, --max_tokens tokens, chat questions from the
shipped SFT data, the same in both modes). Reported per level: aggregate generated tokens/s (usage
counts over wall time), time to first token p50/p95 (request sent -> first content chunk) and
per-token latency (first -> last content chunk over the tokens in between, mean). The ratio row
compares the two modes at 16 clients.

The soak then sends 200 requests from 16 clients to the batched server: every 10th body malformed, every
10th invalid (temperature 5), every 10th stream dropped after 3 chunks, the rest valid (streamed or not,
8-64 tokens). Every valid request must complete with its [DONE] or JSON body and usage, every bad one get
a 400, no sequence may be left running, and the server's resident memory (VmRSS) afterwards is compared
with its level after warm-up.

    python bench/serve_throughput.py                       # the default model shape, random weights
    python bench/serve_throughput.py --model_dir out/sft   # a trained model
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from common import add_json_flag, environment, print_table, write_checkpoint, write_json

ROOT = Path(__file__).resolve().parent.parent


def questions(n: int) -> list[str]:
    """The first user message of the first n SFT conversations."""
    out = []
    with open(ROOT / "dataset" / "sft.jsonl", encoding="utf-8") as f:
        for line in f:
            record = json.loads(line)
            turns = record.get("conversations") or record.get("messages") or []
            user = next((t["content"] for t in turns if t.get("role") == "user"), None)
            if user:
                out.append(user)
            if len(out) == n:
                break
    return out


class Server:
    """serve.py in a subprocess on a free port."""

    def __init__(self, model_dir: str, max_batch: int, threads: int | None, extra: list[str]) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        tokenizer = [] if (Path(model_dir) / "tokenizer.json").is_file() else ["--tokenizer", "default"]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        extra = extra + (["--threads", str(threads)] if threads else [])
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "serve.py"), "--model", model_dir, *tokenizer, "--port", str(self.port),
             "--max_batch", str(max_batch), *extra], env=env, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"serve.py did not start (exit status {self.proc.poll()})")
            time.sleep(0.2)

    def rss_mib(self) -> float:
        """The server's resident memory now."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


async def stream_once(client: httpx.AsyncClient, url: str, question: str, max_tokens: int) -> dict:
    """One streamed greedy chat request: ttft, per-token latency, completion tokens."""
    body = {"messages": [{"role": "user", "content": question}], "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first = last = None
    tokens = 0
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"status {r.status_code}: {await r.aread()}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if any(c.get("delta", {}).get("content") for c in chunk["choices"]):
                last = time.perf_counter()
                first = first or last
    return {"ttft": (first or last or time.perf_counter()) - t0, "tokens": tokens,
            "per_token": (last - first) / (tokens - 1) if first and tokens > 1 else None}


async def load_level(url: str, clients: int, requests: int, qs: list[str], max_tokens: int) -> dict:
    """`clients` concurrent clients, each sending `requests` requests one after the other."""
    async with httpx.AsyncClient(timeout=600) as client:
        async def one_client(c: int) -> list[dict]:
            return [await stream_once(client, url, qs[(c * requests + k) % len(qs)], max_tokens)
                    for k in range(requests)]

        t0 = time.perf_counter()
        results = [r for rs in await asyncio.gather(*(one_client(c) for c in range(clients))) for r in rs]
        wall = time.perf_counter() - t0
    ttfts = sorted(r["ttft"] for r in results)
    per_token = [r["per_token"] for r in results if r["per_token"] is not None]
    return {"tokens_per_s": sum(r["tokens"] for r in results) / wall, "tokens": sum(r["tokens"] for r in results),
            "ttft_p50": statistics.median(ttfts), "ttft_p95": ttfts[min(len(ttfts) - 1, int(0.95 * len(ttfts)))],
            "per_token_ms": 1000 * statistics.mean(per_token) if per_token else float("nan"), "wall": wall}


async def soak(server: Server, total: int, clients: int, qs: list[str]) -> dict:
    """`total` requests from `clients` clients: valid, malformed, invalid and dropped ones mixed."""
    counts = {"valid": 0, "completed": 0, "malformed": 0, "invalid": 0, "bad_rejected": 0, "dropped": 0}
    problems: list[str] = []
    url = server.url + "/v1/chat/completions"

    async def one(client: httpx.AsyncClient, i: int) -> None:
        kind = i % 10
        question = [{"role": "user", "content": qs[i % len(qs)]}]
        max_tokens = 8 + (i * 7) % 57
        if kind in (0, 1):
            counts["malformed" if kind == 0 else "invalid"] += 1
            content = '{"messages": [' if kind == 0 else json.dumps({"messages": question, "temperature": 5})
            r = await client.post(url, content=content, headers={"Content-Type": "application/json"})
            counts["bad_rejected"] += r.status_code == 400 and "error" in r.json()
            return
        if kind == 2:
            counts["dropped"] += 1
            async with client.stream("POST", url, json={"messages": question, "max_tokens": 200, "stream": True}) as r:
                n = 0
                async for _ in r.aiter_lines():
                    n += 1
                    if n >= 6:  # 3 events (each followed by a blank line): hang up mid-stream
                        break
            return
        counts["valid"] += 1
        body = {"messages": question, "max_tokens": max_tokens, "temperature": 0.8, "seed": i}
        if kind % 2:
            r = await client.post(url, json=body)
            ok = r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
        else:
            seen_done, usage = False, None
            async with client.stream("POST", url, json={**body, "stream": True,
                                                        "stream_options": {"include_usage": True}}) as r:
                async for line in r.aiter_lines():
                    seen_done |= line == "data: [DONE]"
                    if line.startswith("data: {"):
                        usage = json.loads(line[6:]).get("usage") or usage
            ok = r.status_code == 200 and seen_done and usage is not None
        counts["completed"] += ok
        if not ok:
            problems.append(f"request {i} failed (status {r.status_code})")

    queue = list(range(total))

    async def worker() -> None:
        async with httpx.AsyncClient(timeout=600) as client:
            while queue:
                await one(client, queue.pop(0))

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(clients)))
    counts["seconds"] = time.perf_counter() - t0
    await asyncio.sleep(1.0)  # dropped streams are retired at the next step
    health = httpx.get(server.url + "/health").json()
    counts["left_running"] = health["running"] + health["waiting"]
    counts["problems"] = problems
    return counts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_json_flag(p)
    p.add_argument("--model_dir", default=None, help="a trained model (default: the default shape, random weights)")
    p.add_argument("--clients", default="1,4,16", help="concurrency levels (default: %(default)s)")
    p.add_argument("--requests", type=int, default=2, help="requests per client per level (default: %(default)s)")
    p.add_argument("--max_tokens", type=int, default=48, help="tokens per answer (default: %(default)s)")
    p.add_argument("--max_batch", type=int, default=16, help="the batched server's --max_batch (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None,
                   help="the servers' --threads (default: serve.py's own default, the cores minus one)")
    p.add_argument("--soak", type=int, default=200, help="soak requests; 0 skips the soak (default: %(default)s)")
    p.add_argument("--context", type=int, default=512, help="the servers' --context (default: %(default)s)")
    args = p.parse_args()
    levels = [int(c) for c in args.clients.split(",")]
    qs = questions(64)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model_dir or str(write_checkpoint("default", Path(tmp), seed=0))
        import torch

        print(f"# {environment(torch.device('cpu'))}; server --threads {args.threads or 'default'}")
        print(f"# model {args.model_dir or 'default shape, random weights'}; {args.max_tokens} tokens per answer, "
              f"greedy; {args.requests} requests per client per level\n")
        results, servers = {}, {"one at a time": 1, "batched": args.max_batch}
        for mode, max_batch in servers.items():
            server = Server(model_dir, max_batch, args.threads, ["--context", str(args.context)])
            try:
                asyncio.run(load_level(server.url, 2, 1, qs, 8))  # warm-up
                for clients in levels:
                    results[mode, clients] = asyncio.run(load_level(server.url, clients, args.requests, qs,
                                                                    args.max_tokens))
                if mode == "batched" and args.soak:
                    rss_before = server.rss_mib()
                    outcome = asyncio.run(soak(server, args.soak, 16, qs))
                    rss_after = server.rss_mib()
            finally:
                server.close()
        rows = []
        for clients in levels:
            for mode in servers:
                r = results[mode, clients]
                rows.append([str(clients), f"{mode} (--max_batch {servers[mode]})", f"{r['tokens_per_s']:.1f}",
                             f"{r['ttft_p50']:.2f}", f"{r['ttft_p95']:.2f}", f"{r['per_token_ms']:.1f}"])
        print_table(["clients", "server", "tokens/s", "TTFT p50 s", "TTFT p95 s", "ms/token"], rows)
        top = max(levels)
        ratio = results["batched", top]["tokens_per_s"] / results["one at a time", top]["tokens_per_s"]
        print(f"\nbatched / one at a time at {top} clients: {ratio:.2f}x aggregate tokens/s "
              f"(target >= 4x); batched TTFT p95 {results['batched', top]['ttft_p95']:.2f} s (target < 2 s)")
        if args.soak:
            print(f"\nsoak: {args.soak} requests from 16 clients in {outcome['seconds']:.0f} s: "
                  f"{outcome['completed']}/{outcome['valid']} valid completed, "
                  f"{outcome['bad_rejected']}/{outcome['malformed'] + outcome['invalid']} bad ones got 400, "
                  f"{outcome['dropped']} dropped mid-stream, {outcome['left_running']} sequences left running; "
                  f"server RSS {rss_before:.0f} MiB after warm-up -> {rss_after:.0f} MiB after "
                  f"({100 * (rss_after / rss_before - 1):+.1f}%)")
            for problem in outcome["problems"]:
                print("  " + problem)
    write_json(args.json)


if __name__ == "__main__":
    main()
