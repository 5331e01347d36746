# One-command set-up: `make demo` and `make test` create .venv/ when it is missing.
PY      := .venv/bin/python
PIP     := $(PY) -m pip
STAMP   := .venv/.deps-installed
BUILT   := .venv/.ext-built
NATIVE  := $(shell find kernels -name '*.cpp' -o -name '*.h' 2>/dev/null) setup.py

.PHONY: demo test build clean bench bench-cpu bench-gpu-dry asan-test cross-check

$(STAMP): requirements.txt
	test -x $(PY) || python3 -m venv .venv
	$(PIP) install -q --upgrade pip setuptools wheel
	$(PIP) install -q -r requirements.txt
	touch $(STAMP)

$(BUILT): $(STAMP) $(NATIVE)
	$(PIP) install -q --no-build-isolation --no-deps -e .
	touch $(BUILT)

build: $(BUILT)

demo: $(BUILT)
	$(PY) -m torch_iosparse.tools.demo

test: $(BUILT)
	TRITON_INTERPRET=1 $(PY) -m pytest -q -n 2 tests

bench: $(BUILT)
	$(PY) benchmarks/planner_speed.py

clean:
	rm -rf build build-asan *.egg-info torch_iosparse/*.so .venv

bench-cpu: $(BUILT)
	$(PY) benchmarks/cpu_speed.py

bench-gpu-dry: $(BUILT)
	TRITON_INTERPRET=1 $(PY) benchmarks/gpu_speed.py --dry

# The op and CPU-kernel tests and the fuzz test against an AddressSanitizer + UBSan build (docs/hardening.md).
asan-test: $(BUILT)
	bash scripts/asan_test.sh

# Every kernels/**/*.cpp (not cuda) compiled for aarch64 with Debian's cross g++ (installed with apt-get if
# missing) against the venv's torch headers: the x86-only parts stay behind their guards (docs/cpu-kernel.md).
cross-check: $(STAMP)
	PY=$(PY) bash scripts/cross_check.sh
