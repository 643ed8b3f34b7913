# The two commands: `make demo` (whole pipeline on the built-in default) and `make test`.
# Both set up .venv first: torch from its CPU wheel, then everything else pinned by constraints.txt.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: setup data demo compare test lint lock clean mlflow-ui chromium interop screenshot

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "installing torch 2.13.0 (CPU) first, then the pinned stack (a few minutes the first time)"
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	@touch $(STAMP)

# The built-in image world: regenerated from its seed when missing; data.dvc pins its bytes.
# On a fresh clone the DVC cache is empty and `dvc status` says "not in cache" whatever the
# bytes, so the check hashes data/ into the cache (`dvc commit`) and asks git whether data.dvc
# had to change; if it did, data.dvc is restored and the mismatch reported.
data: setup
	@if [ ! -f data/shapes/world.json ]; then $(BIN)/saev shapes --out data/shapes; fi
	@$(BIN)/dvc status -q data.dvc || { $(BIN)/dvc commit -q -f data.dvc && git diff --quiet -- data.dvc; } \
		|| { git checkout -q -- data.dvc; echo "data/ differs from the bytes data.dvc pins:" \
		"regenerate it with: $(BIN)/saev shapes --out data/shapes --overwrite"; exit 1; }

# `dvc repro warehouse`: the demo's stages (warehouse is their last); a bare `dvc repro` would
# also run the backbone comparison (`make compare`, about 22 min more)
demo: data
	$(BIN)/dvc repro warehouse
	@echo
	@echo "== demo finished =="
	@echo "-- SAE metrics (dvc metrics show; all of them: $(BIN)/dvc metrics show) --"
	@$(BIN)/dvc metrics show metrics/train.json
	@echo "-- best feature per concept (warehouse/saev.duckdb; saev sql --list for more) --"
	@$(BIN)/saev sql best_feature_per_concept
	@echo "-- clamping each concept's best feature to -2 x max, against its controls (saev sql intervention_controls) --"
	@$(BIN)/saev sql "select concept, feature, round(delta, 3) as delta, round(control_lo, 3) as control_lo, round(control_hi, 3) as control_hi, round(vs_control_lo, 3) as vs_control_lo, round(vs_control_hi, 3) as vs_control_hi, round(p_adjusted, 4) as p_adjusted, beyond_controls, verdict from interventions where strength = -2 and task = 'classifier' order by concept"
	@echo "MLflow UI:        make mlflow-ui, then open http://127.0.0.1:5000"
	@echo "SAE checkpoint:   artifacts/saes/demo/    shards: artifacts/activations/shapes/"
	@echo "stats (Parquet):  artifacts/stats/demo/   interventions: artifacts/interventions/demo/"

# The backbone comparison (issue 15): the forms world, then for every entry of params.yaml
# compare.backbones the demo's recipe (backbone, extract, SAE + seeds, stats, baselines,
# stability, probe), then warehouse/compare.duckdb; the second thing to run, after make demo.
# (compare-warehouse depends on artifacts/compare/, so DVC runs every compare stage before it)
compare: setup
	$(BIN)/dvc repro compare-warehouse
	@echo
	@echo "== comparison finished (warehouse/compare.duckdb) =="
	@$(BIN)/saev sql --db warehouse/compare.duckdb cross_form_features
	@$(BIN)/saev sql --db warehouse/compare.duckdb semantic_probe
	@$(BIN)/saev sql --db warehouse/compare.duckdb sae_vs_baselines
	@$(BIN)/saev sql --db warehouse/compare.duckdb seed_stability
	@echo "per concept and form: $(BIN)/saev sql --db warehouse/compare.duckdb compare_backbones"

test: setup chromium interop
	SAEV_REQUIRE_PLAYWRIGHT=1 $(BIN)/pytest -q

# A side venv with SAELens and saev, which tests/test_interchange.py runs to check our SAELens
# export and saev import against those projects' own code. Its own venv because sae-lens needs
# transformer-lens and its own pins; never installed into .venv.
INTEROP := .venv-interop
interop: $(INTEROP)/.installed

# Rebuilt when this Makefile (the pins below) changes; pip skips what is installed already.
$(INTEROP)/.installed: Makefile
	@test -x $(INTEROP)/bin/python || $(PYTHON) -m venv $(INTEROP)
	@echo "installing torch 2.13.0 (CPU), sae-lens and saev into $(INTEROP) (a few minutes the first time)"
	$(INTEROP)/bin/pip install -q torch==2.13.0
	@# torch pinned again: sae-lens' dependencies may not replace the CPU wheel installed above
	$(INTEROP)/bin/pip install -q torch==2.13.0 sae-lens==6.54.12 transformer-lens==3.9.0 beartype einops jaxtyping
	$(INTEROP)/bin/pip install -q --no-deps saev==0.1.0  # its nn module needs only the three above
	@touch $@

# Headless Chromium for the browser tests (tests/headless.py: Playwright drives Debian's package,
# Playwright's own browser builds are never downloaded), installed once (about 30 s with
# apt-get update); the tests skip when it is missing.
chromium:
	@command -v chromium >/dev/null || { \
		SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
		echo "installing chromium (apt-get) for the feature browser test"; \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium \
			|| echo "warning: could not install chromium; the browser tests will skip"; }

# docs/explore.png for the README: the screenshot tests/test_explore_browser.py takes of
# `saev explore` over the demo run when artifacts/ holds it (`make demo`), else over its tiny run
# (the test writes it only when SAEV_EXPLORE_SCREENSHOT is set).
screenshot: setup chromium
	SAEV_EXPLORE_SCREENSHOT=$(abspath docs/explore.png) \
	$(if $(wildcard artifacts/saes/demo/cfg.json),SAEV_EXPLORE_DEMO=$(abspath params.yaml)) \
	$(BIN)/pytest -q tests/test_explore_browser.py

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

mlflow-ui: setup
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false $(BIN)/mlflow ui --workers 1 --host 127.0.0.1 --port 5000 \
		--backend-store-uri sqlite:///mlruns/mlflow.db

# Re-pin every package to what the venv holds now.
lock:
	$(BIN)/pip freeze --exclude-editable | sed 's/^torch==\(.*\)+cpu/torch==\1/' \
		| cat <(echo "# Pinned versions of every package in the venv (pip freeze), used as pip constraints by the Makefile.") - > constraints.txt

clean:
	rm -rf artifacts warehouse metrics/*.json
