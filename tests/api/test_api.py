"""``reco serve`` for real: a server process (uvicorn on a free port) over a prepared memory, every endpoint,
every error code, API keys and scopes, a takedown that never comes back — with SQLite and with PostgreSQL."""

from __future__ import annotations

import base64
import io
import json
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.config import Settings
from app.db.apikeys import ApiKeyRepo
from app.db.session import make_session_factory
from app.memory.store import close_stores
from tests.ui.conftest import SAMPLE, png_bytes, subset_manifest

pytestmark = [pytest.mark.slow]

CLASSES = ["dress", "hat", "shoes", "shorts", "t-shirt"]


@dataclass
class Server:
    url: str
    settings: Settings
    admin: str  # the server's own key for local CLI clients (read, write, admin)
    read: str
    write: str
    manifests: Path

    def client(self, key: str | None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=120)


def _prepare(data_dir: Path, database_url: str | None, manifests: Path) -> Settings:
    from app.services.ingest import prepare_storage
    from app.services.train import TrainRequest, run_training
    from ingestion.pipeline import ingest_source

    settings = Settings(data_dir=data_dir, database_url=database_url, clip_model="reco-tiny", clip_pretrained="",
                        decode_workers=0, ingest_batch_size=32, allowed_roots=[SAMPLE, manifests], k_infer=4,
                        upload_max_files=3, max_image_bytes=1_000_000, api_max_body_bytes=4_000_000,
                        memory_index_idle_s=0.5)
    prepare_storage(settings)
    summary = ingest_source(subset_manifest(manifests), settings, progress=False)
    assert summary["ingested"] == 40, summary
    run_training(settings, TrainRequest(dataset="clothing10", split="train", epochs=2, batch_size=16, k=4,
                                        warmup_steps=1, progress=False))
    close_stores()  # the server owns the memory from here on
    return settings


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    from api.process import start_server, stop_server

    root = tmp_path_factory.mktemp(f"api-{request.param}")
    database_url = None
    if request.param == "postgres":
        from tests.conftest import POSTGRES_URL, require_service
        from tests.fixtures.postgres import fresh_database

        server_url = require_service("PostgreSQL", POSTGRES_URL, 5432)
        if server_url is None:
            pytest.skip("PostgreSQL unreachable (set CI=true to make this fail)")
        database = fresh_database(server_url)
        database_url = database.__enter__()
        request.addfinalizer(lambda: database.__exit__(None, None, None))
    settings = _prepare(root / "data", database_url, root / "manifests")
    with (root / "serve.log").open("wb") as log:
        process, url = start_server(settings, port=0, log=log)
    try:
        keys = ApiKeyRepo(make_session_factory(settings.resolved_database_url))
        read, _ = keys.create("test-read", "read")
        write, _ = keys.create("test-write", "read,write")
        admin = (settings.data_dir / "keys" / "cli.key").read_text().strip()
        yield Server(url, settings, admin, read, write, root / "manifests")
    finally:
        stop_server(process)
        assert not (settings.data_dir / "serve.json").exists(), "the announcement outlived the server"


def _error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, (response.status_code, response.text)
    body = response.json()
    assert body["error"]["code"] == code, body
    assert body["error"]["message"], body
    return dict(body["error"])


def _image(split: str = "val", index: int = 0) -> bytes:
    import csv

    with (SAMPLE / "manifest.csv").open(newline="") as handle:
        rows = [r for r in csv.DictReader(handle) if r["split"] == split]
    return (SAMPLE / rows[index]["image"]).read_bytes()


# --- health, docs, metrics --------------------------------------------------------------------------------
def test_health_readiness_docs_metrics(server: Server) -> None:
    with server.client(None) as http:
        assert http.get("/healthz").json() == {"status": "ok"}
        ready = http.get("/readyz").json()
        assert ready["status"] == "ready" and ready["encoder_id"].startswith("reco-tiny") and ready["checkpoint"]
        spec = http.get("/openapi.json").json()
        for path in ("/v1/predict", "/v1/search", "/v1/items", "/v1/items/{item_id}", "/v1/ingest",
                     "/v1/jobs/{job_id}", "/v1/status"):
            assert path in spec["paths"], path
        assert http.get("/docs").status_code == 200
        with server.client(server.read) as authed:
            authed.post("/v1/search", json={"text": "a hat"})
        metrics = http.get("/metrics").text
    assert 'reco_http_requests_total{endpoint="/v1/search",method="POST",status="200"}' in metrics
    assert "reco_http_request_seconds_bucket" in metrics
    assert 'reco_items{encoder="reco-tiny/random/s0",status="embedded"} 40.0' in metrics
    assert "reco_memory_points{collection=" in metrics and "reco_ingest_queue_depth" in metrics


# --- auth ---------------------------------------------------------------------------------------------------
def test_keys_and_scopes(server: Server) -> None:
    with server.client(None) as http:
        _error(http.get("/v1/status"), 401, "missing_api_key")
    with server.client("reco_nothere_abc") as http:
        _error(http.get("/v1/status"), 401, "invalid_api_key")
    with server.client(server.read) as http:
        assert http.get("/v1/status").status_code == 200
        item = http.get("/v1/items", params={"limit": 1}).json()["items"][0]
        _error(http.delete(f"/v1/items/{item['id']}"), 403, "insufficient_scope")
        _error(http.post("/v1/ingest", json={"path": str(server.manifests)}), 403, "insufficient_scope")
        _error(http.put("/v1/memory/collections/x", json={"dim": 8}), 403, "insufficient_scope")
    with server.client(server.write) as http:
        _error(http.delete(f"/v1/items/{item['id']}"), 403, "insufficient_scope")
    keys = ApiKeyRepo(make_session_factory(server.settings.resolved_database_url))
    revoked, _ = keys.create("soon-revoked", "read")
    assert keys.revoke("soon-revoked") == 1
    with httpx.Client(base_url=server.url, headers={"X-API-Key": revoked}) as http:
        _error(http.get("/v1/status"), 401, "invalid_api_key")


# --- predict --------------------------------------------------------------------------------------------------
def test_predict_clip_and_reco_with_explanations(server: Server) -> None:
    with server.client(server.read) as http:
        response = http.post("/v1/predict", data={"labels": ",".join(CLASSES), "mode": "both", "k": "3"},
                             files=[("images", ("a.jpg", _image(), "image/jpeg")),
                                    ("images", ("b.jpg", _image(index=1), "image/jpeg"))])
        assert response.status_code == 200, response.text
        predictions = response.json()["predictions"]
        assert [p["name"] for p in predictions] == ["a.jpg", "b.jpg"]
        first = predictions[0]
        assert len(first["clip"]) == 5 and len(first["reco"]) == 5 and first["k"] == 3
        assert len(first["neighbours"]) == 3 and all(n["attention"] is not None for n in first["neighbours"])
        assert first["neighbours"][0]["source"] and first["neighbours"][0]["caption"]
        by_set = http.post("/v1/predict", data={"class_set": "clothing10", "mode": "text", "top": "3"},
                           files=[("images", ("a.jpg", _image(), "image/jpeg"))]).json()["predictions"][0]
        assert len(by_set["clip"]) == 3 and by_set["reco"] and by_set["mode"] == "text"
        # no mode: the checkpoint's validated one, reported as used (this checkpoint records none: both)
        chosen = http.post("/v1/predict", data={"labels": ",".join(CLASSES), "k": "3"},
                           files=[("images", ("a.jpg", _image(), "image/jpeg"))]).json()["predictions"][0]
        assert chosen["mode"] == "both" and len(chosen["reco"]) == 5 and len(chosen["neighbours"]) == 3
        prepared = http.post("/v1/classes/prepare", json={"labels": CLASSES})
        assert prepared.status_code == 200 and prepared.json()["refined"], prepared.text
        clip_only = http.post("/v1/predict", data={"labels": ["dress", "hat"], "mode": "clip"},
                              files=[("images", ("a.jpg", _image(), "image/jpeg"))]).json()["predictions"][0]
        assert clip_only["reco"] is None and {s["name"] for s in clip_only["clip"]} == {"dress", "hat"}


def test_predict_errors(server: Server) -> None:
    good = [("images", ("a.jpg", _image(), "image/jpeg"))]
    with server.client(server.read) as http:
        _error(http.post("/v1/predict", data={"labels": "a,b"}), 400, "invalid_request")  # no image
        _error(http.post("/v1/predict", data={}, files=good), 400, "invalid_request")  # no classes
        _error(http.post("/v1/predict", data={"labels": "a", "class_set": "clothing10"}, files=good), 400,
               "invalid_request")
        _error(http.post("/v1/predict", data={"class_set": "no-such-set"}, files=good), 404, "not_found")
        _error(http.post("/v1/predict", data={"labels": "a", "mode": "sideways"}, files=good), 400, "invalid_request")
        _error(http.post("/v1/predict", data={"labels": "a,b", "k": "0"}, files=good), 400, "invalid_request")
        _error(http.post("/v1/predict", data={"labels": "a,b"},
                         files=[("images", ("x.jpg", b"\xff\xd8\xff\xe0 not really", "image/jpeg"))]), 400,
               "truncated")
        _error(http.post("/v1/predict", data={"labels": "a,b"},
                         files=[("images", ("x.svg", b"<svg xmlns='http://www.w3.org/2000/svg'/>", "image/png"))]),
               400, "not_an_image")
        _error(http.post("/v1/predict", data={"labels": "a,b"},
                         files=[("images", ("big.png", b"\x89PNG" + bytes(1_100_000), "image/png"))]), 413, "too_large")
        _error(http.post("/v1/predict", data={"labels": "a,b"}, files=good * 4), 413, "too_many_files")
        huge = {"labels": "a,b"}
        _error(http.post("/v1/predict", data=huge, files=[("images", ("h.png", bytes(5_000_000), "image/png"))]), 413,
               "too_large")  # over the body cap: refused before the body is read


# --- search ---------------------------------------------------------------------------------------------------
def test_search_text_image_targets_filters_threshold_reco(server: Server) -> None:
    with server.client(server.read) as http:
        text = http.post("/v1/search", json={"text": "a photo of a hat", "k": 5}).json()
        assert len(text["results"]) == 5 and text["target"] == "image" and not text["reco"]
        captions = http.post("/v1/search", json={"text": "a photo of a hat", "k": 5, "target": "text"}).json()
        assert captions["target"] == "text" and len(captions["results"]) == 5
        image = base64.b64encode(_image()).decode()
        similar = http.post("/v1/search", json={"image_b64": image, "k": 4}).json()  # default: similar images
        assert similar["query_modality"] == "image" and similar["target"] == "image" and len(similar["results"]) == 4
        assert all(r["captions"] == [r["caption"]] and r["label_name"] in CLASSES + ["long-sleeve shirt", "outerwear",
                   "pants", "shirt", "skirt"] for r in similar["results"])
        by_caption = http.post("/v1/search", json={"image_b64": image, "target": "text", "k": 4}).json()
        assert by_caption["target"] == "text" and len(by_caption["results"]) == 4
        assert len({r["item_id"] for r in similar["results"]}) == 4
        filtered = http.post("/v1/search", json={"text": "a hat", "k": 10, "filters": {"label": 1}}).json()
        assert filtered["results"] and all(r["label"] == 1 for r in filtered["results"])
        threshold = text["results"][2]["score"] - 1e-4  # the third result is in, the scores round-trip JSON
        above = http.post("/v1/search", json={"text": "a photo of a hat", "k": 20,
                                              "score_threshold": threshold}).json()
        assert 3 <= len(above["results"]) < 20 and all(r["score"] >= threshold - 1e-6 for r in above["results"])
        reco = http.post("/v1/search", json={"text": "a photo of a hat", "k": 5, "mode": "text", "k_prime": 3}).json()
        assert reco["reco"] and len(reco["neighbours"]) == 3 and reco["self_attention"] is not None


def test_memory_map(server: Server) -> None:
    with server.client(server.read) as http:
        plain = http.post("/v1/map", json={}).json()
        assert plain["total"] >= 39 and len(plain["points"]) == plain["total"] and plain["query"] is None
        assert all(p["label_name"] for p in plain["points"])
        item = plain["points"][0]["item_id"]
        marked = http.post("/v1/map", json={"item_id": item, "k": 5}).json()
        assert marked["query"]["item_id"] == item and sum(p["role"] == "neighbour" for p in marked["points"]) == 5
        image = base64.b64encode(_image()).decode()
        by_image = http.post("/v1/map", json={"image_b64": image, "k": 3}).json()
        assert by_image["query"]["role"] == "query" and sum(p["role"] == "neighbour" for p in by_image["points"]) == 3
        _error(http.post("/v1/map", json={"item_id": "no-such-item"}), 404, "not_found")


def test_class_coverage_and_text_side_explanation(server: Server) -> None:
    with server.client(server.read) as http:
        coverage = http.post("/v1/classes/coverage", json={"labels": ["hat", "golf ball", "dress"]}).json()
        assert (coverage["held"], coverage["missing"]) == (2, ["golf ball"])
        assert http.post("/v1/classes/coverage", json={"class_set": "clothing10"}).json()["missing_count"] == 0
        answer = http.post("/v1/predict", data={"class_set": "clothing10", "mode": "text"},
                           files=[("images", ("q.jpg", _image(), "image/jpeg"))]).json()["predictions"][0]
        assert len(answer["class_explanations"]) == 3 and answer["neighbours"] == []
        assert all(len(c["neighbours"]) == 4 and c["neighbours"][0]["attention"] is not None
                   for c in answer["class_explanations"])
        assert answer["relatedness"]["top_similarity"] > 0 and answer["relatedness"]["sample"] >= 5


def test_search_errors(server: Server) -> None:
    with server.client(server.read) as http:
        _error(http.post("/v1/search", json={"k": 5}), 400, "invalid_request")
        _error(http.post("/v1/search", json={"text": "a", "image_b64": "aGk="}), 400, "invalid_request")
        _error(http.post("/v1/search", json={"text": "   "}), 400, "invalid_request")
        _error(http.post("/v1/search", json={"text": "a", "filters": {"colour": "red"}}), 400, "unknown_filter_field")
        _error(http.post("/v1/search", json={"image_b64": "%%%not base64"}), 400, "invalid_request")
        _error(http.post("/v1/search", json={"image_b64": base64.b64encode(b"not an image").decode()}), 400,
               "not_an_image")
        _error(http.post("/v1/search", json={"text": "a", "k": 0}), 400, "invalid_request")
        _error(http.post("/v1/search", json={"text": "a", "target": "audio"}), 400, "invalid_request")
        _error(http.post("/v1/search", content=b"{not json", headers={"content-type": "application/json"}), 400,
               "invalid_request")


# --- items and takedown -------------------------------------------------------------------------------------------
def test_items_browse_read_image_neighbours(server: Server) -> None:
    with server.client(server.read) as http:
        page = http.get("/v1/items", params={"limit": 7, "offset": 0}).json()
        assert page["total"] >= 40 and len(page["items"]) == 7
        second = http.get("/v1/items", params={"limit": 7, "offset": 7}).json()
        assert not {i["id"] for i in page["items"]} & {i["id"] for i in second["items"]}
        hats = http.get("/v1/items", params={"label": 1, "limit": 100}).json()
        assert hats["items"] and all(i["label"] == 1 for i in hats["items"])
        assert http.get("/v1/items", params={"q": "hat", "limit": 100}).json()["total"] == hats["total"]
        item = page["items"][0]
        detail = http.get(f"/v1/items/{item['id']}").json()
        embedding = detail["embeddings"][0]
        assert detail["in_memory"] and embedding["status"] == "embedded" and embedding["live"]
        image = http.get(f"/v1/items/{item['id']}/image")
        assert image.status_code == 200 and image.headers["content-type"] == "image/jpeg"
        assert image.content[:2] == b"\xff\xd8"
        neighbours = http.get(f"/v1/items/{item['id']}/neighbours").json()["neighbours"]
        assert len(neighbours) == 4 and item["id"] not in {n["item_id"] for n in neighbours}
        _error(http.get("/v1/items/00000000-0000-5000-8000-000000000000"), 404, "not_found")
        _error(http.get("/v1/items", params={"limit": 0}), 400, "invalid_request")
        _error(http.get("/v1/items", params={"label": "many"}), 400, "invalid_request")


def test_delete_then_never_returned_nor_reingested(server: Server) -> None:
    with server.client(server.read) as reader:
        found = reader.post("/v1/search", json={"text": "a photo of a shoe", "k": 1, "target": "text"}).json()
    hit = found["results"][0]
    victim = hit["item_id"]
    with server.client(server.admin) as admin:
        gone = admin.delete(f"/v1/items/{victim}", params={"reason": "takedown request #42"})
        assert gone.status_code == 200, gone.text
        assert gone.json()["reason"] == "takedown request #42" and gone.json()["vectors_removed_from"]
        _error(admin.delete(f"/v1/items/{victim}x"), 404, "not_found")
    with server.client(server.read) as reader:
        for query in ({"text": "a photo of a shoe", "k": 40, "target": "text"},
                      {"text": hit["caption"], "k": 40, "target": "image"},
                      {"text": "a photo of a shoe", "k": 40, "target": "text", "mode": "text"}):
            found = reader.post("/v1/search", json=query).json()
            assert victim not in {r["item_id"] for r in found["results"]}
            assert victim not in {n["item_id"] for n in found.get("neighbours", [])}
        _error(reader.get(f"/v1/items/{victim}"), 404, "not_found")
        assert victim not in {i["id"] for i in reader.get("/v1/items", params={"limit": 500}).json()["items"]}
        prediction = reader.post("/v1/predict", data={"labels": ",".join(CLASSES), "mode": "both", "k": "20"},
                                 files=[("images", ("a.jpg", _image(), "image/jpeg"))]).json()["predictions"][0]
        assert victim not in {n["item_id"] for n in prediction["neighbours"]}
    source = Path(hit["source"])
    manifest = server.manifests / "again.csv"
    manifest.write_text(f"image,caption,label,split\n{source},{hit['caption']},,train\n")
    with server.client(server.write) as writer:
        job = writer.post("/v1/ingest", json={"path": str(manifest)}).json()
        done = _wait_job(writer, job["id"])
    assert done["failed"] == 1 and done["failures"][0]["reason"] == "taken_down", done


# --- ingestion ---------------------------------------------------------------------------------------------------
def _wait_job(http: httpx.Client, job_id: int, timeout_s: float = 180) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        job = http.get(f"/v1/jobs/{job_id}").json()
        if job["status"] != "running":
            return dict(job)
        assert time.monotonic() < deadline, job
        time.sleep(0.3)


def test_ingest_upload_zip_manifest_and_server_path(server: Server) -> None:
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zf:
        for n, color in enumerate([(250, 0, 0), (0, 250, 0)]):  # + 1 broken = 3 images, the upload cap
            zf.writestr(f"set/p{n}.png", png_bytes((40, 40), color))
            zf.writestr(f"set/p{n}.txt", f"a plain square number {n}")
        zf.writestr("set/broken.png", b"\x89PNG broken")
        zf.writestr("set/broken.txt", "a broken one")
    with server.client(server.write) as http:
        started = http.post("/v1/ingest", files=[("file", ("squares.zip", archive.getvalue(), "application/zip"))])
        assert started.status_code == 202, started.text
        job = _wait_job(http, started.json()["id"])
        assert (job["status"], job["ingested"], job["failed"]) == ("completed", 2, 1), job
        assert job["failures"][0]["reason"] in {"truncated", "corrupt", "not_an_image"}
        rows = [{"image": str(SAMPLE / "images" / p.name), "caption": "a sample test picture", "split": "test"}
                for p in sorted((SAMPLE / "images").glob("val_*"))[:2]]
        upload = "\n".join(json.dumps(r) for r in rows).encode()
        job = _wait_job(http, http.post("/v1/ingest", files=[("file", ("rows.jsonl", upload, "text/plain"))])
                        .json()["id"])
        assert (job["status"], job["ingested"]) == ("completed", 2), job
        folder = server.manifests / "clothing10"
        job = _wait_job(http, http.post("/v1/ingest", json={"path": str(folder / "manifest.csv")}).json()["id"])
        assert (job["status"], job["duplicates"] + job["failed"], job["ingested"]) == ("completed", 40, 0), job
        assert {f["reason"] for f in job["failures"]} <= {"taken_down"}  # the one deleted above stays out
        recent = http.get("/v1/jobs", params={"limit": 3}).json()["jobs"]
        assert [j["id"] for j in recent][0] == job["id"]
        found = http.post("/v1/search", json={"text": "a plain square number 1", "k": 3, "target": "text"}).json()
        assert any(r["caption"] == "a plain square number 1" for r in found["results"])  # searchable at once


def test_ingest_class_folders_dataset_name_total_and_cancel(server: Server) -> None:
    """A zip of class folders without captions, captioned from a template and filed under a chosen dataset
    name; a server-path job has a total (progress); cancel on a finished job returns it, unknown is 404."""
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("red_square/a.png", png_bytes((40, 40), (240, 10, 10)))
        zf.writestr("green_square/b.png", png_bytes((40, 40), (10, 240, 10)))
    with server.client(server.write) as http:
        started = http.post("/v1/ingest", data={"dataset": "squares", "caption_template": "a photo of a {folder}."},
                            files=[("file", ("classes.zip", archive.getvalue(), "application/zip"))])
        assert started.status_code == 202, started.text
        job = _wait_job(http, started.json()["id"])
        assert (job["status"], job["ingested"], job["failed"], job["total"]) == ("completed", 2, 0, 2), job
        items = http.get("/v1/items", params={"dataset": "squares"}).json()["items"]
        assert sorted((i["caption"], i["label"]) for i in items) == [("a photo of a green square.", 0),
                                                                      ("a photo of a red square.", 1)]
        found = http.post("/v1/search", json={"text": "a photo of a red square.", "k": 1, "target": "text",
                                              "filters": {"dataset": "squares"}}).json()["results"][0]
        assert found["label_name"] == "red square"  # classes.txt written for the dataset
        folder = server.manifests / "clothing10"
        path_job = http.post("/v1/ingest", json={"path": str(folder / "manifest.csv")}).json()
        done = _wait_job(http, path_job["id"])
        assert done["total"] == 40, done  # counted before the work: a progress for server paths too
        cancelled = http.post(f"/v1/jobs/{done['id']}/cancel")
        assert cancelled.status_code == 200 and cancelled.json()["status"] == "completed"
        _error(http.post("/v1/jobs/999999/cancel"), 404, "not_found")
        _error(http.post("/v1/ingest", json={"path": str(folder), "caption_template": "a {label}"}), 400,
               "invalid_request")
    with server.client(server.read) as reader:
        _error(reader.post(f"/v1/jobs/{done['id']}/cancel"), 403, "insufficient_scope")


def test_ingest_errors(server: Server, tmp_path: Path) -> None:
    with server.client(server.write) as http:
        _error(http.post("/v1/ingest", json={"path": "/etc"}), 403, "path_outside_root")
        _error(http.post("/v1/ingest", json={"path": str(server.manifests / "../../../../etc/passwd")}), 403,
               "path_outside_root")
        _error(http.post("/v1/ingest", json={"path": str(server.manifests / "missing.csv")}), 404, "not_found")
        _error(http.post("/v1/ingest", json={"nothing": 1}), 400, "invalid_request")
        _error(http.post("/v1/ingest", content=b"plain", headers={"content-type": "text/plain"}), 415,
               "unsupported_media_type")
        _error(http.post("/v1/ingest", files=[("file", ("notes.txt", b"hello", "text/plain"))]), 400, "unsupported")
        _error(http.post("/v1/ingest", files=[("file", ("fake.zip", b"PK not a zip", "application/zip"))]), 400,
               "corrupt")
        _error(http.post("/v1/ingest", files=[("other", ("a.csv", b"image,caption\n", "text/csv"))]), 400,
               "invalid_request")
        archive = io.BytesIO()
        with zipfile.ZipFile(archive, "w") as zf:
            for n in range(4):
                zf.writestr(f"p{n}.png", png_bytes((8, 8), (n, n, n)))
        _error(http.post("/v1/ingest", files=[("file", ("many.zip", archive.getvalue(), "application/zip"))]), 413,
               "too_large")
        _error(http.get("/v1/jobs/999999"), 404, "not_found")
        _error(http.get("/v1/jobs/not-a-number"), 400, "invalid_request")


def test_status_and_memory_through_the_server(server: Server) -> None:
    with server.client(server.read) as http:
        status = http.get("/v1/status").json()
        assert status["memory"]["backend"] == "edge" and status["serving"]["checkpoint"]
        assert status["alias"]["collection"] in status["collections"]
        _error(http.get("/v1/nothing-here"), 404, "not_found")
