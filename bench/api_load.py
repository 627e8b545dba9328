#!/usr/bin/env python3
"""The load of bench/api-latency.sh: N engineers (one token each, one keep-alive HTTP/1.1 connection each) against
one fcdev API. Phase 1, `up`: all POST /v1/clusters {"name": "dev", "image": "tiny"} at the same moment. Phase 2
(not timed): wait until every cluster is ready. Phase 3, `status`: for SECS seconds each engineer sends
GET /v1/clusters/dev back to back (what `fcdev status` asks per cluster). Prints one JSON object: the latencies'
p50/p99/max in ms per phase, the status requests per second, and each engineer's cluster host.

usage: api_load.py URL TOKENS_FILE SECS
"""
import asyncio
import json
import sys
import time
from urllib.parse import urlparse


class Conn:
    def __init__(self, host, port, token):
        self.host, self.port, self.token = host, port, token
        self.r = self.w = None

    async def request(self, method, path, body=None):
        if self.w is None:
            self.r, self.w = await asyncio.open_connection(self.host, self.port)
        data = json.dumps(body).encode() if body is not None else b""
        head = (
            f"{method} {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
            f"Authorization: Bearer {self.token}\r\nContent-Length: {len(data)}\r\n"
        )
        if body is not None:
            head += "Content-Type: application/json\r\n"
        self.w.write(head.encode() + b"\r\n" + data)
        await self.w.drain()
        status_line = await self.r.readline()
        if not status_line:
            raise ConnectionError("the server closed the connection")
        status = int(status_line.split()[1])
        length, chunked = 0, False
        while True:
            line = await self.r.readline()
            if line in (b"\r\n", b"\n", b""):
                break
            k, _, v = line.decode().partition(":")
            if k.lower() == "content-length":
                length = int(v.strip())
            elif k.lower() == "transfer-encoding" and "chunked" in v.lower():
                chunked = True
        if chunked:
            payload = b""
            while True:
                size = int((await self.r.readline()).strip(), 16)
                if size == 0:
                    await self.r.readline()
                    break
                payload += await self.r.readexactly(size)
                await self.r.readline()
        else:
            payload = await self.r.readexactly(length)
        return status, payload


def pct(xs, p):
    xs = sorted(xs)
    if not xs:
        return None
    return round(xs[min(len(xs) - 1, int(len(xs) * p))] * 1000, 1)


def summary(xs):
    return {"n": len(xs), "p50": pct(xs, 0.50), "p99": pct(xs, 0.99), "max": pct(xs, 1.0)}


async def main():
    url, tokens_file, secs = sys.argv[1], sys.argv[2], float(sys.argv[3])
    u = urlparse(url)
    tokens = [t.strip() for t in open(tokens_file) if t.strip()]
    conns = [Conn(u.hostname, u.port, t) for t in tokens]

    # Phase 1: every engineer's `up` at once.
    start = asyncio.Event()
    up_lat, errors = [], []

    async def up(c):
        await start.wait()
        t = time.perf_counter()
        s, body = await c.request("POST", "/v1/clusters", {"name": "dev", "image": "tiny"})
        up_lat.append(time.perf_counter() - t)
        if s not in (200, 202):
            errors.append(f"up: {s} {body[:200]!r}")

    tasks = [asyncio.create_task(up(c)) for c in conns]
    await asyncio.sleep(0.2)
    start.set()
    await asyncio.gather(*tasks)

    # Phase 2: until every cluster is ready (not timed).
    hosts = {}
    deadline = time.monotonic() + 120
    for c in conns:
        while True:
            s, body = await c.request("GET", "/v1/clusters/dev")
            v = json.loads(body) if s == 200 else {}
            if v.get("state") == "ready":
                hosts[c.token[:12]] = v.get("host")
                break
            if time.monotonic() > deadline:
                raise SystemExit(f"a cluster is not ready after 120 s: {s} {body[:300]!r}")
            await asyncio.sleep(0.1)

    # Phase 3: status requests back to back for `secs`.
    status_lat = []
    stop_at = time.monotonic() + secs

    async def status(c):
        while time.monotonic() < stop_at:
            t = time.perf_counter()
            s, body = await c.request("GET", "/v1/clusters/dev")
            status_lat.append(time.perf_counter() - t)
            if s != 200:
                errors.append(f"status: {s} {body[:200]!r}")

    t0 = time.monotonic()
    await asyncio.gather(*(status(c) for c in conns))
    elapsed = time.monotonic() - t0
    print(json.dumps({
        "clients": len(conns),
        "up": summary(up_lat),
        "status": summary(status_lat),
        "status_per_sec": round(len(status_lat) / elapsed, 1),
        "errors": errors[:5],
        "error_count": len(errors),
        "hosts": hosts,
    }))


asyncio.run(main())
