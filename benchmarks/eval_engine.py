"""Evaluation engine vs pytorch-metric-learning's AccuracyCalculator on SOP-scale data.

Synthetic embeddings shaped like Stanford Online Products' test split (60,502 images of
11,316 classes, 2 or more per class, 512-d, L2-normalised), generated with a fixed seed. Each
engine runs in its own process (so each peak resident memory is its own) on the same data:

* P@1 + R-Precision + MAP@R: ``AccuracyCalculator(k="max_bin_count")`` vs
  ``idml.evaluation.metrics.retrieval_metrics(..., clustering=False)`` (exact bf16-shortlist kNN);
* NMI: AccuracyCalculator's ``NMI`` vs
  ``idml.evaluation.metrics.cluster_nmi_f1`` (both faiss k-means,
  20 iterations, faiss' seed 1234; ours also returns the pairwise F1).

Prints seconds, the ratio, peak resident memory and the largest metric difference, and
checks each engine's neighbour lists of random queries against a float64 brute force.

    python benchmarks/eval_engine.py                 # full size (several minutes on 2 cores)
    python benchmarks/eval_engine.py --n 6000 --classes 1100   # a quick look
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

FAISS_DEFAULT_SEED = 1234


def make_data(n: int, classes: int, dim: int, noise: float, seed: int):
    """Embeddings ``[n, dim]`` (unit rows) and labels: every class gets >= 2 items."""
    g = torch.Generator().manual_seed(seed)
    if n < 2 * classes:
        raise SystemExit(f"--n {n} must be at least twice --classes {classes}")
    extra = torch.multinomial(torch.ones(classes), n - 2 * classes, replacement=True,
                              generator=g)
    sizes = 2 + torch.bincount(extra, minlength=classes)
    labels = torch.repeat_interleave(torch.arange(classes), sizes)
    labels = labels[torch.randperm(n, generator=g)]
    centres = torch.nn.functional.normalize(torch.randn(classes, dim, generator=g), dim=1)
    x = centres[labels]
    x += noise / dim**0.5 * torch.randn(n, dim, generator=g)
    return torch.nn.functional.normalize(x, dim=1), labels


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize() / 2**20


def float64_neighbours(x: torch.Tensor, rows: torch.Tensor, k: int) -> torch.Tensor:
    """Ground truth for ``rows``: top ``k`` by float64 inner product, self excluded, ties by
    smaller index (independent of both engines)."""
    scores = x[rows].double() @ x.double().T
    scores[torch.arange(len(rows)), rows] = float("-inf")
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices
    return order[:, :k]


def check_sample(x: torch.Tensor, y: torch.Tensor, indices: torch.Tensor, count: int,
                 seed: int) -> dict[str, float]:
    k = indices.shape[1]
    rows = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed + 7))[:count]
    truth = float64_neighbours(x, rows, k)
    same = (indices[rows] == truth).all(dim=1)
    same_labels = (y[indices[rows]] == y[truth]).all(dim=1)
    return {"verify_rows": count, "verify_same": int(same.sum()),
            "verify_same_labels": int(same_labels.sum())}


def worker(args: argparse.Namespace) -> None:
    x, y = make_data(args.n, args.classes, args.dim, args.noise, args.seed)
    out: dict[str, float] = {"rss_before_mb": rss_mb()}
    k = int(torch.bincount(y).max()) - 1  # AccuracyCalculator's k="max_bin_count", self out
    if args.worker == "pml":
        from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

        calc = AccuracyCalculator(
            include=("precision_at_1", "r_precision", "mean_average_precision_at_r"),
            k="max_bin_count", device=torch.device("cpu"))
        t = time.perf_counter()
        acc = calc.get_accuracy(x, y)
        out["ranked_s"] = time.perf_counter() - t
        out["rss_ranked_mb"] = peak_rss_mb()
        out |= {"p@1": acc["precision_at_1"], "r_precision": acc["r_precision"],
                "map@r": acc["mean_average_precision_at_r"]}
        if not args.skip_nmi:
            calc = AccuracyCalculator(include=("NMI",), device=torch.device("cpu"))
            t = time.perf_counter()
            out["nmi"] = calc.get_accuracy(x, y)["NMI"]
            out["nmi_s"] = time.perf_counter() - t
    else:
        from idml.evaluation.metrics import cluster_nmi_f1, retrieval_metrics

        t = time.perf_counter()
        m = retrieval_metrics(x, y, ks=(1,), clustering=False)
        out["ranked_s"] = time.perf_counter() - t
        out["rss_ranked_mb"] = peak_rss_mb()
        out |= {"p@1": m["recall@1"], "r_precision": m["r_precision"], "map@r": m["map@r"]}
        if not args.skip_nmi:
            t = time.perf_counter()
            out["nmi"], out["f1"] = cluster_nmi_f1(x, y, seed=FAISS_DEFAULT_SEED)
            out["nmi_s"] = time.perf_counter() - t
    out["peak_rss_mb"] = peak_rss_mb()
    if args.verify:
        if args.worker == "pml":
            from pytorch_metric_learning.utils.inference import FaissKNN

            _, indices = FaissKNN()(x, k, x, ref_includes_query=True)
        else:
            from idml.evaluation.knn import knn

            _, indices = knn(x, x, k, exclude_self=True)
        out |= check_sample(x, y, indices.cpu(), args.verify, args.seed)
    print(json.dumps(out))


def run(engine: str, argv: list[str]) -> dict[str, float]:
    proc = subprocess.run([sys.executable, __file__, "--worker", engine, *argv],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{engine} worker failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=60502)
    parser.add_argument("--classes", type=int, default=11316)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--noise", type=float, default=1.0,
                        help="within-class spread (noise norm relative to the class centre)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-nmi", action="store_true")
    parser.add_argument("--verify", type=int, default=2000, metavar="Q",
                        help="compare each engine's neighbours of Q random queries with a "
                             "float64 brute force (0: skip)")
    parser.add_argument("--worker", choices=("pml", "idml"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    argv = [a for a in sys.argv[1:]]
    print(f"synthetic SOP-scale data: {args.n} x {args.dim}, {args.classes} classes, "
          f"noise {args.noise}, seed {args.seed}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    pml = run("pml", argv)
    ours = run("idml", argv)
    keys = ["p@1", "r_precision", "map@r"] + ([] if args.skip_nmi else ["nmi"])
    print(f"{'':28s}{'AccuracyCalculator':>20s}{'idml':>14s}")
    for k in keys:
        print(f"{k:28s}{pml[k]:20.6f}{ours[k]:14.6f}")
    print(f"{'P@1+RP+MAP@R seconds':28s}{pml['ranked_s']:20.2f}{ours['ranked_s']:14.2f}"
          f"   ratio {pml['ranked_s'] / ours['ranked_s']:.2f}x")
    if not args.skip_nmi:
        print(f"{'NMI seconds':28s}{pml['nmi_s']:20.2f}{ours['nmi_s']:14.2f}"
              f"   ratio {pml['nmi_s'] / ours['nmi_s']:.2f}x")
    print(f"{'peak RSS MB (whole process)':28s}{pml['peak_rss_mb']:20.0f}"
          f"{ours['peak_rss_mb']:14.0f}")
    print(f"{'  RSS before evaluating':28s}{pml['rss_before_mb']:20.0f}"
          f"{ours['rss_before_mb']:14.0f}")
    print(f"{'  peak during P@1/RP/MAP@R':28s}{pml['rss_ranked_mb']:20.0f}"
          f"{ours['rss_ranked_mb']:14.0f}")
    if args.verify:
        print(f"neighbour lists equal to a float64 brute force on {args.verify} random queries: "
              f"AccuracyCalculator (faiss) {pml['verify_same']}, idml {ours['verify_same']} "
              f"(same labels in the same order: {pml['verify_same_labels']}, "
              f"{ours['verify_same_labels']})")
    print(f"largest metric difference: {max(abs(pml[k] - ours[k]) for k in keys):.3g}")


if __name__ == "__main__":
    main()
