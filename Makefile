# Two entry points for a fresh machine: `make demo` and `make test` (see README.md).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
RUN ?= runs/demo
PATIENTS ?= 1000
# Many patients with few slices each: neighbouring slices share anatomy, which a small
# model memorises instead of the acquisition (measured in docs/results.md).
SLICES ?= 5
WORKERS ?= 2

.PHONY: install sysdeps demo synth prep train predict-validation calibrate predict evaluate sort test test-fast test-accelerator bench bench-synth bench-prep bench-train bench-predict bench-input bench-gpu-check bench-qa bench-ood clean

# Installs the project with its dev extra, whose [cpu] part builds the oneDNN convolution
# library (native/), and says whether it loads.
install: $(VENV)/.installed sysdeps
	@$(BIN)/python -c "from iap_jax.kernels import onednn; r = onednn.unavailable_reason(); \
	  print('oneDNN convolutions: ' + ('unavailable, ' + r if r else 'ready'))"

NATIVE := native/pyproject.toml native/CMakeLists.txt native/locate.py native/src/onednn_conv.cc

$(VENV)/.installed: setup.py $(NATIVE)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	@# An update (not a fresh install): pip keeps an installed iap-jax-native of the same
	@# version, so it is rebuilt from the source.
	@if [ -e $@ ] && $(BIN)/pip show -q iap-jax-native 2>/dev/null; then \
	  $(BIN)/pip install -q --no-deps --force-reinstall ./native; fi
	touch $@

# dcmtk's dcmdump is the independent DICOM reader the tests check our files with; without
# it that test is skipped.
sysdeps:
	@command -v dcmdump >/dev/null || (apt-get update -qq && apt-get install -y -qq dcmtk >/dev/null) \
	  || echo "could not install dcmtk: the dcmdump test will be skipped"

synth: install
	$(BIN)/iap-synth --out $(RUN)/dicom --patients $(PATIENTS) --seed 0 --preset small --slices $(SLICES) \
	  --workers $(WORKERS) --contact-sheet $(RUN)/contact_sheet.png

DATA := $(RUN)/data
IMAGE_SIZE ?= 64
DATASET := $(DATA)/iap_dataset/pre_$(IMAGE_SIZE)/1.0.0

# A fixed salt keeps the demo's splits reproducible; the cohort is synthetic, so nothing
# is private. On real data, leave --salt out: a random private salt is generated and kept.
prep: synth
	$(BIN)/iap-prep --dicom-root $(RUN)/dicom --data-dir $(DATA) --image-size $(IMAGE_SIZE) \
	  --workers $(WORKERS) --salt synthetic-demo

train: prep
	$(BIN)/iap-train --config=configs/synthetic_cpu.py --workdir=$(RUN)/train \
	  --config.dataset_dir=$(DATASET)

# Calibration (a calibrator per categorical head and header-QA thresholds) is fitted on the
# validation split's raw predictions and the out-of-distribution model on the train and
# validation features; the test split is then predicted from the best checkpoint with both.
predict-validation: train
	$(BIN)/iap-predict --workdir $(RUN)/train --input $(DATASET) --split validation \
	  --out $(RUN)/predict_validation --no-calibration --quiet

calibrate: predict-validation
	$(BIN)/iap-fit --predictions $(RUN)/predict_validation

# The calibration is fitted anew by every run: where it changed, the parts predicted with the
# old one are discarded (--overwrite); where it did not, they are kept.
predict: calibrate
	$(BIN)/iap-predict --workdir $(RUN)/train --input $(DATASET) --split test --out $(RUN)/predict \
	  --overwrite

evaluate: predict
	$(BIN)/iap-eval --predictions $(RUN)/predict --out $(RUN)/report

sort: evaluate
	$(BIN)/iap-sort --predictions $(RUN)/predict --out $(RUN)/sort/manifest.csv

demo: sort

# Tiers (markers in pytest.ini). test: the whole suite but the accelerator bundle (what CI
# runs first); test-fast: less the slow tests (multi-process training, the GCS emulator, Beam,
# long training runs), for the edit-test loop; test-accelerator: the accelerator bundle built
# and run by a Python 3.12 environment holding only an accelerator image's packages.
test: install
	$(BIN)/python -m pytest -q -n 2 -m "not accelerator" tests

test-fast: install
	$(BIN)/python -m pytest -q -n 2 -m "not slow" tests

test-accelerator: install
	$(BIN)/python -m pytest -q -m accelerator tests

# The PyTorch baseline is pinned to the CPU build that installs without a GPU stack.
$(VENV)/.torch: $(VENV)/.installed
	$(BIN)/pip install -q 'torch==2.13.0'
	touch $@

bench-synth: install
	$(BIN)/python bench/synth.py

bench-prep: install
	$(BIN)/python bench/prep.py

bench-train: install $(VENV)/.torch
	$(BIN)/python bench/train.py

bench-predict: install $(VENV)/.torch
	$(BIN)/python bench/predict.py

# Training-input images/s per CPU core at 224 px (zlib and raw records; with and without the
# in-memory cache), the training loop's reader beside the tf.data pipeline it replaced, on a
# dataset made once with iap-synth + iap-prep.
bench-input: install
	$(BIN)/python bench/input.py

# On a GPU machine, in an environment with jax[cuda12] and a CUDA PyTorch (PYTHON=.../python,
# default .venv/bin/python): one JSON of training, prediction and input speed in under
# 8 minutes. SMOKE=1: the same code paths on the CPU in under 3.
bench-gpu-check:
	bash bench/gpu_check.sh $(if $(SMOKE),--smoke)

# The accelerator bundle: on this (CPU) machine, one folder of at most 60 MiB (the project's
# wheel, the runtime wheels a Python 3.12 JAX image without TensorFlow lacks, a 224 px dataset,
# the check's scripts) that runs bench/gpu_check.sh on a host without network:
# `bash $(BUNDLE)/run.sh` there (--smoke: the CPU check). BUNDLE=dir moves it.
BUNDLE ?= bench/results/bundle
.PHONY: bench-bundle
bench-bundle: install
	bash bench/gpu_check.sh --bundle $(BUNDLE)

# Need the demo's run (make demo): header QA on altered held-out series, and unknown-domain
# detection with a scanner model held out of a new training run.
bench-qa: install
	$(BIN)/python bench/header_qa.py

# Every scanner model held out of training in turn (about 8 minutes on 2 cores); the trainings
# are kept under $(RUN)/bench_ood, so a rerun reuses them.
bench-ood: prep
	$(BIN)/python bench/ood.py --hold-out all --dataset-dir $(DATASET) --workdir $(RUN)/bench_ood

bench: bench-synth bench-prep bench-train bench-predict bench-input

clean:
	rm -rf $(RUN)
