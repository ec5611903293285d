"""Safe defaults on an interface other than loopback: no admin token means no writes, open inference is
said out loud, and /metrics shows adapter ids only behind its own token.

Each server listens on 0.0.0.0 (reached here through 127.0.0.1): without an admin token PUT and DELETE
get 401 with a sentence saying how to enable them, while inference and reads stay open (started with
--allow-anonymous-inference, which the start line and /health report); an explicit
--allow-unauthenticated-writes opens them; a token read from LORAPLEX_ADMIN_TOKEN_FILE guards them.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import httpx

from tests.lifecycle_support import upload
from tests.live_server import LiveServer
from tests.peft_factory import save_peft_adapter

TOKEN = "admin-from-a-file-5d1c0e8a2f7b9c4e6d13"
API_KEY = "api-key-from-a-file-93b1f0d7c6e2a5847f"
METRICS_TOKEN = "metrics-from-a-file-2c7e9b4d1f8a6035e9"


def adapter() -> Path:
    return save_peft_adapter(Path(tempfile.mkdtemp(prefix="loraplex-auth-")) / "a", seed=31)


def server(workers: list[str], *args: str, env: dict[str, str] | None = None) -> LiveServer:
    store = tempfile.mkdtemp(prefix="loraplex-auth-store-")
    return LiveServer(*workers, "--host", "0.0.0.0", "--adapter-store", store, *args, env=env)


def secret_file(name: str, token: str) -> str:
    path = Path(tempfile.mkdtemp(prefix="loraplex-secrets-")) / name
    path.write_text(token + "\n")
    return str(path)


def test_without_an_admin_token_a_public_server_refuses_writes_and_says_how_to_allow_them(workers):
    folder = adapter()
    srv = server(workers, "--allow-anonymous-inference", "--preload", f"kept={folder}")
    with srv, httpx.Client(base_url=srv.url, timeout=60) as client:
        # Open inference on a public address is a choice the server states, at start and in /health.
        assert "INFERENCE AND ADAPTER READS ARE OPEN TO ANYONE (--allow-anonymous-inference)" in srv.log()
        assert client.get("/health").json() == {"status": "ok", "anonymous_inference": True}
        for response in (upload(client, "new", folder), client.delete("/adapters/kept")):
            assert response.status_code == 401, response.text
            body = response.json()
            assert body["error_type"] == "unauthorized"
            assert (
                "LORAPLEX_ADMIN_TOKEN" in body["error"] and "--allow-unauthenticated-writes" in body["error"]
            )
        # Reads and inference stay as they were; --preload (the operator's own) still worked.
        assert client.get("/adapters").json()["adapters"][0]["adapter_id"] == "kept"
        assert client.post("/classify", json={"adapter_id": "kept", "inputs": "hi"}).status_code == 200
        assert client.get("/adapters/new").status_code == 404  # nothing was stored
        # /metrics is open (no metrics token), so it names no adapter: tenants stay private.
        metrics = client.get("/metrics")
        assert metrics.status_code == 200 and 'loraplex_inputs_total{adapter="other"}' in metrics.text
        assert "kept" not in metrics.text


def test_allow_unauthenticated_writes_opens_them_and_a_token_file_guards_them(workers):
    folder = adapter()
    with (
        server(workers, "--allow-unauthenticated-writes", "--allow-anonymous-inference") as srv,
        httpx.Client(base_url=srv.url, timeout=60) as client,
    ):
        assert upload(client, "open", folder).status_code == 201
        assert client.delete("/adapters/open").status_code == 204
    env = {
        "LORAPLEX_ADMIN_TOKEN_FILE": secret_file("admin-token", TOKEN),
        "LORAPLEX_API_KEY_FILE": secret_file("api-key", API_KEY),
        "LORAPLEX_METRICS_TOKEN_FILE": secret_file("metrics-token", METRICS_TOKEN),
    }
    with server(workers, env=env) as srv, httpx.Client(base_url=srv.url, timeout=60) as client:
        refused = upload(client, "guarded", folder)
        assert refused.status_code == 401 and "Bearer" in refused.json()["error"]
        admin = {"Authorization": f"Bearer {TOKEN}"}
        assert upload(client, "guarded", folder, headers=admin).status_code == 201
        reader = {"Authorization": f"Bearer {API_KEY}"}
        assert client.post("/classify", json={"adapter_id": "guarded", "inputs": "hi"}).status_code == 401
        assert (
            client.post(
                "/classify", json={"adapter_id": "guarded", "inputs": "hi"}, headers=reader
            ).status_code
            == 200
        )
        assert client.get("/health").json() == {"status": "ok", "anonymous_inference": False}
        assert "OPEN TO ANYONE" not in srv.log()
        # /metrics has its own token; behind it, series name their adapters.
        for headers in ({}, reader):
            refused = client.get("/metrics", headers=headers)
            assert refused.status_code == 401 and refused.json()["error_type"] == "unauthorized"
        scraped = client.get("/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"})
        assert scraped.status_code == 200 and 'loraplex_inputs_total{adapter="guarded"}' in scraped.text
        assert client.delete("/adapters/guarded", headers=admin).status_code == 204
        for secret in (TOKEN, API_KEY, METRICS_TOKEN):
            assert secret not in srv.log()
