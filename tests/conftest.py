"""Fixtures shared by several test files: a headless Chromium, and the digits default's run
embedded and indexed as a user would (``idml train``, ``idml embed``, ``idml index``)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from idml.cli import main

#: Set by .ci/run: the browser tests must run there, so a missing Chromium fails them.
REQUIRE_BROWSER = os.environ.get("IDML_REQUIRE_BROWSER") == "1"


@pytest.fixture(scope="session")
def chromium() -> str:
    """Path of a Chromium binary; skips without one, fails under CI (IDML_REQUIRE_BROWSER=1)."""
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    message = "no chromium binary on PATH (apt-get install chromium; .ci/run installs it)"
    if REQUIRE_BROWSER:
        pytest.fail(message + "; IDML_REQUIRE_BROWSER=1 says the browser tests must run")
    pytest.skip(message)


#: Chromium flags for a closed network: no background connections, throwaway profile.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="session")
def digits_served(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """``(index folder, checkpoint)``: the digits default trained, its test split embedded and
    indexed (exact, with thumbnails) through the command line."""
    root = tmp_path_factory.mktemp("digits-served")
    run, emb, index = root / "run", root / "test.npz", root / "index"
    assert main(["train", "--no-progress", "--device", "cpu", "--out", str(run)]) == 0
    ckpt = run / "checkpoint.pt"
    assert main(["embed", str(ckpt), "--split", "test", "--out", str(emb), "--device",
                 "cpu"]) == 0
    assert main(["index", str(emb), "--out", str(index)]) == 0
    return index, ckpt
