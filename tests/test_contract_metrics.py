"""/metrics: every request counted under its route template (docs included), warm-up refusals under
`not_ready`, and the resident gauge counting what the slots hold for live adapters."""

from __future__ import annotations

import tempfile
import threading

import httpx
import pytest

from loraplex.http.app import create_app
from loraplex.settings import Settings
from tests.contract_support import DEMO, contract_server
from tests.live_server import LiveServer
from tests.serving_support import metrics


def _templates(routes) -> set[str]:
    """Every route template of the app, through included routers of any depth."""
    out: set[str] = set()
    for route in routes:
        if hasattr(route, "path"):
            out.add(route.path)
        inner = getattr(route, "original_router", None) or getattr(route, "app", None)
        if inner is not None and hasattr(inner, "routes"):
            out |= _templates(inner.routes)
    return out


TEMPLATES = _templates(create_app(Settings()).routes)


@pytest.fixture(scope="module")
def srv():
    return contract_server()


def _requests(url: str) -> dict[tuple[str, str], float]:
    """{(route, status): count} of loraplex_requests_total."""
    out: dict[tuple[str, str], float] = {}
    for (name, labels), value in metrics(url).items():
        if name == "loraplex_requests_total":
            labels = dict(labels)
            key = (labels["route"], labels["status"])
            out[key] = out.get(key, 0) + value
    return out


def test_every_route_is_labelled_by_its_template(srv):
    paths = ["/docs", "/redoc", "/docs/assets/swagger-ui.css", "/docs/oauth2-redirect", "/openapi.json"]
    paths += ["/adapters/no-such-adapter", "/adapters", "/health", "/no/such/route"]
    before = _requests(srv.url)
    for path in paths:
        httpx.get(srv.url + path, timeout=30)
    after = _requests(srv.url)
    grown = {route for (route, _), n in after.items() if n > before.get((route, _), 0)}
    assert grown <= TEMPLATES | {"unmatched", "/metrics"}, grown - TEMPLATES
    expected = {"/docs", "/redoc", "/docs/assets/{name}", "/docs/oauth2-redirect", "/openapi.json"}
    expected |= {"/adapters/{adapter_id:path}", "/adapters", "/health", "unmatched"}
    assert expected <= grown, expected - grown


def test_resident_gauge_counts_the_adapters_the_slots_serve(srv):
    files = {
        "adapter_config": ("adapter_config.json", (DEMO / "adapter_config.json").read_bytes()),
        "adapter_model": ("adapter_model.safetensors", (DEMO / "adapter_model.safetensors").read_bytes()),
    }
    ids = [f"resident-{i}" for i in range(4)]
    for adapter_id in ids:
        assert httpx.put(f"{srv.url}/adapters/{adapter_id}", files=files, timeout=60).status_code == 201
        body = {"adapter_id": adapter_id, "inputs": "hello"}
        assert httpx.post(srv.url + "/classify", json=body, timeout=60).status_code == 200
    for adapter_id in ids[:3]:
        assert httpx.delete(f"{srv.url}/adapters/{adapter_id}", timeout=10).status_code == 204
    listed = httpx.get(srv.url + "/adapters", timeout=10).json()["adapters"]
    resident = [a["adapter_id"] for a in listed if a["resident"]]
    assert "resident-3" in resident and not set(ids[:3]) & {a["adapter_id"] for a in listed}
    gauge = metrics(srv.url)[("loraplex_resident_adapters", ())]
    assert gauge == len(resident)
    httpx.delete(f"{srv.url}/adapters/{ids[3]}", timeout=10)


def test_warm_up_refusals_are_labelled_not_ready():
    server = LiveServer("--adapter-store", tempfile.mkdtemp(prefix="loraplex-warmup-store-"))
    starting = threading.Thread(target=server.start)
    starting.start()
    refused = 0
    try:
        while starting.is_alive() and refused < 5:
            try:
                answer = httpx.post(
                    server.url + "/classify", json={"adapter_id": "x", "inputs": "hi"}, timeout=5
                )
            except httpx.TransportError:  # not listening yet
                continue
            if answer.status_code == 503:
                refused += 1
        starting.join()
        assert refused, "the server was ready before any request reached it while loading"
        counts = _requests(server.url)
        assert counts.get(("not_ready", "503"), 0) >= refused
        assert ("unmatched", "503") not in counts and ("/classify", "503") not in counts
    finally:
        starting.join()
        server.stop()
