# The two entry points of the README: `make demo` (main job) and `make test`.
# Both create .venv at the repository root and install xfast into it.
PY := .venv/bin/python
PIP := .venv/bin/pip
# torch is pinned in the same pip command as everything else so pip never picks a CUDA build.
TORCH := torch==2.13.0

.PHONY: install demo test test-fast lint bench clean

# --no-compile: pip would byte-compile all ~240 MB of the packages' Python sources (transformers,
# sympy, scipy, ...) one file at a time; Python compiles the modules a run imports on first import.
.venv/.installed: setup.py setup.cfg pyproject.toml csrc/*.cpp csrc/*.h
	test -x $(PY) || python3 -m venv .venv
	$(PIP) install -q --no-compile --upgrade pip setuptools wheel ninja $(TORCH)
	$(PIP) install -q --no-compile --no-build-isolation -e ".[test]" $(TORCH)
	touch $@

install: .venv/.installed

demo: install
	$(PY) -m xfast.training.demo

# --durations=30: every CI log lists the slowest tests.
test: install
	$(PY) -m pytest -q --durations=30

# Everything but the tests marked slow or multiprocess (setup.cfg): under 2 minutes on 2 cores.
test-fast: install
	$(PY) -m pytest -q -m "not slow and not multiprocess"

lint: install
	.venv/bin/ruff check .

bench: install
	$(PY) benchmarks/bench_losses.py

clean:
	rm -rf build xfast/_C*.so .venv
