"""Latency and throughput of ``idml serve``'s ``POST /search``, against the library call.

    python benchmarks/serve.py --items 100000 --seconds 5

1. **Search only**: exact and HNSW indexes of ``--items`` synthetic embeddings (clustered unit
   vectors, the digits model's sizes and fingerprint); queries are indexed items (``id``), so
   no model forward runs. Competitor, in the same run: :func:`idml.serving.search.search` of
   the same queries in-process, one at a time (what the service wraps: the ratio is the cost
   of HTTP, the framework and the JSON answer).
2. **End to end**: the digits default's run, its test split indexed with thumbnails (896
   items); queries are uploaded PNGs, so every request decodes and runs the model.

The server is the real ``idml serve`` in its own process on 127.0.0.1; ``--clients`` threads
send requests back to back (1 client: latency without queueing). One JSON line per
measurement goes to ``--out``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from idml.cli import main as idml
from idml.data.digits import digit_image
from idml.serving.embedder import load, make_meta
from idml.serving.embeddings import EmbeddingSet
from idml.serving.index import build_index, save_index
from idml.serving.search import search


def synthetic(embedder: Any, n: int, seed: int = 0) -> EmbeddingSet:
    """``n`` unit vectors in 1,000 clusters, with uncertainty rows, made for ``embedder``."""
    rng = np.random.default_rng(seed)
    d, du = embedder.semantic_dim, embedder.uncertainty_dim
    centres = rng.standard_normal((1000, d)).astype(np.float32)
    s = centres[rng.integers(0, 1000, n)] + 0.6 * rng.standard_normal((n, d)).astype(np.float32)
    s /= np.linalg.norm(s, axis=1, keepdims=True)
    u = (0.05 * rng.standard_normal((n, du))).astype(np.float32)
    return EmbeddingSet(s, u, np.array([f"synthetic/{i}" for i in range(n)]),
                        np.full(n, -1, np.int64), make_meta(embedder, n))


def percentiles(seconds: list[float]) -> dict[str, float]:
    ms = 1000.0 * np.asarray(seconds)
    return {"p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95))}


def library_search(index: Any, embedder: Any, ids: np.ndarray, k: int) -> dict[str, float]:
    """The competitor: in-process search of one query at a time."""
    times = []
    for i in ids:
        t0 = time.perf_counter()
        search(index, index.semantic[i : i + 1], index.uncertainty[i : i + 1], k,
               ism=embedder.ism, exclude=[int(i)])
        times.append(time.perf_counter() - t0)
    return {"qps": len(ids) / sum(times), **percentiles(times)}


class Server:
    """``idml serve`` in its own process on a free 127.0.0.1 port."""

    def __init__(self, index: Path, ckpt: Path, log: Path) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.base = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "idml.cli", "serve", str(index), "--checkpoint", str(ckpt),
               "--port", str(self.port), "--device", "cpu"]
        self.proc = subprocess.Popen(cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while True:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"idml serve did not start: {log.read_text()[-2000:]}")
            try:
                if httpx.get(self.base + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


def hammer(base: str, requests: list[dict], clients: int, seconds: float) -> dict[str, float]:
    """``clients`` threads send ``requests`` (cycling) for ``seconds``; all must be 200."""
    times: list[float] = []
    failures: list[str] = []

    def client(offset: int) -> None:
        deadline = time.monotonic() + seconds
        n = offset
        with httpx.Client(base_url=base, timeout=60) as c:
            while time.monotonic() < deadline:
                t0 = time.perf_counter()
                r = c.post("/search", **requests[n % len(requests)])
                times.append(time.perf_counter() - t0)
                if r.status_code != 200:
                    failures.append(f"{r.status_code} {r.text[:200]}")
                n += 7

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    if failures:
        raise RuntimeError(f"{len(failures)} failed requests, e.g. {failures[0]}")
    return {"qps": len(times) / wall, "requests": len(times), **percentiles(times)}


def digits_run(root: Path) -> tuple[Path, Path]:
    """The digits default trained; its test split embedded and indexed with thumbnails."""
    run, emb, index = root / "run", root / "test.npz", root / "index"
    steps = [["train", "--no-progress", "--device", "cpu", "--out", str(run)],
             ["embed", str(run / "checkpoint.pt"), "--split", "test", "--out", str(emb),
              "--device", "cpu"],
             ["index", str(emb), "--out", str(index)]]
    for argv in steps:
        if idml(argv) != 0:
            raise RuntimeError(f"idml {' '.join(argv)} failed")
    return index, run / "checkpoint.pt"


def png(name: str) -> bytes:
    buf = io.BytesIO()
    digit_image(name).resize((64, 64)).save(buf, format="PNG")
    return buf.getvalue()


def measure(args: argparse.Namespace, root: Path) -> list[dict[str, Any]]:
    index_dir, ckpt = digits_run(root)
    embedder = load(ckpt, device="cpu")
    rows: list[dict[str, Any]] = []
    emb = synthetic(embedder, args.items)
    rng = np.random.default_rng(1)
    ids = rng.integers(0, args.items, 400)
    for kind in ("exact", "hnsw"):
        t0 = time.perf_counter()
        index = build_index(emb, kind)
        built = time.perf_counter() - t0
        folder = save_index(index, root / f"synthetic-{kind}")
        library = library_search(index, embedder, ids, args.k)
        server = Server(folder, ckpt, root / f"serve-{kind}.log")
        try:
            requests = [{"data": {"id": int(i), "k": args.k}} for i in ids]
            for clients in (1, args.clients):
                http = hammer(server.base, requests, clients, args.seconds)
                rows.append({"case": f"search only, {kind}", "items": args.items,
                             "clients": clients, "build_s": built, "http": http,
                             "library": library})
        finally:
            server.stop()
    server = Server(index_dir, ckpt, root / "serve-e2e.log")
    try:
        uploads = [{"files": {"file": ("q.png", png(f"digits/test/{i:04d}"), "image/png")},
                    "data": {"k": args.k}} for i in range(0, 896, 37)]
        for clients in (1, args.clients):
            rows.append({"case": "end to end (upload, model forward), exact",
                         "items": 896, "clients": clients,
                         "http": hammer(server.base, uploads, clients, args.seconds)})
    finally:
        server.stop()
    return rows


def report(rows: list[dict[str, Any]]) -> None:
    print(f"{'case':<44} {'items':>7} {'clients':>7} {'q/s':>7} {'p50 ms':>7} {'p95 ms':>7}"
          f"   library p50 ms  ratio")
    for r in rows:
        h, lib = r["http"], r.get("library")
        extra = (f"   {lib['p50_ms']:14.2f}  {h['p50_ms'] / lib['p50_ms']:5.1f}x"
                 if lib and r["clients"] == 1 else "")
        print(f"{r['case']:<44} {r['items']:>7} {r['clients']:>7} {h['qps']:>7.0f} "
              f"{h['p50_ms']:>7.2f} {h['p95_ms']:>7.2f}{extra}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("-k", type=int, default=10)
    parser.add_argument("--out", default="benchmarks/results/serve.jsonl")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = measure(args, Path(tmp))
    report(rows)
    machine = {"machine": platform.processor() or platform.machine(), "cores": os.cpu_count(),
               "date": time.strftime("%Y-%m-%d")}
    with open(args.out, "a", encoding="utf-8") as fh:
        for r in rows:
            fh.write(json.dumps({**machine, **r}) + "\n")
    print(f"appended {len(rows)} rows to {args.out}")


if __name__ == "__main__":
    main()
