"""Guards of the package's layering: serving never needs training or pytorch-metric-learning,
and no module imports a layer above its own."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from idml.core.checkpoint import save_checkpoint
from idml.core.config import RunConfig, as_dict
from idml.method.model import create_model

SRC = Path(__file__).resolve().parents[1] / "src" / "idml"
#: Which subpackages each subpackage may import (besides itself); cli may import all.
ALLOWED = {
    "core": set(),
    "method": {"core"},
    "data": {"core"},
    "evaluation": {"core", "method", "data"},
    "training": {"core", "method", "data", "evaluation"},
    "serving": {"core", "method", "data", "evaluation"},
}

SERVE = """
import sys
import idml
from idml.data.sources import folder_source
from idml.serving.embedder import embed_source
from idml.serving.index import build_index
from idml.serving.search import search_images
embedder = idml.load(sys.argv[1], device="cpu")
index = build_index(embed_source(embedder, folder_source(sys.argv[2])), "exact")
result = search_images(index, embedder, [sys.argv[3]], k=2, rerank="introspective")
assert len(result.queries[0].hits) == 2
from idml.serving.app import create_app
from idml.serving.service import SearchService
create_app(SearchService(index, embedder))
loaded = sorted(m for m in sys.modules
                if m.startswith(("idml.training", "pytorch_metric_learning")))
print("LOADED", loaded)
"""


def _digits_checkpoint(path: Path) -> Path:
    torch.manual_seed(0)
    model = create_model("digits_cnn", embedding_dim=8, in_chans=1)
    cfg = RunConfig(embedding_dim=8)
    save_checkpoint(path, {"config": as_dict(cfg), "model": model.state_dict(), "loss": {}})
    return path


def test_load_embed_search_import_neither_training_nor_pml(tmp_path):
    ckpt = _digits_checkpoint(tmp_path / "checkpoint.pt")
    rng = np.random.default_rng(0)
    for label in ("a", "b"):
        (tmp_path / "gallery" / label).mkdir(parents=True)
        for i in range(3):
            pixels = rng.integers(0, 256, (8, 8), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "gallery" / label / f"{i}.png")
    query = tmp_path / "gallery" / "a" / "0.png"
    out = subprocess.run([sys.executable, "-c", SERVE, str(ckpt), str(tmp_path / "gallery"),
                          str(query)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "LOADED []" in out.stdout, out.stdout


def _imported_layers(path: Path) -> set[str]:
    layers = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "idml" and len(parts) > 1 and parts[1] in ALLOWED:
                layers.add(parts[1])
    return layers


def test_no_module_imports_a_layer_above_its_own():
    wrong = []
    for layer, allowed in ALLOWED.items():
        for path in sorted((SRC / layer).glob("*.py")):
            above = _imported_layers(path) - allowed - {layer}
            if above:
                wrong.append(f"{path.relative_to(SRC)} imports {sorted(above)}")
    assert wrong == []
