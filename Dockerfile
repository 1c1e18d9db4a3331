# lookalike on NGC's tritonserver: all backends (onnxruntime, tensorrt_plan, python) are in the image;
# this adds the Python backend's dependencies and the repository. Build the embedder first, on the
# host (`make export`, and `make engine` for TensorRT), since the image copies model_repository/.
#   make image && docker run --gpus all -p 8000-8003:8000-8003 -e LOOKALIKE_ADMIN_KEY=... lookalike:24.10
ARG NGC_RELEASE=24.10
FROM nvcr.io/nvidia/tritonserver:${NGC_RELEASE}-py3

WORKDIR /opt/lookalike
COPY docker/requirements-serve.txt docker/requirements-serve.txt
RUN pip install --no-cache-dir -r docker/requirements-serve.txt
COPY pyproject.toml README.md ./
COPY client/ client/
COPY lookalike/ lookalike/
COPY export/ export/
RUN pip install --no-cache-dir --no-deps ./client . 
COPY model_repository/ /models/

# Bound beyond loopback, lookalike serve requires LOOKALIKE_ADMIN_KEY and restricts model control to it.
# VARIANT: tensorrt (model.plan from `make engine`), onnxruntime, or python (ONNX Runtime in Python).
ENV VARIANT=tensorrt
EXPOSE 8000 8001 8002 8003
CMD ["sh", "-c", "lookalike serve --model-repository /models --host 0.0.0.0 $( [ \"$VARIANT\" = python ] || echo --model-config-name $VARIANT )"]
