"""Safe defaults for adapter writes: on an interface other than loopback, no admin token means no writes.

Each server listens on 0.0.0.0 (reached here through 127.0.0.1): without an admin token PUT and DELETE
get 401 with a sentence saying how to enable them, while inference and reads stay open; an explicit
--allow-unauthenticated-writes opens them; a token read from LORAPLEX_ADMIN_TOKEN_FILE guards them.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import httpx

from tests.lifecycle_support import upload
from tests.live_server import LiveServer
from tests.peft_factory import save_peft_adapter

TOKEN = "admin-from-a-file-5d1c0e"


def adapter() -> Path:
    return save_peft_adapter(Path(tempfile.mkdtemp(prefix="loraplex-auth-")) / "a", seed=31)


def server(workers: list[str], *args: str, env: dict[str, str] | None = None) -> LiveServer:
    store = tempfile.mkdtemp(prefix="loraplex-auth-store-")
    return LiveServer(*workers, "--host", "0.0.0.0", "--adapter-store", store, *args, env=env)


def test_without_an_admin_token_a_public_server_refuses_writes_and_says_how_to_allow_them(workers):
    folder = adapter()
    srv = server(workers, "--preload", f"kept={folder}")
    with srv, httpx.Client(base_url=srv.url, timeout=60) as client:
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


def test_allow_unauthenticated_writes_opens_them_and_a_token_file_guards_them(workers):
    folder = adapter()
    with (
        server(workers, "--allow-unauthenticated-writes") as srv,
        httpx.Client(base_url=srv.url, timeout=60) as client,
    ):
        assert upload(client, "open", folder).status_code == 201
        assert client.delete("/adapters/open").status_code == 204
    token_file = Path(tempfile.mkdtemp(prefix="loraplex-secrets-")) / "admin-token"
    token_file.write_text(TOKEN + "\n")
    with (
        server(workers, env={"LORAPLEX_ADMIN_TOKEN_FILE": str(token_file)}) as srv,
        httpx.Client(base_url=srv.url, timeout=60) as client,
    ):
        refused = upload(client, "guarded", folder)
        assert refused.status_code == 401 and "Bearer" in refused.json()["error"]
        admin = {"Authorization": f"Bearer {TOKEN}"}
        assert upload(client, "guarded", folder, headers=admin).status_code == 201
        assert client.delete("/adapters/guarded", headers=admin).status_code == 204
        assert TOKEN not in srv.log()
