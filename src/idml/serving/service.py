"""The retrieval service behind ``idml serve``, free of any web framework.

:class:`SearchService` holds an index and the model that built it (checked at start-up, as
``idml search`` does), and answers in plain dicts: a search by uploaded image or by indexed
item, an item's metadata and thumbnail, what is served. Every refusal is a
:class:`RequestError` carrying the HTTP status to answer with. Per-request search widths go
to faiss as parameters of the call (:func:`idml.serving.search.search_parameters`), so the
shared index is only read, never changed, by a request.

The query's confidence is its uncertainty ``||u||^2`` placed in the distribution of the
indexed items' own ``||u||^2``: its percentile, and a low-confidence flag above the
``low_confidence_quantile`` of that distribution (stated by :meth:`SearchService.info`).
"""

from __future__ import annotations

import io
import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from idml import __version__
from idml.core.errors import IdmlError
from idml.data.images import to_storage_mode
from idml.serving.embedder import Embedder
from idml.serving.index import RetrievalIndex
from idml.serving.search import RERANKS, Hit, check_compatible, search
from idml.serving.thumbnails import file_thumbnail

#: The confidence the service reports, in words.
CONFIDENCE_NAME = "uncertainty ||u||^2"


@dataclass(frozen=True)
class ServeLimits:
    """What a request may ask for and how much work the server takes on at once."""

    max_upload_bytes: int = 16 * 2**20  #: request bodies larger than this get 413
    max_pixels: int = 40_000_000  #: images with more pixels get 413 (checked before decoding)
    max_k: int = 100  #: largest ``k``
    max_shortlist: int = 1000  #: largest re-ranking shortlist
    max_ef_search: int = 4096  #: largest HNSW beam width a request may ask for
    timeout_s: float = 30.0  #: a search that takes longer gets 503
    forward_workers: int = 1  #: model forwards running at once
    max_pending: int = 64  #: searches waiting or running at once; more get 503
    low_confidence_quantile: float = 0.9  #: ``||u||^2`` above this quantile of the index: low

    def __post_init__(self) -> None:
        for name in ("max_upload_bytes", "max_pixels", "max_k", "max_shortlist",
                     "max_ef_search", "forward_workers", "max_pending"):
            if getattr(self, name) < 1:
                raise IdmlError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not (self.timeout_s > 0 and math.isfinite(self.timeout_s)):
            raise IdmlError(f"timeout_s must be a positive number, got {self.timeout_s}")
        if not 0.0 < self.low_confidence_quantile < 1.0:
            raise IdmlError("low_confidence_quantile must be in (0, 1), got "
                            f"{self.low_confidence_quantile}")


class RequestError(IdmlError):
    """A request the service refuses; ``status`` is the HTTP status code to answer with and
    ``field`` the request field at fault, where one is."""

    def __init__(self, status: int, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status, self.field = status, field


def decode_image(data: bytes, max_pixels: int) -> Image.Image:
    """An uploaded file as a decoded PIL image (8-bit grey or RGB).

    The pixel count is read from the header and refused (413) before any pixel is decoded;
    what PIL cannot identify or decode is refused with 415.
    """
    if not data:
        raise RequestError(400, "the uploaded file is empty")
    try:
        img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise RequestError(413, f"image too large: {exc}") from exc
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise RequestError(415, "the upload is not an image this server can read (JPEG, PNG, "
                                "WebP, GIF, BMP, TIFF)") from exc
    width, height = img.size
    if width * height > max_pixels:
        raise RequestError(413, f"image has {width}x{height} = {width * height} pixels; this "
                                f"server takes at most {max_pixels}")
    try:
        img.load()
        return to_storage_mode(img)
    except Exception as exc:  # PIL raises many types for truncated or corrupt data
        raise RequestError(415, f"the image cannot be decoded ({type(exc).__name__}: "
                                f"{exc})") from exc


class SearchService:
    """An index and the model that built it, answering the service's requests.

    ``show_paths``: include the items' file paths and the checkpoint path in answers (only
    for a server bound to the local machine: they are paths of the server's disk).
    """

    def __init__(self, index: RetrievalIndex, embedder: Embedder,
                 limits: ServeLimits | None = None, *, show_paths: bool = False) -> None:
        check_compatible(index, embedder.fingerprint, embedder.semantic_dim,
                         embedder.uncertainty_dim, model=f"checkpoint {embedder.checkpoint}")
        self.index, self.embedder = index, embedder
        self.limits = limits or ServeLimits()
        self.show_paths = show_paths
        self.scores = embedder.uncertainty_score(index.uncertainty).astype(np.float64)
        self._sorted = np.sort(self.scores)
        self.threshold = float(np.quantile(self.scores, self.limits.low_confidence_quantile))

    # -- what is served -----------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        """The model, the index and the confidence rule in use."""
        cfg, index = self.embedder.config, self.index
        return {
            "idml_version": __version__,
            "model": {"fingerprint": self.embedder.fingerprint, "backbone": cfg.backbone,
                      "dataset": cfg.dataset, "design": cfg.design,
                      "semantic_dim": self.embedder.semantic_dim,
                      "uncertainty_dim": self.embedder.uncertainty_dim,
                      **({"checkpoint": self.embedder.checkpoint} if self.show_paths else {})},
            "index": {"kind": index.kind, "size": len(index), "params": index.params,
                      "thumbnails": index.thumbnails is not None,
                      "classes": len(index.meta.get("class_names") or [])},
            "confidence": {
                "name": CONFIDENCE_NAME, "design": cfg.design,
                "meaning": "larger = less sure; percentile = share of indexed items that are "
                           "at least as sure",
                "low_confidence_quantile": self.limits.low_confidence_quantile,
                "low_confidence_threshold": self.threshold,
            },
            "limits": asdict(self.limits),
            "reranks": ["none", *RERANKS],
        }

    def confidence(self, score: float) -> dict[str, Any]:
        """A query's ``||u||^2`` against the index's distribution."""
        below = np.searchsorted(self._sorted, score, side="right")
        return {"name": CONFIDENCE_NAME, "uncertainty": float(score),
                "percentile": float(100.0 * below / len(self._sorted)),
                "threshold": self.threshold, "low_confidence": bool(score > self.threshold)}

    def _check_id(self, item: int) -> int:
        if not 0 <= item < len(self.index):
            raise RequestError(404, f"no item {item}: this index holds ids 0 to "
                                    f"{len(self.index) - 1}")
        return item

    def _describe(self, i: int) -> dict[str, Any]:
        """Item ``i``'s id, label, thumbnail URL (and path, where paths are shown)."""
        label = int(self.index.labels[i])
        # without stored thumbnails, the image file is read when its thumbnail is asked for
        has_thumb = self.index.thumbnails is None or self.index.thumbnails.has(i)
        return {"id": i, "label": label, "label_name": self.index.label_name(label),
                "thumbnail": f"/items/{i}/thumbnail" if has_thumb else None,
                **({"path": self.index.paths[i]} if self.show_paths else {})}

    def item(self, item: int) -> dict[str, Any]:
        """An indexed item's metadata (label, uncertainty, confidence, thumbnail URL)."""
        i = self._check_id(item)
        return {**self._describe(i), "confidence": self.confidence(self.scores[i])}

    def items(self, start: int, count: int) -> dict[str, Any]:
        """Metadata of items ``start`` to ``start + count - 1`` (for browsing the index)."""
        if start < 0 or count < 1:
            raise RequestError(422, f"start must be >= 0 and count >= 1, got {start} and {count}",
                               "start" if start < 0 else "count")
        ids = range(min(start, len(self.index)), min(start + count, len(self.index)))
        return {"total": len(self.index), "items": [self.item(i) for i in ids]}

    def thumbnail(self, item: int) -> tuple[bytes, str]:
        """An item's thumbnail bytes and MIME type: made when the index was built, or for an
        index built without them, now from the image at the item's indexed path (recorded
        absolute at embed time; never a path from the request)."""
        i = self._check_id(item)
        stored = self.index.thumbnails
        found = file_thumbnail(self.index.paths[i]) if stored is None else stored.get(i)
        if found is None:
            when = "now" if stored is None else "when the index was built"
            raise RequestError(404, f"item {i} has no thumbnail: its image could not be read "
                                    f"{when}")
        return found

    # -- searching ----------------------------------------------------------------------------

    def embed(self, image: Image.Image) -> tuple[np.ndarray, np.ndarray]:
        """One image through the model: semantic ``[1, D]`` and uncertainty ``[1, Du]``."""
        batch = self.embedder.preprocess(image).unsqueeze(0)
        return tuple(self.embedder.embed(batch))  # type: ignore[return-value]

    def check_params(self, k: int, rerank: str, shortlist: int,
                     ef_search: int | None = None) -> None:
        """Refuse (422) search parameters out of range, naming the field."""
        lim = self.limits
        if ef_search is not None and not 1 <= ef_search <= lim.max_ef_search:
            raise RequestError(422, f"ef_search must be in [1, {lim.max_ef_search}], got "
                                    f"{ef_search}", "ef_search")
        if not 1 <= k <= lim.max_k:
            raise RequestError(422, f"k must be in [1, {lim.max_k}], got {k}", "k")
        if rerank not in ("none", *RERANKS):
            raise RequestError(422, f"rerank must be one of none, {', '.join(RERANKS)}; "
                                    f"got {rerank!r}", "rerank")
        if not 1 <= shortlist <= lim.max_shortlist:
            raise RequestError(422, f"shortlist must be in [1, {lim.max_shortlist}], got "
                                    f"{shortlist}", "shortlist")

    def search(self, semantic: np.ndarray, uncertainty: np.ndarray, *, k: int = 10,
               rerank: str = "none", shortlist: int = 100, nprobe: int | None = None,
               ef_search: int | None = None, exclude: int = -1) -> dict[str, Any]:
        """The ``k`` nearest indexed items of one embedded query, with its confidence.

        ``exclude``: an item left out of the results (the query itself, when it is indexed).
        """
        self.check_params(k, rerank, shortlist, ef_search)
        try:
            result = search(self.index, semantic, uncertainty, k,
                            rerank=None if rerank == "none" else rerank, shortlist=shortlist,
                            ism=self.embedder.ism, exclude=[exclude], nprobe=nprobe,
                            ef_search=ef_search)
        except IdmlError as exc:  # nprobe / ef_search out of range or for another kind
            raise RequestError(422, str(exc), "nprobe" if nprobe is not None else "ef_search") \
                from exc
        query = result.queries[0]
        return {"confidence": self.confidence(query.uncertainty),
                "semantic_gap": query.semantic_gap, "k": k, "rerank": rerank,
                "shortlist": shortlist if rerank != "none" else None,
                "hits": [self._hit(h) for h in query.hits]}

    def search_item(self, item: int, **params: Any) -> dict[str, Any]:
        """:meth:`search` with an indexed item as the query, left out of its own results."""
        i = self._check_id(item)
        return {"query": {"id": i}, **self.search(
            self.index.semantic[i : i + 1], self.index.uncertainty[i : i + 1], exclude=i,
            **params)}

    def _hit(self, hit: Hit) -> dict[str, Any]:
        return {"rank": hit.rank, **self._describe(hit.id), "cosine": hit.cosine,
                "distance": hit.distance,
                "introspective": hit.introspective,
                "introspective_distance": hit.introspective_distance,
                "uncertainty": float(self.scores[hit.id])}
