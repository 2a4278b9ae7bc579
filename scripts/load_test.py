#!/usr/bin/env python
"""Load test for ``dlp-lora serve``: N concurrent clients on loopback for T seconds.

Reports requests/s, completion tokens/s, p50/p99 latency, errors (by kind) and lost requests (sent but never
answered within the grace period), plus the batch sizes the server's engine saw (from /health).

    # against a running server
    python scripts/load_test.py --url http://127.0.0.1:8000 --clients 32 --seconds 60

    # start `dlp-lora serve` on a free port for the run (a tiny demo run is built if RUN does not exist; the
    # server loads the run's own base model unless --model overrides it)
    python scripts/load_test.py --run /tmp/tiny_run --make-run --clients 32 --seconds 60

    # both schedulers side by side (bench row P8's protocol: two servers loaded in turns by the same seeded
    # streaming workload; output tokens/s, TTFT and latency p50/p99, ratios continuous/static)
    python scripts/load_test.py --run /tmp/tiny_run --make-run --compare-schedulers --clients 32 --seconds 60

Each client loops: pick a request from a mixed workload (routed chat, routed completion, forced adapter, base
model, manual mixture; every fourth one streamed), send it, check the answer (OpenAI shape, usage, routing,
``data: [DONE]`` for streams), record its latency. Nothing leaves 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

QUESTIONS = ["What is {a} plus {b}?", "Convert {a} kilometres to metres.", "Sort these words: pear {w} apple.",
             "What is the capital of France? Answer in one word.", "Count the letters in '{w}'.",
             "Reverse the word {w}. Then say it twice."]
WORDS = ["banana", "kiwi", "mango", "cherry", "plum"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_run(run: Path, model: str = "tiny") -> Path:
    """A small run for load testing: three random adapters on ``model`` and a mini-MLP router trained on
    built-in tasks (what the tests use; answers are not meaningful, the serving path is)."""
    from dlp_lora.config import RouterConfig, RouterDataConfig
    from dlp_lora.fusion import make_random_adapter
    from dlp_lora.models import load_model, resolve_model_path
    from dlp_lora.router import make_router_data, train_router
    from dlp_lora.run import write_adapter_list
    from dlp_lora.tasks import write_builtin_tasks

    tasks = ["arithmetic", "capitals", "word_sorting"]
    data = run / "data"
    write_builtin_tasks(data, n=60, seed=0, tasks=tasks)
    m, _ = load_model(model, device="cpu", dtype="fp32")
    dirs = [make_random_adapter(m, run / "adapters" / t, rank=8, alpha=16, seed=i + 1, task=t)
            for i, t in enumerate(tasks)]
    write_adapter_list(run / "adapters.txt", dirs)
    make_router_data(run / "router_data", data_dir=data, config=RouterDataConfig(val_frac=0.2, test_frac=0.2),
                     progress=False)
    train_router(run / "router_data", resolve_model_path(model), run / "router",
                 RouterConfig(epochs=6, embed_dim=32, hidden_dim=64, batch_size=16), progress=False)
    return run


def workload(i: int, tasks: list[str], max_tokens: int) -> tuple[str, dict]:
    """The i-th request of the mix: (path, body)."""
    q = QUESTIONS[i % len(QUESTIONS)].format(a=i % 97, b=(i * 7) % 89, w=WORDS[i % len(WORDS)])
    kind = i % 5
    mt = max(1, max_tokens - (i % 3) * (max_tokens // 4))
    if kind == 0:
        path, body = "/v1/chat/completions", {"model": "dlp", "messages": [{"role": "user", "content": q}]}
    elif kind == 1:
        path, body = "/v1/completions", {"model": "dlp", "prompt": q}
    elif kind == 2:
        path, body = "/v1/chat/completions", {"model": f"dlp:{tasks[i % len(tasks)]}",
                                              "messages": [{"role": "user", "content": q}]}
    elif kind == 3:
        path, body = "/v1/completions", {"model": "base", "prompt": q}
    else:
        w = {tasks[0]: 0.6, tasks[-1]: 0.4}
        path, body = "/v1/chat/completions", {"model": "dlp", "messages": [{"role": "user", "content": q}],
                                              "dlp": {"weights": w}}
    body["max_tokens"] = mt
    body["stream"] = i % 4 == 3
    return path, body


def check_json(obj: dict) -> int:
    """Completion tokens of a valid answer; raises ValueError otherwise."""
    ch = obj["choices"][0]
    text = ch["message"]["content"] if "message" in ch else ch["text"]
    if not isinstance(text, str) or ch["finish_reason"] not in ("stop", "length"):
        raise ValueError("bad choice")
    if "dlp_routing" not in obj:
        raise ValueError("no routing")
    u = obj["usage"]
    if u["total_tokens"] != u["prompt_tokens"] + u["completion_tokens"]:
        raise ValueError("bad usage")
    return int(u["completion_tokens"])


async def one(client, url: str, path: str, body: dict) -> tuple[str, int]:
    """(status, completion tokens): status "ok" or an error kind."""
    import httpx

    try:
        if not body["stream"]:
            r = await client.post(url + path, json=body)
            if r.status_code != 200:
                return f"http_{r.status_code}", 0
            return "ok", check_json(r.json())
        async with client.stream("POST", url + path, json=body) as r:
            if r.status_code != 200:
                await r.aread()
                return f"http_{r.status_code}", 0
            done, final, n_chunks = False, None, 0
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    break
                obj = json.loads(line[6:])
                if "error" in obj:
                    return "stream_error", 0
                n_chunks += 1
                if obj.get("choices") and obj["choices"][0].get("finish_reason"):
                    final = obj
            if not done or final is None or "dlp_routing" not in final:
                return "stream_incomplete", 0
            return "ok", int(final["usage"]["completion_tokens"])
    except httpx.TimeoutException:
        return "timeout", 0
    except (httpx.HTTPError, OSError):
        return "connection", 0
    except (ValueError, KeyError, TypeError, IndexError):
        return "bad_answer", 0


async def run_load(url: str, clients: int, seconds: float, max_tokens: int, grace: float, timeout: float) -> dict:
    import httpx

    async with httpx.AsyncClient(timeout=timeout, limits=httpx.Limits(max_connections=clients + 4)) as client:
        r = await client.get(url + "/v1/models")
        r.raise_for_status()
        tasks = [m["id"][4:] for m in r.json()["data"] if m["id"].startswith("dlp:")]
        h0 = (await client.get(url + "/health")).json()
        latencies: list[float] = []
        outcome: Counter = Counter()
        tokens = 0
        sent = 0
        counter = iter(range(10 ** 9))
        t_start = time.monotonic()
        t_end = t_start + seconds

        async def worker(k: int) -> None:
            nonlocal tokens, sent
            while time.monotonic() < t_end:
                i = next(counter)
                path, body = workload(i, tasks, max_tokens)
                sent += 1
                t0 = time.monotonic()
                status, n = await one(client, url, path, body)
                outcome[status] += 1
                if status == "ok":
                    latencies.append(time.monotonic() - t0)
                    tokens += n

        workers = [asyncio.create_task(worker(k)) for k in range(clients)]
        done, pending = await asyncio.wait(workers, timeout=seconds + grace)
        for p in pending:
            p.cancel()
        elapsed = time.monotonic() - t_start
        h1 = (await client.get(url + "/health")).json()

    answered = sum(outcome.values())
    lat = sorted(latencies)

    def pct(p):
        return lat[min(len(lat) - 1, int(round(p / 100 * (len(lat) - 1))))] if lat else None

    b0 = h0.get("engine", {}).get("batch_sizes", {})
    b1 = h1.get("engine", {}).get("batch_sizes", {})
    batches = {k: v - b0.get(k, 0) for k, v in b1.items() if v - b0.get(k, 0)}
    n_batches = sum(batches.values())
    return {"url": url, "clients": clients, "seconds": seconds, "elapsed_s": round(elapsed, 2),
            "max_tokens": max_tokens, "sent": sent, "ok": outcome["ok"],
            "errors": answered - outcome["ok"], "error_kinds": {k: v for k, v in outcome.items() if k != "ok"},
            "lost": sent - answered, "requests_per_s": round(outcome["ok"] / elapsed, 2),
            "completion_tokens": tokens, "tokens_per_s": round(tokens / elapsed, 1),
            "latency_p50_s": round(pct(50), 3) if lat else None, "latency_p99_s": round(pct(99), 3) if lat else None,
            "latency_max_s": round(lat[-1], 3) if lat else None,
            "engine_batches": n_batches, "engine_batch_sizes": dict(sorted(batches.items(), key=lambda kv: int(kv[0]))),
            "mean_batch": round(sum(int(k) * v for k, v in batches.items()) / n_batches, 2) if n_batches else None,
            "server_rejected_429": h1.get("engine", {}).get("rejected", 0) - h0.get("engine", {}).get("rejected", 0)}


def start_server(args) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "dlp_lora", "serve", "--run", str(args.run), "--port", str(port),
           "--max-batch", str(args.max_batch), "--max-queue", str(args.max_queue), "--scheduler", args.scheduler]
    if args.model:
        cmd += ["--model", args.model]
    if args.device:
        cmd += ["--device", args.device]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    log = open(args.server_log, "w") if args.server_log else subprocess.DEVNULL
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    import httpx

    t0 = time.monotonic()
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"error: server exited with code {proc.returncode} (see --server-log)")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        if time.monotonic() - t0 > 300:
            proc.kill()
            raise SystemExit("error: server did not start within 300 s")
        time.sleep(0.3)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default=None, help="a running server (default: start one for --run)")
    p.add_argument("--run", default=None, help="run folder to serve when --url is not given")
    p.add_argument("--model", default=None, help="started server: --model (default: the run's own base model)")
    p.add_argument("--make-run", action="store_true",
                   help="build a small demo run at --run if it does not exist (on --model, default tiny)")
    p.add_argument("--device", default="cpu", help="device of the started server (default cpu)")
    p.add_argument("--max-batch", type=int, default=32, help="started server: --max-batch (default 32)")
    p.add_argument("--scheduler", default="continuous", choices=("continuous", "static"),
                   help="started server: --scheduler (default continuous)")
    p.add_argument("--compare-schedulers", action="store_true",
                   help="serve --run with both schedulers and load them in turns (--seconds each; bench row P8)")
    p.add_argument("--threads", type=int, default=1, help="--compare-schedulers: the servers' torch threads")
    p.add_argument("--max-queue", type=int, default=64, help="started server: --max-queue (default 64)")
    p.add_argument("--clients", type=int, default=32, help="concurrent clients (default 32)")
    p.add_argument("--seconds", type=float, default=60, help="test duration (default 60)")
    p.add_argument("--max-tokens", type=int, default=32, help="max_tokens of the largest requests (default 32)")
    p.add_argument("--grace", type=float, default=60, help="wait this long for in-flight requests after the end")
    p.add_argument("--timeout", type=float, default=120, help="per-request timeout in seconds")
    p.add_argument("--out", default=None, help="write the summary JSON here")
    p.add_argument("--server-log", default=None, help="started server: write its output here (default: discard)")
    args = p.parse_args(argv)
    proc = None
    url = args.url
    if url is None:
        if not args.run:
            p.error("give --url or --run")
        run = Path(args.run)
        if not run.exists():
            if not args.make_run:
                p.error(f"{run} does not exist (add --make-run to build a small demo run there)")
            print(f"building a demo run at {run} ...", flush=True)
            make_run(run, args.model or "tiny")
        if args.compare_schedulers:
            return compare(args, run)
        proc, url = start_server(args)
    try:
        print(f"load test: {args.clients} clients x {args.seconds:g} s against {url}", flush=True)
        res = asyncio.run(run_load(url.rstrip("/"), args.clients, args.seconds, args.max_tokens, args.grace,
                                   args.timeout))
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
    res["machine"] = {"cpus": os.cpu_count(), "platform": sys.platform}
    print(json.dumps(res, indent=2))
    print(f"requests/s {res['requests_per_s']}  tokens/s {res['tokens_per_s']}  p50 {res['latency_p50_s']} s  "
          f"p99 {res['latency_p99_s']} s  errors {res['errors']}  lost {res['lost']}  mean batch {res['mean_batch']}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    return 0 if res["errors"] == 0 and res["lost"] == 0 else 1


def compare(args, run: Path) -> int:
    """Both schedulers on the same run and workload (bench row P8's protocol); prints figures and ratios."""
    import tempfile

    from dlp_lora.bench import compare_schedulers

    with tempfile.TemporaryDirectory(prefix="dlp-load-") as tmp:
        res = compare_schedulers(run, args.model, args.device, args.threads, args.clients, args.seconds, seed=0,
                                 log_dir=Path(tmp), max_batch=args.max_batch)
    st, co = res["systems"]["static"], res["systems"]["continuous"]
    res["ratios_continuous_over_static"] = {k: round(co[k] / st[k], 3) if st[k] else None
                                            for k in ("tokens_per_s", "ttft_p50", "ttft_p99", "latency_p50",
                                                      "latency_p99")}
    print(json.dumps(res, indent=2))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    return 0 if not st["failed"] and not co["failed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
