"""Load benchmark of `python -m qala.serve`: full length fixed vs adaptive (--p95-ms) at increasing rates.

    python benchmarks/serve_load.py --model runs/quickstart/int8_static/model --p95-ms 50 \
        --rates 5,10,20,40,80 --seconds 30 --max-requests 2000 --out benchmarks/results/serve_load

Per mode (fixed: full length; adaptive: --p95-ms T) the server runs on 127.0.0.1 in a subprocess; per
offered rate, SQuAD dev questions go out as an open-loop Poisson stream (bounded by --seconds and
--max-requests, --drain-s for answers still out). Recorded: answers/s, client-side p50/p95/p99, refused
(503: shed or full queue), timed out (504) and other failures apart, F1 of the answers given (unanswered
ones reported apart). The adaptive server sheds past 2x --p95-ms; --shed-ms sets both modes' threshold
(0: none). First, the in-process throughput of QalaModel.answer_batch (the "served >= 0.9x" goal).
Writes results.json (CPU, versions, date, command) and p95_f1.png.

Why not locust: its users are closed-loop (the next request waits for the last answer), so under overload
the offered rate drops to what the server sustains and queueing delay goes unmeasured (coordinated
omission); an open-loop asyncio + aiohttp sender sends at the offered rate whatever the server does.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import datetime as dt
import json
import os
import random
import shlex
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEV = REPO.parent / "shared" / "data" / "squad-v1.1" / "dev.json"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="model directory (with frontier.json) to serve")
    p.add_argument("--p95-ms", type=float, required=True, help="the adaptive mode's latency target")
    p.add_argument("--shed-ms", type=float, help="the servers' --shed-ms, both modes (default: adaptive 2x --p95-ms)")
    p.add_argument("--min-f1", type=float, help="the adaptive server's --min-f1 (default: none)")
    p.add_argument("--rates", default="5,10,20,40,80", help="offered loads, requests per second")
    p.add_argument("--seconds", type=float, default=30.0, help="sending time per rate (bound)")
    p.add_argument("--max-requests", type=int, default=2000, help="requests per rate (bound)")
    p.add_argument("--drain-s", type=float, default=30.0, help="how long to wait for answers still out")
    p.add_argument("--modes", default="fixed,adaptive", help="fixed, adaptive or both")
    p.add_argument("--dev", default=str(DEV), help="SQuAD v1.1 dev file of the questions")
    p.add_argument("--questions", type=int, default=2000, help="dev questions to draw from")
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--max-wait-ms", type=float, default=5.0)
    p.add_argument("--engine", default=None, help="serving engine (qala.quantize.engines); default by model kind")
    p.add_argument("--threads", type=int, default=None, help="torch threads of the server")
    p.add_argument("--concurrent-batches", type=int, default=1, help="the server's; the in-process baseline's too")
    p.add_argument("--port", type=int, default=0, help="0: a free port")
    saturation = "fixed mode: the served throughput at saturation, the in-process questions sent by this many "
    p.add_argument("--saturation-concurrency", type=int, default=32, help=saturation + "closed-loop clients (0: none)")
    p.add_argument("--in-process-questions", type=int, default=256, help="0 skips the in-process baseline")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/results/serve_load", help="folder for results.json and p95_f1.png")
    return p.parse_args(argv)


def load_questions(path: str, limit: int, seed: int) -> list[dict[str, Any]]:
    """Dev questions as {id, question, context, answers} (qala.data.load_squad), shuffled (seeded), at most `limit`."""
    from qala.data import load_squad

    rows = load_squad(path).select_columns(["id", "question", "context", "answers"]).to_list()
    rows = [{**r, "answers": r["answers"]["text"]} for r in rows if r["answers"]["text"] and r["question"].strip()]
    random.Random(seed).shuffle(rows)
    return rows[:limit]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def in_process_throughput(args: argparse.Namespace, questions: list[dict[str, Any]]) -> dict[str, Any]:
    """Answers per second of QalaModel.answer_batch in batches of --max-batch (no HTTP), after a warm-up."""
    from qala.answer import QalaModel
    from qala.serve.service import batch_threads

    lanes = args.concurrent_batches
    threads = batch_threads(args.threads, lanes)  # as the server splits them
    model = QalaModel.from_pretrained(args.model, threads=threads, backend=args.engine)
    sample, b = questions[: args.in_process_questions], args.max_batch

    def answer(chunks: list[list[dict[str, Any]]]) -> None:
        for chunk in chunks:
            model.answer_batch([q["question"] for q in chunk], [q["context"] for q in chunk])

    answer([sample[:b]])  # warm-up
    chunks = [sample[i : i + b] for i in range(0, len(sample), b)]
    started = time.perf_counter()
    # As the server with --concurrent-batches N: N threads, each answering every N-th batch.
    with ThreadPoolExecutor(lanes) as pool:
        list(pool.map(answer, [chunks[k::lanes] for k in range(lanes)]))
    seconds = time.perf_counter() - started
    record = {"questions": len(sample), "batch": b, "concurrent_batches": lanes, "threads_per_batch": threads}
    return {**record, "seconds": seconds, "answers_per_s": len(sample) / seconds}


@contextlib.contextmanager
def server(args: argparse.Namespace, p95_ms: float | None, port: int):
    """`python -m qala.serve` on 127.0.0.1:port, healthy, stopped (SIGTERM) on exit."""
    import httpx

    adaptive = p95_ms is not None
    options = {"--max-batch": args.max_batch, "--max-wait-ms": args.max_wait_ms, "--max-queue": 100000}
    options.update({"--timeout-s": args.drain_s + args.seconds, "--p95-ms": p95_ms})
    options.update({"--min-f1": args.min_f1 if adaptive else None, "--shed-ms": args.shed_ms, "--engine": args.engine})
    options.update({"--threads": args.threads or None, "--concurrent-batches": args.concurrent_batches})
    command = [sys.executable, "-m", "qala.serve", "--model", args.model, "--port", str(port)]
    command += [part for flag, value in options.items() if value is not None for part in (flag, str(value))]
    proc = subprocess.Popen(command, cwd=REPO)
    try:
        deadline = time.monotonic() + 1800  # compiling engines warm for minutes
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited with {proc.returncode}: {shlex.join(command)}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError("the server did not become healthy")
            time.sleep(0.5)
        yield command, proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def client_session(url: str, connections: int) -> Any:
    """The load generator's HTTP client. aiohttp, not httpx: it shares the 2 cores with the server, and on 512
    closed-loop requests (Zen 5, ad hoc) httpx's client used 0.70-0.82 CPU seconds and aiohttp's 0.10-0.12,
    CPU that a server on its own machine would have. `connections`: at most this many open (0: no limit)."""
    import aiohttp

    return aiohttp.ClientSession(
        base_url=url, connector=aiohttp.TCPConnector(limit=connections), timeout=aiohttp.ClientTimeout(total=None)
    )


async def open_loop(
    url: str, questions: list[dict[str, Any]], rate: float, seconds: float, limit: int, drain_s: float, seed: int
) -> list[dict[str, Any]]:
    """Send questions as a Poisson stream at `rate`/s for at most `seconds` and `limit` requests; each result
    {id, latency_s, status, answer, configuration}. Requests still out `drain_s` after the last send are
    recorded with status None (not answered)."""
    import aiohttp

    rng = random.Random(seed)
    results: list[dict[str, Any]] = []
    async with client_session(url, connections=0) as client:

        async def one(q: dict[str, Any]) -> None:
            row: dict[str, Any] = {"id": q["id"], "status": None, "answer": None, "configuration": None}
            results.append(row)
            start = time.perf_counter()
            try:
                async with client.post("/answer", json={"question": q["question"], "context": q["context"]}) as r:
                    status, body = r.status, (await r.json()) if r.status == 200 else None
            except aiohttp.ClientError as e:
                row["status"], row["error"] = "transport", type(e).__name__
                return
            row["latency_s"] = time.perf_counter() - start
            row["done_s"] = time.perf_counter() - begin
            row["status"] = status
            if body is not None:
                row["answer"], row["configuration"] = body["answer"], body["configuration"]["name"]

        tasks = []
        begin = time.perf_counter()
        next_send = begin
        for i in range(limit):
            next_send += rng.expovariate(rate)
            if next_send - begin > seconds:
                break
            await asyncio.sleep(max(0.0, next_send - time.perf_counter()))
            tasks.append(asyncio.create_task(one(questions[i % len(questions)])))
        with contextlib.suppress(asyncio.TimeoutError):  # wait_for cancels the requests still out
            await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), timeout=drain_s)
    return results


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far."""
    import psutil  # accelerate's dependency, so always installed

    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


async def closed_loop(url: str, questions: list[dict[str, Any]], concurrency: int, server_pid: int) -> dict[str, Any]:
    """Served throughput at saturation on the same questions as the in-process figure: `concurrency` clients keep
    the queue full without the thousands of open requests an overloaded open loop piles up (whose client and
    connection handling then share the 2 cores with the server)."""
    async with client_session(url, connections=concurrency) as client:
        pending, answered = list(reversed(questions)), 0

        async def post(q: dict[str, Any]) -> bool:
            async with client.post("/answer", json={"question": q["question"], "context": q["context"]}) as r:
                await r.read()
                return r.status == 200

        async def client_loop() -> None:
            nonlocal answered
            while pending:
                ok = await post(pending.pop())  # not `answered += await ...`: that reads `answered` before the await
                answered += ok

        for q in questions[:concurrency]:  # warm-up: connections opened, first batches answered
            await post(q)
        begin, server_cpu, client_cpu = time.perf_counter(), cpu_seconds(server_pid), time.process_time()
        await asyncio.gather(*(client_loop() for _ in range(concurrency)))
        seconds = time.perf_counter() - begin
        server_cpu, client_cpu = cpu_seconds(server_pid) - server_cpu, time.process_time() - client_cpu
    record = {"questions": len(questions), "answered": answered, "concurrency": concurrency, "seconds": seconds}
    # The load generator shares the machine's cores with the server: its CPU is CPU the server lacked.
    cores = {"server_cores": server_cpu / seconds, "client_cores": client_cpu / seconds}
    return {**record, "answers_per_s": answered / seconds, **cores}


def summarize(rows: list[dict[str, Any]], questions: dict[str, dict[str, Any]], rate: float) -> dict[str, Any]:
    from qala.data import f1_score

    ok = [r for r in rows if r["status"] == 200]
    statuses = collections.Counter(r["status"] for r in rows)
    latencies = np.array([r["latency_s"] for r in ok]) * 1000 if ok else np.array([])
    span = max((r["done_s"] for r in ok), default=1e-9)  # first send to last answer
    f1 = [max(f1_score(r["answer"], a) for a in questions[r["id"]]["answers"]) for r in ok]
    pct = (lambda q: float(np.percentile(latencies, q))) if len(latencies) else (lambda q: None)
    return {
        "offered_rps": rate,
        "sent": len(rows),
        "answered": len(ok),
        # 503 is a refusal on arrival (shed or a full queue: the server answered at once, Retry-After set), not a
        # request that waited and timed out (504): counted apart, as are other failures.
        "refused": statuses[503],
        "timed_out": statuses[504],
        # Anything else: other statuses (4xx, 500) and transport errors. Before refusals were counted apart
        # (results of 2026-12-03), this counted every non-200 status.
        "errors": sum(n for status, n in statuses.items() if status not in (200, 503, 504, None)),
        "unanswered": statuses[None],
        # Answers per second from the first send to the last answer: the offered rate while the server keeps
        # up, its saturation throughput when it does not (its queue is then never empty).
        "throughput_rps": len(ok) / span,
        **{f"p{q}_ms": pct(q) for q in (50, 95, 99)},
        "f1": 100.0 * float(np.mean(f1)) if f1 else None,
        "configurations": dict(collections.Counter(r["configuration"] for r in ok)),
    }


def plot(results: dict[str, Any], path: Path, target: float) -> None:
    from qala.bench.report import figure, save_figure

    fig, (top, bottom) = figure((7, 7), rows=2)
    for axes, key in ((top, "p95_ms"), (bottom, "f1")):
        for mode, rows in results["modes"].items():
            axes.plot([r["offered_rps"] for r in rows], [r[key] for r in rows], marker="o", label=mode)
    top.axhline(target, color="gray", linestyle="--", label=f"target {target:g} ms")
    top.set(ylabel="p95 latency (ms)", yscale="log")
    bottom.set(ylabel="F1 of the answers given", xlabel="offered load (requests/s)")
    top.legend()
    bottom.legend()
    fig.suptitle(f"qala.serve on {results['environment'].get('cpu', 'CPU')}")
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from qala.bench.cli import environment

    rates = [float(r) for r in args.rates.split(",")]
    modes = [m.strip() for m in args.modes.split(",")]
    if not set(modes) <= {"fixed", "adaptive"}:
        raise SystemExit(f"--modes: fixed and/or adaptive, got {args.modes}")
    questions = load_questions(args.dev, args.questions, args.seed)
    by_id = {q["id"]: q for q in questions}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "command": shlex.join([sys.executable, *sys.argv]) if argv is None else shlex.join(argv),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "environment": environment(),
        "settings": vars(args),
        "in_process": in_process_throughput(args, questions) if args.in_process_questions else None,
        "modes": {},
    }
    with contextlib.suppress(Exception):
        import fastapi
        import uvicorn

        results["environment"]["versions"].update(fastapi=fastapi.__version__, uvicorn=uvicorn.__version__)
    for mode in modes:
        port = args.port or free_port()
        with server(args, args.p95_ms if mode == "adaptive" else None, port) as (command, pid):
            results.setdefault("server_commands", {})[mode] = shlex.join(command)
            rows = []
            for rate in rates:
                bounds = (args.seconds, args.max_requests, args.drain_s, args.seed)
                raw = asyncio.run(open_loop(f"http://127.0.0.1:{port}", questions, rate, *bounds))
                rows.append(summarize(raw, by_id, rate))
                print(json.dumps({"mode": mode, **rows[-1]}), flush=True)
                time.sleep(1.0)  # let the queue drain between rates
            results["modes"][mode] = rows
            if mode == "fixed" and args.saturation_concurrency and args.in_process_questions:
                sample = questions[: args.in_process_questions]
                url = f"http://127.0.0.1:{port}"
                saturation = asyncio.run(closed_loop(url, sample, args.saturation_concurrency, pid))
                in_process = results["in_process"]["answers_per_s"]  # measured: --in-process-questions is not 0
                saturation["served_over_in_process"] = saturation["answers_per_s"] / in_process
                results["saturation"] = saturation
                print(json.dumps({"saturation": saturation}), flush=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    plot(results, out / "p95_f1.png", args.p95_ms)
    print(f"wrote {out / 'results.json'} and {out / 'p95_f1.png'}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
