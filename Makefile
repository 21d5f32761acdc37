# Kiln: two commands set everything up on a fresh machine.
#   make demo   - create .venv, install, run `kiln quickstart` (no flags, no network)
#   make test   - create .venv, install with dev extras, run the whole test suite
#   make check  - lint (ruff), types (mypy --strict on src/), tests
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test check lint typecheck format bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch first and pinned: pip takes the local CPU wheel, and nothing later can pull a CUDA build.
	$(BIN)/pip install -q "torch==2.13.0"
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/kiln quickstart

test: $(STAMP)
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff format --check src tests bench
	$(BIN)/ruff check src tests bench

typecheck: $(STAMP)
	$(BIN)/mypy --strict src

check: lint typecheck test

format: $(STAMP)
	$(BIN)/ruff format src tests bench
	$(BIN)/ruff check --fix src tests bench

bench: $(STAMP)
	$(BIN)/python bench/optimize_minilm.py

clean:
	rm -rf $(VENV) kiln-repo kiln-report .pytest_cache .mypy_cache .ruff_cache

# Regenerate the shipped gRPC protocol modules (src/kiln/serve/proto/*_pb2.py, *_pb2.pyi) from the .proto files.
# The sed moves their messages into Kiln's own descriptor pool (kiln/serve/proto/_pool.py), so they load beside
# tritonclient's identically named inference.* messages in one process.
PROTO_DIR := src/kiln/serve/proto
.PHONY: proto
proto: $(STAMP)
	$(BIN)/python -m grpc_tools.protoc -I src --python_out=src --pyi_out=src \
		$(PROTO_DIR)/model_config.proto $(PROTO_DIR)/grpc_service.proto
	sed -i.orig \
		-e 's/^from google\.protobuf import descriptor_pool as _descriptor_pool$$/from kiln.serve.proto._pool import POOL as _KILN_POOL/' \
		-e 's/_descriptor_pool\.Default()\.AddSerializedFile(/_KILN_POOL.AddSerializedFile(/' \
		$(PROTO_DIR)/model_config_pb2.py $(PROTO_DIR)/grpc_service_pb2.py
	rm -f $(PROTO_DIR)/*_pb2.py.orig
	grep -q '_KILN_POOL.AddSerializedFile' $(PROTO_DIR)/model_config_pb2.py
	grep -q '_KILN_POOL.AddSerializedFile' $(PROTO_DIR)/grpc_service_pb2.py
