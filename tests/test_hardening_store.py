"""What the adapter store holds is input: damaged or foreign entries are skipped, never a crash or a 500.

Both store kinds (a directory, and S3 on moto's server on loopback) get the same damage written straight
into their files: a manifest that is not JSON, a foreign JSON manifest, one that names another adapter,
one whose version would leave the adapter's folder, a damaged labels file, weights that are not
safetensors, and valid safetensors weights changed in place (they no longer hash to their version). A
listing skips them, a request for one gets 409 with the reason, the rest keep working, and an upload or a
delete repairs them. A real server starts on such a directory store.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import tempfile
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import load, save

from loraplex.adapters.errors import DamagedAdapterError
from loraplex.adapters.registry import Registry
from loraplex.adapters.store import AdapterFiles, AdapterRecord, DirectoryStore, utc_now
from tests.lifecycle_support import upload
from tests.live_server import LiveServer
from tests.peft_factory import peft_logits, save_peft_adapter
from tests.serving_support import metrics, sample

TEXTS = ["a sunny day", "the package never arrived"]
GOOD = ["good", "labels-damaged", "weights-damaged", "weights-altered"]  # manifests that are fine
DAMAGED_MANIFESTS = {
    "not-json": b"{'adapter_id': \"not-json\", version",
    "foreign": json.dumps({"name": "foreign", "weights": "model.bin", "format": 2}).encode(),
    "other-id": None,  # a valid manifest of "good", copied under another id
    "traversal": None,  # a valid manifest whose version is "../good/<version>"
    "wrong-types": None,  # a valid manifest with rank "8" and labels a string
}


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory) -> Path:
    return save_peft_adapter(tmp_path_factory.mktemp("adapters") / "a", seed=21, labels=["x", "y", "z"])


def stored(adapter_id: str, folder: Path, model: bytes | None = None) -> tuple[AdapterRecord, AdapterFiles]:
    model = model if model is not None else (folder / "adapter_model.safetensors").read_bytes()
    files = AdapterFiles(
        config=(folder / "adapter_config.json").read_bytes(),
        model=model,
        labels=tuple(json.loads((folder / "labels.json").read_text())),
    )
    record = AdapterRecord(
        adapter_id=adapter_id, version=files.version(), sha256=hashlib.sha256(model).hexdigest(), rank=8,
        lora_alpha=16, target_modules=("query", "value"), labels=files.labels, size_bytes=len(model),
        created_at=utc_now(),
    )  # fmt: skip
    return record, files


def damaged_manifest(adapter_id: str, good_manifest: bytes) -> bytes:
    raw = DAMAGED_MANIFESTS[adapter_id]
    if raw is not None:
        return raw
    data = json.loads(good_manifest)
    if adapter_id == "traversal":
        data = {**data, "adapter_id": "traversal", "version": f"../good/{data['version']}"}
    elif adapter_id == "wrong-types":
        data = {**data, "adapter_id": "wrong-types", "rank": "8", "labels": "x,y,z"}
    return json.dumps(data).encode()  # "other-id": the manifest of "good" as it is


class DirectoryKind:
    name = "directory"

    def __init__(self, root: Path):
        self.root = root

    def open(self):
        return DirectoryStore(self.root)

    def write(self, adapter_id: str, name: str, data: bytes) -> None:
        folder = self.root / "adapters" / adapter_id
        if name != "manifest.json":
            folder = folder / json.loads((folder / "manifest.json").read_text())["version"]
        folder.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)

    def read(self, adapter_id: str, name: str) -> bytes:
        return (self.root / "adapters" / adapter_id / name).read_bytes()

    def read_version(self, adapter_id: str, name: str) -> bytes:
        folder = self.root / "adapters" / adapter_id
        return (folder / json.loads((folder / "manifest.json").read_text())["version"] / name).read_bytes()


class S3Kind:
    name = "s3"

    def __init__(self, bucket: str):
        from loraplex.adapters.store_s3 import make_client

        self.bucket = bucket
        self.client = make_client()

    def open(self):
        from loraplex.adapters.store_s3 import S3Store

        return S3Store.from_url(f"s3://{self.bucket}/team")

    def write(self, adapter_id: str, name: str, data: bytes) -> None:
        key = f"team/adapters/{adapter_id}/manifest.json"
        if name != "manifest.json":
            key = f"{json.loads(self.read(adapter_id, 'manifest.json'))['objects']}/{name}"
        self.client.put_object(Bucket=self.bucket, Key=key, Body=data)

    def read(self, adapter_id: str, name: str) -> bytes:
        key = f"team/adapters/{adapter_id}/{name}"
        return self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()

    def read_version(self, adapter_id: str, name: str) -> bytes:
        key = f"{json.loads(self.read(adapter_id, 'manifest.json'))['objects']}/{name}"
        return self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()


@pytest.fixture(scope="module")
def s3_endpoint():
    pytest.importorskip("moto.server")
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


_buckets = iter(range(10_000))


@pytest.fixture(params=["directory", "s3"])
def kind(request, tmp_path, adapter_dir):
    if request.param == "directory":
        kind = DirectoryKind(tmp_path / "store")
    else:
        endpoint = request.getfixturevalue("s3_endpoint")
        monkeypatch = request.getfixturevalue("monkeypatch")
        for name, value in {
            "AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
        }.items():  # fmt: skip
            monkeypatch.setenv(name, value)
        bucket = f"loraplex-damaged-{next(_buckets)}"
        kind = S3Kind(bucket)
        kind.client.create_bucket(Bucket=bucket)
    damage(kind, adapter_dir)
    return kind


def damage(kind, adapter_dir: Path) -> None:
    """The good adapters through the store, then every kind of damage written into its files."""
    store = kind.open()
    for adapter_id in GOOD:
        model = b"\x80\x04\x95pickle, not safetensors" if adapter_id == "weights-damaged" else None
        store.put(*stored(adapter_id, adapter_dir, model))
    kind.write("labels-damaged", "labels.json", b'["x", "y"')
    tensors = load(kind.read_version("weights-altered", "adapter_model.safetensors"))
    name = next(name for name in tensors if "lora_B" in name)
    tensors[name] = tensors[name] + 1.0  # still valid, the right shapes, other numbers
    kind.write("weights-altered", "adapter_model.safetensors", save(tensors))
    good_manifest = kind.read("good", "manifest.json")
    for adapter_id in DAMAGED_MANIFESTS:
        kind.write(adapter_id, "manifest.json", damaged_manifest(adapter_id, good_manifest))


def test_a_listing_skips_damaged_manifests_and_a_get_names_the_reason(kind):
    store = kind.open()  # a directory store recovers its folders here: damaged ones must not stop it
    before = store.damaged
    assert [record.adapter_id for record in store.list()] == sorted(GOOD)
    assert store.damaged == before + len(DAMAGED_MANIFESTS)  # each skipped one is counted (and logged)
    for adapter_id in DAMAGED_MANIFESTS:
        with pytest.raises(DamagedAdapterError) as caught:
            store.get(adapter_id)
        assert (
            repr(adapter_id) in caught.value.message
            and "Upload it again or delete it" in caught.value.message
        )
    with pytest.raises(DamagedAdapterError, match="labels.json is not JSON"):
        store.read("labels-damaged", store.get("labels-damaged").version)
    # The content of "good" is still there and whole.
    assert store.read("good", store.get("good").version).labels == ("x", "y", "z")


def test_an_upload_or_a_delete_repairs_a_damaged_adapter(kind, adapter_dir):
    store = kind.open()
    record, files = stored("not-json", adapter_dir)
    assert store.put(record, files)[0] == record
    assert store.get("not-json") == record
    assert store.read("not-json", record.version) == files
    assert store.delete("foreign") is True
    assert store.get("foreign") is None
    assert "foreign" not in [r.adapter_id for r in store.list()]


def test_the_registry_answers_409_for_damaged_entries_and_serves_the_rest(kind, engine):
    registry = Registry(kind.open(), engine)
    before = registry.damaged

    async def main():
        for adapter_id in [*DAMAGED_MANIFESTS, *GOOD[1:]]:
            with pytest.raises(DamagedAdapterError) as caught:
                await registry.get(adapter_id)
            assert repr(adapter_id) in caught.value.message
        with pytest.raises(DamagedAdapterError, match="do not hash to their version"):
            await registry.get("weights-altered")
        assert (await registry.get("good")).labels == ("x", "y", "z")

    asyncio.run(main())
    assert registry.damaged == before + len(DAMAGED_MANIFESTS) + len(GOOD[1:]) + 1  # weights-altered twice


@pytest.fixture(scope="module")
def engine():
    from loraplex.engine.core import Engine

    return Engine(num_slots=2)


def test_a_server_starts_on_a_damaged_store_and_never_answers_500(adapter_dir):
    root = Path(tempfile.mkdtemp(prefix="loraplex-damaged-store-"))
    kind = DirectoryKind(root)
    damage(kind, adapter_dir)
    expected = peft_logits(adapter_dir, TEXTS)
    with (
        LiveServer("--adapter-store", str(root)) as srv,
        httpx.Client(base_url=srv.url, timeout=60) as client,
    ):
        listing = client.get("/adapters")
        assert listing.status_code == 200, listing.text
        assert [info["adapter_id"] for info in listing.json()["adapters"]] == sorted(GOOD)

        def classify(adapter_id: str) -> httpx.Response:
            return client.post(
                "/classify", json={"adapter_id": adapter_id, "inputs": TEXTS, "raw_scores": True}
            )

        good = classify("good")
        assert good.status_code == 200, good.text
        got = torch.tensor([[r["scores"][label] for label in "xyz"] for r in good.json()["results"]])
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
        for adapter_id in [*DAMAGED_MANIFESTS, *GOOD[1:]]:
            for response in (classify(adapter_id), client.get(f"/adapters/{adapter_id}")):
                if adapter_id in GOOD and response.request.method == "GET":
                    assert response.status_code == 200  # its manifest is fine; its files are not
                    continue
                assert response.status_code == 409, response.text
                body = response.json()
                assert body["error_type"] == "conflict" and repr(adapter_id) in body["error"]
        assert sample(metrics(srv.url), "loraplex_store_damaged_total") >= len(DAMAGED_MANIFESTS) + len(
            GOOD[1:]
        )

        assert upload(client, "not-json", adapter_dir).status_code in (200, 201)
        assert classify("not-json").status_code == 200
        assert client.delete("/adapters/foreign").status_code == 204
        assert classify("foreign").status_code == 404
        answered = {
            (dict(labels)["route"], dict(labels)["status"])
            for (name, labels), value in metrics(srv.url).items()
            if name == "loraplex_requests_total" and value and dict(labels)["route"] != "/ready"
        }
        assert not [status for _, status in answered if status.startswith("5")], answered
        assert "is damaged and skipped" in srv.log()


def test_a_read_stops_at_the_size_limit_of_an_upload(kind):
    """A store object larger than an upload may be (a foreign or planted file) is refused as damaged, read
    no further than the limit; an object at the limit is read whole."""
    store = kind.open()
    version = store.get("good").version
    size = len(store.read("good", version).model)
    store.max_file_bytes = size
    assert len(store.read("good", version).model) == size
    store.max_file_bytes = size - 1
    with pytest.raises(
        DamagedAdapterError, match=f"adapter_model.safetensors is over the limit of {size - 1} bytes"
    ):
        store.read("good", version)
