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

STRONG = "5f0c2a9e" * 8  # a token of the length `openssl rand -hex 32` prints
KEY_FILE = Path(tempfile.mkdtemp(prefix="loraplex-settings-")) / "api-key"
KEY_FILE.write_text(STRONG + "\n")

# A valid value that differs from the default, for every setting, and what it parses to.
VALUES = {
    "host": ("::1", "::1"),  # loopback: a public host without an API key is refused (see below)
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
    "max_concurrent_uploads": ("5", 5),
    "request_timeout_s": ("1.5", 1.5),
    "staleness_s": ("0", 0.0),
    "drain_grace_s": ("3", 3.0),
    "api_key": ("k1" + "0123456789abcdef" * 2, "k1" + "0123456789abcdef" * 2),
    "admin_token": ("t1" + "0123456789abcdef" * 2, "t1" + "0123456789abcdef" * 2),
    "metrics_token": ("m1" + "0123456789abcdef" * 2, "m1" + "0123456789abcdef" * 2),
    "api_key_file": (str(KEY_FILE), KEY_FILE),
    "admin_token_file": ("/run/secrets/absent/admin-token", Path("/run/secrets/absent/admin-token")),
    "metrics_token_file": ("/run/secrets/absent/metrics", Path("/run/secrets/absent/metrics")),
    "allow_unauthenticated_writes": ("true", True),  # a flag without a value on the command line
    "allow_anonymous_inference": ("true", True),
    "metrics_adapter_labels": ("off", "off"),
    "preload": ("a=/tmp", ["a=/tmp"]),
    "metrics_max_adapters": ("5", 5),
    "log_level": ("WARNING", "warning"),
    "log_format": ("JSON", "json"),
    "replica_id": ("replica-2", "replica-2"),
}


def value_of(settings: Settings, name: str):
    value = getattr(settings, name)
    return value.get_secret_value() if name in ("api_key", "admin_token", "metrics_token") else value


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
        (["--dtype", "float8"], {}, ["--dtype", "auto", "float32"]),
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
    (tmp_path / "admin").write_text(STRONG + "\n")
    (tmp_path / "empty").write_text(" \n")
    settings = load_settings(["--admin-token-file", str(tmp_path / "admin")])
    assert settings.admin_token.get_secret_value() == STRONG and settings.api_key is None
    explicit = STRONG[::-1]
    clean_env.setenv("LORAPLEX_ADMIN_TOKEN", explicit)
    assert load_settings(["--admin-token-file", str(tmp_path / "admin")]).admin_token.get_secret_value() == (
        explicit
    )
    clean_env.delenv("LORAPLEX_ADMIN_TOKEN")
    # An absent admin token file turns writes off (fails closed); no metrics token leaves /metrics open.
    assert load_settings(["--admin-token-file", str(tmp_path / "absent")]).admin_token is None
    assert load_settings(["--metrics-token-file", str(tmp_path / "absent")]).metrics_token is None
    with pytest.raises(SettingsError, match="is empty; put a token in it .*openssl rand -hex 32"):
        load_settings(["--api-key-file", str(tmp_path / "empty")])


def test_a_configured_api_key_file_that_is_missing_refuses_to_start(clean_env, tmp_path, capsys):
    """An absent key file would leave inference open to anyone: a start-up error, not a silent open server."""
    absent = tmp_path / "not-mounted" / "api-key"
    assert serve.main(["--api-key-file", str(absent)]) == 2
    err = capsys.readouterr().err
    assert str(absent) in err and "does not exist" in err and "openssl rand -hex 32" in err
    # Saying "no key file" on purpose (the image's variable set empty) is how to run without one, on loopback.
    clean_env.setenv("LORAPLEX_API_KEY_FILE", "")
    assert load_settings([]).api_key is None


PLACEHOLDERS = [
    "replace-with-a-long-random-admin-token",  # long enough, but an example file's placeholder
    "changeme-changeme-changeme-changeme-changeme",
    "x" * 64,
    "short-but-random-9f2c",
    "",
]


@pytest.mark.parametrize("name", ["api_key", "admin_token", "metrics_token"])
@pytest.mark.parametrize("token", PLACEHOLDERS)
def test_a_short_or_placeholder_token_is_refused_on_a_public_host_with_how_to_make_one(
    clean_env, tmp_path, name, token, caplog
):
    file = tmp_path / name
    file.write_text(token)
    public = ["--host", "0.0.0.0", "--allow-anonymous-inference"]
    for given in ([option_flag(name), token], [option_flag(name + "_file"), str(file)]):
        if not token and given[0] == option_flag(name):
            continue  # an empty token given directly means "unset"
        with pytest.raises(SettingsError) as caught:
            load_settings([*public, *given])
        message = str(caught.value)
        assert "openssl rand -hex 32" in message and "secrets.token_hex(32)" in message
        assert not token or token not in message  # the refused value is not echoed
        if token:  # on loopback only this machine reaches the server: a warning, not a refusal
            caplog.clear()
            assert value_of(load_settings(given), name) == token
            assert "refused on any other address" in caplog.text and token not in caplog.text
    assert value_of(load_settings([*public, option_flag(name), STRONG]), name) == STRONG


def test_a_public_host_needs_an_api_key_or_an_explicit_choice_to_open_inference(clean_env, capsys):
    for host in ("0.0.0.0", "::", "192.0.2.7", "example.org"):
        assert serve.main(["--host", host]) == 2
        err = capsys.readouterr().err
        assert f"listen on {host} with no API key" in err and "--allow-anonymous-inference" in err
        assert "openssl rand -hex 32" in err
        opened = load_settings(["--host", host, "--allow-anonymous-inference"])
        assert opened.anonymous_inference
        assert "OPEN TO ANYONE (--allow-anonymous-inference)" in serve.exposure(opened)
        closed = load_settings(["--host", host, "--api-key", STRONG])
        assert not closed.anonymous_inference and "OPEN TO ANYONE" not in serve.exposure(closed)
    for host in ("127.0.0.1", "localhost", "::1"):  # only this machine reaches it: open without a word
        assert load_settings(["--host", host]).anonymous_inference
        assert serve.exposure(load_settings(["--host", host])) == ""


def test_adapter_ids_label_metrics_only_where_the_metrics_are_not_public(clean_env):
    public = ["--host", "0.0.0.0", "--api-key", STRONG, "--metrics-max-adapters", "7"]
    assert load_settings(public).metrics_adapter_limit == 0
    assert "/metrics is open, without adapter ids" in serve.exposure(load_settings(public))
    assert load_settings([*public, "--metrics-token", STRONG[::-1]]).metrics_adapter_limit == 7
    assert load_settings([*public, "--metrics-adapter-labels", "on"]).metrics_adapter_limit == 7
    assert "/metrics is open, with adapter ids" in serve.exposure(
        load_settings([*public, "--metrics-adapter-labels", "on"])
    )
    assert load_settings(["--metrics-max-adapters", "7"]).metrics_adapter_limit == 7  # loopback
    assert (
        load_settings(
            ["--metrics-max-adapters", "7", "--metrics-adapter-labels", "off"]
        ).metrics_adapter_limit
        == 0
    )


def test_secrets_are_not_echoed_in_errors(clean_env, capsys):
    assert serve.main(["--api-key", STRONG, "--port", "x"]) == 2
    assert STRONG not in capsys.readouterr().err
    assert STRONG not in repr(load_settings(["--api-key", STRONG]))


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


def test_a_preload_larger_than_an_upload_may_be_stops_the_start():
    """--max-upload-bytes bounds preloaded weights as it bounds uploads: the same adapter is refused."""
    from tests.peft_factory import save_peft_adapter

    folder = save_peft_adapter(Path(tempfile.mkdtemp(prefix="loraplex-big-")) / "a", seed=5)
    size = (folder / "adapter_model.safetensors").stat().st_size
    store = tempfile.mkdtemp(prefix="loraplex-settings-store-")
    result = subprocess.run(
        [sys.executable, "-m", "loraplex", "serve", "--port", str(free_port()), "--adapter-store", store,
         "--max-upload-bytes", str(size - 1), "--preload", f"big={folder}"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert f"start-up failed: --preload big={folder}: " in result.stderr
    assert f"over the limit of {size - 1} bytes" in result.stderr
    assert not any(Path(store).glob("adapters/big/*"))  # nothing was stored
