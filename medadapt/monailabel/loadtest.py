"""A load test of a running ``medadapt label`` server: many clients at once, some misbehaving.

    python -m medadapt.monailabel.loadtest --url http://127.0.0.1:8000 --image IMAGE \\
        --models MODEL [MODEL ...] [--clients 100] [--seconds 60]

Well-behaved clients (`POLITE_SHARE` of them) each loop for the duration, as a viewer does:
a request drawn from `MIX` (``GET /info/``, the datastore listing, an image download, an
inference of one of ``--models`` on ``--image``), a pause of 0.2-1 s, again; a 429 or 503
answer is followed by waiting its Retry-After. The others misbehave, in equal parts: idle
clients open a connection and send nothing, slow-head clients send a request head one byte a
second, slow-body clients announce a 1 MB body and send a byte every two seconds; each
reconnects as soon as the server closes it. Every client's requests stay on the loopback or
whatever ``--url`` names; nothing else is contacted.

The result says how many well-behaved requests were answered (any HTTP answer within
`ANSWER_TIMEOUT` seconds), by status, their latencies, whether every 429 / 503 carried
Retry-After, and how long the server kept the misbehaving connections.
"""

from __future__ import annotations

import argparse
import json
import random
import socket
import statistics
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

POLITE_SHARE = 0.8
ANSWER_TIMEOUT = 60.0  # s: a request not answered by then counts as unanswered
MIX = (("info", 0.4), ("datastore", 0.25), ("image", 0.15), ("infer", 0.2))
PAUSE = (0.2, 1.0)  # s between a client's requests


@dataclass
class Record:
    """What the clients saw (appended from many threads; list.append is atomic)."""

    answers: list[tuple[str, int, float, bool]] = field(default_factory=list)  # kind, status, seconds, Retry-After
    unanswered: list[tuple[str, str]] = field(default_factory=list)  # kind, error
    held: dict[str, list[float]] = field(default_factory=lambda: {"idle": [], "slow_head": [], "slow_body": []})


def _request(session, url: str, kind: str, image: str, models: list[str], rng: random.Random):
    if kind == "info":
        return session.get(f"{url}/info/", timeout=ANSWER_TIMEOUT)
    if kind == "datastore":
        return session.get(f"{url}/datastore/", params={"output": "all"}, timeout=ANSWER_TIMEOUT)
    if kind == "image":
        return session.get(f"{url}/datastore/image", params={"image": image}, timeout=ANSWER_TIMEOUT)
    model = rng.choice(models)
    return session.post(f"{url}/infer/{model}", params={"image": image, "output": "json"},
                        files={"params": (None, "{}")}, timeout=ANSWER_TIMEOUT)


def polite_client(url: str, image: str, models: list[str], until: float, record: Record, seed: int) -> None:
    """Requests from `MIX` with pauses until ``until``; 429 / 503 are waited out (Retry-After)."""
    import requests

    rng = random.Random(seed)
    session = requests.Session()
    session.trust_env = False  # never through a proxy from the environment
    kinds, weights = zip(*MIX)
    while time.monotonic() < until:
        kind = rng.choices(kinds, weights)[0]
        started = time.monotonic()
        try:
            answer = _request(session, url, kind, image, models, rng)
        except requests.RequestException as error:
            record.unanswered.append((kind, f"{type(error).__name__}: {error}"[:200]))
            session = requests.Session()
            session.trust_env = False
            continue
        seconds = time.monotonic() - started
        retry_after = answer.headers.get("Retry-After")
        record.answers.append((kind, answer.status_code, seconds, retry_after is not None))
        pause = rng.uniform(*PAUSE)
        if answer.status_code in (429, 503) and retry_after and retry_after.isdigit():
            pause = max(pause, float(retry_after))
        time.sleep(max(0.0, min(pause, until - time.monotonic())))


def misbehaving_client(url: str, how: str, until: float, record: Record) -> None:
    """Open connections that are idle (``how`` "idle"), send a head a byte a second
    ("slow_head") or a body a byte every two seconds ("slow_body"), until ``until``; record
    how long the server kept each one."""
    parts = urlsplit(url)
    address = (parts.hostname, parts.port or 80)
    head = f"PUT /datastore/image?image=slow HTTP/1.1\r\nHost: {parts.netloc}\r\nContent-Length: 1000000\r\n\r\n"
    while time.monotonic() < until:
        opened = time.monotonic()
        try:
            with socket.create_connection(address, timeout=5) as connection:
                if how == "slow_body":
                    connection.sendall(head.encode())
                _hold(connection, how, until)
        except OSError:
            pass  # closed by the server (reset, broken pipe): what is measured
        if time.monotonic() < until:
            record.held[how].append(time.monotonic() - opened)
        time.sleep(0.1)


def _hold(connection: socket.socket, how: str, until: float) -> None:
    """Keep ``connection`` busy in the way ``how`` says until the server closes it or ``until``."""
    trickle = b"GET /info/ HTTP/1.1\r\nHost: slow\r\nX-Padding: " + b"x" * 10_000
    step, sent = (1.0 if how == "slow_head" else 2.0), 0
    connection.settimeout(step)
    while time.monotonic() < until:
        if how == "slow_head":
            connection.sendall(trickle[sent % len(trickle):][:1])
            sent += 1
        elif how == "slow_body":
            connection.sendall(b"x")
        try:
            if connection.recv(65536) == b"":  # closed (an answer, if any, came first)
                return
            if how != "idle":
                return  # answered (408): the server ends the request
        except TimeoutError:
            continue


def run(url: str, image: str, models: list[str], clients: int = 100, seconds: float = 60.0,
        seed: int = 0) -> dict[str, Any]:
    """Run the load test against the server at ``url``; the summary (see the module docstring)."""
    record = Record()
    until = time.monotonic() + seconds
    polite = max(1, round(clients * POLITE_SHARE))
    rude = ["idle", "slow_head", "slow_body"] * clients
    threads = [threading.Thread(target=polite_client, args=(url, image, models, until, record, seed + n), daemon=True)
               for n in range(polite)]
    threads += [threading.Thread(target=misbehaving_client, args=(url, rude[n], until, record), daemon=True)
                for n in range(clients - polite)]
    for thread in threads:
        thread.start()
        time.sleep(0.01)  # clients arrive over a second, not in one burst
    for thread in threads:
        thread.join(timeout=seconds + ANSWER_TIMEOUT + 30)
    return summary(record, seconds, polite, clients - polite)


def summary(record: Record, seconds: float, polite: int, rude: int) -> dict[str, Any]:
    answers = list(record.answers)
    latencies = sorted(a[2] for a in answers)
    statuses = Counter(a[1] for a in answers)

    def percentile(values: list[float], q: float) -> float | None:
        return round(values[min(len(values) - 1, int(q * len(values)))] * 1000, 1) if values else None

    by_kind = {}
    for kind, _ in MIX:
        own = sorted(a[2] for a in answers if a[0] == kind)
        by_kind[kind] = {"requests": len(own), "p50_ms": percentile(own, 0.5), "p95_ms": percentile(own, 0.95),
                         "max_ms": percentile(own, 1.0),
                         "statuses": {str(k): v for k, v in sorted(Counter(a[1] for a in answers if a[0] == kind).items())}}
    held = {how: {"connections": len(times), "median_s": round(statistics.median(times), 1) if times else None,
                  "max_s": round(max(times), 1) if times else None}
            for how, times in record.held.items()}
    return {
        "seconds": seconds, "clients": {"polite": polite, "misbehaving": rude},
        "requests": len(answers) + len(record.unanswered), "answered": len(answers),
        "unanswered": len(record.unanswered), "unanswered_examples": record.unanswered[:5],
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "busy_without_retry_after": sum(1 for a in answers if a[1] in (429, 503) and not a[3]),
        "latency_ms": {"p50": percentile(latencies, 0.5), "p95": percentile(latencies, 0.95),
                       "p99": percentile(latencies, 0.99), "max": percentile(latencies, 1.0)},
        "by_kind": by_kind, "misbehaving_held": held,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", required=True, help="the server, e.g. http://127.0.0.1:8000")
    parser.add_argument("--image", required=True, help="a datastore image id the models run on")
    parser.add_argument("--models", nargs="+", required=True, help="models to run (each on --image)")
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--seconds", type=float, default=60.0)
    args = parser.parse_args(argv)
    print(json.dumps(run(args.url.rstrip("/"), args.image, args.models, args.clients, args.seconds), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
