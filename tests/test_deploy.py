"""The deployment artifacts, offline and fast: every manifest in deploy/k8s/ against Kubernetes' own schemas
(kubernetes-validate, strict: an unknown or misspelled field fails), then what Atlas needs from them (the
drain fits the termination grace, probes and ports line up, selectors select, every secret reference
resolves, the pod's settings pass Atlas's own start-up checks), and the Dockerfile's essentials.

Each check is a function returning the problems it finds, run on the real files and on a copy with one
mistake put in, so a check that cannot fail shows up as a failing test.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import subprocess
from pathlib import Path
from urllib.parse import urlparse

import kubernetes_validate
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from config.settings import Settings
from monitoring.metrics import Monitor
from vocabulary.errors import ErrorCode

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
KUBERNETES_VERSION = "1.31.0"  # the oldest Kubernetes the manifests are written for
# Read by uvicorn, not by Atlas's settings: the proxies whose X-Forwarded-For/-Proto it trusts.
NOT_SETTINGS = {"FORWARDED_ALLOW_IPS"}
# The Dockerfile's build argument and scripts/quickstart.sh's switch (not a server setting).
BUILD_SWITCHES = {"ATLAS_LOCAL_LLM"}

Docs = list[dict]


def load_manifests() -> Docs:
    return [doc for path in sorted(K8S.glob("*.yaml")) for doc in yaml.safe_load_all(path.read_text()) if doc]


def k8s_objects(docs: Docs) -> Docs:
    """Copies of the documents Kubernetes stores (all but kustomize's own file)."""
    return [copy.deepcopy(doc) for doc in docs if doc["kind"] != "Kustomization"]


def find(docs: Docs, kind: str, name: str) -> dict:
    matches = [d for d in docs if d["kind"] == kind and d["metadata"].get("name") == name]
    assert len(matches) == 1, f"expected one {kind} {name}, found {len(matches)}"
    return matches[0]


def atlas_deployment(docs: Docs) -> dict:
    return find(docs, "Deployment", "atlas-voice")


def atlas_container(docs: Docs) -> dict:
    return atlas_deployment(docs)["spec"]["template"]["spec"]["containers"][0]


def selects(selector: dict, labels: dict) -> bool:
    """A matchLabels selector against a pod's labels (Kubernetes' rule: every pair present)."""
    match = selector.get("matchLabels", selector)
    return bool(match) and all(labels.get(k) == v for k, v in match.items())


def arg_value(args: list[str], flag: str) -> str | None:
    return args[args.index(flag) + 1] if flag in args else None


# --- the Dockerfile -------------------------------------------------------------------------------------


def dockerfile_stages(text: str) -> list[list[tuple[str, str]]]:
    """The Dockerfile as stages of (INSTRUCTION, arguments), continuation lines joined; stage 0 holds what
    comes before the first FROM (global ARGs)."""
    joined = re.sub(r"\\\n", " ", "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#")))
    stages: list[list[tuple[str, str]]] = [[]]
    for line in joined.splitlines():
        if not line.strip():
            continue
        word, _, rest = line.strip().partition(" ")
        if word.upper() == "FROM":
            stages.append([])
        stages[-1].append((word.upper(), " ".join(rest.split())))
    return stages


def image_env(stage: list[tuple[str, str]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for word, rest in stage:
        if word == "ENV":
            for pair in shlex.split(rest):
                key, _, value = pair.partition("=")
                env[key] = value
    return env


DOCKERFILE = (ROOT / "Dockerfile").read_text()
FINAL_STAGE = dockerfile_stages(DOCKERFILE)[-1]


def pod_environment(docs: Docs) -> dict[str, str]:
    """The environment the server sees in the pod: the image's ENV, the ConfigMap, then the env entries
    (secretKeyRefs resolved against the Secret's placeholder values)."""
    env = image_env(FINAL_STAGE)
    container = atlas_container(docs)
    for source in container.get("envFrom", []):
        env.update(find(docs, "ConfigMap", source["configMapRef"]["name"])["data"])
    secret_data = find(docs, "Secret", "atlas-voice-secrets")["stringData"]
    for entry in container.get("env", []):
        if "value" in entry:
            env[entry["name"]] = entry["value"]
        elif "secretKeyRef" in entry["valueFrom"]:
            env[entry["name"]] = secret_data.get(entry["valueFrom"]["secretKeyRef"]["key"], "")
    return env


def setting_default(alias: str):
    for field in Settings.model_fields.values():
        if alias in field.validation_alias.choices:
            return field.default
    raise KeyError(alias)


def setting_names() -> set[str]:
    return {name for f in Settings.model_fields.values() for name in f.validation_alias.choices}


# --- the checks -----------------------------------------------------------------------------------------


def grace_problems(docs: Docs) -> list[str]:
    """terminationGracePeriodSeconds must outlast the preStop sleep plus the whole drain: ATLAS_DRAIN_SECS, then
    ATLAS_SHUTDOWN_GRACE_SECS for the sessions still live, 1 s for uvicorn, and the outbox's last flush
    (2 x ATLAS_DB_TIMEOUT_SECS), as app/server.py's AtlasServer.shutdown does them; else the kubelet's
    SIGKILL cuts calls off without session_end."""
    env = pod_environment(docs)

    def setting(name: str) -> float:
        return float(env.get(name, setting_default(name)))

    container = atlas_container(docs)
    command = container.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
    if command[:1] != ["sleep"] or len(command) != 2:
        return [f"preStop is not a sleep: {command}"]
    pre_stop = float(command[1])
    needed = (
        pre_stop
        + setting("ATLAS_DRAIN_SECS")
        + setting("ATLAS_SHUTDOWN_GRACE_SECS")
        + 1
        + 2 * setting("ATLAS_DB_TIMEOUT_SECS")
    )
    grace = atlas_deployment(docs)["spec"]["template"]["spec"].get("terminationGracePeriodSeconds", 30)
    return [] if grace >= needed else [f"terminationGracePeriodSeconds {grace} < {needed:g} s the drain may take"]


def secret_ref_problems(docs: Docs) -> list[str]:
    problems = []
    secrets = {
        d["metadata"]["name"]: {**d.get("data", {}), **d.get("stringData", {})} for d in docs if d["kind"] == "Secret"
    }
    config_maps = {d["metadata"]["name"] for d in docs if d["kind"] == "ConfigMap"}
    for container in atlas_deployment(docs)["spec"]["template"]["spec"]["containers"]:
        for entry in container.get("env", []):
            ref = entry.get("valueFrom", {}).get("secretKeyRef")
            if ref is None:
                continue
            if ref["name"] not in secrets:
                problems.append(f"{entry['name']}: no Secret {ref['name']}")
            elif ref["key"] not in secrets[ref["name"]]:
                problems.append(f"{entry['name']}: Secret {ref['name']} has no key {ref['key']}")
        for source in container.get("envFrom", []):
            if "configMapRef" in source and source["configMapRef"]["name"] not in config_maps:
                problems.append(f"no ConfigMap {source['configMapRef']['name']}")
    return problems


def unknown_setting_problems(docs: Docs) -> list[str]:
    """Every variable the manifests set is one Atlas reads (a misspelled name is silently ignored by Atlas)."""
    known = setting_names() | NOT_SETTINGS
    names = set(find(docs, "ConfigMap", "atlas-voice-config")["data"])
    names |= set(find(docs, "Secret", "atlas-voice-secrets")["stringData"])
    names |= {e["name"] for e in atlas_container(docs).get("env", [])}
    return [f"{name} is not a setting Atlas reads" for name in sorted(names - known)]


def doc_name_problems(text: str) -> list[str]:
    """Every variable or error code docs/DEPLOY.md names exists (CMake's -D flags aside)."""
    known = setting_names() | NOT_SETTINGS | BUILD_SWITCHES | {c.value for c in ErrorCode}
    names = set(re.findall(r"(?<![-\w])[A-Z][A-Z0-9]*_[A-Z0-9_]+\b", text))
    return [
        f"docs/DEPLOY.md names {name}, which is neither a setting nor an error code" for name in sorted(names - known)
    ]


def selector_problems(docs: Docs) -> list[str]:
    problems = []
    deployment = atlas_deployment(docs)
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    redis = find(docs, "Deployment", "atlas-redis")
    redis_labels = redis["spec"]["template"]["metadata"]["labels"]
    for doc in (deployment, redis):
        if not selects(doc["spec"]["selector"], doc["spec"]["template"]["metadata"]["labels"]):
            problems.append(f"Deployment {doc['metadata']['name']} does not select its own pods")
    checks = [
        (
            "PodDisruptionBudget atlas-voice",
            find(docs, "PodDisruptionBudget", "atlas-voice")["spec"]["selector"],
            pod_labels,
        ),
        ("Service atlas-voice", find(docs, "Service", "atlas-voice")["spec"]["selector"], pod_labels),
        ("Service atlas-redis", find(docs, "Service", "atlas-redis")["spec"]["selector"], redis_labels),
    ]
    policy = find(docs, "NetworkPolicy", "atlas-redis")["spec"]
    checks.append(("NetworkPolicy atlas-redis", policy["podSelector"], redis_labels))
    for rule in policy["ingress"]:
        for peer in rule["from"]:
            checks.append(("NetworkPolicy atlas-redis's allowed clients", peer["podSelector"], pod_labels))
    for what, selector, labels in checks:
        if not selects(selector, labels):
            problems.append(f"{what} does not select {labels}")
    if selects(find(docs, "Service", "atlas-voice")["spec"]["selector"], redis_labels):
        problems.append("Service atlas-voice also selects the Redis pods")
    return problems


# --- the tests ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def docs() -> Docs:
    return load_manifests()


def test_every_manifest_is_valid_for_kubernetes_strictly(docs):
    objects = k8s_objects(docs)
    assert {d["kind"] for d in objects} >= {
        "Namespace",
        "ConfigMap",
        "Secret",
        "Deployment",
        "Service",
        "Ingress",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "NetworkPolicy",
    }
    for doc in objects:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == find(docs, "Namespace", "atlas-voice")["metadata"]["name"]


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: d["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"].update(pth="/readyz"),
        lambda d: d["spec"]["template"]["spec"].update(terminationGracePeriodSeconds="340"),
        lambda d: d["spec"]["template"]["spec"]["containers"][0].update(port=8000),
    ],
    ids=["misspelled-field", "string-for-integer", "field-in-the-wrong-place"],
)
def test_a_broken_manifest_fails_validation(docs, mutate):
    deployment = next(
        d for d in k8s_objects(docs) if d["kind"] == "Deployment" and d["metadata"]["name"] == "atlas-voice"
    )
    kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)
    mutate(deployment)
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)


def test_kustomization_applies_every_manifest_but_the_secret(docs):
    kustomization = next(d for d in docs if d["kind"] == "Kustomization")
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    # The real Secret is created with kubectl (docs/DEPLOY.md): applying the placeholders would overwrite it.
    assert set(kustomization["resources"]) == files - {"secret.yaml"}
    image = atlas_container(docs)["image"]
    assert [i["name"] for i in kustomization["images"]] == [image.rsplit(":", 1)[0]]


def test_termination_grace_covers_the_drain(docs):
    assert grace_problems(docs) == []
    env = pod_environment(docs)
    assert float(env["ATLAS_DRAIN_SECS"]) >= 60  # long enough for most calls to end by themselves
    longer = copy.deepcopy(docs)
    find(longer, "ConfigMap", "atlas-voice-config")["data"]["ATLAS_DRAIN_SECS"] = "600"
    assert grace_problems(longer) == ["terminationGracePeriodSeconds 340 < 631 s the drain may take"]
    unset = copy.deepcopy(docs)  # the settings' own default then counts
    del find(unset, "ConfigMap", "atlas-voice-config")["data"]["ATLAS_DRAIN_SECS"]
    atlas_deployment(unset)["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = 300
    assert grace_problems(unset)


def test_probes_hit_readyz_livez_and_healthz_on_the_port_the_server_listens_on(docs):
    container = atlas_container(docs)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    listen = int(arg_value(container["args"], "--port"))
    assert ports == {"http": listen}
    expected = {"readinessProbe": "/readyz", "livenessProbe": "/livez", "startupProbe": "/healthz"}
    for probe, path in expected.items():
        get = container[probe]["httpGet"]
        assert get["path"] == path, probe
        assert ports.get(get["port"], get["port"]) == listen, probe
    # Out of rotation at the first 503 (full, draining), restarted only after several missed /livez.
    assert container["readinessProbe"]["failureThreshold"] == 1
    assert container["livenessProbe"]["failureThreshold"] >= 3
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120  # the engines load in 30-60 s


def test_the_pods_settings_pass_atlas_start_up_checks(docs):
    """The server in the pod listens on 0.0.0.0, which `serve` refuses without auth (check_exposure), and the
    providers the ConfigMap names must have their keys (check_providers)."""
    env = pod_environment(docs)
    settings = Settings(_env_file=None, **env)
    host = arg_value(atlas_container(docs)["args"], "--host")
    assert host == "0.0.0.0"
    settings.check_exposure(host)
    settings.check_providers()
    assert (settings.resolved_stt, settings.resolved_llm, settings.resolved_tts) == (
        "deepgram",
        "anthropic",
        "elevenlabs",
    )
    assert settings.auth_enabled
    # The image has no local LLM: when Claude fails, an apology, never a local LLM that is not there.
    if atlas_container(docs)["image"].endswith(":cloud"):
        assert settings.llm_fallback == "apology"

    no_auth = {k: v for k, v in env.items() if k not in ("SUPABASE_JWT_SECRET", "SUPABASE_JWKS_URL")}
    with pytest.raises(ValueError, match="auth is off"):
        Settings(_env_file=None, **no_auth).check_exposure(host)


def test_every_variable_set_is_a_setting_atlas_reads(docs):
    assert unknown_setting_problems(docs) == []
    typo = copy.deepcopy(docs)
    find(typo, "ConfigMap", "atlas-voice-config")["data"]["ATLAS_DRAIN_SEC"] = "300"
    assert unknown_setting_problems(typo) == ["ATLAS_DRAIN_SEC is not a setting Atlas reads"]


def test_deploy_doc_names_only_real_settings_and_error_codes():
    text = (ROOT / "docs" / "DEPLOY.md").read_text()
    assert doc_name_problems(text) == []
    assert doc_name_problems(text + " set ATLAS_DRAIN_SECONDS") == [
        "docs/DEPLOY.md names ATLAS_DRAIN_SECONDS, which is neither a setting nor an error code"
    ]


def test_every_secret_reference_names_a_key_the_secret_has(docs):
    assert secret_ref_problems(docs) == []
    refs = [e for e in atlas_container(docs)["env"] if "secretKeyRef" in e.get("valueFrom", {})]
    assert {e["name"] for e in refs} >= {
        "ANTHROPIC_API_KEY",
        "DEEPGRAM_API_KEY",
        "ELEVENLABS_API_KEY",
        "TWILIO_AUTH_TOKEN",
        "SUPABASE_URL",
        "SUPABASE_SERVICE_ROLE_KEY",
        "SUPABASE_JWT_SECRET",
        "ATLAS_METRICS_TOKEN",
    }
    missing = copy.deepcopy(docs)
    del find(missing, "Secret", "atlas-voice-secrets")["stringData"]["DEEPGRAM_API_KEY"]
    assert secret_ref_problems(missing) == ["DEEPGRAM_API_KEY: Secret atlas-voice-secrets has no key DEEPGRAM_API_KEY"]


def test_selectors_select_the_pods_they_are_for(docs):
    assert selector_problems(docs) == []
    relabelled = copy.deepcopy(docs)
    atlas_deployment(relabelled)["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"] = "web"
    problems = selector_problems(relabelled)
    assert any("does not select its own pods" in p for p in problems)
    assert any(p.startswith("PodDisruptionBudget") for p in problems)
    assert any(p.startswith("Service atlas-voice") for p in problems)


def test_service_and_ingress_lead_to_the_containers_port(docs):
    container = atlas_container(docs)
    service = find(docs, "Service", "atlas-voice")
    ports = {p["name"]: p for p in service["spec"]["ports"]}
    container_ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    for port in ports.values():
        target = port["targetPort"]
        assert container_ports.get(target, target) == int(arg_value(container["args"], "--port"))
    ingress = find(docs, "Ingress", "atlas-voice")
    annotations = ingress["metadata"]["annotations"]
    hosts = []
    for rule in ingress["spec"]["rules"]:
        hosts.append(rule["host"])
        for path in rule["http"]["paths"]:
            backend = path["backend"]["service"]
            assert backend["name"] == service["metadata"]["name"]
            assert backend["port"].get("name") in ports or backend["port"].get("number") in {
                p["port"] for p in ports.values()
            }
    # The WebSocket of a call stays open up to ATLAS_SESSION_MAX_SECS; nginx's 60 s default would cut it.
    session_max = float(pod_environment(docs).get("ATLAS_SESSION_MAX_SECS", setting_default("ATLAS_SESSION_MAX_SECS")))
    for key in ("proxy-read-timeout", "proxy-send-timeout"):
        assert float(annotations[f"nginx.ingress.kubernetes.io/{key}"]) >= session_max
    assert not any("affinity" in key for key in annotations)
    # Twilio signs the URL it called: the host Atlas rebuilds it with is the Ingress's.
    assert pod_environment(docs)["ATLAS_PUBLIC_HOST"] in hosts


def test_hpa_scales_the_deployment_on_live_calls_before_pods_are_full(docs):
    hpa = find(docs, "HorizontalPodAutoscaler", "atlas-voice")["spec"]
    deployment = atlas_deployment(docs)
    assert hpa["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": deployment["metadata"]["name"],
    }
    assert "replicas" not in deployment["spec"]  # else every apply resets what the HPA chose
    pods = [m["pods"] for m in hpa["metrics"] if m["type"] == "Pods"]
    assert [p["metric"]["name"] for p in pods] == ["atlas_active_sessions"]
    assert any(m["type"] == "Resource" and m["resource"]["name"] == "cpu" for m in hpa["metrics"])
    container = atlas_container(docs)
    assert container["resources"]["requests"]["cpu"]  # CPU utilization is measured against the request

    # The metric is the gauge a pod exports at /metrics, labelled by transport (summed per pod by the adapter).
    monitor = Monitor(Settings(_env_file=None))
    monitor.session_started("websocket")
    families = {f.name: f for f in text_string_to_metric_families(monitor.render()[0].decode())}
    gauge = families["atlas_active_sessions"]
    assert gauge.type == "gauge" and gauge.samples
    assert all(set(sample.labels) == {"transport"} for sample in gauge.samples)

    # A pod takes workers x ATLAS_MAX_SESSIONS calls; the HPA must add pods before they are all full.
    workers = int(arg_value(container["args"], "--workers"))
    capacity = workers * int(pod_environment(docs)["ATLAS_MAX_SESSIONS"])
    assert float(pods[0]["target"]["averageValue"]) < capacity
    # One worker per CPU of the limit: more would share cores, fewer would leave one idle.
    assert workers == int(container["resources"]["limits"]["cpu"])
    pdb = find(docs, "PodDisruptionBudget", "atlas-voice")["spec"]
    assert hpa["minReplicas"] > pdb["maxUnavailable"]  # a node drain never takes the last pod


def test_redis_url_leads_to_the_redis_service(docs):
    url = urlparse(pod_environment(docs)["REDIS_URL"])
    service = find(docs, "Service", "atlas-redis")
    assert url.scheme == "redis" and url.hostname == service["metadata"]["name"]
    assert url.port in {p["port"] for p in service["spec"]["ports"]}
    policy_ports = [
        p["port"] for r in find(docs, "NetworkPolicy", "atlas-redis")["spec"]["ingress"] for p in r["ports"]
    ]
    redis_ports = {
        p["name"]: p["containerPort"]
        for p in find(docs, "Deployment", "atlas-redis")["spec"]["template"]["spec"]["containers"][0]["ports"]
    }
    assert [redis_ports.get(p, p) for p in policy_ports] == [url.port]


def test_containers_run_as_non_root_on_a_read_only_root_with_the_write_paths_mounted(docs):
    for name in ("atlas-voice", "atlas-redis"):
        pod = find(docs, "Deployment", name)["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
        assert pod["automountServiceAccountToken"] is False
        assert pod["enableServiceLinks"] is False  # else ATLAS_REDIS_PORT=tcp://... lands next to the settings
        for container in pod["containers"]:
            security = container["securityContext"]
            assert security["allowPrivilegeEscalation"] is False and security["readOnlyRootFilesystem"] is True
            assert security["capabilities"]["drop"] == ["ALL"]
            assert "command" not in container  # the image's entrypoint stays
    pod = atlas_deployment(docs)["spec"]["template"]["spec"]
    user = dict(FINAL_STAGE)["USER"].split(":")[0]
    assert pod["securityContext"]["runAsUser"] == int(user)

    # Atlas writes the outbox and the SQLite store (config/settings.py), and libraries write to /tmp.
    env = pod_environment(docs)
    mounts = [m["mountPath"] for m in atlas_container(docs)["volumeMounts"] if not m.get("readOnly")]
    for path in (env["ATLAS_OUTBOX_PATH"], env["ATLAS_SQLITE_PATH"], "/tmp"):
        assert any(Path(path).is_relative_to(m) for m in mounts), f"{path} is on the read-only root"
    assert not any(Path(env["ATLAS_CACHE_DIR"]).is_relative_to(m) for m in mounts)  # a mount would hide the models


def test_dockerfile_builds_with_the_quickstart_and_serves_as_non_root():
    stages = dockerfile_stages(DOCKERFILE)
    global_args = dict(rest.split("=", 1) for word, rest in stages[0] if word == "ARG" and "=" in rest)
    assert global_args["ATLAS_LOCAL_LLM"] == "1"
    froms = [rest for stage in stages[1:] for word, rest in stage if word == "FROM"]
    assert all("bookworm" in f for f in froms), froms
    runs = [rest for stage in stages for word, rest in stage if word == "RUN"]
    assert any(re.search(r"(^|\s)(bash )?scripts/quickstart\.sh install(\s|$)", r) for r in runs)
    assert any("--no-llm" in r for r in runs)  # the cloud variant verifies its models without the LLM

    final = dict(FINAL_STAGE)
    user = final["USER"].split(":")[0]
    assert user.isdigit() and int(user) != 0  # numeric, so Kubernetes' runAsNonRoot can check it
    assert final["EXPOSE"] == "8000"
    assert "/livez" in final["HEALTHCHECK"] and ":8000/" in final["HEALTHCHECK"]
    assert json.loads(final["CMD"]) == ["atlas-voice", "serve", "--host", "0.0.0.0", "--port", "8000"]
    assert json.loads(final["ENTRYPOINT"])[0].endswith("tini")
    # The final stage carries no compilers: only the build stage runs the install.
    final_runs = " ".join(rest for word, rest in FINAL_STAGE if word == "RUN")
    assert not re.search(r"build-essential|cmake|\bgcc\b|quickstart", final_runs)
    assert image_env(FINAL_STAGE)["ATLAS_OUTBOX_PATH"].startswith("/var/lib/atlas-voice/")


def test_dockerignore_keeps_the_venv_and_secrets_out_of_the_build():
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()}
    assert {".venv", ".git", ".env"} <= ignored


@pytest.mark.parametrize(
    "env, args, message",
    [
        ({}, ["bogus"], "usage: .* serve\\|test\\|install"),
        ({"ATLAS_LOCAL_LLM": "0"}, ["test"], "the test suite runs the local LLM"),
        ({"ATLAS_LOCAL_LLM": "yes"}, ["install"], "ATLAS_LOCAL_LLM must be 1"),
    ],
)
def test_quickstart_refuses_bad_arguments_before_installing_anything(env, args, message):
    result = subprocess.run(
        ["bash", str(ROOT / "scripts" / "quickstart.sh"), *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert re.search(message, result.stdout + result.stderr)
    assert "==>" not in result.stdout  # no step started
