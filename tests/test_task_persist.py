"""Every task survives the store, the listing and a restart: uploaded over HTTP, listed with its task and
routes (HTTP, CLI, /v1/models), served again by a new server on the same store; what an upload is told
when it is accepted anyway (another base model, no labels); the labels part's documented bound."""

from __future__ import annotations

import json
import re
import shutil

import httpx
import numpy as np
import pytest

from loraplex import cli
from loraplex.adapters.upload import MAX_LABEL_CHARS, MAX_LABELS_BYTES
from loraplex.client import Client
from tests.live_server import LiveServer
from tests.task_support import save_task_adapter

TEXTS = ["The service was quick and the food was excellent.", "Terrible."]
TASKS = {
    "emb": ("FEATURE_EXTRACTION", {}, ["/embed", "/v1/embeddings"]),
    "sent": ("SEQ_CLS", {"num_labels": 3}, ["/classify", "/predict"]),
    "cross": ("SEQ_CLS", {"num_labels": 1}, ["/classify", "/predict", "/rerank"]),
    "ner": ("TOKEN_CLS", {"num_labels": 5}, ["/tokens"]),
    "squad": ("QUESTION_ANS", {"num_labels": 2}, ["/answer"]),
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("persist")
    return {
        name: save_task_adapter(root / name, task, seed=i, **kwargs)
        for i, (name, (task, kwargs, _)) in enumerate(TASKS.items())
    }


def embed(url: str, adapter_id: str) -> np.ndarray:
    answer = httpx.post(f"{url}/embed", json={"adapter_id": adapter_id, "inputs": TEXTS}, timeout=60)
    assert answer.status_code == 200, answer.text
    return np.array([r["embedding"] for r in answer.json()["results"]])


def listed(url: str) -> dict[str, dict]:
    answer = httpx.get(f"{url}/adapters", timeout=60)
    assert answer.status_code == 200, answer.text
    return {a["adapter_id"]: a for a in answer.json()["adapters"]}


def test_every_task_is_listed_and_served_after_a_restart(folders, tmp_path, capsys):
    store = tmp_path / "store"
    with LiveServer("--adapter-store", str(store)) as first, Client(first.url) as client:
        for name, folder in folders.items():
            info = client.upload(name, folder)
            assert info.created and info.task_type == TASKS[name][0] and info.routes == TASKS[name][2]
            assert info.warnings == []  # trained on the served model, labels.json sent
        before = embed(first.url, "emb")
        adapters = listed(first.url)
        assert {n: (a["task_type"], a["routes"]) for n, a in adapters.items()} == {
            n: (task, routes) for n, (task, _, routes) in TASKS.items()
        }
        assert adapters["emb"]["labels"] == [] and adapters["emb"]["num_labels"] == 0
        for name, (task, _, routes) in TASKS.items():
            shown = httpx.get(f"{first.url}/adapters/{name}", timeout=60)
            assert shown.status_code == 200, shown.text
            assert (shown.json()["task_type"], shown.json()["routes"]) == (task, routes)
            # `loraplex adapters show` prints the same task and routes, one row as `ls` does
            assert cli.main(["adapters", "show", name, "--url", first.url]) in (0, None)
            header, *rows = capsys.readouterr().out.splitlines()
            assert header.split()[:4] == ["ID", "VERSION", "TASK", "ROUTE"]
            assert [line.split()[2:4] for line in rows] == [[task, ",".join(routes)]]
        assert cli.main(["adapters", "ls", "--url", first.url]) in (0, None)
        table = capsys.readouterr().out.splitlines()
        assert table[0].split()[:4] == ["ID", "VERSION", "TASK", "ROUTE"]
        rows = {line.split()[0]: line.split() for line in table[1:]}
        assert rows["emb"][2:4] == ["FEATURE_EXTRACTION", "/embed,/v1/embeddings"]
        assert rows["squad"][2:4] == ["QUESTION_ANS", "/answer"]
        assert "damaged" not in first.log()
        # the access log, as text by default: one line per request
        assert re.search(
            r" INFO loraplex\.access: POST /embed adapter=emb status=200 rows=2 ms=\d", first.log()
        )

    # A new server on the same store, nothing preloaded: every adapter is there and serves.
    with LiveServer("--adapter-store", str(store)) as second:
        assert set(listed(second.url)) == set(TASKS)
        np.testing.assert_allclose(embed(second.url, "emb"), before, atol=1e-6, rtol=0)
        models = httpx.get(f"{second.url}/v1/models", timeout=60).json()["data"]
        assert {m["id"]: m["task_type"] for m in models if m["id"] in TASKS} == {
            n: task for n, (task, _, _) in TASKS.items()
        }
        squad = {"adapter_id": "squad", "question": "When?", "context": "The train leaves at 9:15."}
        assert httpx.post(f"{second.url}/answer", json=squad, timeout=60).status_code == 200
        assert "damaged" not in second.log()


def test_a_store_written_before_manifests_recorded_the_task(folders, tmp_path):
    """The embedding adapter's manifest of earlier versions ("labels": [], no task_type) serves now."""
    store = tmp_path / "store"
    with LiveServer("--adapter-store", str(store)) as first, Client(first.url) as client:
        client.upload("emb", folders["emb"])
        client.upload("sent", folders["sent"])
        before = embed(first.url, "emb")
    for name in ("emb", "sent"):
        path = store / "adapters" / name / "manifest.json"
        manifest = json.loads(path.read_text())
        del manifest["task_type"]
        path.write_text(json.dumps(manifest))
    with LiveServer("--adapter-store", str(store)) as second:
        adapters = listed(second.url)
        assert adapters["emb"]["task_type"] == "FEATURE_EXTRACTION"
        # A classifier's manifest of then: its task is unknown until it is uploaded again; it serves.
        assert adapters["sent"]["task_type"] is None and adapters["sent"]["routes"] == []
        np.testing.assert_allclose(embed(second.url, "emb"), before, atol=1e-6, rtol=0)
        classified = httpx.post(
            f"{second.url}/classify", json={"adapter_id": "sent", "inputs": "hi"}, timeout=60
        )
        assert classified.status_code == 200


def test_upload_warnings(folders, tmp_path, capsys):
    other_base = tmp_path / "other"
    shutil.copytree(folders["sent"], other_base)
    config = json.loads((other_base / "adapter_config.json").read_text())
    (other_base / "adapter_config.json").write_text(
        json.dumps({**config, "base_model_name_or_path": "prajjwal1/bert-tiny"})
    )
    (other_base / "labels.json").unlink()
    with LiveServer("--adapter-store", str(tmp_path / "store")) as srv, Client(srv.url) as client:
        info = client.upload("other", other_base)
        assert len(info.warnings) == 2, info.warnings
        assert (
            "prajjwal1/bert-tiny" in info.warnings[0]
            and "sentence-transformers/all-MiniLM-L6-v2" in info.warnings[0]
        )
        assert "LABEL_0, LABEL_1, LABEL_2" in info.warnings[1]
        assert info.labels == ["LABEL_0", "LABEL_1", "LABEL_2"]
        log = srv.log()
        assert "adapter other: adapter_config.json names base model 'prajjwal1/bert-tiny'" in log
        assert "adapter other: No labels were sent" in log
        code = cli.main(["adapters", "push", "other", str(other_base), "--url", srv.url])
        assert code in (0, None) and "warning: No labels were sent" in capsys.readouterr().out
        # the labels part's documented bounds: over maxLength (characters) is 413, a long label is 422
        files = {
            "adapter_config": ("adapter_config.json", (folders["sent"] / "adapter_config.json").read_bytes()),
            "adapter_model": (
                "adapter_model.safetensors",
                (folders["sent"] / "adapter_model.safetensors").read_bytes(),
            ),
        }
        too_long = json.dumps(["a" * (MAX_LABELS_BYTES)])
        answer = httpx.put(f"{srv.url}/adapters/bounds", files=files, data={"labels": too_long}, timeout=60)
        assert answer.status_code == 413, answer.text
        wide = json.dumps(["a" * (MAX_LABEL_CHARS + 1), "b", "c"])
        answer = httpx.put(f"{srv.url}/adapters/bounds", files=files, data={"labels": wide}, timeout=60)
        assert answer.status_code == 422 and str(MAX_LABEL_CHARS) in answer.json()["error"], answer.text
        assert httpx.get(f"{srv.url}/adapters/bounds", timeout=60).status_code == 404
