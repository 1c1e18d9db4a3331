"""Triton model configurations as Triton's own schema: `ModelConfig` protobuf messages (tritonclient's
`model_config_pb2`), built field by field and printed with protobuf's `text_format`, so that a wrong
field name or value fails when the config is generated, not when tritonserver loads it (the way PyTriton
writes its configs). Also the one reader of a `config.pbtxt` and of its `parameters`.

Generated here: the embedder's config.pbtxt and configs/<variant>.pbtxt, one per serving variant. The
other models' configs are committed files; `read` parses them.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from google.protobuf import text_format

from lookalike.serving.artifacts import ONNX_FILE, PLAN_FILE
from lookalike_client import contract as c

# Serving variants of the embedder, chosen at serve time with tritonserver's --model-config-name.
# "python" is config.pbtxt itself: ONNX Runtime inside a Python-backend model, for the tritonserver of
# the nvidia-pytriton wheel, which has no other backend.
EMBEDDER_VARIANTS = ("python", "onnxruntime", "tensorrt")
CONFIG_FILE = "config.pbtxt"
VARIANTS_DIR = "configs"
PREFERRED_BATCH_SIZES = (4, 8, 16, 32, 64)
# No queue delay: the embedder takes whatever queued while it ran (under load, batches of 3-8 form by
# themselves); waiting for more only added latency at low load (`make bench`, docs/benchmarks.md).
EMBEDDER_QUEUE_DELAY_US = 0
# ONNX Runtime inside the Python backend, on the CPU: one thread that sleeps between calls. The
# preprocess_query instances need the other cores for decoding; ORT's default (a thread per core,
# spinning between calls) cost 15-37 ms of CPU a photo against 9 ms (`make bench`, docs/benchmarks.md).
EMBEDDER_INTRA_OP_THREADS = 1
EMBEDDER_SPIN_WAIT = False


def _pb() -> Any:
    """tritonclient's generated `model_config_pb2` (protobuf builds its classes at run time, so type
    checkers see none of them: this module is typed against Any)."""
    from tritonclient.grpc import model_config_pb2

    return model_config_pb2


def new_config(**fields: Any) -> Any:
    return _pb().ModelConfig(**fields)


def parse(text: str) -> Any:
    """A ModelConfig from config.pbtxt text; google.protobuf's ParseError names the line."""
    return text_format.Parse(text, new_config())


def read(path: Path) -> Any:
    return parse(Path(path).read_text())


def to_json(config: Any) -> dict[str, Any]:
    """A ModelConfig as Triton's JSON form of it (what its load API takes as a `config` parameter)."""
    from google.protobuf import json_format

    return json_format.MessageToDict(config, preserving_proto_field_name=True)


def to_text(config: Any, comment: str = "") -> str:
    """config.pbtxt text of a ModelConfig, after an optional comment (one `# ` line per line)."""
    header = "".join(f"# {line}\n" for line in comment.splitlines())
    return header + text_format.MessageToString(config, use_short_repeated_primitives=True)


def parameters(config: Any) -> dict[str, str]:
    """The string parameters of a ModelConfig."""
    return {key: value.string_value for key, value in config.parameters.items()}


def set_parameters(config: Any, values: dict[str, str]) -> None:
    for key, value in values.items():
        config.parameters[key].string_value = str(value)


def embedder_config(variant: str, *, height: int, width: int, dim: int, max_batch_size: int,
                    instances: int = 1, intra_op_threads: int = EMBEDDER_INTRA_OP_THREADS,
                    spin_wait: bool = EMBEDDER_SPIN_WAIT) -> Any:
    """The embedder's ModelConfig for one serving variant. The tensors are the same in all."""
    if variant not in EMBEDDER_VARIANTS:
        raise ValueError(f"variant must be one of {EMBEDDER_VARIANTS}")
    pb = _pb()
    config = pb.ModelConfig(name=c.EMBEDDER_MODEL, max_batch_size=max_batch_size)
    if variant == "python":
        config.backend = "python"
    elif variant == "onnxruntime":
        config.backend = "onnxruntime"
        config.default_model_filename = ONNX_FILE
    else:
        config.platform = "tensorrt_plan"
        config.default_model_filename = PLAN_FILE
    config.input.add(name=c.PIXELS, data_type=pb.TYPE_FP32, dims=[3, height, width])
    config.output.add(name=c.EMBEDDING, data_type=pb.TYPE_FP32, dims=[dim])
    config.dynamic_batching.preferred_batch_size.extend(b for b in PREFERRED_BATCH_SIZES if b <= max_batch_size)
    config.dynamic_batching.max_queue_delay_microseconds = EMBEDDER_QUEUE_DELAY_US
    if variant == "python":
        # One process per instance (GIL); ONNX Runtime threads inside it (0 = ORT's default: one per
        # core). spin_wait: whether those threads busy-wait between calls (ORT's default: true).
        config.instance_group.add(kind=pb.ModelInstanceGroup.KIND_CPU, count=instances)
        set_parameters(config, {"onnx_file": ONNX_FILE, "intra_op_threads": str(intra_op_threads),
                                "spin_wait": "true" if spin_wait else "false"})
    elif variant == "onnxruntime":
        # No instance kind: one instance per visible GPU, or on the CPU where there is none.
        config.instance_group.add(count=instances)
    else:
        config.instance_group.add(kind=pb.ModelInstanceGroup.KIND_GPU, count=instances)
    return config


def render_embedder_config(variant: str, **kwargs: Any) -> str:
    """config.pbtxt text of `embedder_config(variant, **kwargs)`."""
    backend = {"python": "ONNX Runtime inside the Python backend", "onnxruntime": "Triton's onnxruntime backend",
               "tensorrt": "Triton's TensorRT backend"}[variant] if variant in EMBEDDER_VARIANTS else ""
    return to_text(embedder_config(variant, **kwargs),
                   f"Written by `lookalike export` (lookalike/indexing/model_configs.py): the embedder on {backend}.")


def write_embedder_configs(embedder_dir: Path, *, height: int, width: int, dim: int, max_batch_size: int,
                           tensorrt: bool = False) -> None:
    """config.pbtxt (Python + ONNX Runtime) and configs/<variant>.pbtxt for the other backends; the
    tensorrt variant only when a model.plan was built for it."""
    embedder_dir = Path(embedder_dir)
    (embedder_dir / VARIANTS_DIR).mkdir(parents=True, exist_ok=True)
    common: dict[str, Any] = dict(height=height, width=width, dim=dim, max_batch_size=max_batch_size)
    (embedder_dir / CONFIG_FILE).write_text(render_embedder_config("python", **common))
    (embedder_dir / VARIANTS_DIR / "onnxruntime.pbtxt").write_text(render_embedder_config("onnxruntime", **common))
    plan_config = embedder_dir / VARIANTS_DIR / "tensorrt.pbtxt"
    if tensorrt:
        plan_config.write_text(render_embedder_config("tensorrt", **common))
    elif plan_config.exists():
        plan_config.unlink()  # a new ONNX export makes an older engine stale


# -- product_search's search backend -----------------------------------------------------------------
_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://[A-Za-z0-9._~:/?#\[\]@!$&'()*+,;=%-]+$")
_COLLECTION = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,254}$")


def search_backend_parameters(backend: str, milvus_uri: str | None = None, milvus_collection: str | None = None) -> dict[str, str]:
    """product_search's parameters for a search backend, checked (ValueError names the bad one): the
    Milvus URI a URL without credentials (the token comes from $LOOKALIKE_MILVUS_TOKEN), the alias a
    Milvus collection name."""
    if backend not in c.SEARCH_BACKENDS:
        raise ValueError(f"--search-backend must be one of {', '.join(c.SEARCH_BACKENDS)}, got {backend!r}")
    values = {"search_backend": backend}
    if backend == "milvus":
        if not milvus_uri:
            raise ValueError("--search-backend milvus needs --milvus-uri URI (e.g. http://milvus:19530)")
        if not _URI.match(milvus_uri):
            raise ValueError(f"--milvus-uri must be a URL such as http://host:19530, got {c.quoted(milvus_uri)}")
        if "@" in milvus_uri.split("://", 1)[1].split("/", 1)[0]:
            raise ValueError("--milvus-uri must not carry credentials: put the token in $LOOKALIKE_MILVUS_TOKEN")
        values["milvus_uri"] = milvus_uri
    if milvus_collection is not None:
        if not _COLLECTION.match(milvus_collection):
            raise ValueError(f"--milvus-collection must be a Milvus collection name ([A-Za-z_][A-Za-z0-9_]*), "
                             f"got {c.quoted(milvus_collection)}")
        values["milvus_collection"] = milvus_collection
    return values


def write_parameters(path: Path, values: dict[str, str]) -> bool:
    """Sets string parameters of a committed config.pbtxt in place, its comments kept: each one's
    `parameters { key: ... }` line is rewritten (or appended). Returns whether the file changed; an
    unchanged file is not written (a read-only repository that already says so is fine). The new text
    is parsed before it replaces the old one, atomically."""
    text = Path(path).read_text()
    current = parameters(parse(text))
    if all(current.get(k) == v for k, v in values.items()):
        return False
    for key, value in values.items():
        line = f'parameters {{ key: "{key}" value {{ string_value: "{value}" }} }}'
        pattern = re.compile(r'^parameters \{ key: "' + re.escape(key) + r'" value \{ string_value: "[^"\n]*" \} \}$', re.M)
        text, found = pattern.subn(lambda _m, line=line: line, text)
        if not found:
            text = text.rstrip("\n") + "\n" + line + "\n"
    written = parameters(parse(text))
    if any(written.get(k) != v for k, v in values.items()):
        raise ValueError(f"{path}: could not set {sorted(values)} (parameters written in another form?)")
    staged = Path(path).with_name(f".{Path(path).name}.{os.getpid()}")
    staged.write_text(text)
    os.replace(staged, path)
    return True
