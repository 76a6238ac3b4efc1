"""``idml data check``: what a data set holds before anyone trains on it: images and classes per
split, unreadable files, exact duplicates within and across splits, and near-duplicates by a
perceptual hash (reported only: two photos of one scene may be legitimate)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from idml.data.duplicates import duplicate_groups, shared_images
from idml.data.images import validate_images
from idml.data.records import Records
from idml.data.registry import read_dataset, resolve_root

#: Near-duplicate threshold: at most this many of the 64 bits of the difference hash differ.
NEAR_BITS = 4


def difference_hash(path: Path) -> int:
    """The 64-bit difference hash (dHash) of an image: grey, 9 x 8 pixels, one bit per
    horizontal neighbour pair (brighter on the left). Near-identical images (re-encoded,
    resized, slightly recoloured) differ in a few bits.

    Hand-written: ten lines of PIL and numpy; the ``imagehash`` package would add PyWavelets
    for this one function.
    """
    with Image.open(path) as img:
        grey = np.asarray(img.convert("L").resize((9, 8), Image.Resampling.LANCZOS),
                          dtype=np.int16)
    bits = (grey[:, :-1] > grey[:, 1:]).ravel()
    return int(np.packbits(bits).view(">u8")[0])


def near_duplicates(hashes: Sequence[int], max_bits: int = NEAR_BITS
                    ) -> list[tuple[int, int, int]]:
    """Pairs ``(i, j, bits)`` of hashes at most ``max_bits`` apart (exact ones included).

    Pigeonhole banding: split the 64 bits into ``max_bits + 1`` bands; two hashes within
    ``max_bits`` agree exactly on at least one band, so only pairs sharing a band value are
    compared, not all N^2.
    """
    bands = max_bits + 1
    edges = [64 * k // bands for k in range(bands + 1)]
    found: dict[tuple[int, int], int] = {}
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        buckets: dict[int, list[int]] = defaultdict(list)
        mask = (1 << (hi - lo)) - 1
        for i, h in enumerate(hashes):
            buckets[(h >> lo) & mask].append(i)
        for members in buckets.values():
            for a, i in enumerate(members):
                for j in members[a + 1:]:
                    if (i, j) not in found:
                        bits = (hashes[i] ^ hashes[j]).bit_count()
                        if bits <= max_bits:
                            found[(i, j)] = bits
    return sorted((i, j, b) for (i, j), b in found.items())


@dataclass
class SplitCheck:
    """One split's numbers."""

    images: int
    classes: int
    unreadable: list[tuple[str, str]] = field(default_factory=list)
    duplicates: list[list[str]] = field(default_factory=list)  # groups of identical images
    near: list[tuple[str, str, int]] = field(default_factory=list)  # pairs, bits apart


def _check_split(records: Records, max_bits: int) -> SplitCheck:
    good, bad = validate_images(records, skip_bad=True)
    paths = good.paths
    groups = duplicate_groups(paths)
    identical = {(a, b) for g in groups for a in g for b in g if a < b}  # reported as such
    near = [(str(paths[i]), str(paths[j]), b)
            for i, j, b in near_duplicates([difference_hash(p) for p in paths], max_bits)
            if (i, j) not in identical]
    return SplitCheck(len(records), len(records.classes), [(str(p), r) for p, r in bad],
                      [[str(paths[i]) for i in g] for g in groups], near)


def check_dataset(name: str, data_root: str | None = None, csv: str | None = None,
                  max_bits: int = NEAR_BITS) -> tuple[dict[str, SplitCheck], int]:
    """Every split's :class:`SplitCheck`, and how many test images equal a training image."""
    root, csv = resolve_root(name, data_root, csv)
    parts = read_dataset(name, root, csv=csv).parts()
    checks = {part: _check_split(records, max_bits) for part, records in parts.items()}
    shared = shared_images(parts["train"].paths, parts["test"].paths) if "test" in parts else 0
    return checks, shared


def format_check(checks: dict[str, SplitCheck], shared: int, max_bits: int = NEAR_BITS,
                 show: int = 10) -> str:
    """The check as text: a table, then the first ``show`` findings of each kind."""
    lines = [f"{'split':<8} {'images':>7} {'classes':>7} {'unreadable':>10} "
             f"{'duplicates':>10} {'near-duplicates':>15}"]
    for part, c in checks.items():
        extra = sum(len(g) - 1 for g in c.duplicates)
        lines.append(f"{part:<8} {c.images:>7} {c.classes:>7} {len(c.unreadable):>10} "
                     f"{extra:>10} {len(c.near):>15}")
    lines.append(f"test images identical to a training image: {shared}")
    lines.append(f"near-duplicate: difference hashes at most {max_bits} of 64 bits apart "
                 "(reported, not removed)")
    for part, c in checks.items():
        lines += [f"{part}: unreadable {p} ({why})" for p, why in c.unreadable[:show]]
        lines += [f"{part}: identical {' = '.join(g)}" for g in c.duplicates[:show]]
        lines += [f"{part}: near ({b} bits) {a} ~ {b_}" for a, b_, b in c.near[:show]]
    return "\n".join(lines)
