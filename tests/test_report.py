"""HTML report: content checked against independent computations, and a headless browser."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import CHROMIUM_FLAGS
from PIL import Image

from idml import cli
from idml.data.images import CachedImageDataset, DecodedCache, ImageDataset
from idml.data.records import Records
from idml.data.splits import LabeledTensors
from idml.method.backbones import DIGITS_SPEC
from idml.method.model import create_model
from idml.serving.report import TOP_K, _thumbnail, pick_examples

EXAMPLES = 4


class Elements(HTMLParser):
    """Every start tag as ``(tag, attrs)``, in document order."""

    def __init__(self) -> None:
        super().__init__()
        self.items: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.items.append((tag, dict(attrs)))

    def find(self, tag: str, **attrs: str) -> list[dict[str, str | None]]:
        """Attributes of every ``tag`` whose attributes include ``attrs`` (``class_`` = class
        contains the word)."""
        want_class = attrs.pop("class_", None)
        out = []
        for t, a in self.items:
            if t != tag or any(a.get(k.replace("_", "-")) != v for k, v in attrs.items()):
                continue
            if want_class is not None and want_class not in (a.get("class") or "").split():
                continue
            out.append(a)
        return out


def parse(page: str) -> Elements:
    parser = Elements()
    parser.feed(page)
    return parser


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("report") / "run"
    assert cli.main(["train", "--epochs", "1", "--out", str(out), "--no-progress"]) == 0
    return out


@pytest.fixture(scope="module")
def report(run_dir: Path) -> Path:
    out = run_dir.parent / "report.html"
    assert cli.main(["report", str(run_dir), "--out", str(out),
                     "--examples", str(EXAMPLES)]) == 0
    return out


@pytest.fixture(scope="module")
def page(report: Path) -> str:
    return report.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def independent(run_dir: Path) -> dict[str, np.ndarray]:
    """Test embeddings of the run, recomputed here without idml's training/report code."""
    from sklearn.datasets import load_digits

    ckpt = torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=True)
    cfg = ckpt["config"]
    model = create_model("digits_cnn", embedding_dim=cfg["embedding_dim"],
                         uncertainty_dim=cfg["uncertainty_dim"], pretrained="none",
                         freeze_bn=cfg["freeze_bn"], in_chans=1, design=cfg["design"])
    model.load_state_dict(ckpt["model"])
    model.eval()
    bunch = load_digits()
    test = bunch.target >= 5
    raw = np.asarray(bunch.images[test], dtype=np.float32)
    x = (torch.from_numpy(raw / 16.0).unsqueeze(1) - DIGITS_SPEC["mean"][0]) \
        / DIGITS_SPEC["std"][0]
    with torch.no_grad():
        s, u = model(x)
    sem = F.normalize(s, dim=1)
    sims = sem @ sem.T
    sims.fill_diagonal_(-float("inf"))
    return {
        "labels": bunch.target[test],
        "raw": raw,
        "scores": u.pow(2).sum(1).numpy().astype(np.float64),
        "sims": sims.numpy(),
    }


def test_metrics_table_equals_metrics_json(run_dir: Path, page: str) -> None:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    cells = parse(page).find("td", class_="num")
    table = {(c["data-column"], c["data-metric"]): c["data-value"]
             for c in cells if c.get("data-metric")}
    expected = {(col, name): value for col in ("initial", "final")
                for name, value in metrics[col].items()}
    assert set(table) == set(expected)
    for key, value in expected.items():
        assert float(table[key]) == value, key  # exact: repr round-trips a float
        assert f">{100 * value:.2f}</td>" in page
    rows = {(c["data-row"], c["data-key"]): c["data-value"] for c in cells if c.get("data-row")}
    recorded = metrics["uncertainty"]["risk_coverage"]
    assert set(rows) == {(r, k) for r, row in recorded.items() for k in row}
    for (row, key), value in rows.items():
        want = recorded[row][key]
        assert (value == "null") if want is None else float(value) == want
    # the recomputed Recall@1 over all queries agrees with the recorded final metric
    assert f"Recall@1 of all queries {100 * metrics['final']['recall@1']:.2f} %" in page


def test_thumbnails_are_the_most_and_least_uncertain(page: str, independent: dict) -> None:
    doc = parse(page)
    scores, labels = independent["scores"], independent["labels"]
    order = np.argsort(-scores)
    most = doc.find("figure", data_kind="most")
    least = doc.find("figure", data_kind="least")
    assert len(most) == EXAMPLES and len(least) == EXAMPLES
    assert [int(f["data-index"]) for f in most] == order[:EXAMPLES].tolist()
    assert [int(f["data-index"]) for f in least] == order[::-1][:EXAMPLES].tolist()
    for f in most + least:
        i = int(f["data-index"])
        assert int(f["data-label"]) == labels[i]
        assert float(f["data-score"]) == pytest.approx(scores[i], rel=1e-4)


def test_retrieval_examples_marks_match_labels(page: str, independent: dict) -> None:
    doc = parse(page)
    labels, sims = independent["labels"], independent["sims"]
    examples = doc.find("div", class_="example")
    queries = doc.find("figure", class_="query")
    results = doc.find("figure", class_="result")
    assert len(examples) == EXAMPLES == len(queries)
    assert len(results) == EXAMPLES * TOP_K
    nearest_wrong = labels[sims.argmax(1)] != labels
    shown_failures = 0
    for n, q in enumerate(queries):
        qi = int(q["data-index"])
        assert int(examples[n]["data-query"]) == qi
        assert int(q["data-label"]) == labels[qi]
        top = np.argsort(-sims[qi], kind="stable")[:TOP_K]
        row = results[n * TOP_K:(n + 1) * TOP_K]
        assert [int(r["data-rank"]) for r in row] == list(range(1, TOP_K + 1))
        got = [int(r["data-index"]) for r in row]
        # same neighbours up to float ties: compare their similarities
        np.testing.assert_allclose(sims[qi, got], sims[qi, top], atol=1e-5)
        for r in row:
            j = int(r["data-index"])
            assert j != qi
            assert int(r["data-label"]) == labels[j]
            right = labels[j] == labels[qi]
            assert r["data-right"] == str(int(right))
            assert ("right" if right else "wrong") in r["class"].split()
        shown_failures += bool(nearest_wrong[qi])
    # failures come first in the selection (up to half of the examples)
    assert shown_failures == min(int(nearest_wrong.sum()), EXAMPLES // 2)


def test_self_contained(page: str) -> None:
    doc = parse(page)
    images = doc.find("img")
    assert len(images) == 3 + 2 * EXAMPLES + EXAMPLES * (1 + TOP_K)  # plots, thumbs, examples
    for img in images:
        src = img["src"] or ""
        assert src.startswith("data:image/png;base64,")
        with Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))) as im:
            im.load()
            assert min(im.size) > 0
    assert not doc.find("link") and all("src" not in s for s in doc.find("script"))
    assert "http://" not in page and "https://" not in page
    assert "default-src 'none'" in page


def test_digit_thumbnail_shows_the_raw_pixels(independent: dict) -> None:
    raw = independent["raw"][:3]
    x = (torch.from_numpy(raw / 16.0).unsqueeze(1) - DIGITS_SPEC["mean"][0]) \
        / DIGITS_SPEC["std"][0]
    data = LabeledTensors(x, torch.zeros(3, dtype=torch.long))
    for i in range(3):
        img = _thumbnail(data, i, DIGITS_SPEC)
        assert img.mode == "L" and img.size == (64, 64)
        pixels = np.asarray(img)[::8, ::8].astype(int)
        np.testing.assert_allclose(pixels, np.round(raw[i] / 16 * 255), atol=1)


def test_file_thumbnail_shows_the_file(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    big = rng.integers(0, 256, (300, 200, 3), dtype=np.uint8)
    Image.fromarray(small).save(tmp_path / "small.png")
    Image.fromarray(big).save(tmp_path / "big.png")
    data = ImageDataset(Records([tmp_path / "small.png", tmp_path / "big.png"], [0, 1]))
    up = _thumbnail(data, 0, {})
    assert up.size == (90, 60)  # 3x nearest upscale: the long side reaches 64 px
    np.testing.assert_array_equal(np.asarray(up)[::3, ::3], small)
    down = _thumbnail(data, 1, {})
    assert max(down.size) == 112 and down.size[0] < down.size[1]
    decoded = DecodedCache.from_tensors([torch.from_numpy(small).permute(2, 0, 1)])
    cached = CachedImageDataset(decoded, [0])
    np.testing.assert_array_equal(np.asarray(_thumbnail(cached, 0, {}))[::3, ::3], small)


def test_pick_examples() -> None:
    scores = np.array([5.0, 4.0, 3.0, 2.0, 1.0, 0.5])
    correct = np.array([True, True, False, True, False, True])
    assert pick_examples(scores, correct, 4) == [0, 2, 4, 5]  # failures 2, 4 + spread 0, 5
    assert pick_examples(scores, np.ones(6, bool), 3) == [0, 2, 5]
    assert pick_examples(scores, correct, 50) == list(range(6))


def test_text_is_escaped(run_dir: Path, tmp_path: Path) -> None:
    odd = tmp_path / 'run <b>&"x'
    shutil.copytree(run_dir, odd, ignore=shutil.ignore_patterns("report.html"))
    assert cli.main(["report", str(odd), "--examples", "1"]) == 0
    page = (odd / "report.html").read_text(encoding="utf-8")
    assert "<b>" not in page
    assert "run &lt;b&gt;&amp;&quot;x" in page


def test_not_a_run_folder(run_dir: Path, tmp_path: Path,
                          capsys: pytest.CaptureFixture[str]) -> None:
    partial = tmp_path / "partial"
    shutil.copytree(run_dir, partial)
    (partial / "metrics.json").unlink()
    (partial / "history.json").unlink()
    assert cli.main(["report", str(partial)]) == 2
    err = capsys.readouterr().err
    assert "missing metrics.json, history.json" in err
    assert cli.main(["report", str(tmp_path / "nowhere")]) == 2
    assert "no such folder" in capsys.readouterr().err
    assert not (partial / "report.html").exists()


# ------------------------------------------------------------------ headless browser


def render(binary: str, path: Path, profile: Path) -> tuple[dict[str, str | None], str]:
    """Load ``path`` in headless Chromium: ``(<body> attributes after load, console lines)``."""
    cmd = [binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--enable-logging=stderr",
           "--v=0",
           "--virtual-time-budget=5000", "--dump-dom", path.resolve().as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    bodies = parse(proc.stdout).find("body")
    assert len(bodies) == 1, proc.stdout[:500]
    console = "\n".join(line for line in proc.stderr.splitlines() if "CONSOLE" in line)
    return bodies[0], console


def test_report_renders_in_chromium(chromium: str, report: Path, page: str,
                                    tmp_path: Path) -> None:
    body, console = render(chromium, report, tmp_path / "profile")
    assert body.get("data-images-total") == str(len(parse(page).find("img")))
    assert body.get("data-images-failed") == "0"
    assert console == ""


def test_browser_check_catches_broken_images_and_console_errors(
    chromium: str, page: str, tmp_path: Path
) -> None:
    good_png = parse(page).find("img")[0]["src"]
    broken = tmp_path / "broken.html"
    broken.write_text(page.replace(good_png, "data:image/png;base64,iVBORw0KGgo=", 1))
    body, console = render(chromium, broken, tmp_path / "p1")
    assert body.get("data-images-failed") == "1"
    assert console == ""  # a bad data: image is silent: only the load check sees it

    noisy = tmp_path / "noisy.html"
    noisy.write_text(page.replace("<script>", "<script>console.error('report broke');", 1))
    body, console = render(chromium, noisy, tmp_path / "p2")
    assert body.get("data-images-failed") == "0"
    assert "report broke" in console

    external = tmp_path / "external.html"  # blocked by the page's policy: no network needed
    external.write_text(page.replace("</body>", '<img src="https://example.invalid/x.png">'
                                     "</body>", 1))
    body, console = render(chromium, external, tmp_path / "p3")
    assert body.get("data-images-failed") == "1"
    assert "Content Security Policy" in console or "Refused" in console


# ------------------------------------------------------------------ image data sets

TINY = [
    "--backbone", "resnet18", "--pretrained", "none", "--image-size", "32",
    "--embedding-dim", "16", "--batch-size", "2", "--epochs", "1", "--warmup-epochs", "0",
    "--num-workers", "0", "--eval-batch-size", "8", "--no-progress",
]


def _data_uri_image(uri: str) -> np.ndarray:
    with Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))) as im:
        return np.asarray(im.convert("RGB"))


def test_report_of_a_class_folder_run_shows_the_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("IDML_CACHE", str(tmp_path / "cache"))
    rng = np.random.default_rng(0)
    files = []
    for c, name in enumerate(("001.a", "002.b", "003.c", "004.d")):
        (tmp_path / "data" / name).mkdir(parents=True)
        for k in range(3):
            path = tmp_path / "data" / name / f"img_{k}.png"
            Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(path)
            files.append((c, path))
    # a test image that is also a training image (by bytes): counted in the report
    (tmp_path / "data" / "004.d" / "copy_of_a.png").write_bytes(files[0][1].read_bytes())
    files.append((3, tmp_path / "data" / "004.d" / "copy_of_a.png"))
    out = tmp_path / "run"
    assert cli.main(["train", "--dataset", "folder", "--data-root", str(tmp_path / "data"),
                     "--out", str(out), *TINY]) == 0
    assert cli.main(["report", str(out), "--examples", "2"]) == 0
    page = (out / "report.html").read_text(encoding="utf-8")
    assert '<span id="overlap">1 test image(s) identical to a training image' in page
    assert "1 test image(s)" in (out / "train.log").read_text()
    doc = parse(page)
    sources = [np.asarray(Image.open(p).convert("RGB")) for _, p in files]
    thumbs = doc.find("figure", class_="thumb")
    assert len(thumbs) == 4
    figures = thumbs + doc.find("figure", class_="query") + doc.find("figure", class_="result")
    images = [i for i in doc.find("img") if "plot" not in (i.get("class") or "")]
    assert len(images) == len(figures) == 4 + 2 * (1 + TOP_K)
    for img in images:
        shown = _data_uri_image(img["src"])
        assert shown.shape == (60, 72, 3)  # 20x24 upscaled 3x (long side >= 64 px)
        assert any(np.array_equal(shown[::3, ::3], s) for s in sources)


def test_report_of_a_query_gallery_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from test_datasets import make_inshop

    monkeypatch.setenv("IDML_CACHE", str(tmp_path / "cache"))
    root = make_inshop(tmp_path / "inshop")
    out = tmp_path / "run"
    assert cli.main(["train", "--dataset", "inshop", "--data-root", str(root),
                     "--out", str(out), *TINY]) == 0
    assert cli.main(["report", str(out), "--examples", "3"]) == 0
    page = (out / "report.html").read_text(encoding="utf-8")
    doc = parse(page)
    assert "nearest gallery by cosine" in page
    queries = doc.find("figure", class_="query")
    results = doc.find("figure", class_="result")
    assert len(queries) == 2 and len(results) == 2 * 2  # 2 queries, gallery of 2
    for n, q in enumerate(queries):
        row = results[2 * n:2 * n + 2]
        # each query's item is in the gallery exactly once: one right, one wrong result
        assert sorted(r["data-right"] for r in row) == ["0", "1"]
        for r in row:
            assert r["data-right"] == str(int(r["data-label"] == q["data-label"]))


def test_training_plot_adds_validation_panel() -> None:
    from idml.serving.report import plot_training

    epochs = [{"epoch": e, "loss": 3.0 - e, "images_per_s": 100.0 + e} for e in (1, 2)]
    two = _data_uri_image(plot_training(epochs))
    three = _data_uri_image(plot_training(
        [{**h, "val": {"recall@1": 0.5 + h["epoch"] / 10}} for h in epochs]))
    assert three.shape[1] > two.shape[1] * 1.3  # one more panel side by side
    assert plot_training([]) is None and plot_training([{"epoch": 1}]) is None


def test_report_lists_the_suspicious_training_images(
    run_dir: Path, page: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--suspicious N``: the same N training items as ``idml suspicious``, in its order, with
    their labels and scores, each with a thumbnail; without the flag the section is absent."""
    out = tmp_path / "suspects.html"
    assert cli.main(["report", str(run_dir), "--out", str(out), "--examples", "2",
                     "--suspicious", "4"]) == 0
    html_text = out.read_text(encoding="utf-8")
    capsys.readouterr()
    assert cli.main(["suspicious", str(run_dir / "checkpoint.pt"), "--top", "4", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    rows = re.findall(r'<tr class="suspect" data-index="(\d+)" data-label="(\d+)">', html_text)
    assert [(int(i), int(lab)) for i, lab in rows] == [(x["index"], x["label"]) for x in listed]
    section = html_text[html_text.index('id="suspicious"'):]
    assert section.count("<img") == 4
    assert 'id="suspicious"' not in page
