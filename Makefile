# Two entry points for a fresh machine: `make demo` and `make test` (see README.md).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
RUN ?= runs/demo
PATIENTS ?= 40
WORKERS ?= 2

.PHONY: install sysdeps demo synth test bench clean

install: $(VENV)/.installed

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

# dcmtk's dcmdump is the independent DICOM reader the tests check our files with.
sysdeps:
	@command -v dcmdump >/dev/null || (apt-get update -qq && apt-get install -y -qq dcmtk >/dev/null) \
	  || echo "could not install dcmtk: the dcmdump test will be skipped"

synth: install
	$(BIN)/iap-synth --out $(RUN)/dicom --patients $(PATIENTS) --seed 0 --preset small \
	  --workers $(WORKERS) --contact-sheet $(RUN)/contact_sheet.png

demo: synth

test: install sysdeps
	$(BIN)/python -m pytest -q -n 2 tests

bench: install
	$(BIN)/pip install -q 'torch==2.13.0'
	$(BIN)/python bench/synth.py
	$(BIN)/python bench/train.py

clean:
	rm -rf $(RUN)
