"""Duplicate images: the same file, or the same bytes, listed twice.

Leave-one-out retrieval counts an image's copy as a perfect neighbour, so a duplicate within a
split silently inflates recall (a CSV listing an image twice took recall@1 from 0.58 to 1.0 on
a small set). Within a split a duplicate is an error naming both entries, unless allowed: then
the first of each group is kept and the rest counted. Across train and test, identical images
are counted and reported (they leak, but do not change the test protocol).

Hand-written: grouping by ``(device, inode)`` and then by size before hashing keeps the cost at
one ``stat`` per image plus a hash of only the files whose size another file shares; no library
does exactly this check on a list of paths.
"""

from __future__ import annotations

import hashlib
import os
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path

from idml.data.records import DatasetError, Records


def _digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def content_keys(paths: Sequence[Path]) -> list[tuple]:
    """A key per path, equal exactly for the same file (any name or link) or the same bytes."""
    stats = [os.stat(p) for p in paths]
    by_size: dict[int, list[int]] = defaultdict(list)
    for i, st in enumerate(stats):
        by_size[st.st_size].append(i)
    keys: list[tuple] = [("file", st.st_dev, st.st_ino) for st in stats]
    for members in by_size.values():
        files = {keys[i] for i in members}
        if len(files) > 1:  # several files of one size: compare their bytes
            hashes: dict[tuple, str] = {}
            for i in members:
                if keys[i] not in hashes:
                    hashes[keys[i]] = _digest(paths[i])
            for i in members:
                keys[i] = ("bytes", stats[i].st_size, hashes[keys[i]])
    return keys


def _groups(keys: Sequence[tuple]) -> list[list[int]]:
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, key in enumerate(keys):
        groups[key].append(i)
    return sorted((g for g in groups.values() if len(g) > 1), key=lambda g: g[0])


def duplicate_groups(paths: Sequence[Path]) -> list[list[int]]:
    """Indices of the paths that are the same file or hold the same bytes (groups of two or
    more, each in list order, groups ordered by their first member)."""
    return _groups(content_keys(paths))


def split_keys(parts: dict[str, Records]) -> dict[str, list[tuple]]:
    """:func:`content_keys` of every split, computed once over all of them (so a key means
    the same content in every split)."""
    keys = content_keys([p for records in parts.values() for p in records.paths])
    out, start = {}, 0
    for part, records in parts.items():
        out[part], start = keys[start:start + len(records)], start + len(records)
    return out


def drop_duplicates(records: Records, part: str, where: str, allow: bool,
                    log: Callable[[str], None], keys: Sequence[tuple] | None = None
                    ) -> Records:
    """``records`` without duplicates: an error naming the first pair, or with ``allow`` the
    first of each group kept and the number dropped logged. ``keys``: the records'
    :func:`content_keys`, if already computed."""
    groups = _groups(content_keys(records.paths) if keys is None else keys)
    if not groups:
        return records
    extra = sum(len(g) - 1 for g in groups)
    if not allow:
        a, b = records.paths[groups[0][0]], records.paths[groups[0][1]]
        how = "the same file" if os.path.samefile(a, b) else "identical bytes"
        raise DatasetError(
            f"the {part} split of {where} holds the same image twice: {a} and {b} ({how}); "
            f"{extra} duplicate(s) in {len(groups)} group(s). A duplicate inflates "
            "leave-one-out recall: remove them, or keep the first of each with "
            "--allow-duplicates (allow_duplicates: true in a YAML config)")
    drop = {i for g in groups for i in g[1:]}
    log(f"dropped {extra} duplicate image(s) of the {part} split ({len(groups)} group(s) "
        f"of identical images; the first of each kept)")
    keep = [i for i in range(len(records)) if i not in drop]
    return Records([records.paths[i] for i in keep], [records.labels[i] for i in keep])


def shared_images(train: Sequence[Path | str], test: Sequence[Path | str]) -> int:
    """How many test images are identical to a training image (same file or bytes)."""
    keys = content_keys([*train, *test])
    seen = set(keys[:len(train)])
    return sum(k in seen for k in keys[len(train):])
