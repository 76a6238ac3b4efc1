"""A bounded load test of ``idml serve``: the real command on 127.0.0.1, 8 concurrent clients
for a few seconds, a mix of good and bad requests. Every request must be answered with its
expected status (no 5xx), the server's resident memory must grow by less than 10 % after
warm-up, and the latency percentiles are printed."""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

import httpx
import numpy as np
import pytest

from idml.data.digits import digit_image

CLIENTS, WARMUP_S, LOAD_S = 8, 1.5, 4.0
UPLOAD_LIMIT_MB = 0.05


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def _png(index: int) -> bytes:
    buf = io.BytesIO()
    digit_image(f"digits/test/{index:04d}").resize((48, 48)).save(buf, format="PNG")
    return buf.getvalue()


#: (name, expected status, request keyword arguments); clients cycle through them.
MIX = [
    ("id", 200, {"data": {"id": 7, "k": 10}}),
    ("id+rerank", 200, {"data": {"id": 400, "k": 5, "rerank": "introspective"}}),
    ("upload", 200, {"files": {"file": ("q.png", _png(3), "image/png")}, "data": {"k": 8}}),
    ("not-image", 415, {"files": {"file": ("q.png", b"hello" * 20, "image/png")}}),
    ("unknown-id", 404, {"data": {"id": 10**6}}),
    ("bad-k", 422, {"data": {"id": 1, "k": 0}}),
    ("oversize", 413, {"files": {"file": ("big.png", b"\0" * 80_000, "image/png")}}),
]


def _hammer(base: str, seconds: float, out: dict, errors: list, offset: int) -> None:
    deadline = time.monotonic() + seconds
    with httpx.Client(base_url=base, timeout=30) as client:
        n = offset
        while time.monotonic() < deadline:
            name, expected, kwargs = MIX[n % len(MIX)]
            n += 1
            start = time.perf_counter()
            try:
                status = client.post("/search", **kwargs).status_code
            except httpx.HTTPError as exc:
                errors.append(f"{name}: {type(exc).__name__}: {exc}")
                continue
            out[name].append((status, time.perf_counter() - start))
            if status != expected:
                errors.append(f"{name}: status {status}, expected {expected}")


def _load(base: str, seconds: float) -> tuple[dict, list]:
    out: dict = defaultdict(list)
    errors: list = []
    threads = [threading.Thread(target=_hammer, args=(base, seconds, out, errors, i))
               for i in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out, errors


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads RSS from /proc")
def test_serve_under_load(digits_served, tmp_path, capsys):
    folder, ckpt = digits_served
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "idml.cli", "serve", str(folder), "--checkpoint", str(ckpt),
           "--port", str(port), "--device", "cpu", "--max-upload-mb", str(UPLOAD_LIMIT_MB)]
    log = tmp_path / "serve.log"  # a file, not a pipe: an unread pipe would block the server
    proc = subprocess.Popen(cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, log.read_text()[-2000:]
            assert time.monotonic() < deadline, "server did not come up in 60 s"
            try:
                if httpx.get(base + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        _, errors = _load(base, WARMUP_S)
        assert errors == []
        rss_before = _rss_kib(proc.pid)
        results, errors = _load(base, LOAD_S)
        rss_after = _rss_kib(proc.pid)
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    assert errors == [], errors[:10]
    statuses = [s for rows in results.values() for s, _ in rows]
    assert set(results) == {name for name, _, _ in MIX}
    assert not any(s >= 500 for s in statuses)
    growth = rss_after / rss_before - 1.0
    assert growth < 0.10, f"resident memory grew {100 * growth:.1f} % under load"
    with capsys.disabled():
        total = len(statuses)
        print(f"\nidml serve load: {CLIENTS} clients, {LOAD_S:.0f} s, {total} requests "
              f"({total / LOAD_S:.0f}/s), RSS {rss_before / 1024:.0f} -> "
              f"{rss_after / 1024:.0f} MiB ({100 * growth:+.1f} %)")
        for name, rows in results.items():
            ms = 1000 * np.array([t for _, t in rows])
            print(f"  {name:<11} n={len(rows):>4}  p50 {np.percentile(ms, 50):7.1f} ms  "
                  f"p95 {np.percentile(ms, 95):7.1f} ms")
