"""`loraplex serve --adapter-store s3://...` against a real S3 server on loopback (moto's standalone server),
behind the repository's nginx template: uploads land in the bucket, and when the store goes away cached
adapters keep serving while changes get 503 with Retry-After, through nginx."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import httpx
import pytest
import torch

from loraplex.adapters.store_s3 import make_client
from tests.deploy_support import Nginx, free_port, render_nginx_template, upload
from tests.live_server import LiveServer
from tests.peft_factory import peft_logits, save_peft_adapter

pytest.importorskip("moto.server")
pytestmark = pytest.mark.skipif(
    shutil.which("nginx") is None and not Path("/usr/sbin/nginx").exists(),
    reason="nginx is not installed (.ci/run installs nginx-light)",
)

TEXTS = ["a sunny day", "the package never arrived"]
BUCKET = "loraplex-live"


class Moto:
    """moto's S3 server in this process; its data outlives a stop, so it can come back on the same port."""

    def __init__(self):
        self.port = free_port()
        self.server = None

    def start(self) -> None:
        from moto.server import ThreadedMotoServer

        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()

    def stop(self) -> None:
        self.server.stop()
        self.server._server.server_close()  # refuse connections, as a store that is down does


@pytest.fixture
def s3_env(monkeypatch):
    moto = Moto()
    moto.start()
    env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{moto.port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    make_client().create_bucket(Bucket=BUCKET)
    yield moto, env
    if moto.server is not None and moto.server._server_ready_event.is_set():
        moto.stop()


def test_s3_store_serves_uploads_and_survives_an_outage(s3_env, tmp_path):
    moto, env = s3_env
    adapter = save_peft_adapter(tmp_path / "a", seed=5, labels=["x", "y", "z"])
    expected = peft_logits(adapter, TEXTS)
    server = LiveServer("--adapter-store", f"s3://{BUCKET}/team", "--staleness-s", "0.5", env=env)
    with server:
        port = free_port()
        with (
            Nginx(render_nginx_template([server.port], port), port) as nginx,
            httpx.Client(timeout=60) as client,
        ):
            created = upload(client, nginx.url, "sentiment", adapter)
            assert created.status_code == 201, f"{created.text}\n{server.log()[-3000:]}"
            version = created.json()["version"]
            keys = sorted(item["Key"] for item in make_client().list_objects_v2(Bucket=BUCKET)["Contents"])
            assert keys[-1] == "team/adapters/sentiment/manifest.json"
            assert [k.rsplit("/", 1)[-1] for k in keys[:-1]] == [
                "adapter_config.json", "adapter_model.safetensors", "labels.json"
            ]  # fmt: skip
            assert keys[0].startswith(f"team/adapters/sentiment/{version}.")

            def classify():
                body = {"adapter_id": "sentiment", "inputs": TEXTS, "raw_scores": True}
                return client.post(f"{nginx.url}/classify", json=body, headers={"X-Adapter-Id": "sentiment"})

            reply = classify()
            assert reply.status_code == 200, reply.text
            got = torch.tensor([[r["scores"][label] for label in "xyz"] for r in reply.json()["results"]])
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)

            moto.stop()
            time.sleep(0.6)  # past the staleness bound: the next request asks the (gone) store
            for _ in range(3):
                kept = classify()
                assert kept.status_code == 200, f"{kept.text}\n{server.log()[-3000:]}"
                assert kept.json()["adapter_version"] == version
            start = time.monotonic()
            refused = upload(client, nginx.url, "other", adapter)
            assert time.monotonic() - start < 15, "an unreachable store must fail fast"
            assert refused.status_code == 503, refused.text
            assert refused.json()["error_type"] == "unavailable"
            assert int(refused.headers["retry-after"]) > 0  # passed through nginx
            assert "x-loraplex-replica" in refused.headers  # the server's answer, not nginx's
            listing = client.get(f"{nginx.url}/adapters")
            assert listing.status_code == 503 and "retry-after" in listing.headers
            unknown = client.post(f"{nginx.url}/classify", json={"adapter_id": "never-seen", "inputs": "x"})
            assert unknown.status_code == 503

            moto.start()
            back = upload(client, nginx.url, "other", adapter)
            assert back.status_code == 201, back.text
            assert classify().status_code == 200
