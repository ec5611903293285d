"""/openapi.json says what the server enforces, and 405 answers name every method of the path."""

from __future__ import annotations

import json
import re

import httpx
import pytest

from loraplex.adapters.store import ADAPTER_ID_RE
from tests.contract_support import DEMO, MAX_CLIENT_BATCH, contract_server

METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


@pytest.fixture(scope="module")
def srv(workers):
    return contract_server(int(workers[1]))


@pytest.fixture(scope="module")
def doc(srv):
    return httpx.get(srv.url + "/openapi.json", timeout=10).json()


def _json_body_schema(doc: dict, path: str) -> dict:
    return doc["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]


# An adapter that does not exist, so that DELETE and PUT change nothing.
@pytest.mark.parametrize("path", ["/adapters/no-such-adapter", "/classify", "/adapters"])
def test_405_allow_names_exactly_the_methods_that_are_answered(srv, path):
    answers = {m: httpx.request(m, srv.url + path, timeout=10) for m in METHODS}
    refused = {m for m, r in answers.items() if r.status_code == 405}
    assert refused, f"every method is answered on {path}"
    for method in refused:
        response = answers[method]
        allow = {m.strip() for m in response.headers["allow"].split(",")}
        assert allow == set(METHODS) - refused, (method, path, response.headers["allow"])
        if method != "HEAD":
            body = response.json()
            assert body["error_type"] == "bad_request"
            assert method in body["error"] and path in body["error"]


def test_405_on_an_adapter_lists_get_put_and_delete(srv):
    # The three routes of /adapters/{id} are separate; Starlette alone would name only the first's method.
    for method in ("OPTIONS", "PATCH", "POST"):
        response = httpx.request(method, srv.url + "/adapters/no-such-adapter", timeout=10)
        assert response.status_code == 405
        assert {"GET", "PUT", "DELETE"} <= {m.strip() for m in response.headers["allow"].split(",")}


def test_text_lists_are_capped_at_max_client_batch_as_the_server_enforces(srv, doc):
    capped = []
    for path, item in doc["paths"].items():
        for operation in item.values():
            content = operation.get("requestBody", {}).get("content", {}).get("application/json")
            if content is None:
                continue
            properties = content["schema"]["properties"]
            for name in ("inputs", "input", "texts"):
                if name in properties:
                    field = properties[name]
                    options = [o for o in [field, *field.get("anyOf", ())] if o.get("type") == "array"]
                    # TEI's /predict reads ["text", "text_pair"] as one input (a pair), not as a list
                    arrays = [o for o in options if not o.get("x-one-input")]
                    assert arrays, (path, name)
                    assert all(a["maxItems"] == MAX_CLIENT_BATCH for a in arrays), (path, name)
                    capped.append(path)
    assert "/classify" in capped
    texts = ["a good day"] * MAX_CLIENT_BATCH
    url = srv.url + "/classify"
    ok = httpx.post(url, json={"adapter_id": "tweet-sentiment", "inputs": texts}, timeout=60)
    assert ok.status_code == 200 and len(ok.json()["results"]) == MAX_CLIENT_BATCH
    over = httpx.post(url, json={"adapter_id": "tweet-sentiment", "inputs": [*texts, "one more"]}, timeout=60)
    assert over.status_code == 422 and str(MAX_CLIENT_BATCH) in over.json()["error"]


def test_adapter_ids_follow_the_documented_pattern(srv, doc):
    body = _json_body_schema(doc, "/classify")["properties"]["adapter_id"]
    parameters = [
        p
        for item in doc["paths"].values()
        for operation in item.values()
        for p in operation.get("parameters", ())
        if p["name"] == "adapter_id"
    ]
    assert len(parameters) == 3  # PUT, GET, DELETE /adapters/{adapter_id}
    for schema in [body, *(p["schema"] for p in parameters)]:
        assert schema["pattern"] == ADAPTER_ID_RE.pattern
        assert schema["minLength"] == 1 and schema["maxLength"] == 64
    pattern = re.compile(body["pattern"])
    # An upload under an id the pattern admits is stored; any other id is a 422 naming the rule.
    for candidate in ("contract-id", "a.b_c-9", "Upper", "-lead", "x" * 65, "sp ace", "\u00e4"):
        url = srv.url + "/adapters/" + candidate
        response = httpx.put(url, files=_demo_files(), timeout=60)
        if pattern.fullmatch(candidate):
            assert response.status_code == 201, (candidate, response.text)
            assert httpx.delete(url, timeout=10).status_code == 204
        else:
            assert response.status_code == 422, (candidate, response.text)
            assert "is not allowed" in response.json()["error"]


def _demo_files() -> dict:
    return {
        "adapter_config": ("adapter_config.json", (DEMO / "adapter_config.json").read_bytes()),
        "adapter_model": ("adapter_model.safetensors", (DEMO / "adapter_model.safetensors").read_bytes()),
    }


def test_upload_parts_and_media_types_are_declared_and_others_refused(srv, doc):
    media = doc["paths"]["/adapters/{adapter_id}"]["put"]["requestBody"]["content"]
    assert set(media) == {"multipart/form-data"}
    schema = media["multipart/form-data"]["schema"]
    assert set(schema["properties"]) == {"adapter_config", "adapter_model", "labels"}
    assert set(schema["required"]) == {"adapter_config", "adapter_model"}
    assert schema["additionalProperties"] is False
    assert schema["properties"]["adapter_model"]["format"] == "binary"
    encoding = media["multipart/form-data"]["encoding"]
    assert encoding["adapter_config"]["contentType"] == "application/json"
    assert encoding["adapter_model"]["contentType"] == "application/octet-stream"

    files = _demo_files()
    url = srv.url + "/adapters/contract-upload"
    extra = httpx.put(url, files={**files, "notes": ("notes.txt", b"hello")}, timeout=60)
    assert extra.status_code == 422 and "notes" in extra.json()["error"]
    labels = json.dumps(json.loads((DEMO / "labels.json").read_text()))
    assert httpx.put(url, files=files, data={"labels": labels}, timeout=60).status_code == 201
    assert httpx.delete(url, timeout=10).status_code == 204


def test_every_operation_has_an_example(doc):
    missing = []
    for path, item in doc["paths"].items():
        for method, operation in item.items():
            where = f"{method.upper()} {path}"
            for name, media in operation.get("requestBody", {}).get("content", {}).items():
                if "example" not in media and "examples" not in media:
                    missing.append(f"{where} request {name}")
            for status, response in operation["responses"].items():
                for name, media in response.get("content", {}).items():
                    if "example" not in media and "examples" not in media:
                        missing.append(f"{where} {status} {name}")
            for parameter in operation.get("parameters", ()):
                if parameter["in"] == "path" and "example" not in parameter:
                    missing.append(f"{where} parameter {parameter['name']}")
    assert not missing, missing


def test_the_classify_example_is_what_the_server_answers(srv, doc):
    content = doc["paths"]["/classify"]["post"]
    example = content["requestBody"]["content"]["application/json"]["example"]
    documented = content["responses"]["200"]["content"]["application/json"]["example"]
    answer = httpx.post(srv.url + "/classify", json=example, timeout=60).json()
    assert [r["label"] for r in answer["results"]] == [r["label"] for r in documented["results"]]
    assert answer["adapter_id"] == documented["adapter_id"]
