# lookalike on NGC's tritonserver: all backends (onnxruntime, tensorrt_plan, python) are in the image;
# this adds the Python backend's dependencies and the lookalike package. The model repository is a
# volume: the host exports the embedder and indexes the catalog into it (README, Production):
#   make image
#   docker run --gpus all --shm-size=1g -p 8000-8003:8000-8003 -v "$PWD/model_repository:/models" \
#     --user "$(id -u):$(id -g)" -e LOOKALIKE_ADMIN_KEY=... lookalike:24.10
# or `docker compose up` (docker-compose.yml).
ARG NGC_RELEASE=24.10
FROM nvcr.io/nvidia/tritonserver:${NGC_RELEASE}-py3

WORKDIR /opt/lookalike
COPY docker/requirements-serve.txt docker/requirements-serve.txt
RUN pip install --no-cache-dir -r docker/requirements-serve.txt
COPY pyproject.toml setup.py README.md LICENSE NOTICE ./
COPY client/ client/
COPY lookalike/ lookalike/
COPY export/ export/
RUN pip install --no-cache-dir --no-deps ./client .

# Not root: uid 1000 owns the image's copy of the repository (used when no volume is mounted); with a
# volume, run as the host user that owns it: --user "$(id -u):$(id -g)" (docker-compose.yml does).
COPY --chown=1000:1000 model_repository/ /models/
USER 1000:1000
ENV HOME=/tmp
VOLUME ["/models"]

# Bound beyond loopback, lookalike serve requires LOOKALIKE_ADMIN_KEY and restricts model control to it.
# VARIANT: tensorrt (model.plan from `make engine`), onnxruntime, or python (ONNX Runtime in Python);
# lookalike serve refuses a variant whose configs/<VARIANT>.pbtxt the embedder does not have.
ENV VARIANT=tensorrt
EXPOSE 8000 8001 8002 8003
# Triton's readiness (the supervisor's /ready on 8003 is the stricter one, for orchestrators' probes).
HEALTHCHECK --interval=15s --timeout=5s --start-period=180s --retries=3 \
  CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/v2/health/ready', timeout=4)"]
# exec: lookalike serve is PID 1 and gets docker stop's SIGTERM (it stops tritonserver and exits 0).
CMD ["sh", "-c", "exec lookalike serve --model-repository /models --host 0.0.0.0 $( [ \"$VARIANT\" = python ] || echo --model-config-name \"$VARIANT\" )"]
