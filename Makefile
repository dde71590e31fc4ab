# Everything installs from nothing into the project's own virtualenv (.venv).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: system-tools install demo test test-unit bench proto clean known-answer-model

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# The thin client (.) and the server (server/: torch==2.14.1 / torchvision==0.29.1 pinned in
# server/pyproject.toml, open_clip, gRPC).
$(VENV)/.server-installed: pyproject.toml server/pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -e . -e ./server
	touch $@

# Tests add the server's hf extra (Hugging Face transformers models) and exclip 1.1, the
# reference implementation. exclip imports `clip`, which the openai-clip sdist provides; that
# sdist only builds beside setuptools<81 (pkg_resources), hence no build isolation for those two.
# The monitoring tests run Debian's promtool (alert rule unit tests) and Pushgateway (what
# explain-monitor pushes to); they fail in CI without them, so install them when we can.
SYSTEM_TOOLS := promtool:prometheus prometheus-pushgateway:prometheus-pushgateway
system-tools:
	@missing=$$(for t in $(SYSTEM_TOOLS); do command -v $${t%%:*} >/dev/null || echo $${t#*:}; done); \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
		else echo "install $$missing (Debian packages) for the monitoring tests"; fi; \
	fi

$(VENV)/.test-installed: $(VENV)/.server-installed | system-tools
	$(BIN)/python -m pip install -e ".[test]" -e "./server[hf]"
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
	$(BIN)/python benchmarks/bench_monitor.py --record docs/benchmarks.md
	# one real-size model per family at its defaults (issue 22); the defaults themselves come from
	# benchmarks/choose_defaults.py --record docs/benchmarks.md (about half an hour on one thread)
	$(BIN)/python benchmarks/bench_families.py --record docs/benchmarks.md
	# the single-process design the worker split is measured against (issue 24)
	test -d bench-out/baseline || git worktree add --detach bench-out/baseline 970cf2c
	$(BIN)/python benchmarks/bench_workers.py --baseline-tree bench-out/baseline --record docs/benchmarks.md

# Retrain the shipped shapes model on the CPU and overwrite
# server/explain_server/assets/shapes/shapes-ViT.safetensors. Deterministic (seeded weights and
# batches), so the result is the shipped file; the recipe and how to evaluate a new one are in
# docs/shapes-model.md.
known-answer-model: $(VENV)/.server-installed
	$(BIN)/python -m explain_server.shapes.training

proto: $(VENV)/.test-installed
	$(BIN)/python proto/generate.py

clean:
	rm -rf $(VENV) demo-out bench-out .pytest_cache
	-git worktree prune
