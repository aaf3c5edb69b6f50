# Two commands on a fresh machine (Python 3.11, network to PyPI):
#   make demo   builds the environments, writes the demo screen and runs the workflow on it
#   make test   builds the environments and runs the test suite (all three tiers)
VENV    := .venv
CP_VENV := .venv-cellprofiler
BIN     := $(VENV)/bin
CORES   ?= all
PYTEST_ARGS ?=
DEMO_CONFIG := config/demo.yaml
DEMO_SHEET  := results/demo/screen/plates.tsv

.PHONY: setup env env-cellprofiler demo test test-fast lint bench clean

# the two environments build side by side (105 s instead of 129 s on 2 cores)
setup:
	$(MAKE) -j2 env env-cellprofiler

env:
	tools/bootstrap-env $(VENV) envs/main.txt --editable . \
	  --smoke "import brightpaint.ingest, brightpaint.demo.screen, torch, snakemake"

env-cellprofiler:
	tools/bootstrap-env $(CP_VENV) envs/cellprofiler.txt \
	  --smoke "import cellprofiler_core.preferences as p; p.set_headless(); import cellprofiler.modules.measureobjectsizeshape"

# The demo screen is written once (again only when the demo config changes); the workflow then
# reads it like any user's screen.
$(DEMO_SHEET): $(DEMO_CONFIG) | env
	$(BIN)/brightpaint simulate --config $(DEMO_CONFIG) --workers 2

demo: setup $(DEMO_SHEET)
	$(BIN)/snakemake --cores $(CORES) --configfile $(DEMO_CONFIG)

test: setup
	$(BIN)/ruff check src tests bench workflow
	PATH=$(CURDIR)/$(BIN):$$PATH tools/run-tests $(BIN)/python --durations=25 $(PYTEST_ARGS)

# The unit and workflow tiers (no demo run): minutes, for a developer's loop.
test-fast: setup
	$(BIN)/ruff check src tests bench workflow
	PATH=$(CURDIR)/$(BIN):$$PATH tools/run-tests --fast $(BIN)/python $(PYTEST_ARGS)

lint: env
	$(BIN)/ruff check src tests bench workflow
	$(BIN)/snakemake --lint --configfile $(DEMO_CONFIG)

bench: env
	$(BIN)/python bench/ingest_throughput.py --out bench/results/ingest_throughput.json
	$(BIN)/python bench/stain.py --out bench/results/stain.json
	$(BIN)/python bench/segment.py --out bench/results/segment.json
	test -d results/plates/P1/features || $(BIN)/snakemake --cores $(CORES) results/plates/P1/features/cells.parquet
	$(BIN)/python bench/features.py --plate-dir results/plates/P1 --out bench/results/features.json
	$(BIN)/python bench/report.py --out bench/results/report.json

clean:
	rm -rf results .snakemake
