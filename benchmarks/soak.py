"""Soak: one duo server under many concurrent clients for minutes; errors, health, latency, memory.

  python benchmarks/soak.py                                     # CPU: SmolLM2 W50+X50, 64 clients, 120 s
  python benchmarks/soak.py --ckpt CKPT --clients 128 --duration 600

Starts `duo-serve CKPT` on a loopback port, sends one short warm-up request per client (all at once),
then runs --clients asynchronous clients for --duration seconds. Each client loops over random
requests (seeded per client): chat or plain completions, streamed or not, a prompt of 3 to 300 words
of the bundled wiki text, max_tokens 1..64, temperature 0 or 0.8. About 10% of the streamed requests
hang up after 1 to 4 chunks. Each request opens its own connection. When the time is up the clients finish the requests they are in; then
vLLM's /metrics must show no running or waiting request (the hung-up ones were aborted) within 15 s.
A separate process polls GET /health every second throughout. The RSS of the server's process tree (the
server and its descendants, e.g. vLLM's EngineCore; shared pages counted once per process) is read
after the warm-up (start), every 10 s, and after the last request (end).

A request fails if it gets no HTTP 200, times out (--request-timeout), streams an error, ends
without finish_reason "stop" or "length", or reports more completion tokens than max_tokens (or
fewer with "length"). A health check (on a fresh connection each time) fails if it gets no 200 within
10 s. The exit status is 1 if any request or health check failed, requests stayed in the engine, the
server died, or the RSS grew beyond the tolerance, end > start x 1.15 + 64 MiB. Prints a table, writes
JSON (--out) and the table as markdown beside it. Without --ckpt it calibrates SmolLM2 at W50+X50
(DuoGPT, 8x256) into --work first.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import multiprocessing
import os
import random
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import psutil
from bench_io import command_line, duo_checkpoint_arg

from duo_vllm.calibrate import models
from duo_vllm.calibrate.data import load_text
from duo_vllm.files import write_json_atomic, write_text_atomic
from duo_vllm.serve.server import ServerProcess, console_script

RSS_GROWTH = 1.15  # end RSS may be at most start x RSS_GROWTH + RSS_SLACK_MIB
RSS_SLACK_MIB = 64
RSS_EVERY_S = 10
HEALTH_EVERY_S = 1
HEALTH_TIMEOUT_S = 10
LAG_EVERY_S = 0.25
HANG_UP_SHARE = 0.1  # of the streamed requests
MAX_TOKENS = 64
PROMPT_WORDS = (3, 300)
KEEP_ERRORS = 10
IDLE_WAIT_S = 15  # after the last request, for vLLM's gauges to show no running or waiting request


class RequestError(Exception):
    """A request that did not end as a well-formed, finished response."""


@dataclass
class Tally:
    """What the clients saw."""

    started: int = 0
    finished: int = 0
    disconnected: int = 0
    errors: int = 0
    completion_tokens: int = 0
    latencies: list[float] = field(default_factory=list)
    finish_reasons: Counter = field(default_factory=Counter)
    kinds: Counter = field(default_factory=Counter)
    error_messages: list[str] = field(default_factory=list)

    def error(self, message: str) -> None:
        self.errors += 1
        if len(self.error_messages) < KEEP_ERRORS:
            self.error_messages.append(message[:500])


def tree_rss_mib(pid: int) -> tuple[float, dict[str, float]]:
    """Summed RSS (MiB) of a process and all its descendants, and the RSS of each ('pid name': MiB)."""
    root = psutil.Process(pid)
    each = {}
    for proc in [root, *root.children(recursive=True)]:
        try:
            each[f"{proc.pid} {proc.name()}"] = proc.memory_info().rss / 2**20
        except psutil.NoSuchProcess:
            pass
    return sum(each.values()), each


def make_request(rng: random.Random, words: list[str], model: str) -> tuple[str, dict, int | None]:
    """(path, JSON body, hang up after this many chunks or None) of one random request."""
    lo, hi = PROMPT_WORDS
    n = round(math.exp(rng.uniform(math.log(lo), math.log(hi))))
    start = rng.randrange(len(words) - n)
    text = " ".join(words[start:start + n])
    body: dict = {"model": model, "max_tokens": rng.randint(1, MAX_TOKENS), "temperature": rng.choice((0.0, 0.8))}
    if rng.random() < 0.5:
        path, body["messages"] = "/v1/chat/completions", [{"role": "user", "content": text}]
    else:
        path, body["prompt"] = "/v1/completions", text
    hang_up = None
    if rng.random() < 0.5:
        body["stream"], body["stream_options"] = True, {"include_usage": True}
        if rng.random() < HANG_UP_SHARE:
            hang_up = rng.randint(1, 4)
    return path, body, hang_up


def check_usage(finish: str | None, usage: dict | None, max_tokens: int) -> int:
    """The completion tokens of a finished response; RequestError if its ending or count is wrong."""
    if finish not in ("stop", "length"):
        raise RequestError(f"finish_reason {finish!r}")
    if not usage or "completion_tokens" not in usage:
        raise RequestError(f"no usage ({usage!r})")
    used = usage["completion_tokens"]
    if used > max_tokens or (finish == "length" and used != max_tokens):
        raise RequestError(f"{used} completion tokens for max_tokens {max_tokens}, finish_reason {finish!r}")
    return used


async def send(http: httpx.AsyncClient, path: str, body: dict, hang_up: int | None) -> tuple[str | None, int]:
    """(finish_reason, completion tokens) of one request, or (None, 0) if it hung up on purpose."""
    if not body.get("stream"):
        r = await http.post(path, json=body)
        if r.status_code != 200:
            raise RequestError(f"HTTP {r.status_code}: {r.text[:300]}")
        out = r.json()
        finish = out["choices"][0]["finish_reason"]
        return finish, check_usage(finish, out.get("usage"), body["max_tokens"])
    async with http.stream("POST", path, json=body) as r:
        if r.status_code != 200:
            raise RequestError(f"HTTP {r.status_code}: {(await r.aread())[:300]!r}")
        chunks, finish, usage, done = 0, None, None, False
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                continue
            event = json.loads(line[6:])
            if "error" in event:
                raise RequestError(f"error event: {json.dumps(event)[:300]}")
            for choice in event.get("choices") or []:
                chunks += 1
                finish = choice.get("finish_reason") or finish
            usage = event.get("usage") or usage
            if hang_up and chunks >= hang_up and not finish:
                return None, 0  # leaving the block closes the connection mid-stream
    if not done:
        raise RequestError("stream ended without [DONE]")
    return finish, check_usage(finish, usage, body["max_tokens"])


async def one(http: httpx.AsyncClient, tally: Tally, path: str, body: dict, hang_up: int | None) -> None:
    """Send one request and count how it ended."""
    kind = ("chat" if "messages" in body else "completions") + (" stream" if body.get("stream") else "")
    tally.started += 1
    tally.kinds[kind] += 1
    t0 = time.monotonic()
    try:
        finish, used = await send(http, path, body, hang_up)
    except (RequestError, httpx.HTTPError, ValueError, KeyError, IndexError, TypeError) as e:  # bad answers
        tally.error(f"{kind}: {type(e).__name__}: {e}")
        return
    if finish is None:
        tally.disconnected += 1
        return
    tally.finished += 1
    tally.latencies.append(time.monotonic() - t0)
    tally.finish_reasons[finish] += 1
    tally.completion_tokens += used


def warm_up_request(i: int, words: list[str], model: str) -> tuple[str, dict, None]:
    """A short request (8 words, 8 tokens), chat for odd i: one per client, all at once, before the soak."""
    body: dict = {"model": model, "max_tokens": 8, "temperature": 0.0}
    text = " ".join(words[8 * i:8 * i + 8])
    if i % 2:
        return "/v1/chat/completions", {**body, "messages": [{"role": "user", "content": text}]}, None
    return "/v1/completions", {**body, "prompt": text}, None


def gauge(metrics: str, name: str) -> float:
    """The sum over labels of a Prometheus gauge in /metrics text."""
    return sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
               if line.startswith((name + "{", name + " ")))


async def engine_idle(http: httpx.AsyncClient, wait: float = IDLE_WAIT_S) -> dict:
    """vLLM's running/waiting request gauges and KV-cache use once all requests ended (polled up to `wait` s)."""
    deadline = time.monotonic() + wait
    while True:
        text = (await http.get("/metrics")).text
        out = {key: gauge(text, f"vllm:{key}") for key in ("num_requests_running", "num_requests_waiting",
                                                          "kv_cache_usage_perc")}
        out["idle"] = out["num_requests_running"] == 0 and out["num_requests_waiting"] == 0
        if out["idle"] or time.monotonic() > deadline:
            return out
        await asyncio.sleep(1)


async def client(http: httpx.AsyncClient, tally: Tally, rng: random.Random, words: list[str], model: str,
                 deadline: float) -> None:
    while time.monotonic() < deadline:
        await one(http, tally, *make_request(rng, words, model))


def probe_health(base_url: str, stop, results) -> None:
    """In its own process: GET /health every HEALTH_EVERY_S s until `stop` is set; send the counts to `results`.

    Each probe opens its own connection (Connection: close), as a load balancer's or Kubernetes' probe does:
    on a reused one, a server loop stalled past uvicorn's keep-alive timeout (vLLM: 5 s) may close the socket
    just as the next probe is sent. The probe runs apart from the clients, whose event loop parses 64 streams
    and can itself stall for seconds on 2 cores: a probe timed from that loop measured the driver, not the server.
    """
    ok = failed = 0
    max_s, messages = 0.0, []
    while not stop.is_set():
        t0 = time.monotonic()
        try:
            status = httpx.get(base_url + "/health", headers={"Connection": "close"}, timeout=HEALTH_TIMEOUT_S,
                               trust_env=False).status_code
            why = None if status == 200 else f"HTTP {status}"
        except httpx.HTTPError as e:
            why = f"{type(e).__name__}: {e}"
        took = time.monotonic() - t0
        max_s = max(max_s, took)
        if why is None:
            ok += 1
        else:
            failed += 1
            if len(messages) < KEEP_ERRORS:
                messages.append(f"after {took:.2f} s: {why}"[:500])
        stop.wait(max(0.0, HEALTH_EVERY_S - took))
    results.send({"ok": ok, "failed": failed, "max_s": round(max_s, 3), "messages": messages})


async def watch_loop_lag(lags: list[float], stop: asyncio.Event) -> None:
    """Record how late the driver's own event loop wakes from short sleeps (its stalls, not the server's)."""
    while not stop.is_set():
        t0 = time.monotonic()
        await asyncio.sleep(LAG_EVERY_S)
        lags.append(time.monotonic() - t0 - LAG_EVERY_S)


async def sample_rss(pid: int, series: list[tuple[float, float]], t0: float, stop: asyncio.Event) -> None:
    """Append (seconds since t0, tree RSS MiB) every RSS_EVERY_S seconds until stop is set."""
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), RSS_EVERY_S)
        except TimeoutError:
            series.append((round(time.monotonic() - t0, 1), round(tree_rss_mib(pid)[0], 1)))


async def drive(server: ServerProcess, clients: int, duration: float, seed: int, request_timeout: float) -> dict:
    """Warm up, run the clients, poll health and sample RSS; the measurements as a dict."""
    # A fresh connection per request, as for the health probe: a connection left idle in the pool while this
    # loop stalls past uvicorn's keep-alive timeout (5 s; CI saw 9.2 s stalls) can be closed by the server just
    # as the next request goes out on it, and that ReadError would be the driver's, not the server's.
    limits = httpx.Limits(max_connections=clients + 8, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=server.base_url, timeout=request_timeout, limits=limits,
                                 headers={"Connection": "close"}, trust_env=False) as http:
        model = (await http.get("/v1/models")).json()["data"][0]["id"]
        words = load_text("local:wiki").split()
        warm, tally, stop = Tally(), Tally(), asyncio.Event()
        rngs = [random.Random(f"{seed}-{i}") for i in range(clients)]
        spawn = multiprocessing.get_context("spawn")
        stop_probe, (health_in, health_out) = spawn.Event(), spawn.Pipe(duplex=False)
        prober = spawn.Process(target=probe_health, args=(server.base_url, stop_probe, health_out), daemon=True)
        prober.start()
        lags: list[float] = []
        watchers = [asyncio.create_task(watch_loop_lag(lags, stop))]
        await asyncio.gather(*(one(http, warm, *warm_up_request(i, words, model)) for i in range(clients)))
        rss_start, procs_start = tree_rss_mib(server.proc.pid)
        t0 = time.monotonic()
        series = [(0.0, round(rss_start, 1))]
        watchers.append(asyncio.create_task(sample_rss(server.proc.pid, series, t0, stop)))
        deadline = t0 + duration
        await asyncio.gather(*(client(http, tally, rngs[i], words, model, deadline) for i in range(clients)))
        load_s = time.monotonic() - t0
        idle = await engine_idle(http)
        stop.set()
        stop_probe.set()
        await asyncio.gather(*watchers)
    if not health_in.poll(HEALTH_TIMEOUT_S + 5):
        raise RuntimeError("the health prober sent no counts")
    health = health_in.recv()
    prober.join()
    rss_end, procs_end = tree_rss_mib(server.proc.pid)
    series.append((round(load_s, 1), round(rss_end, 1)))
    lat = np.array(tally.latencies) if tally.latencies else np.array([math.nan])
    return {
        "model": model,
        "warmup": {"requests": warm.started, "finished": warm.finished, "errors": warm.errors,
                   "error_messages": warm.error_messages},
        "requests": {"started": tally.started, "finished": tally.finished, "disconnected": tally.disconnected,
                     "errors": tally.errors, "by_kind": dict(tally.kinds)},
        "finish_reasons": dict(tally.finish_reasons),
        "completion_tokens": tally.completion_tokens,
        "latency_s": {"p50": float(np.percentile(lat, 50)), "p99": float(np.percentile(lat, 99)),
                      "max": float(lat.max())},
        "health": health,
        "driver_loop_lag_max_s": round(max(lags, default=0.0), 3),
        "rss_mib": {"start": round(rss_start, 1), "end": round(rss_end, 1), "max": max(v for _, v in series),
                    "limit": round(rss_start * RSS_GROWTH + RSS_SLACK_MIB, 1), "series": series,
                    "processes_start": {k: round(v, 1) for k, v in procs_start.items()},
                    "processes_end": {k: round(v, 1) for k, v in procs_end.items()}},
        "load_s": round(load_s, 1),
        "engine_after": idle,
        "error_messages": tally.error_messages,
    }


def log_errors(text: str, keep: int = KEEP_ERRORS) -> tuple[int, list[str]]:
    """How many lines of a server log say ERROR or Traceback, and the first `keep` of them."""
    lines = [line for line in text.splitlines() if " ERROR " in line or "Traceback" in line]
    return len(lines), lines[:keep]


def failures(result: dict) -> list[str]:
    """Why the soak failed (empty if it passed)."""
    out = []
    req, warm, rss = result["requests"], result["warmup"], result["rss_mib"]
    if req["errors"] or warm["errors"]:
        out.append(f"{req['errors']} failed requests (+{warm['errors']} in the warm-up)")
    if result["health"]["failed"]:
        out.append(f"{result['health']['failed']} failed health checks ({'; '.join(result['health']['messages'])})")
    if rss["end"] > rss["limit"]:
        out.append(f"RSS grew from {rss['start']:.0f} to {rss['end']:.0f} MiB (limit {rss['limit']:.0f})")
    if not result["engine_after"]["idle"]:
        out.append(f"requests still in the engine after the soak: {result['engine_after']}")
    if not result["server_alive"]:
        out.append("the server died")
    return out


def table(result: dict) -> str:
    req, lat, health, rss = result["requests"], result["latency_s"], result["health"], result["rss_mib"]
    tokens = result["completion_tokens"]
    rows = [
        ("clients / duration", f"{result['clients']} / {result['duration_s']:.0f} s (load phase {result['load_s']} s)"),
        ("requests started", req["started"]),
        ("finished (stop / length)", (f"{req['finished']} ({result['finish_reasons'].get('stop', 0)} / "
                                      f"{result['finish_reasons'].get('length', 0)})")),
        ("disconnected on purpose", req["disconnected"]),
        ("errors", req["errors"]),
        ("completion tokens", f"{tokens} ({tokens / result['load_s']:.1f}/s)"),
        ("latency p50 / p99 / max", f"{lat['p50']:.2f} / {lat['p99']:.2f} / {lat['max']:.2f} s"),
        ("health ok / failed (slowest)", f"{health['ok']} / {health['failed']} ({health['max_s']:.2f} s)"),
        ("driver's own loop, longest stall", f"{result['driver_loop_lag_max_s']:.2f} s"),
        ("RSS start / end / max (limit)", (f"{rss['start']:.0f} / {rss['end']:.0f} / {rss['max']:.0f} MiB "
                                           f"({rss['limit']:.0f})")),
        ("engine after the soak: running / waiting", (f"{result['engine_after']['num_requests_running']:.0f} / "
                                                      f"{result['engine_after']['num_requests_waiting']:.0f}")),
        ("server log ERROR lines", result["server_log_errors"]),
        ("result", "PASS" if not result["failures"] else "FAIL: " + "; ".join(result["failures"])),
    ]
    return "\n".join(["| metric | value |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)])


def host_cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} cores"
    except OSError:
        pass
    return f"{os.cpu_count()} cores"


def run_soak(ckpt: Path, clients: int = 64, duration: float = 120, seed: int = 0, log: Path | None = None,
             server_args: list[str] | None = None, request_timeout: float = 300, timeout: float = 900) -> dict:
    """Serve `ckpt` with duo-serve, soak it (module doc), stop it; the result (failures in result['failures'])."""
    import vllm

    server_args = ["--max-model-len", "1024"] if server_args is None else server_args
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    with ServerProcess([*console_script("duo-serve", "duo_vllm.serve.launch"), str(ckpt), *server_args], log, env) as server:
        server.wait_ready(timeout)
        result = asyncio.run(drive(server, clients, duration, seed, request_timeout))
        result["server_alive"] = server.proc.poll() is None
        count, lines = log_errors(server.tail(10**9))
    result = {"command": command_line(), "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
              "host_cpu": host_cpu(), "vllm_version": vllm.__version__, "checkpoint": str(ckpt),
              "server_args": server_args, "clients": clients, "duration_s": duration, "seed": seed, **result,
              "server_log": str(log) if log else None, "server_log_errors": count, "server_log_error_lines": lines}
    result["failures"] = failures(result)
    result["table"] = table(result)
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default=None, help="duo checkpoint to serve (default: calibrate SmolLM2 W50+X50)")
    p.add_argument("--clients", type=int, default=64, help="concurrent clients (default 64)")
    p.add_argument("--duration", type=float, default=120, help="seconds the clients keep sending (default 120)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--request-timeout", type=float, default=300, help="seconds one request may take (default 300)")
    p.add_argument("--server-args", default="--max-model-len 1024", help="extra duo-serve/vLLM arguments (one string)")
    p.add_argument("--timeout", type=float, default=900, help="seconds to wait for the server to start")
    p.add_argument("--work", default="build/soak", help="calibration and server log directory")
    p.add_argument("--out", default="benchmarks/results/soak.json")
    args = p.parse_args()

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    ckpt = duo_checkpoint_arg(p, "--ckpt", args.ckpt, work, models.prepare_test_model(), nsamples=8, seqlen=256)
    result = run_soak(ckpt, args.clients, args.duration, args.seed, work / "soak-server.log", args.server_args.split(),
                      args.request_timeout, args.timeout)
    out = Path(args.out)
    write_json_atomic(out, result)
    write_text_atomic(out.with_suffix(".md"), f"<!-- {result['command']} ({result['date']}, {result['host_cpu']}, "
                      f"vLLM {result['vllm_version']}) -->\n\n{result['table']}\n")
    print(result["table"])
    for message in result["error_messages"] + result["warmup"]["error_messages"]:
        print("error:", message)
    print(f"wrote {out}, {out.with_suffix('.md')}")
    return 1 if result["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
