"""Smoke tests of every benchmark at tiny sizes (JSON keys and sanity, never timings), and the fast paths
the benchmarks led to: each must give the same results as the path it replaced."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import app.memory.exact_knn as exact_knn_module
from app.memory.base import ItemPayload
from app.memory.exact import ExactIndex
from app.memory.payload_file import LazyPayloads
from app.schemas import Modality
from ingestion.pipeline import ingest_source
from programs.bench import child
from programs.bench.common import machine_info, unit_vectors
from programs.bench.growth import describe_bends, ingest_batch_curve, search_curve
from programs.bench.ingest import build_encoder, run_ingest_bench
from programs.bench.memory_files import memory_folder, write_synthetic_memories
from programs.bench.report import write_report
from programs.bench.search import run_search_bench
from programs.bench.train import run_train_bench
from tests.conftest import SHARED_DATA

IMAGES = SHARED_DATA / "flickr8k" / "images"
INGEST_KEYS = {"n", "encoder_only_img_s", "pipeline_img_s", "ratio", "model", "device"}
SEARCH_KEYS = {"size", "backend", "batch", "qps", "p50_ms", "p99_ms", "recall_at_10", "rss_mb", "ef", "filtered"}
REFINE_KEYS = {"memory_size", "clip_p50_ms", "reco_p50_ms", "clip_p99_ms", "reco_p99_ms", "overhead",
               "class_set_1000_labels_s", "cub100_first_prediction_s"}


@pytest.fixture(scope="module")
def tiny() -> object:
    return build_encoder("reco-tiny", batch=4)


def _in_process(task: str, args: dict) -> dict:  # type: ignore[type-arg]
    return child.TASKS[task](args)


# --- the benchmarks ---------------------------------------------------------------------------
def test_ingest_bench_gives_the_contract(tiny: object, tmp_path: Path) -> None:
    result = run_ingest_bench(IMAGES, 8, rounds=2, batch=4, pipeline=ingest_source, encoder=tiny, workdir=tmp_path)
    dumped = result.model_dump()
    assert set(dumped) == INGEST_KEYS and dumped["n"] == 8
    assert dumped["ratio"] == pytest.approx(dumped["pipeline_img_s"] / dumped["encoder_only_img_s"], rel=1e-3)
    assert [r["ingested"] for r in result.details["rounds"]] == [4, 4]
    assert dumped["model"] == "reco-tiny/random" and dumped["device"] == "cpu/fp32"


def test_search_bench_gives_the_contract_and_exact_agrees_with_qdrant(tmp_path: Path) -> None:
    result = run_search_bench([300, 600], dim=32, single=4, batches=2, batch=8, qdrant_single=4, workdir=tmp_path,
                              runner=_in_process)
    rows = result.model_dump()["results"]
    assert {tuple(sorted(r)) for r in rows} == {tuple(sorted(SEARCH_KEYS))}
    assert {(r["backend"], r["batch"]) for r in rows} == {
        (b, n) for b in ("exact", "exact-fp16", "qdrant-local") for n in (1, 8)}
    assert all(r["qps"] > 0 and r["p99_ms"] >= r["p50_ms"] for r in rows)
    by = {(r["size"], r["backend"]): r for r in rows}
    assert by[(600, "exact")]["recall_at_10"] == 1.0 and by[(600, "qdrant-local")]["recall_at_10"] == 1.0
    assert all(run["identical_top10"] == 1.0 for run in result.details["runs"] if run["backend"] == "qdrant-local")


def _clustered(n: int, dim: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((20, dim))
    rows = centres[rng.integers(0, 20, n)] + 0.5 * rng.standard_normal((n, dim))
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def test_engine_bench_edge_against_exact_on_embedding_like_rows(tmp_path: Path) -> None:
    from programs.bench.search import engine_goals, engine_report, merge_runs, run_engine_bench

    pairs = {"image": _clustered(400, 32, 1), "text": _clustered(400, 32, 2), "dataset": ["a", "b"] * 200,
             "queries": _clustered(30, 32, 3), "encoder_id": "test"}
    result = run_engine_bench([600, 1200], data_root=tmp_path, settings=None, single=12, batches=1, batch=8,
                              efs=(8, 64), workdir=tmp_path, runner=_in_process, pairs=pairs)
    rows = result.results
    edge = [r for r in rows if r.backend == "edge" and r.batch == 1 and not r.filtered]
    assert {(r.size, r.ef) for r in edge} == {(n, ef) for n in (600, 1200) for ef in (8, 64)}
    # exact mode is the exact index's answer; HNSW with a wide candidate list finds it too at this size
    assert all(r.recall_at_10 == 1.0 for r in rows if r.backend in ("exact", "edge-exact"))
    assert all(r.recall_at_10 >= 0.9 for r in edge if r.ef == 64)
    assert {r.size for r in rows if r.filtered} == {600, 1200}  # the 1 % "probe" dataset, searched alone
    runs = [run for run in result.details["runs"] if run["backend"] == "edge"]
    assert all(run["upsert_pairs_per_s"] > 0 and run["reopen_s"] > 0 and run["rows"] == run["size"] for run in runs)
    assert isinstance(engine_goals(result), list) and "| goal |" in engine_report(result, "reco bench search")
    # a later run at one size replaces that size's rows and keeps the others
    again = result.model_copy(update={"results": [r for r in rows if r.size == 600]})
    again.details = dict(result.details, runs=[r for r in result.details["runs"] if r["size"] == 600])
    merged = merge_runs(result.model_dump() | {"details": result.details}, again, "second")
    assert len(merged.results) == len(rows) and merged.details["commands"] == {"600": "second"}


def test_refine_bench_gives_the_contract(tiny: object, tmp_path: Path) -> None:
    from programs.bench.refine import run_refine_bench

    result = run_refine_bench(IMAGES, memory_size=300, n_images=2, encoder=tiny, workdir=tmp_path, memory="exact")
    dumped = result.model_dump()
    assert set(dumped) == REFINE_KEYS and dumped["memory_size"] == 300
    assert dumped["overhead"] == pytest.approx(dumped["reco_p50_ms"] / dumped["clip_p50_ms"] - 1, abs=1e-3)
    assert set(result.details["retrieval_fusion_ms"]) == {"float32", "float16"}
    assert torch.get_num_threads() == machine_info()["torch_threads"]  # the thread setting was restored


def test_train_bench_gives_the_contract() -> None:
    result = run_train_bench(pairs=64, memory_size=256, dim=64, batch_size=32, epochs=1)
    assert set(result.model_dump()) == {"samples_per_s", "epoch_s"}
    assert result.samples_per_s > 0 and result.details["steps"] == 2
    assert result.details["precompute_neighbours_s"] > 0


def test_growth_curves_and_their_notes(tiny: object, tmp_path: Path) -> None:
    batches = ingest_batch_curve(IMAGES, (1, 4), pipeline=ingest_source, encoder=tiny, workdir=tmp_path)
    assert [p["batch"] for p in batches] == [1, 4] and all(p["pipeline_img_s"] > 0 for p in batches)
    search = run_search_bench([300, 900], dim=32, single=3, batches=1, batch=8, qdrant_local_max=0,
                              workdir=tmp_path, runner=_in_process)
    points = search_curve(search.results, search.details["runs"], dim=32)
    assert {p["backend"] for p in points} == {"exact", "exact-fp16"}
    assert all("scan_gb_s" in p and p["load_s"] is not None for p in points)
    notes = describe_bends(points, batches)
    assert 3 <= len(notes) <= 4 and "batch 1" in notes[-1]


def test_gpu_bench_says_not_run_without_a_gpu_and_runs_its_path_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    from programs.bench import gpu

    monkeypatch.setattr(gpu.torch.cuda, "is_available", lambda: False)
    assert gpu.run_gpu_bench(IMAGES, 8)["status"] == "not run: no GPU"
    on_cpu = gpu.run_gpu_bench(IMAGES, 8, batch=4, workers=2, device="cpu", model="reco-tiny")
    assert on_cpu["status"] == "ok" and on_cpu["n"] == 8 and on_cpu["end_to_end_img_s"] > 0


def test_report_writes_goals_tables_and_plots(tmp_path: Path) -> None:
    search = run_search_bench([300], dim=32, single=2, batches=1, batch=4, workdir=tmp_path, runner=_in_process)
    folder = tmp_path / "docs" / "performance"
    folder.mkdir(parents=True)
    results = {"machine": machine_info(), "duration_s": 1.0,
               "search": {"result": search.model_dump(), "details": search.details},
               "train": {"result": {"samples_per_s": 1.0, "epoch_s": 2.0}, "details": {"steps": 1}},
               "growth": {"search": search_curve(search.results, search.details["runs"], dim=32),
                          "ingest_batch": [{"batch": 1, "images": 2, "encoder_only_img_s": 1.0, "pipeline_img_s": 0.9},
                                           {"batch": 4, "images": 8, "encoder_only_img_s": 2.0,
                                            "pipeline_img_s": 1.9}], "notes": ["a note"]},
               "gpu": {"status": "not run: no GPU"}}
    (folder / "results.json").write_text(json.dumps(results, default=str))
    text = write_report(tmp_path / "docs").read_text()
    assert "## Goals" in text and "## Search" in text and "not run: no GPU" in text and "- a note" in text
    assert (folder / "growth_search.png").stat().st_size > 1000 and (folder / "growth_ingest.png").is_file()


def test_bench_cli_prints_the_contract_as_json() -> None:
    from app.cli import cli

    out = CliRunner().invoke(cli, ["bench", "train", "--pairs", "64", "--memory-size", "128", "--batch-size", "32",
                                   "--epochs", "1", "--json"])
    assert out.exit_code == 0, out.output
    assert set(json.loads(out.output.strip().splitlines()[-1])) == {"samples_per_s", "epoch_s"}


# --- the fast paths equal the paths they replaced ---------------------------------------------
def test_float16_direct_product_gives_the_converting_paths_neighbours(monkeypatch: pytest.MonkeyPatch) -> None:
    n = 3000
    ids = [str(i) for i in range(n)]
    index = ExactIndex(ids, unit_vectors(n, 64, 1), unit_vectors(n, 64, 2), ids, dtype="float16", chunk=1024,
                       normalise=False)
    queries = unit_vectors(5, 64, 3)
    allowed = np.ones(n, bool)
    allowed[::7] = False
    kwargs = {"exclude_ids": [[ids[i]] for i in range(5)], "allowed": allowed}
    monkeypatch.setattr(exact_knn_module, "HALF_DIRECT_MAX_QUERIES", 0)
    ref_scores, ref_rows = index.knn(queries, Modality.IMAGE, 10, **kwargs)
    monkeypatch.setattr(exact_knn_module, "HALF_DIRECT_MAX_QUERIES", 16)
    scores, rows = index.knn(queries, Modality.IMAGE, 10, **kwargs)
    np.testing.assert_array_equal(rows, ref_rows)
    np.testing.assert_allclose(scores, ref_scores, atol=1e-6)
    assert not np.isin(rows, np.flatnonzero(~allowed)).any()


def test_saved_memory_loads_lazily_and_round_trips(tmp_path: Path) -> None:
    folders = write_synthetic_memories(tmp_path, [50], dim=16)
    loaded = ExactIndex.load(folders[(50, "float32")])
    assert isinstance(loaded.payloads, LazyPayloads) and not loaded.payloads._cache
    assert loaded.payloads[7] == ItemPayload.model_validate_json(
        (folders[(50, "float32")] / "payloads.jsonl").read_text().splitlines()[7])
    assert loaded.matrix(Modality.IMAGE).flags.writeable  # copy-on-write map: torch takes it without a copy
    again = ExactIndex.load(loaded.save(tmp_path / "copy"))
    assert len(loaded.payloads._cache) == 1  # saving copied the stored lines without parsing them
    assert again.payloads == loaded.payloads and len(again) == 50
    assert memory_folder(tmp_path, 50, "float32") == folders[(50, "float32")]


def test_split_preprocessing_equals_the_full_transform(tiny: object) -> None:
    images = [Image.open(p).convert("RGB") for p in sorted(IMAGES.iterdir())[:3]]
    full = torch.stack([tiny.preprocess(im) for im in images])  # type: ignore[attr-defined]
    split = tiny.pixels_from_uint8(np.stack([tiny.preprocess_uint8(im) for im in images]))  # type: ignore[attr-defined]
    assert torch.equal(full, split)


def test_repeated_captions_are_encoded_once_per_service(tiny: object, tmp_path: Path) -> None:
    from app.services.ingest import IngestService, prepare_storage
    from programs.bench.ingest import pipeline_settings

    calls: list[int] = []
    original = tiny.encode_texts  # type: ignore[attr-defined]

    class Counting:
        def __getattr__(self, name: str) -> object:
            return getattr(tiny, name)

        def encode_texts(self, texts: list[str]) -> np.ndarray:
            calls.append(len(texts))
            return original(texts)

    settings = pipeline_settings(tmp_path / "data", tiny, 2)  # type: ignore[arg-type]
    prepare_storage(settings)
    service = IngestService(settings, encoder=Counting())  # type: ignore[arg-type]
    folder = tmp_path / "imgs"
    folder.mkdir()
    for p in sorted(IMAGES.iterdir())[:6]:
        (folder / p.name).write_bytes(p.read_bytes())
    summary = ingest_source(folder, settings, service=service, progress=False)
    assert summary["ingested"] == 6 and calls == [1]  # three batches of two, one empty caption encoded once


def test_an_item_in_the_batch_being_stored_counts_as_a_duplicate(tiny: object, tmp_path: Path) -> None:
    from app.services.ingest import IngestService, prepare_storage
    from programs.bench.ingest import pipeline_settings

    settings = pipeline_settings(tmp_path / "data", tiny, 2)  # type: ignore[arg-type]
    prepare_storage(settings)
    folder = tmp_path / "imgs"
    folder.mkdir()
    first, second = sorted(IMAGES.iterdir())[:2]
    for name, source in (("a.jpg", first), ("b.jpg", second), ("c.jpg", first), ("d.jpg", second)):
        (folder / name).write_bytes(source.read_bytes())  # batch 2 repeats batch 1 while it may still be storing
    summary = ingest_source(folder, settings, service=IngestService(settings, encoder=tiny), progress=False)
    assert (summary["ingested"], summary["duplicates"], summary["failed"]) == (2, 2, 0)


# --- scale-out -----------------------------------------------------------------------------------
def test_cluster_profile_has_three_qdrant_nodes_and_n_embed_workers() -> None:
    import yaml

    services = yaml.safe_load((Path(__file__).resolve().parents[2] / "docker-compose.yml").read_text())["services"]
    nodes = [f"qdrant-node-{i}" for i in (1, 2, 3)]
    assert all(services[n]["profiles"] == ["cluster"] for n in [*nodes, "embed-worker-cluster"])
    assert all(services[n]["environment"]["QDRANT__CLUSTER__ENABLED"] == "true" for n in nodes)
    assert all("--bootstrap" in services[n]["command"] for n in nodes[1:])
    worker = services["embed-worker-cluster"]
    assert worker["deploy"]["replicas"] == "${RECO_EMBED_WORKERS:-3}" and "embed" in " ".join(worker["command"])
    assert worker["environment"]["RECO_MEMORY_QUANTIZATION"] == "${RECO_MEMORY_QUANTIZATION:-int8}"


def test_collection_layout_comes_from_settings_and_every_engine_accepts_it(tmp_path: Path) -> None:
    from qdrant_client import QdrantClient

    from app.config import get_settings
    from app.memory.edge import EdgeStore
    from app.memory.layout import MemoryLayout
    from app.memory.qdrant import QdrantServerStore

    layout = MemoryLayout.from_settings(get_settings(qdrant_shard_number=6, qdrant_replication_factor=2,
                                                     memory_quantization="int8", memory_on_disk=True,
                                                     memory_hnsw_m=24, memory_hnsw_ef=64))
    assert layout == MemoryLayout(shards=6, replication=2, int8=True, on_disk=True, hnsw_m=24, hnsw_ef=64)
    server = QdrantServerStore(QdrantClient(location=":memory:"), layout)
    assert server.ensure_collection("layout", 8).count() == 0
    assert server.client.get_collection("layout").config.params.vectors["image"].size == 8
    edge = EdgeStore(tmp_path / "edge", layout)
    assert edge.ensure_collection("layout", 8).count() == 0
    assert edge.describe()["quantization"] == "int8" and edge.describe()["hnsw"]["m"] == 24
    edge.close()


def test_int8_storage_with_rescoring_finds_the_float32_neighbours(tmp_path: Path) -> None:
    from programs.bench.stretch import write_int8_memory

    queries = unit_vectors(8, 32, 5)
    truth = write_int8_memory(tmp_path / "int8", 3000, 32, queries, 10)
    index = ExactIndex.load(tmp_path / "int8")
    assert index.dtype == "int8" and index.matrix(Modality.IMAGE).originals is not None
    scores, rows = index.knn(queries, Modality.IMAGE, 10)
    assert [set(r) for r in rows.tolist()] == [set(t) for t in truth.tolist()]
    exact = np.einsum("nd,nkd->nk", queries, index.matrix(Modality.IMAGE)[rows])  # float16 originals
    np.testing.assert_allclose(scores, exact, atol=1e-5)
    approx = ExactIndex(index.ids, np.asarray(index.matrix(Modality.IMAGE)[:]), np.zeros((3000, 32), np.float32),
                        index.image_hashes, dtype="int8", normalise=False)  # in RAM: no originals, no rescoring
    assert approx.matrix(Modality.IMAGE).originals is None
    assert np.mean([len(set(a) & set(b)) / 10 for a, b in zip(approx.knn(queries, Modality.IMAGE, 10)[1], truth,
                                                               strict=True)]) >= 0.8
