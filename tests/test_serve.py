"""``idml serve``: the JSON API through FastAPI's test client on the digits default's run,
checked against independent NumPy computations; refusals; per-request search widths."""

from __future__ import annotations

import asyncio
import io
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from idml.cli import main
from idml.core.errors import IdmlError
from idml.serving.app import PAGE_POLICY, BodyLimit, create_app, is_loopback
from idml.serving.embedder import load
from idml.serving.index import load_index
from idml.serving.search import search
from idml.serving.service import RequestError, SearchService, ServeLimits


@pytest.fixture(scope="module")
def loaded(digits_served):
    folder, ckpt = digits_served
    return load_index(folder), load(ckpt, device="cpu")


def make_client(loaded, limits: ServeLimits | None = None, show_paths: bool = True):
    index, embedder = loaded
    service = SearchService(index, embedder, limits, show_paths=show_paths)
    return TestClient(create_app(service)), service


@pytest.fixture(scope="module")
def client(loaded):
    with make_client(loaded)[0] as c:
        yield c


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def digit_png(index: int, size: int = 64) -> bytes:
    from idml.data.digits import digit_image

    return png(digit_image(f"digits/test/{index:04d}").resize((size, size)))


def brute_force(index, semantic: np.ndarray, k: int, exclude: int = -1) -> list[int]:
    cos = index.semantic.astype(np.float64) @ semantic.astype(np.float64).ravel()
    order = [int(j) for j in np.argsort(-cos, kind="stable") if j != exclude]
    return order[:k]


def test_health_info_and_openapi(client, loaded):
    index, embedder = loaded
    assert client.get("/health").json() == {"status": "ok", "items": len(index)}
    info = client.get("/info").json()
    assert info["model"]["fingerprint"] == embedder.fingerprint == index.fingerprint
    assert info["index"] == {"kind": "exact", "size": 896, "params": {}, "thumbnails": True,
                             "classes": 10}
    u = index.uncertainty.astype(np.float64)
    expected = np.quantile((u**2).sum(1), 0.9)
    assert info["confidence"]["low_confidence_threshold"] == pytest.approx(expected, rel=1e-5)
    assert info["confidence"]["design"] == embedder.config.design
    schema = client.get("/openapi.json").json()
    assert {"/search", "/items/{item}", "/health", "/info"} <= set(schema["paths"])
    assert client.get("/docs").status_code == 404  # its page would load scripts from a CDN


def test_search_by_id_is_brute_force_without_itself(client, loaded):
    index, _ = loaded
    for item in (0, 17, 895):
        body = client.post("/search", data={"id": item, "k": 7}).json()
        assert [h["id"] for h in body["hits"]] == brute_force(index, index.semantic[item], 7,
                                                              exclude=item)
        score = float((index.uncertainty[item].astype(np.float64) ** 2).sum())
        conf = body["confidence"]
        assert conf["uncertainty"] == pytest.approx(score, rel=1e-5)
        all_scores = (index.uncertainty.astype(np.float64) ** 2).sum(1)
        share = 100.0 * (all_scores <= score + 1e-9).mean()
        assert conf["percentile"] == pytest.approx(share, abs=100.0 / len(index))
        assert conf["low_confidence"] == (score > conf["threshold"])
        for h in body["hits"]:
            assert h["cosine"] == pytest.approx(float(index.semantic[h["id"]] @
                                                      index.semantic[item]), abs=1e-5)
            assert h["label"] == int(index.labels[h["id"]])
            assert h["label_name"] == str(h["label"])
            assert h["thumbnail"] == f"/items/{h['id']}/thumbnail"


def test_the_least_sure_items_are_flagged(client, loaded):
    index, _ = loaded
    scores = (index.uncertainty.astype(np.float64) ** 2).sum(1)
    flags = [client.post("/search", data={"id": int(i), "k": 1}).json()["confidence"]
             ["low_confidence"] for i in (int(np.argmax(scores)), int(np.argmin(scores)))]
    assert flags == [True, False]


def test_rerank_orders_the_shortlist_by_the_ism(client, loaded):
    index, embedder = loaded
    body = client.post("/search", data={"id": 5, "k": 5, "rerank": "introspective",
                                        "shortlist": 50}).json()
    expected = search(index, index.semantic[5:6], index.uncertainty[5:6], 5,
                      rerank="introspective", shortlist=50, ism=embedder.ism, exclude=[5])
    assert [h["id"] for h in body["hits"]] == expected.ids()[0]
    d_in = [h["introspective_distance"] for h in body["hits"]]
    assert d_in == sorted(d_in) and body["shortlist"] == 50 and body["rerank"] == "introspective"


def test_search_by_upload_matches_embedding_the_image_directly(client, loaded):
    index, embedder = loaded
    data = digit_png(5)
    body = client.post("/search", files={"file": ("five.png", data, "image/png")},
                       data={"k": 4}).json()
    semantic, _ = embedder.embed([Image.open(io.BytesIO(data))])
    assert [h["id"] for h in body["hits"]] == brute_force(index, semantic[0], 4)
    assert body["query"] == {"upload": "five.png"}
    assert body["hits"][0]["label"] == 5


def test_items_and_thumbnails(client, loaded):
    index, _ = loaded
    item = client.get("/items/12").json()
    assert item["id"] == 12 and item["label"] == int(index.labels[12])
    assert item["path"] == "digits/test/0012"  # bound to localhost: paths are shown
    r = client.get("/items/12/thumbnail")
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    from idml.data.digits import digit_image

    thumb = np.asarray(Image.open(io.BytesIO(r.content)))
    raw = np.asarray(digit_image("digits/test/0012"))
    assert thumb.shape == (64, 64) and (thumb[::8, ::8] == raw).all()  # nearest, x8
    listing = client.get("/items", params={"start": 890, "count": 50}).json()
    assert listing["total"] == 896 and [i["id"] for i in listing["items"]] == list(range(890, 896))


@pytest.mark.parametrize("request_kw,status,says", [
    ({"files": {"file": ("x.png", b"not an image at all", "image/png")}}, 415, "not an image"),
    ({"files": {"file": ("x.png", b"", "image/png")}}, 400, "empty"),
    ({"data": {"id": 99999}}, 404, "no item 99999"),
    ({"data": {"id": -1}}, 404, "no item -1"),
    ({"data": {"id": 1, "k": 0}}, 422, "k: Input should be greater than or equal to 1"),
    ({"data": {"id": 1, "k": 101}}, 422, "k: Input should be less than or equal to 100"),
    ({"data": {"id": 1, "k": "ten"}}, 422, "k: Input should be a valid integer"),
    ({"data": {"id": 1, "rerank": "magic"}}, 422, "rerank: Input should be 'none' or"),
    ({"data": {"id": 1, "shortlist": 0}}, 422, "shortlist: Input should be greater than"),
    ({"data": {"id": 1, "ef_search": 5000}}, 422, "ef_search: Input should be less than"),
    ({"data": {"id": 1, "nprobe": 4}}, 422, "nprobe: nprobe applies to ivf indexes"),
    ({"data": {}}, 422, "body: give either an image"),
    ({"data": {"id": 1}, "files": {"file": ("x.png", b"abc", "image/png")}}, 422, "either"),
])
def test_bad_requests_get_a_clear_4xx(client, request_kw, status, says):
    r = client.post("/search", **request_kw)
    assert r.status_code == status, r.text
    detail = r.json()["detail"]
    if status == 422:  # FastAPI's validation shape, the field last in loc
        detail = "; ".join(f"{e['loc'][-1]}: {e['msg']}" for e in detail)
    assert says in detail, detail


def test_service_checks_parameters_without_the_framework(loaded):
    _, service = make_client(loaded)
    for kwargs, field in [({"k": 0}, "k"), ({"rerank": "x"}, "rerank"),
                          ({"shortlist": 10**6}, "shortlist"), ({"ef_search": 0}, "ef_search")]:
        with pytest.raises(RequestError, match=field) as exc:
            service.search_item(1, **kwargs)
        assert exc.value.status == 422 and exc.value.field == field


def test_unknown_items_are_404(client):
    assert client.get("/items/896").status_code == 404
    assert client.get("/items/896/thumbnail").status_code == 404
    assert client.get("/items/abc").status_code == 422
    assert client.get("/items", params={"count": 0}).status_code == 422
    assert client.get("/items", params={"start": -1}).status_code == 422


def test_pixel_cap_is_checked_before_decoding(loaded):
    client, _ = make_client(loaded, ServeLimits(max_pixels=1_000_000))
    huge = png(Image.new("L", (2000, 2000)))  # 4 Mpx of zeros compress to a few KB
    assert len(huge) < 50_000
    truncated = huge[: len(huge) // 2]  # decoding this would fail: the cap must come first
    for data in (huge, truncated):
        r = client.post("/search", files={"file": ("big.png", data, "image/png")})
        assert r.status_code == 413 and "2000x2000" in r.json()["detail"]
    small_broken = png(Image.new("L", (100, 100), 200))[:60]
    r = client.post("/search", files={"file": ("cut.png", small_broken, "image/png")})
    assert r.status_code == 415


def test_oversize_upload_is_413_with_or_without_content_length(loaded):
    client, _ = make_client(loaded, ServeLimits(max_upload_bytes=2000))
    r = client.post("/search", files={"file": ("a.png", b"x" * 5000, "image/png")})
    assert r.status_code == 413 and "at most 2000" in r.json()["detail"]
    assert client.post("/search", data={"id": 1, "k": 2}).status_code == 200

    async def no_length(chunks: list[bytes]) -> tuple[int, list[dict]]:
        seen: list[dict] = []
        reached: list[bool] = []

        async def app(scope, receive, send):  # what the wrapped app would see
            reached.append(True)
            body = await receive()
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": body["body"]})

        messages = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1}
                    for i, c in enumerate(chunks)]

        async def receive():
            return messages.pop(0)

        async def send(message):
            seen.append(message)

        await BodyLimit(app, 100)({"type": "http", "headers": []}, receive, send)
        return len(reached), seen

    reached, seen = asyncio.run(no_length([b"a" * 60, b"b" * 60]))
    assert reached == 0 and seen[0]["status"] == 413
    reached, seen = asyncio.run(no_length([b"a" * 40, b"b" * 40]))
    assert reached == 1 and seen[1]["body"] == b"a" * 40 + b"b" * 40


def test_paths_are_left_out_unless_bound_to_localhost(loaded):
    client, _ = make_client(loaded, show_paths=False)
    assert "path" not in client.get("/items/3").json()
    assert "checkpoint" not in client.get("/info").json()["model"]
    hits = client.post("/search", data={"id": 3, "k": 3}).json()["hits"]
    assert all("path" not in h for h in hits)
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.4")
    assert not is_loopback("example.org")


def test_page_is_self_contained(client):
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-security-policy"] == PAGE_POLICY
    assert "http://" not in r.text and "https://" not in r.text and "//" not in PAGE_POLICY


def test_a_slow_search_is_503_and_the_server_stays_bounded(loaded):
    index, embedder = loaded

    class Slow(SearchService):
        def embed(self, image):
            time.sleep(1.0)
            return super().embed(image)

    service = Slow(index, embedder, ServeLimits(timeout_s=0.4, max_pending=1))
    app = create_app(service)

    async def go():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            upload = {"file": ("d.png", digit_png(1), "image/png")}
            return await asyncio.gather(c.post("/search", files=upload),
                                        c.post("/search", files=upload))

    answers = asyncio.run(go())
    assert sorted(r.status_code for r in answers) == [503, 503]  # a timeout, a full slot
    assert all(r.headers["retry-after"] == "1" for r in answers)
    details = [r.json()["detail"] for r in asyncio.run(go())]
    assert any("longer than 0.4 s" in d for d in details)
    assert any("busy" in d for d in details)


def test_serve_refuses_an_index_of_another_model(digits_served, tmp_path, capsys):
    folder, ckpt = digits_served
    index = load_index(folder)
    index.meta["fingerprint"] = "0123456789abcdef"
    with pytest.raises(IdmlError, match="model mismatch"):
        SearchService(index, load(ckpt, device="cpu"))
    other = tmp_path / "other"
    from idml.serving.index import save_index

    save_index(index, other)
    assert main(["serve", str(other), "--checkpoint", str(ckpt), "--port", "1"]) == 2
    assert "model mismatch" in capsys.readouterr().err


def test_serve_warns_when_bound_beyond_localhost(digits_served, monkeypatch, capsys):
    folder, ckpt = digits_served
    started = {}
    monkeypatch.setattr("idml.serving.app.run",
                        lambda service, host, port: started.update(service=service, host=host))
    assert main(["serve", str(folder), "--checkpoint", str(ckpt), "--host", "0.0.0.0"]) == 0
    assert "warning: listening on 0.0.0.0" in capsys.readouterr().err
    assert started["service"].show_paths is False
    assert main(["serve", str(folder), "--checkpoint", str(ckpt)]) == 0
    assert "warning" not in capsys.readouterr().err and started["service"].show_paths is True


def test_index_without_thumbnails_reads_the_indexed_images(digits_served, tmp_path, loaded):
    folder, ckpt = digits_served
    out = tmp_path / "bare"
    emb = Path(folder).parent / "test.npz"
    assert main(["index", str(emb), "--out", str(out), "--no-thumbnails"]) == 0
    bare = load_index(out)
    assert bare.thumbnails is None and not (out / "thumbnails.npy").exists()
    client = TestClient(create_app(SearchService(bare, loaded[1])))
    assert client.get("/items/3").json()["thumbnail"] == "/items/3/thumbnail"
    r = client.get("/items/3/thumbnail")  # made now from the digit: the stored one's bytes
    assert r.status_code == 200 and r.content == loaded[0].thumbnails.get(3)[0]
    bare.paths[4] = str(tmp_path / "gone.png")  # an image that is no longer there
    r = client.get("/items/4/thumbnail")
    assert r.status_code == 404 and "could not be read now" in r.json()["detail"]
    assert "gone.png" not in r.text


def test_damaged_thumbnails_are_refused_at_load(digits_served, tmp_path):
    import shutil

    folder, _ = digits_served
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    for name in ("thumbnails.npy", "thumbnail_offsets.npy"):
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(folder, copy)
        (copy / name).write_bytes(b"garbage")
        with pytest.raises(IdmlError, match=f"{name} is damaged"):
            load_index(copy)
        (copy / name).unlink()
        with pytest.raises(IdmlError, match=f"lacks {name}"):
            load_index(copy)
    loaded = load_index(folder)
    assert isinstance(loaded.thumbnails.data, np.memmap)  # stays on disk until shown


@pytest.mark.parametrize("flags,says", [
    (["--port", "0"], "--port: must be in [1, 65535]"),
    (["--timeout", "-1"], "--timeout: must be a positive number"),
    (["--max-upload-mb", "nan"], "--max-upload-mb: must be a positive number"),
    (["--low-confidence", "1"], "--low-confidence: must be between 0 and 1"),
    (["--max-k", "0"], "--max-k: must be at least 1"),
])
def test_serve_flags_are_checked(flags, says, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["serve", "index", "--checkpoint", "c.pt", *flags])
    assert exc.value.code == 2 and says in capsys.readouterr().err


def test_serve_names_a_missing_index(tmp_path, capsys):
    assert main(["serve", str(tmp_path / "nope"), "--checkpoint", "c.pt"]) == 2
    assert "nope does not exist" in capsys.readouterr().err

_ANY = st.one_of(st.integers(-(2**70), 2**70), st.text(max_size=12), st.just(""))


@settings(max_examples=60, deadline=None)
@given(fields=st.dictionaries(st.sampled_from(["id", "k", "rerank", "shortlist", "nprobe",
                                               "ef_search"]), _ANY),
       upload=st.one_of(st.none(), st.binary(max_size=64)))
def test_no_request_gets_a_5xx(client, fields, upload):
    """Whatever the form holds (huge or negative numbers, text, random bytes as the file),
    the answer is a 2xx or a 4xx, never a server error."""
    files = None if upload is None else {"file": ("f", upload, "application/octet-stream")}
    r = client.post("/search", data={k: str(v) for k, v in fields.items()}, files=files)
    assert r.status_code in (200, 400, 404, 413, 415, 422), r.text


def test_embedded_paths_are_absolute_so_thumbnails_are_found_from_anywhere(
        digits_served, tmp_path, monkeypatch):
    _, ckpt = digits_served
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    from idml.data.digits import digit_image

    for label, first in (("a", 0), ("b", 10)):
        (work / "gallery" / label).mkdir(parents=True)
        for i in range(3):
            digit_image(f"digits/test/{first + i:04d}").save(work / "gallery" / label / f"{i}.png")
    elsewhere.mkdir()
    monkeypatch.chdir(work)
    assert main(["embed", str(ckpt), "gallery", "--out", "e.npz", "--device", "cpu"]) == 0
    monkeypatch.chdir(elsewhere)  # index from another folder: the paths must still resolve
    assert main(["index", str(work / "e.npz"), "--out", "idx"]) == 0
    index = load_index(elsewhere / "idx")
    assert all(Path(p).is_absolute() and Path(p).is_file() for p in index.paths)
    assert index.thumbnails.missing == 0
