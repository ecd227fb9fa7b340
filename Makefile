# Everything a new machine needs is installed by these targets into .venv.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
DEMO_OUT ?= demo-run
# test files run on this many processes (they share one build of the planted model)
TEST_WORKERS ?= 2

.PHONY: demo test lint typecheck check install browser clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first, pinned, so no dependency pulls a different (CUDA) build.
	$(BIN)/pip install --quiet "torch==$(TORCH_VERSION)"
	$(BIN)/pip install --quiet -e ".[model,llm,fleet,dev]"
	touch $@

install: $(BIN)/.installed

demo: install
	$(BIN)/labeler demo --out $(DEMO_OUT)

# One torch (OpenMP) thread per test worker: two workers of two threads each on two cores
# spend their time contending (the suite took 959-977 s so, 875 s with one thread each).
test: install browser
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(BIN)/pytest -n $(TEST_WORKERS) --dist loadfile

# The review page is tested in a real headless Chromium (Debian's package, not a browser
# downloaded by a test tool); installed here when missing and we may, else explained.
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && apt-get install -y -qq chromium >/dev/null; \
	  else \
	    echo "the review page tests need Chromium: sudo apt-get install chromium" >&2; exit 1; \
	  fi; }

lint: install
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

typecheck: install
	$(BIN)/mypy

check: test lint typecheck

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache .mypy_cache .ruff_cache
