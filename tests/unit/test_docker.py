"""The production files that cannot run here (no Docker engine): the Dockerfile's promises and the
compose file, parsed. hadolint lints the Dockerfile in `make lint`."""

import re

import yaml

from tests.conftest import ROOT


def dockerfile() -> str:
    return (ROOT / "Dockerfile").read_text()


def test_the_image_runs_lookalike_as_pid_1_not_root_on_a_repository_volume():
    text = dockerfile()
    cmd = re.search(r'^CMD \[(.*)\]$', text, flags=re.M).group(1)
    assert '"exec lookalike serve --model-repository /models --host 0.0.0.0' in cmd  # docker stop reaches it
    user = re.findall(r"^USER (\S+)$", text, flags=re.M)
    assert user and user[-1].split(":")[0] not in ("0", "root")
    assert 'VOLUME ["/models"]' in text and "COPY --chown=1000:1000 model_repository/ /models/" in text
    assert re.search(r"^HEALTHCHECK .*\n\s+CMD .*/v2/health/ready", text, flags=re.M)


def test_the_compose_file_has_what_a_gpu_host_needs():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    service = compose["services"]["lookalike"]
    assert service["volumes"] == ["./model_repository:/models"]
    assert service["shm_size"] == "1gb"
    assert {p.split(":")[1] for p in service["ports"]} == {"8000", "8001", "8002", "8003"}
    assert ":?" in service["environment"]["LOOKALIKE_ADMIN_KEY"]  # refuses to start without a key
    assert service["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert service["build"]["args"]["NGC_RELEASE"].startswith("${NGC_RELEASE")
    assert int(service["stop_grace_period"].rstrip("s")) > 30  # tritonserver's exit timeout


def test_the_documented_docker_run_has_the_volume_shm_and_user():
    production = (ROOT / "docs" / "production.md").read_text()
    start = production.index("## Docker on a GPU host\n")
    end = production.find("\n## ", start + 1)
    section = production[start:end if end != -1 else len(production)]
    run = section[section.index("docker run"):section.index("lookalike:24.10")]
    for flag in ("--gpus all", "--shm-size=1g", '-v "$PWD/model_repository:/models"', "--user", "-e LOOKALIKE_ADMIN_KEY"):
        assert flag in run, flag


def pins(path) -> dict[str, str]:
    lines = [line.split("#")[0].strip() for line in (ROOT / path).read_text().splitlines()]
    return {re.sub(r"\[.*\]", "", line.split("==")[0]).lower(): line.split("==")[1] for line in lines if line}


def test_make_engine_builds_from_the_hosts_onnx_and_never_exports():
    import subprocess

    dry = subprocess.run(["make", "-n", "engine", "PRECISION=fp16"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert "lookalike engine --model-repository model_repository --precision fp16" in dry
    assert "lookalike export" not in dry  # another torch would change model.onnx and the fingerprint
    assert "chown -R" in dry and "--exclude=./.venv" in dry  # files handed back; the checkout copied, not built in
    engine, serve = pins("docker/requirements-engine.txt"), pins("docker/requirements-serve.txt")
    assert not {"timm", "efficientnet-lite-pytorch", "torchvision", "huggingface_hub"} & set(engine)  # no export
    assert {name: engine[name] for name in engine.keys() & serve.keys()} == {name: serve[name] for name in engine.keys() & serve.keys()}


def test_the_serving_image_pins_every_package_and_one_faiss_a_gpu_build():
    lines = [line.split("#")[0].strip() for line in (ROOT / "docker/requirements-serve.txt").read_text().splitlines()]
    loose = [line for line in lines if line and not re.fullmatch(r"[\w.-]+(\[[\w,]+\])?==[\w.]+", line)]
    assert not loose, loose  # what the image installs, its dependencies too (resolved for Python 3.10)
    serve = pins("docker/requirements-serve.txt")
    # faiss-cpu, or milvus-lite 3 (which requires it), would write its own `faiss` package over faiss-gpu's
    assert "faiss-gpu" in serve and "faiss-cpu" not in serve and int(serve.get("milvus-lite", "0").split(".")[0]) < 3
    # faiss-gpu loads CUDA 12's runtime, cuBLAS and cuRAND from these wheels, not from the image's CUDA
    assert serve["nvidia-cuda-runtime-cu12"].startswith("12.") and serve["nvidia-cublas-cu12"].startswith("12.")
    assert "nvidia-curand-cu12" in serve
