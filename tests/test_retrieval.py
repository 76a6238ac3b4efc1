"""faiss indexes, search with confidence and introspective re-ranking, `idml index/search`."""

import dataclasses
import json
import threading

import numpy as np
import pytest
from test_inference import make_checkpoint, make_class_folder

import idml
from idml.cli import main
from idml.method.metric import ISMParams
from idml.serving.embeddings import EmbeddingSet, load_embeddings
from idml.serving.index import IndexFormatError, build_index, load_index, save_index
from idml.serving.search import check_compatible, format_results, search, search_images


def unit_rows(rng, n, d):
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def random_set(n=3000, d=16, du=8, seed=0, scale=0.5) -> EmbeddingSet:
    rng = np.random.default_rng(seed)
    meta = {"format": "idml-embeddings", "version": 1, "fingerprint": "f00d", "semantic_dim": d,
            "uncertainty_dim": du, "class_names": ["even", "odd"]}
    return EmbeddingSet(unit_rows(rng, n, d),
                        (scale * rng.standard_normal((n, du))).astype(np.float32),
                        np.array([f"img/{i}.jpg" for i in range(n)]),
                        np.arange(n, dtype=np.int64) % 2, meta)


def numpy_d_in(cos, uq, uj, a, b, variant):
    """docs/method.md section 3, cosine form, in float64:
    D_IN = alpha * exp(-(beta + b) / (a * d)), alpha = 1 - cos, d = ||s_q - s_j||^2 = 2 - 2 cos,
    beta = ||u_q - u_j||^2 (difference) or ||u_q||^2 + ||u_j||^2 (sum)."""
    cos, uq, uj = (np.asarray(v, np.float64) for v in (cos, uq, uj))
    if variant == "difference":
        beta = ((uj - uq) ** 2).sum(1)
    else:
        beta = (uq**2).sum() + (uj**2).sum(1)
    alpha = 1.0 - cos
    d = np.maximum(2.0 - 2.0 * cos, 1e-8)
    return alpha * np.exp(-(beta + b) / (a * d))


@pytest.fixture(scope="module")
def gallery():
    return random_set()


@pytest.fixture(scope="module")
def queries():
    rng = np.random.default_rng(1)
    return unit_rows(rng, 40, 16), (0.5 * rng.standard_normal((40, 8))).astype(np.float32)


def test_exact_search_is_brute_force_top_k(gallery, queries):
    q, qu = queries
    result = search(build_index(gallery, "exact"), q, qu, k=10)
    sims = q.astype(np.float64) @ gallery.semantic.T.astype(np.float64)
    expected = np.argsort(-sims, axis=1, kind="stable")[:, :10]
    np.testing.assert_array_equal(np.array(result.ids()), expected)
    for i, qr in enumerate(result.queries):
        top = np.sort(sims[i])[::-1]
        assert qr.semantic_gap == pytest.approx(top[0] - top[1], abs=1e-5)
        assert qr.uncertainty == pytest.approx(float((qu[i].astype(np.float64) ** 2).sum()),
                                               rel=1e-6)
        for h, j in zip(qr.hits, expected[i], strict=True):
            assert h.cosine == pytest.approx(sims[i, j], abs=1e-5)
            assert h.distance == pytest.approx(np.linalg.norm(q[i] - gallery.semantic[j]),
                                               abs=1e-4)
            assert h.path == f"img/{j}.jpg" and h.label == j % 2
            assert h.label_name == ["even", "odd"][j % 2]
        assert [h.rank for h in qr.hits] == list(range(1, 11))


@pytest.mark.parametrize("kind,options", [
    ("ivf", {"nlist": 40, "nprobe": 12}),
    ("hnsw", {"hnsw_m": 16}),
])
def test_approximate_indexes_recall_the_exact_neighbours(gallery, queries, kind, options):
    q, qu = queries
    exact = search(build_index(gallery, "exact"), q, qu, k=10).ids()
    approx = search(build_index(gallery, kind, **options), q, qu, k=10).ids()
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(exact, approx, strict=True)])
    assert recall > 0.9


def test_ivf_defaults_on_clustered_embeddings():
    rng = np.random.default_rng(2)
    centres = unit_rows(rng, 30, 32)
    x = centres[rng.integers(0, 30, 3000)] + 0.15 * rng.standard_normal((3000, 32))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    emb = random_set(d=32)
    emb.semantic = x
    q, qu = x[:50], np.zeros((50, 8), np.float32)
    exact = search(build_index(emb, "exact"), q, qu, k=10).ids()
    index = build_index(emb, "ivf")
    assert index.params["nlist"] == 3000 // 39 and index.params["nprobe"] == 19
    approx = search(index, q, qu, k=10).ids()
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(exact, approx, strict=True)])
    assert recall > 0.9


@pytest.mark.parametrize("a,b,variant", [(5.0, 4.0, "difference"), (0.5, 0.0, "difference"),
                                         (0.5, 0.0, "sum")])
def test_introspective_scores_and_rerank_follow_the_formula(a, b, variant):
    emb = random_set(n=400, d=4, du=4, seed=3, scale=0.4)  # low d: a spread of cosines
    rng = np.random.default_rng(4)
    q, qu = unit_rows(rng, 5, 4), (0.4 * rng.standard_normal((5, 4))).astype(np.float32)
    ism = ISMParams(a, b, variant)
    index = build_index(emb, "exact")
    plain = search(index, q, qu, k=30, ism=ism)
    reranked = search(index, q, qu, k=8, rerank="introspective", shortlist=50, ism=ism)
    assert reranked.ism == ism
    sims = q.astype(np.float64) @ emb.semantic.T.astype(np.float64)
    for i in range(len(q)):
        for h in plain.queries[i].hits:
            want = numpy_d_in(sims[i, h.id], qu[i], emb.uncertainty[[h.id]], a, b, variant)[0]
            assert h.introspective_distance == pytest.approx(want, rel=2e-3, abs=1e-7)
            assert h.introspective == pytest.approx(1.0 - want, abs=1e-6)
        shortlist = np.argsort(-sims[i])[:50]
        d_in = numpy_d_in(sims[i, shortlist], qu[i], emb.uncertainty[shortlist], a, b, variant)
        expected = shortlist[np.argsort(d_in, kind="stable")[:8]]
        got = [h.id for h in reranked.queries[i].hits]
        assert got == expected.tolist()
        assert [h.rank for h in reranked.queries[i].hits] == list(range(1, 9))
        values = [h.introspective_distance for h in reranked.queries[i].hits]
        assert values == sorted(values)
    # the paper's constants re-order something relative to the cosine order
    if (a, b) == (0.5, 0.0):
        assert any([h.id for h in r.hits] != [h.id for h in p.hits[:8]]
                   for r, p in zip(reranked.queries, plain.queries, strict=True))


def test_save_load_round_trip_and_corruption(tmp_path, queries):
    emb = random_set(n=500)
    q, qu = queries
    for kind in ("exact", "ivf", "hnsw"):
        index = build_index(emb, kind)
        folder = save_index(index, tmp_path / kind)
        back = load_index(folder)
        assert back.kind == kind and back.params == index.params
        assert back.fingerprint == "f00d" and len(back) == 500
        assert back.labels.tolist() == emb.labels.tolist() and back.paths == emb.paths.tolist()
        np.testing.assert_array_equal(back.uncertainty, emb.uncertainty)
        assert search(back, q, qu, k=5).to_dict() == search(index, q, qu, k=5).to_dict()
    meta = json.loads((tmp_path / "exact" / "meta.json").read_text())
    assert {"kind", "params", "fingerprint", "semantic_dim", "uncertainty_dim", "count", "paths",
            "labels"} <= set(meta)

    blob = (tmp_path / "exact" / "index.faiss").read_bytes()
    (tmp_path / "exact" / "index.faiss").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(IndexFormatError, match="index.faiss"):
        load_index(tmp_path / "exact")
    (tmp_path / "ivf" / "meta.json").write_text("{broken")
    with pytest.raises(IndexFormatError, match="meta.json"):
        load_index(tmp_path / "ivf")
    (tmp_path / "hnsw" / "embeddings.npz").unlink()
    with pytest.raises(IndexFormatError, match="embeddings.npz"):
        load_index(tmp_path / "hnsw")
    with pytest.raises(IndexFormatError, match="does not exist"):
        load_index(tmp_path / "nowhere")


def test_inconsistent_index_folder_is_refused(tmp_path):
    folder = save_index(build_index(random_set(n=50), "exact"), tmp_path / "ix")
    meta = json.loads((folder / "meta.json").read_text())
    meta["paths"] = meta["paths"][:-1]
    (folder / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(IndexFormatError, match="counts differ"):
        load_index(folder)


def test_search_argument_checks(gallery, queries):
    q, qu = queries
    index = build_index(gallery, "exact")
    with pytest.raises(ValueError, match=r"\[Q, 16\]"):
        search(index, q[:, :8], qu, k=3)
    with pytest.raises(ValueError, match="uncertainty"):
        search(index, q, qu[:, :4], k=3)
    with pytest.raises(ValueError, match="rerank"):
        search(index, q, qu, rerank="cosine")
    with pytest.raises(ValueError, match="nlist"):
        build_index(random_set(n=20), "ivf", nlist=50)
    few = search(build_index(random_set(n=3), "exact"), q[:1], qu[:1], k=10)
    assert len(few.queries[0].hits) == 3


def test_check_compatible_names_both_models():
    index = build_index(random_set(n=10), "exact")
    index.location = "idx"
    check_compatible(index, "f00d", 16, 8)
    with pytest.raises(ValueError, match="model mismatch.*f00d.*beef"):
        check_compatible(index, "beef", 16, 8)
    with pytest.raises(ValueError, match="embedding size mismatch.*16-d.*32-d"):
        check_compatible(index, "beef", 32, 8)


@pytest.fixture(scope="module")
def cli_setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("retrieval")
    ckpt, _ = make_checkpoint(tmp / "checkpoint.pt")
    paths = make_class_folder(tmp / "images")
    assert main(["embed", str(ckpt), str(tmp / "images"), "--out", str(tmp / "emb.npz"),
                 "--device", "cpu"]) == 0
    return tmp, ckpt, paths


def test_cli_index_and_search_end_to_end(cli_setup, capsys):
    tmp, ckpt, paths = cli_setup
    assert main(["index", str(tmp / "emb.npz"), "--out", str(tmp / "idx"), "--kind", "hnsw",
                 "--hnsw-m", "8"]) == 0
    assert "indexed 6 embeddings" in capsys.readouterr().out
    argv = ["search", str(tmp / "idx"), str(paths[0]), str(paths[4]), "--checkpoint", str(ckpt),
            "-k", "3", "--device", "cpu"]
    assert main([*argv, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["fingerprint"] == idml.load(ckpt, device="cpu").fingerprint
    assert out["design"] == idml.load(ckpt, device="cpu").config.design
    assert [q["query"] for q in out["queries"]] == [str(paths[0]), str(paths[4])]
    emb = load_embeddings(tmp / "emb.npz")
    for q, own in zip(out["queries"], (0, 4), strict=True):
        assert len(q["hits"]) == 3
        first = q["hits"][0]
        assert first["path"] == str(paths[own]) and first["cosine"] == pytest.approx(1, abs=1e-5)
        assert first["label_name"] == ("cat" if own < 3 else "dog")
        u = emb.uncertainty[own].astype(np.float64)
        assert q["uncertainty"] == pytest.approx((u**2).sum(), rel=1e-4)
        cos = np.sort(emb.semantic.astype(np.float64) @ emb.semantic[own])[::-1]
        assert q["semantic_gap"] == pytest.approx(cos[0] - cos[1], abs=1e-4)
    assert main([*argv, "--rerank", "introspective", "--shortlist", "6"]) == 0
    text = capsys.readouterr().out
    design = idml.load(ckpt, device="cpu").config.design
    assert text.startswith(f"confidence: ||u||^2 of design {design} (larger = less sure)\n"
                           f"query 1: {paths[0]}") and "ISM D_IN" in text
    # the Python API, with the ISM constants of the checkpoint's config
    embedder = idml.load(ckpt, device="cpu")
    embedder.config = dataclasses.replace(embedder.config, ism_a=0.5, ism_b=0.0, ism_beta="sum")
    result = search_images(load_index(tmp / "idx"), embedder, [paths[1]], k=2,
                           rerank="introspective", shortlist=6)
    assert result.ism == ISMParams(0.5, 0.0, "sum") and result.shortlist == 6
    hit = result.queries[0].hits[1]
    want = numpy_d_in(hit.cosine, emb.uncertainty[1], emb.uncertainty[[hit.id]], 0.5, 0.0, "sum")
    assert hit.introspective_distance == pytest.approx(want[0], rel=2e-3)
    # a folder as the query
    assert main(["search", str(tmp / "idx"), str(tmp / "images" / "dog"), "--checkpoint",
                 str(ckpt), "-k", "1", "--json", "--device", "cpu"]) == 0
    assert len(json.loads(capsys.readouterr().out)["queries"]) == 3


def test_cli_search_refuses_another_model(cli_setup, tmp_path, capsys):
    tmp, _, paths = cli_setup
    assert main(["index", str(tmp / "emb.npz"), "--out", str(tmp_path / "idx")]) == 0
    other, _ = make_checkpoint(tmp_path / "other.pt", seed=5)
    wider, _ = make_checkpoint(tmp_path / "wider.pt", embedding_dim=24)
    fingerprint = load_embeddings(tmp / "emb.npz").fingerprint
    capsys.readouterr()
    base = ["search", str(tmp_path / "idx"), str(paths[0]), "--device", "cpu", "--checkpoint"]
    assert main([*base, str(other)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("idml search: error: model mismatch")
    assert fingerprint in err and idml.load(other, device="cpu").fingerprint in err
    assert main([*base, str(wider)]) == 2
    assert "embedding size mismatch" in capsys.readouterr().err


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_cli_search_with_a_damaged_checkpoint(cli_setup, tmp_path, capsys, damage):
    tmp, ckpt, paths = cli_setup
    assert main(["index", str(tmp / "emb.npz"), "--out", str(tmp_path / "idx")]) == 0
    data = bytearray(ckpt.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0x01
    else:
        data = data[: len(data) - 100]
    bad = tmp_path / "tampered.pt"
    bad.write_bytes(bytes(data))
    capsys.readouterr()
    assert main(["search", str(tmp_path / "idx"), str(paths[0]), "--checkpoint", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("idml search: error:") and "tampered.pt" in err


def test_cli_index_errors(cli_setup, tmp_path, capsys):
    tmp, _, _ = cli_setup
    assert main(["index", str(tmp / "emb.npz"), "--out", str(tmp_path / "i"), "--nlist", "4"]) == 2
    assert "--kind ivf" in capsys.readouterr().err
    broken = tmp_path / "broken.npz"
    broken.write_bytes(b"PK\x03\x04 broken")
    assert main(["index", str(broken), "--out", str(tmp_path / "i")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("idml index: error:") and "broken.npz" in err


def test_format_results_lists_every_hit(gallery, queries):
    q, qu = queries
    text = format_results(search(build_index(gallery, "exact"), q[:2], qu[:2], k=4))
    assert len(text.splitlines()) == 2 * (1 + 1 + 4) + 1  # head, columns, 4 hits; blank line
    assert "semantic gap" in text and "odd" in text


@pytest.mark.parametrize("kind,options,width", [
    ("hnsw", {"hnsw_m": 8, "ef_search": 16}, "ef_search"),
    ("ivf", {"nlist": 40, "nprobe": 2}, "nprobe"),
])
def test_concurrent_searches_with_different_widths_do_not_race(kind, options, width):
    index = build_index(random_set(), kind, **options)
    before = (index.index.hnsw.efSearch if kind == "hnsw" else index.index.nprobe)
    queries = index.semantic[:64] + 0.05
    values = [1, 40] if kind == "ivf" else [10, 400]
    sequential = {v: search(index, queries, index.uncertainty[:64], 10, **{width: v}).ids()
                  for v in values}
    assert sequential[values[0]] != sequential[values[1]]  # the width matters here
    found: dict[int, list] = {v: [] for v in values}

    def worker(v: int) -> None:
        for _ in range(20):
            found[v].append(search(index, queries, index.uncertainty[:64], 10,
                                   **{width: v}).ids())

    threads = [threading.Thread(target=worker, args=(v,)) for v in values for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for v in values:
        assert all(ids == sequential[v] for ids in found[v])
    after = (index.index.hnsw.efSearch if kind == "hnsw" else index.index.nprobe)
    assert after == before


def test_search_widths_survive_faiss_torch_utils():
    """pytorch-metric-learning imports faiss.contrib.torch_utils, whose Index.search takes no
    ``params``: per-call widths must work after that import too (they failed in the suite)."""
    import faiss.contrib.torch_utils  # noqa: F401

    index = build_index(random_set(), "hnsw", hnsw_m=8, ef_search=16)
    q = index.semantic[:8]
    assert search(index, q, index.uncertainty[:8], 5, ef_search=64).ids() == \
        search(index, q, index.uncertainty[:8], 5, ef_search=64).ids()
    assert search(index, q, index.uncertainty[:8], 5, exclude=list(range(8))).ids()[0][0] != 0


def test_search_width_out_of_a_c_int_is_refused():
    index = build_index(random_set(n=200), "hnsw", hnsw_m=8)
    with pytest.raises(ValueError, match=r"ef_search must be in \[1, 2\^31\)"):
        search(index, index.semantic[:1], index.uncertainty[:1], 3, ef_search=2**40)
