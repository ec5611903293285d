"""`loraplex serve` options: every setting is a flag and a LORAPLEX_ variable; bad values exit 2."""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from loraplex import serve
from loraplex.settings import ENV_PREFIX, Settings, SettingsError, load_settings, option_flag
from tests.live_server import REPO, free_port

# A valid value that differs from the default, for every setting, and what it parses to.
VALUES = {
    "host": ("0.0.0.0", "0.0.0.0"),
    "port": ("9123", 9123),
    "model": ("/models/bert", "/models/bert"),
    "device": ("cuda:1", "cuda:1"),
    "dtype": ("bfloat16", "bfloat16"),
    "adapter_store": ("/data/adapters", "/data/adapters"),
    "workers": ("2", 2),
    "engine_threads": ("1", 1),
    "max_resident": ("3", 3),
    "max_host_cache": ("20", 20),
    "max_rank": ("16", 16),
    "max_labels": ("7", 7),
    "max_batch_tokens": ("4096", 4096),
    "max_batch_size": ("8", 8),
    "max_wait_ms": ("0.5", 0.5),
    "max_queued": ("100", 100),
    "max_client_batch": ("10", 10),
    "max_body_bytes": ("1000", 1000),
    "max_upload_bytes": ("5000", 5000),
    "request_timeout_s": ("1.5", 1.5),
    "staleness_s": ("0", 0.0),
    "drain_grace_s": ("3", 3.0),
    "api_key": ("k1", "k1"),
    "admin_token": ("t1", "t1"),
    "api_key_file": ("/run/secrets/absent/api-key", Path("/run/secrets/absent/api-key")),
    "admin_token_file": ("/run/secrets/absent/admin-token", Path("/run/secrets/absent/admin-token")),
    "allow_unauthenticated_writes": ("true", True),  # a flag without a value on the command line
    "preload": ("a=/tmp", ["a=/tmp"]),
    "metrics_max_adapters": ("5", 5),
    "log_level": ("WARNING", "warning"),
    "log_format": ("JSON", "json"),
    "replica_id": ("replica-2", "replica-2"),
}


def value_of(settings: Settings, name: str):
    value = getattr(settings, name)
    return value.get_secret_value() if name in ("api_key", "admin_token") else value


@pytest.fixture
def clean_env(monkeypatch):
    for name in Settings.model_fields:
        monkeypatch.delenv(ENV_PREFIX + name.upper(), raising=False)
    return monkeypatch


def test_every_setting_has_a_test_value():
    assert set(VALUES) == set(Settings.model_fields)


@pytest.mark.parametrize("name", sorted(VALUES))
def test_every_setting_is_a_flag_and_an_env_variable(clean_env, name):
    raw, parsed = VALUES[name]
    flag = [option_flag(name)] if isinstance(parsed, bool) else [option_flag(name), raw]
    assert value_of(load_settings(flag), name) == parsed
    clean_env.setenv(ENV_PREFIX + name.upper(), raw)
    assert value_of(load_settings([]), name) == parsed


def test_flag_wins_over_env(clean_env):
    clean_env.setenv("LORAPLEX_PORT", "9000")
    assert load_settings([]).port == 9000
    assert load_settings(["--port", "9001"]).port == 9001


def test_preload_is_repeatable_and_a_comma_list_in_env(clean_env, tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    flags = load_settings(["--preload", f"x={tmp_path / 'a'}", "--preload", f"y={tmp_path / 'b'}"])
    clean_env.setenv("LORAPLEX_PRELOAD", f"x={tmp_path / 'a'},y={tmp_path / 'b'}")
    assert (
        load_settings([]).preload_items()
        == flags.preload_items()
        == [("x", tmp_path / "a"), ("y", tmp_path / "b")]
    )


@pytest.mark.parametrize(
    "argv, env, mentions",
    [
        (["--port", "abc"], {}, ["--port", "LORAPLEX_PORT", "'abc'"]),
        (["--port", "70000"], {}, ["--port", "65535"]),
        ([], {"LORAPLEX_MAX_QUEUED": "0"}, ["--max-queued", "LORAPLEX_MAX_QUEUED"]),
        (["--max-batch-size", "-1"], {}, ["--max-batch-size"]),
        (["--max-wait-ms", "soon"], {}, ["--max-wait-ms"]),
        (["--request-timeout-s", "0"], {}, ["--request-timeout-s"]),
        (["--dtype", "float8"], {}, ["--dtype", "float32"]),
        (["--device", "gpu"], {}, ["--device", "cuda:N"]),
        (["--log-level", "loud"], {}, ["--log-level"]),
        (["--max-client-batch", "64", "--max-queued", "32"], {}, ["max_client_batch", "max_queued"]),
        (["--preload", "just-a-name"], {}, ["--preload", "ID=DIR"]),
        (["--preload", "x=/definitely/not/here"], {}, ["--preload", "not a directory"]),
        (["--no-such-option", "1"], {}, ["--no-such-option"]),
        (["--port"], {}, ["--port"]),
    ],
)
def test_bad_value_exits_2_with_a_message(clean_env, capsys, argv, env, mentions):
    for key, value in env.items():
        clean_env.setenv(key, value)
    assert serve.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("loraplex serve: ")
    for text in mentions:
        assert text in err
    assert "Traceback" not in err


def test_host_cache_smaller_than_the_slots_is_refused(clean_env):
    with pytest.raises(SettingsError) as caught:
        load_settings(["--max-resident", "32", "--max-host-cache", "31"])
    message = str(caught.value)
    assert "max_host_cache (31) is smaller than max_resident (32)" in message
    assert "raise --max-host-cache or lower --max-resident" in message
    assert load_settings(["--max-resident", "32", "--max-host-cache", "32"]).max_host_cache == 32


def test_tokens_can_come_from_files_and_an_explicit_token_wins(clean_env, tmp_path):
    (tmp_path / "admin").write_text("from-a-file\n")
    (tmp_path / "empty").write_text(" \n")
    settings = load_settings(["--admin-token-file", str(tmp_path / "admin")])
    assert settings.admin_token.get_secret_value() == "from-a-file" and settings.api_key is None
    clean_env.setenv("LORAPLEX_ADMIN_TOKEN", "explicit")
    assert load_settings(["--admin-token-file", str(tmp_path / "admin")]).admin_token.get_secret_value() == (
        "explicit"
    )
    clean_env.delenv("LORAPLEX_ADMIN_TOKEN")
    assert load_settings(["--api-key-file", str(tmp_path / "absent")]).api_key is None  # no secret mounted
    with pytest.raises(SettingsError, match="is empty; put the token in it"):
        load_settings(["--api-key-file", str(tmp_path / "empty")])


def test_secrets_are_not_echoed_in_errors(clean_env, capsys):
    assert serve.main(["--api-key", "s3cret-value", "--port", "x"]) == 2
    assert "s3cret-value" not in capsys.readouterr().err
    assert "s3cret-value" not in repr(load_settings(["--api-key", "s3cret-value"]))


def test_help_lists_every_option(capsys):
    assert serve.main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in Settings.model_fields:
        assert option_flag(name) in out and ENV_PREFIX + name.upper() in out


def test_cli_bad_value_exits_2_without_traceback():
    result = subprocess.run(
        [sys.executable, "-m", "loraplex", "serve", "--max-batch-tokens", "lots"],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2
    assert "--max-batch-tokens / LORAPLEX_MAX_BATCH_TOKENS" in result.stderr
    assert "Traceback" not in result.stderr


def test_not_ready_while_loading_and_a_bad_preload_exits_2():
    folder = Path(tempfile.mkdtemp(prefix="loraplex-not-an-adapter-"))
    (folder / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    (folder / "adapter_model.safetensors").write_bytes(b"\x80\x04pickle, not safetensors")
    store = tempfile.mkdtemp(prefix="loraplex-settings-store-")
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "loraplex", "serve", "--port", str(port), "--adapter-store", store,
         "--preload", f"broken={folder}"],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    seen = set()
    while proc.poll() is None:
        try:
            health = httpx.get(url + "/health", timeout=5)
            ready = httpx.get(url + "/ready", timeout=5)
            work = httpx.post(url + "/classify", json={"adapter_id": "broken", "inputs": "x"}, timeout=5)
            seen.add((health.status_code, ready.status_code, ready.json()["error_type"], work.status_code))
        except httpx.TransportError:
            pass  # not listening yet, or gone
        time.sleep(0.05)
    stderr = proc.communicate(timeout=60)[1]
    # Alive but not ready while the model loads; then the bad preload stops it with a message.
    assert seen and seen <= {(200, 503, "unavailable", 503)}
    assert proc.returncode == 2, stderr
    assert f"start-up failed: --preload broken={folder}: " in stderr
    assert "Traceback" not in stderr
