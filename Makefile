# Every target installs first (fast when already installed), so each works on a fresh clone.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install test test-slow lint demo bench
install:
	./scripts/install.sh

test: install
	$(PY) -m pytest -q

test-slow: install
	$(PY) -m pytest -q -m slow

lint: install
	$(VENV)/bin/ruff check llava_kit data_gen tests benchmarks scripts

demo: install
	$(VENV)/bin/llava-kit demo

bench: install
	$(PY) benchmarks/run.py
