# Everything installs from nothing into the project's own virtualenv (.venv).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install demo test test-unit bench proto clean known-answer-model

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# The server: torch==2.14.1 / torchvision==0.29.1 (pinned in pyproject.toml), open_clip, gRPC.
$(VENV)/.server-installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -e ".[server]"
	touch $@

# Tests add exclip 1.1, the reference implementation. It imports `clip`, which the
# openai-clip sdist provides; that sdist only builds beside setuptools<81 (pkg_resources),
# hence no build isolation for those two.
$(VENV)/.test-installed: $(VENV)/.server-installed
	$(BIN)/python -m pip install -e ".[server,test]"
	$(BIN)/python -m pip install --no-build-isolation openai-clip==1.0.1 exclip==1.1
	touch $@

install: $(VENV)/.test-installed

demo: $(VENV)/.server-installed
	$(BIN)/explain-demo

# Every tier: what CI runs.
test: $(VENV)/.test-installed
	$(BIN)/python -m pytest

# The in-process tier alone (the `unit` marker), for feedback while editing.
test-unit: $(VENV)/.test-installed
	$(BIN)/python -m pytest -m unit

bench: $(VENV)/.test-installed
	$(BIN)/python benchmarks/bench_engine.py --record docs/benchmarks.md
	$(BIN)/python benchmarks/bench_soak.py --record docs/benchmarks.md
	$(BIN)/python benchmarks/bench_batching.py --record docs/benchmarks.md
	$(BIN)/python benchmarks/bench_grounding.py --record docs/benchmarks.md

# Retrain the shipped shapes model (deterministic: seeded weights and batches; 2,400 steps, 23.5
# minutes on this machine's 2 CPU cores beside a second training run) and overwrite server/explain_server/assets/shapes/shapes-ViT.safetensors.
known-answer-model: $(VENV)/.server-installed
	$(BIN)/python -m explain_server.shapes.training

proto: $(VENV)/.test-installed
	$(BIN)/python proto/generate.py

clean:
	rm -rf $(VENV) demo-out bench-out .pytest_cache
