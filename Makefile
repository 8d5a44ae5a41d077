# Two commands do all the set-up: `make demo` and `make test` create .venv and install into it when missing.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
PYTEST_FLAGS ?=

.PHONY: install demo cluster-demo lint test test-all clean

install: $(STAMP)

# pip (not uv/poetry): it takes torch/torchvision from this machine's local wheels instead of downloading GBs.
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test]' 2>&1 | grep -v "^WARNING: Location" || true
	@$(PY) -c "import distcls, ray, torch, torchvision" || { echo "install failed: see pip output above"; exit 1; }
	@touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/distcls demo

# A real two-node Ray cluster on this machine (token auth), a training and a labeling job submitted to it.
cluster-demo: $(STAMP)
	$(PY) cluster/two_nodes.py

# Lint, format and the architecture contracts (import-linter; tests/test_architecture.py covers jobs/ and cluster/).
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports

# The CI suite (under 30 minutes on 2 cores, install included). Tests marked slow run only in `make test-all`.
test: lint
	$(PY) -m pytest -m "not slow" $(PYTEST_FLAGS)

test-all: $(STAMP)
	$(PY) -m pytest $(PYTEST_FLAGS)

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
