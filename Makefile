# Two commands on a fresh machine (Python 3.11, network to PyPI):
#   make demo   builds the environments and runs the workflow on the generated demo screen
#   make test   builds the environments and runs the test suite
VENV    := .venv
CP_VENV := .venv-cellprofiler
BIN     := $(VENV)/bin
CORES   ?= all
PYTEST_ARGS ?=

.PHONY: setup env env-cellprofiler demo test lint bench clean

setup: env env-cellprofiler

env:
	tools/bootstrap-env $(VENV) envs/main.txt --editable . \
	  --smoke "import brightpaint.ingest, brightpaint.simulate, torch, snakemake"

env-cellprofiler:
	tools/bootstrap-env $(CP_VENV) envs/cellprofiler.txt \
	  --smoke "import cellprofiler_core.preferences as p; p.set_headless(); import cellprofiler.modules.measureobjectsizeshape"

demo: setup
	$(BIN)/snakemake --cores $(CORES)

test: setup
	$(BIN)/ruff check src tests bench workflow
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/python -m pytest $(PYTEST_ARGS)

lint: env
	$(BIN)/ruff check src tests bench workflow
	$(BIN)/snakemake --lint

bench: env
	$(BIN)/python bench/ingest_throughput.py --out bench/results/ingest_throughput.json
	$(BIN)/python bench/stain.py --out bench/results/stain.json
	$(BIN)/python bench/segment.py --out bench/results/segment.json
	test -d results/plates/P1/features || $(BIN)/snakemake --cores $(CORES) results/plates/P1/features/cells.parquet
	$(BIN)/python bench/features.py --plate-dir results/plates/P1 --out bench/results/features.json
	$(BIN)/python bench/report.py --out bench/results/report.json

clean:
	rm -rf results .snakemake
