"""A self-contained HTML report of a run folder (``idml report RUN_DIR``).

Three steps, each a function: :func:`collect_report_data` reads the run folder, rebuilds the
model and the test split from ``checkpoint.pt`` (``pretrained="none"``: every weight comes from
the checkpoint) and recomputes the test embeddings, the risk-coverage curves and the
retrieval examples; :func:`render_figures` draws the plots with matplotlib (Agg, no pyplot
state); :func:`build_html` assembles one HTML file. Every image and plot is inlined as a
``data:`` URI and the page loads nothing from anywhere (its Content-Security-Policy forbids
it), so the file can be mailed or archived as is.

The page carries a small inline script that, once loaded, records on ``<body>`` how many
images it holds and how many failed to decode (``data-images-total``,
``data-images-failed``); the browser test reads them back.
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from PIL import Image
from torch.utils.data import Dataset

from idml.core.config import as_dict
from idml.core.errors import IdmlError
from idml.core.io import atomic_write_text
from idml.core.rundir import CHECKPOINT_FILE, HISTORY_FILE, METRICS_FILE, check_finished, quiet
from idml.core.runtime import select_device
from idml.data.build import splits_from_config
from idml.data.duplicates import shared_images
from idml.data.splits import paths_of
from idml.evaluation.evaluator import compute_embeddings
from idml.evaluation.uncertainty import query_correct, risk_coverage, semantic_confidence
from idml.method.metric import uncertainty_score
from idml.serving.thumbnails import fit_thumbnail
from idml.serving.trained import Suspect, TrainedModel, load_trained, rank_training_suspects

#: Results shown per retrieval example.
TOP_K = 5
METRIC_NAMES = {
    "recall@1": "Recall@1", "recall@2": "Recall@2", "recall@4": "Recall@4",
    "recall@8": "Recall@8", "r_precision": "R-Precision", "map@r": "MAP@R", "nmi": "NMI",
    "f1": "F1",
}
CURVE_NAMES = {
    "uncertainty": "uncertainty (-||u||²)",
    "semantic_gap": "semantic gap (cos₁ - cos₂)",
    "feature_norm": "pooled-feature norm",
    "combined": "gap + uncertainty (fitted on validation classes)",
    "random": "random order (expected)",
}


class ReportError(IdmlError):
    """A run folder that cannot be reported on; the message names what is wrong."""


@dataclass
class RetrievalExample:
    """One query and its ``TOP_K`` nearest neighbours (indices into the reference set)."""

    query: int
    query_label: int
    score: float
    neighbours: list[int]
    labels: list[int]
    similarities: list[float]

    @property
    def right(self) -> list[bool]:
        """Whether each neighbour has the query's label."""
        return [lab == self.query_label for lab in self.labels]


@dataclass
class ReportData:
    """Everything the report shows, computed from one run folder."""

    run_dir: Path
    config: dict[str, Any]
    metrics: dict[str, Any]
    history: list[dict[str, Any]]
    query_labels: np.ndarray
    scores: np.ndarray  # ||u||^2 of every query
    correct: np.ndarray  # nearest neighbour has the query's label
    curves: dict[str, dict[str, Any]]  # name -> idml.evaluation.uncertainty.risk_coverage output
    most_uncertain: list[int]
    least_uncertain: list[int]
    examples: list[RetrievalExample]
    query_thumbs: dict[int, Image.Image] = field(default_factory=dict)
    reference_thumbs: dict[int, Image.Image] = field(default_factory=dict)
    leave_one_out: bool = True
    overlap: int | None = None  # test images identical to a training image (None: no files)
    suspects: list[Suspect] = field(default_factory=list)  # training images, most suspect first
    suspect_thumbs: dict[int, Image.Image] = field(default_factory=dict)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ReportError(f"cannot read {path}: {exc}") from exc


def _thumbnail(dataset: Dataset, i: int, spec: dict[str, Any]) -> Image.Image:
    """Image ``i`` of ``dataset`` as a small PIL image, from the rawest source available.

    Image files (``records.paths``) and decoded caches (``cache``) are shown as stored; tensor
    data sets (the embedded digits) are un-normalised with the model's ``spec``.
    """
    records = getattr(dataset, "records", None)
    cache = getattr(dataset, "cache", None)
    if records is not None:
        from idml.data.images import load_rgb

        img = load_rgb(records.paths[i])
    elif cache is not None and hasattr(cache, "shapes"):
        arr = cache[i].numpy().transpose(1, 2, 0)
        img = Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr)
    else:
        x = dataset[i][0].detach().float().cpu()
        mean = torch.tensor(spec["mean"], dtype=torch.float32).view(-1, 1, 1)
        std = torch.tensor(spec["std"], dtype=torch.float32).view(-1, 1, 1)
        x = (x * std + mean).clamp(0, 1)
        arr = (x * 255).round().to(torch.uint8).numpy().transpose(1, 2, 0)
        img = Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr)
    return fit_thumbnail(img)


def pick_examples(scores: np.ndarray, correct: np.ndarray, count: int) -> list[int]:
    """``count`` queries to show: failures and a spread over the uncertainty ranking.

    Up to half are the most uncertain queries whose nearest neighbour is wrong (failures are
    what a reader wants to see, and rare); the rest are spread evenly over the ranking of the
    remaining queries. Returned most uncertain first.
    """
    order = np.argsort(-scores, kind="stable")
    count = min(count, len(order))
    if count <= 0:
        return []
    failures = [int(i) for i in order if not correct[i]][: count // 2]
    shown = set(failures)
    rest = np.array([i for i in order if int(i) not in shown])
    spread = []
    if count > len(failures) and len(rest):
        ranks = np.unique(np.linspace(0, len(rest) - 1, count - len(failures)).round())
        spread = [int(rest[int(r)]) for r in ranks]
    rank_of = {int(i): r for r, i in enumerate(order)}
    return sorted({*failures, *spread}, key=rank_of.__getitem__)


def collect_report_data(
    run_dir: str | Path,
    device: str = "cpu",
    examples: int = 8,
    log: Callable[[str], None] | None = None,
    suspicious: int = 0,
) -> ReportData:
    """Read a run folder and recompute what the report shows (test embeddings etc.).

    ``examples``: number of retrieval examples and of most / least uncertain thumbnails.
    ``suspicious``: number of training images whose label is most likely wrong to list
    (0: none; embedding the training split costs a pass over it).
    """
    if examples < 1:
        raise ReportError(f"examples must be at least 1, got {examples}")
    run_dir = check_finished(run_dir)
    metrics, history = _read_run_files(run_dir)
    trained = load_trained(run_dir / CHECKPOINT_FILE)
    model, cfg, dev = trained.model, trained.config, select_device(device)
    splits = splits_from_config(cfg, model.input_spec, log or quiet)
    model.to(dev)

    queries, reference = splits.test if splits.test is not None else splits.query, None
    if splits.test is None:
        reference = splits.gallery
    if queries is None:
        raise ReportError(f"{run_dir}: the data set has no test or query split")
    sem, unc, labels, gsem, glabels, correct, gap = _embed_for_report(
        model, cfg, dev, queries, reference)
    scores = uncertainty_score(unc).numpy().astype(np.float64)
    correct_np = correct.cpu().numpy().astype(bool)
    curves = _confidence_curves(scores, correct_np, gap.cpu().numpy())
    order = np.argsort(-scores, kind="stable")
    count = min(examples, len(order))
    most = [int(i) for i in order[:count]]
    least = [int(i) for i in order[::-1][:count]]

    chosen = pick_examples(scores, correct_np, examples)
    found = _neighbours(sem, labels, gsem, glabels, chosen, scores, reference is None)

    query_thumbs = {i: _thumbnail(queries, i, model.input_spec)
                    for i in {*most, *least, *chosen}}
    reference_thumbs = _reference_thumbnails(found, query_thumbs, queries, reference,
                                             model.input_spec)
    suspects, suspect_thumbs = _suspects(trained, suspicious, device)
    train_paths, test_paths = paths_of(splits.train), paths_of(queries)
    return ReportData(
        run_dir=run_dir, config=as_dict(cfg), metrics=metrics, history=history,
        query_labels=labels.cpu().numpy(), scores=scores, correct=correct_np, curves=curves,
        most_uncertain=most, least_uncertain=least, examples=found,
        query_thumbs=query_thumbs, reference_thumbs=reference_thumbs,
        leave_one_out=reference is None, suspects=suspects, suspect_thumbs=suspect_thumbs,
        overlap=None if train_paths is None or test_paths is None else shared_images(
            train_paths, test_paths),
    )


def _embed_for_report(model: torch.nn.Module, cfg: Any, dev: torch.device, queries: Dataset,
                      reference: Dataset | None) -> tuple[torch.Tensor, ...]:
    """Embeddings of the queries (and of the gallery, where there is one): ``(sem, unc,
    labels, gallery sem, gallery labels, nearest neighbour right, semantic gap)``; without a
    gallery the queries search each other, leaving themselves out."""
    def embed(data: Dataset) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return compute_embeddings(model, data, cfg.eval_batch_size, dev, cfg.precision,
                                  cfg.num_workers)

    sem, unc, labels = embed(queries)
    if reference is None:
        return (sem, unc, labels, sem, labels, query_correct(sem, labels),
                semantic_confidence(sem))
    gsem, _, glabels = embed(reference)
    return (sem, unc, labels, gsem, glabels,
            query_correct(sem, labels, gallery=gsem, gallery_labels=glabels),
            semantic_confidence(sem, gallery=gsem))


def _suspects(trained: TrainedModel, count: int, device: str
              ) -> tuple[list[Suspect], dict[int, Image.Image]]:
    """The ``count`` most suspect training images (by kNN label disagreement) and thumbnails."""
    if count < 1:
        return [], {}
    suspects, train = rank_training_suspects(trained, count, device)
    return suspects, {x.index: _thumbnail(train, x.index, trained.model.input_spec)
                      for x in suspects}


def _read_run_files(run_dir: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """``metrics.json`` and ``history.json`` of a finished run, checked."""
    metrics = _read_json(run_dir / METRICS_FILE)
    history = _read_json(run_dir / HISTORY_FILE)
    if not isinstance(metrics, dict) or "final" not in metrics:
        raise ReportError(f"{run_dir / METRICS_FILE} has no 'final' metrics")
    if not isinstance(history, list):
        raise ReportError(f"{run_dir / HISTORY_FILE} is not a list of epochs")
    return metrics, history


def _confidence_curves(scores: np.ndarray, correct: np.ndarray,
                       gap: np.ndarray) -> dict[str, dict[str, Any]]:
    """Risk-coverage of the uncertainty, the semantic gap and a random order (the exact
    expectation: all-equal confidence, see ``random_reference``)."""
    return {
        "uncertainty": risk_coverage(-scores, correct),
        "semantic_gap": risk_coverage(gap, correct),
        "random": risk_coverage(np.zeros(len(scores)), correct),
    }


def _reference_thumbnails(found: list[RetrievalExample], query_thumbs: dict[int, Image.Image],
                          queries: Dataset, reference: Dataset | None,
                          spec: dict[str, Any]) -> dict[int, Image.Image]:
    """Thumbnails of the retrieved items (leave-one-out: reusing the queries' own)."""
    thumbs: dict[int, Image.Image] = {}
    for j in sorted({j for ex in found for j in ex.neighbours}):
        if reference is None and j in query_thumbs:
            thumbs[j] = query_thumbs[j]
        else:
            thumbs[j] = _thumbnail(queries if reference is None else reference, j, spec)
    return thumbs


def _neighbours(
    sem: torch.Tensor,
    labels: torch.Tensor,
    ref: torch.Tensor,
    ref_labels: torch.Tensor,
    chosen: Sequence[int],
    scores: np.ndarray,
    leave_one_out: bool,
) -> list[RetrievalExample]:
    """Top-``TOP_K`` neighbours (cosine) of the ``chosen`` queries in ``ref``.

    Leave-one-out (``ref`` is the query set): the query itself is removed by index, as in
    the evaluation.
    """
    from idml.evaluation.metrics import knn

    if not chosen:
        return []
    k = min(TOP_K, len(ref) - (1 if leave_one_out else 0))
    q = F.normalize(sem[list(chosen)].float(), dim=1)
    r = F.normalize(ref.float(), dim=1)
    sims, idx = knn(q, r, min(k + int(leave_one_out), len(ref)), exclude_self=False)
    found = []
    for row, qi in enumerate(chosen):
        pairs = [(int(j), float(s)) for j, s in zip(idx[row].tolist(), sims[row].tolist(),
                                                    strict=True)
                 if not (leave_one_out and j == qi)][:k]
        found.append(RetrievalExample(
            query=int(qi), query_label=int(labels[qi]), score=float(scores[qi]),
            neighbours=[j for j, _ in pairs], labels=[int(ref_labels[j]) for j, _ in pairs],
            similarities=[s for _, s in pairs],
        ))
    return found


# ----------------------------------------------------------------------------- figures


def _figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def figure_data_uri(fig: Any) -> str:
    """A matplotlib figure as a ``data:image/png;base64,...`` URI."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def image_data_uri(img: Image.Image) -> str:
    """A PIL image as a PNG ``data:`` URI."""
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def plot_training(history: list[dict[str, Any]]) -> str | None:
    """Loss, images/s and (if recorded) validation Recall@1 per epoch; None without epochs."""
    if not history:
        return None
    epochs = [h.get("epoch", n + 1) for n, h in enumerate(history)]
    panels: list[tuple[str, list[float]]] = [
        (title, [float(h[key]) for h in history])
        for key, title in (("loss", "training loss"), ("images_per_s", "images / s"))
        if all(isinstance(h.get(key), (int, float)) for h in history)
    ]
    if all(isinstance(h.get("val"), dict) and "recall@1" in h["val"] for h in history):
        panels.append(("validation Recall@1 (%)",
                       [100 * h["val"]["recall@1"] for h in history]))
    if not panels:
        return None
    fig = _figure(3.6 * len(panels), 3.0)
    for ax, (title, values) in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels,
                                   strict=True):
        ax.plot(epochs, values, marker="o")
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    return figure_data_uri(fig)


def plot_risk_coverage(curves: dict[str, dict[str, Any]]) -> str:
    """Risk (1 - Recall@1 of the kept queries) against coverage, one line per confidence."""
    fig = _figure(6.0, 4.0)
    ax = fig.subplots()
    styles = {"uncertainty": "-", "semantic_gap": "--", "random": ":"}
    for name, curve in curves.items():
        ax.plot(curve["coverage"], curve["risk"], styles.get(name, "-"),
                label=f"{CURVE_NAMES.get(name, name)}  AURC {curve['aurc']:.4f}")
    ax.set_xlabel("coverage (fraction of queries kept, most confident first)")
    ax.set_ylabel("risk = 1 - Recall@1")
    ax.set_xlim(0, 1)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend()
    return figure_data_uri(fig)


def plot_uncertainty_histogram(scores: np.ndarray, correct: np.ndarray) -> str:
    """Normalised histograms of ``||u||^2``: queries whose nearest neighbour is right / wrong."""
    fig = _figure(6.0, 3.5)
    ax = fig.subplots()
    bins = np.histogram_bin_edges(scores, bins=30)
    # Densities: failures are rare, their counts would vanish next to the successes.
    for mask, name in ((correct, "right"), (~correct, "wrong")):
        if mask.any():
            ax.hist(scores[mask], bins=bins, alpha=0.6, density=True,
                    label=f"{name} ({int(mask.sum())})")
    ax.set_xlabel("uncertainty ||u||²")
    ax.set_ylabel("density")
    ax.grid(alpha=0.3)
    ax.legend(title="nearest neighbour")
    return figure_data_uri(fig)


def render_figures(data: ReportData) -> dict[str, str | None]:
    """Every plot of the report as a ``data:`` URI (``training`` is None without epochs)."""
    return {
        "training": plot_training(data.history),
        "risk_coverage": plot_risk_coverage(data.curves),
        "histogram": plot_uncertainty_histogram(data.scores, data.correct),
    }


# ----------------------------------------------------------------------------- HTML

_CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em auto;max-width:1100px;color:#222;padding:0 1em}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:1.8em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.5em 0}td,th{padding:.25em .7em;border:1px solid #ddd}
td.num{text-align:right;font-variant-numeric:tabular-nums}
.plot{max-width:100%}
.grid{display:flex;flex-wrap:wrap;gap:.6em}
figure{margin:0;text-align:center;font-size:.75em}
figure img{display:block;margin:0 auto;image-rendering:pixelated;border:3px solid #ccc}
.example{display:flex;gap:.6em;align-items:flex-end;margin:.6em 0;padding:.4em;
 border-bottom:1px solid #eee}
.query img{border-color:#357}
.right img{border-color:#2a2}.wrong img{border-color:#d22}
.mark{font-weight:bold}.right .mark{color:#2a2}.wrong .mark{color:#d22}
.note{color:#666;font-size:.9em}
"""

# Self-check for the browser test: images that did not decode are counted after `load`.
_SCRIPT = """
window.addEventListener("load", function () {
  var images = document.images, failed = 0;
  for (var i = 0; i < images.length; i++) {
    if (!images[i].complete || images[i].naturalWidth === 0) { failed++; }
  }
  document.body.setAttribute("data-images-total", String(images.length));
  document.body.setAttribute("data-images-failed", String(failed));
});
"""

_CSP = ("default-src 'none'; img-src data:; style-src 'unsafe-inline'; "
        "script-src 'unsafe-inline'")


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _pct(value: Any) -> str:
    return "n/a" if not isinstance(value, (int, float)) or value != value else \
        f"{100 * value:.2f}"


def _num(value: Any) -> str:
    return "n/a" if not isinstance(value, (int, float)) or value != value else f"{value:.4f}"


def _value_attr(value: Any) -> str:
    """The exact value for machine reading (``repr`` of the float; ``null`` when missing)."""
    return "null" if value is None else _e(repr(float(value)))


def metrics_table(metrics: dict[str, Any]) -> str:
    """Initial vs final test metrics (percent), one row per metric."""
    columns = [c for c in ("initial", "final") if isinstance(metrics.get(c), dict)]
    names = list(metrics["final"])
    head = "".join(f"<th>{_e(c)}</th>" for c in columns)
    rows = []
    for name in names:
        cells = []
        for c in columns:
            value = metrics[c].get(name)
            cells.append(f'<td class="num" data-metric="{_e(name)}" data-column="{_e(c)}" '
                         f'data-value="{_value_attr(value)}">{_pct(value)}</td>')
        rows.append(f"<tr><th>{_e(METRIC_NAMES.get(name, name))}</th>{''.join(cells)}</tr>")
    return (f'<table id="metrics-table"><tr><th>metric (%)</th>{head}</tr>'
            f"{''.join(rows)}</table>")


def uncertainty_table(uncertainty: dict[str, Any]) -> str:
    """The risk-coverage rows recorded in ``metrics.json`` (AURC etc. per confidence)."""
    report = uncertainty.get("risk_coverage") or {}
    if not report:
        return ""
    columns = list(next(iter(report.values())))
    head = "".join(f"<th>{_e(c)}</th>" for c in columns)
    rows = []
    for name, row in report.items():
        cells = "".join(
            f'<td class="num" data-row="{_e(name)}" data-key="{_e(c)}" '
            f'data-value="{_value_attr(row.get(c))}">{_num(row.get(c))}</td>' for c in columns
        )
        label = "random order" if name == "random" else CURVE_NAMES.get(name, name)
        rows.append(f"<tr><th>{_e(label)}</th>{cells}</tr>")
    summary = ", ".join(
        f"{label} {_num(uncertainty.get(key))}" for key, label in (
            ("mean", "mean ||u||² on test"), ("correct_mean", "right queries"),
            ("wrong_mean", "wrong queries"), ("mixup_auroc", "mixup ambiguity AUROC"))
        if key in uncertainty
    )
    return (f'<table id="uncertainty-table"><tr><th>confidence</th>{head}</tr>'
            f"{''.join(rows)}</table><p class=\"note\">{_e(summary)}</p>")


def _img(uri: str, alt: str, css: str = "") -> str:
    cls = f' class="{css}"' if css else ""
    return f'<img{cls} src="{uri}" alt="{_e(alt)}">'


def _thumb_uris(data: ReportData) -> tuple[dict[int, str], dict[int, str]]:
    q = {i: image_data_uri(img) for i, img in data.query_thumbs.items()}
    r = {j: q[j] if data.leave_one_out and j in q else image_data_uri(img)
         for j, img in data.reference_thumbs.items()}
    return q, r


def thumbnails_section(data: ReportData, uris: dict[int, str]) -> str:
    """Most and least uncertain test images with their ``||u||^2`` and label."""
    parts = []
    for kind, title, indices in (
        ("most", "Most uncertain", data.most_uncertain),
        ("least", "Least uncertain", data.least_uncertain),
    ):
        figs = []
        for i in indices:
            label, score = int(data.query_labels[i]), float(data.scores[i])
            nn = "right" if data.correct[i] else "wrong"
            figs.append(
                f'<figure class="thumb {nn}" data-kind="{kind}" data-index="{i}" '
                f'data-label="{label}" data-score="{_e(repr(score))}">'
                f'{_img(uris[i], f"test image {i}, label {label}")}'
                f"<figcaption>#{i} label {label}<br>||u||² {score:.4g}<br>"
                f'<span class="mark">NN {nn}</span></figcaption></figure>'
            )
        parts.append(f'<h3>{_e(title)}</h3><div class="grid" id="{kind}-uncertain">'
                     f"{''.join(figs)}</div>")
    return "".join(parts)


def suspects_section(data: ReportData) -> str:
    """The training images whose label is most likely wrong, most suspect first."""
    if not data.suspects:
        return ""
    rows = []
    for rank, x in enumerate(data.suspects, 1):
        where = x.path if x.path is not None else f"training item {x.index}"
        uri = image_data_uri(data.suspect_thumbs[x.index])
        rows.append(
            f'<tr class="suspect" data-index="{x.index}" data-label="{x.label}">'
            f"<td>{rank}</td><td>{_img(uri, f'training image {x.index}')}</td>"
            f"<td>{_e(where)}</td><td>{x.label}</td><td>{x.knn_disagreement:.2f}</td>"
            f"<td>{x.centroid_distance:.4f}</td><td>{x.uncertainty:.4g}</td></tr>")
    return ('<h2 id="suspicious">Training images whose label is most likely wrong</h2>'
            '<p class="note">Ranked by the fraction of the 10 nearest training images with '
            "another label (ties: distance to the label's class centre). ||u||² is shown "
            "beside it but does not rank: it sees the image, not the label (BENCHMARKS.md)."
            "</p><table><tr><th>rank</th><th>image</th><th>file</th><th>label</th>"
            "<th>kNN disagreement</th><th>centroid distance</th><th>||u||²</th></tr>"
            f"{''.join(rows)}</table>")


def examples_section(data: ReportData, q_uris: dict[int, str], r_uris: dict[int, str]) -> str:
    """Queries with their top results, each marked right (same label) or wrong."""
    rows = []
    where = "test images (leave-one-out)" if data.leave_one_out else "gallery"
    for ex in data.examples:
        figs = [
            f'<figure class="query" data-index="{ex.query}" data-label="{ex.query_label}">'
            f'{_img(q_uris[ex.query], f"query {ex.query}, label {ex.query_label}")}'
            f"<figcaption>query #{ex.query}<br>label {ex.query_label}<br>"
            f"||u||² {ex.score:.4g}</figcaption></figure>"
        ]
        for rank, (j, lab, sim, ok) in enumerate(
            zip(ex.neighbours, ex.labels, ex.similarities, ex.right, strict=True), 1
        ):
            mark = "right" if ok else "wrong"
            symbol = "✓" if ok else "✗"
            figs.append(
                f'<figure class="result {mark}" data-rank="{rank}" data-index="{j}" '
                f'data-label="{lab}" data-right="{int(ok)}">'
                f'{_img(r_uris[j], f"result {rank}: image {j}, label {lab}, {mark}")}'
                f'<figcaption><span class="mark">{symbol} {mark}</span><br>#{j} label {lab}'
                f"<br>cos {sim:.3f}</figcaption></figure>"
            )
        rows.append(f'<div class="example" data-query="{ex.query}">{"".join(figs)}</div>')
    return (f'<p class="note">Queries ordered most uncertain first: up to half are failures '
            f"(nearest neighbour of another label), the rest spread evenly over the "
            f"uncertainty ranking; results are the nearest {_e(where)} by cosine similarity of "
            f"the semantic embedding.</p>{''.join(rows)}")


def build_html(data: ReportData, figures: dict[str, str | None]) -> str:
    """The whole report as one HTML document (every resource inline)."""
    cfg = data.config
    title = f"idml report: {data.run_dir.name}"
    q_uris, r_uris = _thumb_uris(data)
    n = len(data.scores)
    acc = float(data.correct.mean()) if n else float("nan")
    summary = (f"{cfg.get('dataset')} / {cfg.get('backbone')} / {cfg.get('metric')} metric / "
               f"{cfg.get('loss')} loss / uncertainty design {cfg.get('design')}, "
               f"{cfg.get('epochs')} epoch(s), seed {cfg.get('seed')}")
    training = (_img(figures["training"], "training curves", "plot")
                if figures.get("training") else '<p class="note">no epochs recorded</p>')
    config_yaml = yaml.safe_dump(cfg, sort_keys=False)
    overlap = "" if data.overlap is None else (
        f'<br><span id="overlap">{data.overlap} test image(s) identical to a training image'
        "</span>")
    body = f"""
<h1>{_e(title)}</h1>
<p>{_e(summary)}<br><span class="note">run folder {_e(data.run_dir)}{overlap}</span></p>
<h2 id="metrics">Test metrics</h2>
{metrics_table(data.metrics)}
<h2 id="training">Training</h2>
{training}
<h2 id="risk-coverage">Risk-coverage</h2>
<p class="note">{n} test queries ranked by confidence; recomputed from the checkpoint:
Recall@1 of all queries {_e(_pct(acc))} %. Lower curves and AURC are better.</p>
{_img(figures["risk_coverage"], "risk-coverage curves", "plot")}
{uncertainty_table(data.metrics.get("uncertainty") or {})}
<h2 id="uncertainty">Uncertainty of the test images</h2>
{_img(figures["histogram"], "histogram of the uncertainty", "plot")}
{thumbnails_section(data, q_uris)}
<h2 id="examples">Retrieval examples</h2>
{examples_section(data, q_uris, r_uris)}
{suspects_section(data)}
<h2 id="config">Configuration</h2>
<details><summary>config.yaml</summary><pre>{_e(config_yaml)}</pre></details>
"""
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="generator" content="{GENERATOR}">
<meta http-equiv="Content-Security-Policy" content="{_CSP}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{_e(title)}</title>
<style>{_CSS}</style>
</head>
<body>
{body}
<script>{_SCRIPT}</script>
</body>
</html>
"""


#: The marker of a report page (what ``idml report`` may replace without ``--overwrite``).
GENERATOR = "idml report"


def is_report_file(path: str | Path) -> bool:
    """Whether ``path`` is a report page written by :func:`write_report`."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(4096)
    except OSError:
        return False
    return f'<meta name="generator" content="{GENERATOR}">'.encode() in head


def write_report(
    run_dir: str | Path,
    out: str | Path | None = None,
    *,
    device: str = "cpu",
    examples: int = 8,
    suspicious: int = 0,
) -> Path:
    """Write the HTML report of ``run_dir`` to ``out`` (default ``RUN_DIR/report.html``);
    ``suspicious`` > 0 lists that many training images whose label is most likely wrong."""
    data = collect_report_data(run_dir, device=device, examples=examples,
                               suspicious=suspicious)
    page = build_html(data, render_figures(data))
    path = Path(out) if out is not None else data.run_dir / "report.html"
    if path.is_dir():
        raise ReportError(f"cannot write {path}: it is a folder; give a file name")
    atomic_write_text(path, page)
    return path
