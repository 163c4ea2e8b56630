#!/usr/bin/env bash
# One prepared accelerator check: finishes within 8 minutes on one H100 or H200 and writes
# one JSON (default bench/results/gpu_check.json) with
#   - training images/s of the project's train step (bench/train.py) at 224 px, bf16, batch
#     256 and 512: on a device-resident synthetic batch (jax_xla) and end to end from TFRecord
#     files through the training input pipeline (jax_e2e: configs/gpu.py, input.cache on)
#   - the same network in PyTorch on the same card: eager channels-last bf16 autocast, and
#     torch.compile (batch 512 only, where it works)
#   - predictor images/s (bench/predict.py: the compiled forward, and iap-predict end to end)
#   - the commands themselves on the dataset ("cli"): iap-train (configs/gpu.py) from the
#     TFRecord shards, halted part-way (config.halt_after_steps) and resumed in the same
#     workdir, then iap-predict over the dataset's test split
#   - training-input images/s per core and per host (bench/input.py, every core of the host)
#   - model FLOP utilisation: the step's FLOPs from XLA's cost analysis against the card's
#     dense bf16 peak (bench/train.py PEAK_TFLOPS, from NVIDIA's datasheets)
#   - the git commit measured (the bundle's COMMIT file, else the checkout's HEAD)
# The dataset is made with the project's own prep (iap-synth small preset + iap-prep at 224 px),
# or given (--dataset: a prepared dataset dir, e.g. the bundle's).
#
#   bash bench/gpu_check.sh [--smoke] [--out FILE] [--dataset DIR]
#   bash bench/gpu_check.sh --bundle DIR
#
# --smoke runs the same code paths on the CPU (64 px, float32, the small "tiny" ResNet for
# the train step, tiny batches and dataset, two steps at a time, JAX's compilation cache kept
# between runs) in about 4 minutes: a check of the script, not a measurement.
# --bundle DIR builds, on this (CPU) machine, the folder an accelerator host without network
# needs to run this check (bench/bundle/build.py: wheels, a 224 px dataset, these scripts;
# at most 60 MiB), then prints how to carry and run it (DIR/run.sh [--smoke]).
set -uo pipefail
CALLER_DIR=$PWD
cd "$(dirname "$0")/.."

MODE=full
OUT=bench/results/gpu_check.json
GIVEN_DATASET=""
BUNDLE=""
absolute() { case "$1" in /*) echo "$1" ;; *) echo "$CALLER_DIR/$1" ;; esac; }
while [ $# -gt 0 ]; do
  case "$1" in
    --smoke) MODE=smoke ;;
    --out) OUT="$2"; shift ;;
    --dataset) GIVEN_DATASET=$(absolute "$2"); shift ;;
    --bundle) BUNDLE=$(absolute "$2"); shift ;;
    -h|--help) sed -n '2,30p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done

PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=$(command -v python3)
if [ -n "$BUNDLE" ]; then  # made here, with the project's environment (its prep makes the data)
  exec "$PY" bench/bundle/build.py "$BUNDLE"
fi
# The commit measured: a bundle's COMMIT file (written when it was built), else the checkout's.
# (line 2 of COMMIT, or git status, says whether the tree had uncommitted changes)
COMMIT_DIRTY=false
if [ -f COMMIT ]; then
  COMMIT=$(sed -n 1p COMMIT)
  [ -n "$(sed -n 2p COMMIT)" ] && COMMIT_DIRTY=true
else
  COMMIT=$(git rev-parse HEAD 2>/dev/null || echo unknown)
  [ -n "$(git status --porcelain 2>/dev/null)" ] && COMMIT_DIRTY=true
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TF_CPP_MIN_LOG_LEVEL=2
PARTS=bench/results/gpu_check_parts
rm -rf "$PARTS"
mkdir -p "$PARTS" "$(dirname "$OUT")"
START=$(date +%s)

if [ "$MODE" = smoke ]; then
  export JAX_PLATFORMS=cpu CUDA_VISIBLE_DEVICES=""
  # Compiled programs are kept between smoke runs (so a rerun's "compile s" is a cache load).
  export JAX_COMPILATION_CACHE_DIR=bench/results/gpu_check_jax_cache
  export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0 JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES=0
  # Two steps share the cores: OpenMP threads (PyTorch, oneDNN) that spin while they wait
  # would starve the other step's threads.
  export OMP_WAIT_POLICY=PASSIVE
  SIZE=64; BATCHES=16; COMPILE_BATCH=16; STEPS=2; E2E_STEPS=2; DTYPE=float32; MODEL=tiny:16
  PATIENTS=16; SLICES=4; PREDICT_BATCH=16; PREDICT_BATCHES=2; E2E_IMAGES=64
  INPUT_THREADS=1; INPUT_SECONDS=0.5; INPUT_PATHS=train_batches:zlib,train_batches:zlib:cache
  CLI_CONFIG=configs/gpu.py:runlocal; CLI_BATCH=16
  DEADLINE=240
else
  SIZE=224; BATCHES=256,512; COMPILE_BATCH=512; STEPS=30; E2E_STEPS=30; DTYPE=bfloat16; MODEL=resnet18
  PATIENTS=320; SLICES=16; PREDICT_BATCH=512; PREDICT_BATCHES=20; E2E_IMAGES=4096
  INPUT_THREADS=1,0; INPUT_SECONDS=3
  INPUT_PATHS=train_batches:zlib,train_batches:raw,train_batches:zlib:cache
  CLI_CONFIG=configs/gpu.py; CLI_BATCH=$COMPILE_BATCH
  DEADLINE=450  # seconds of work, leaving room under 8 minutes for start-up and slow steps
fi
CONFIG=configs/gpu.py
CLI_SHARDS=64  # configs/gpu.py's input.logical_shards (fewer when the batch is smaller)
# The cli runs' compiled programs are kept (the resumed run and a rerun load them back).
CLI_CACHE=${JAX_COMPILATION_CACHE_DIR:-$PWD/bench/results/gpu_check_cli_jax_cache}

elapsed() { echo $(( $(date +%s) - START )); }
left() { local l=$(( DEADLINE - $(elapsed) )); [ $l -lt 1 ] && l=1; echo $l; }
# step NAME SECONDS COMMAND...: runs COMMAND with a time limit, its log in $PARTS/NAME.log
step() {
  local name=$1 limit=$2; shift 2
  echo "== $name (limit ${limit}s, at $(elapsed)s)"
  timeout --signal=TERM --kill-after=10 "$limit" "$@" >"$PARTS/$name.log" 2>&1
  local rc=$?
  echo "$name rc=$rc" >>"$PARTS/status.txt"
  [ $rc -ne 0 ] && { echo "   $name failed (rc $rc), last lines:"; tail -n 3 "$PARTS/$name.log" | sed 's/^/   /'; }
  return 0
}

# ---- the card ------------------------------------------------------------------------
if command -v nvidia-smi >/dev/null 2>&1 && [ "$MODE" = full ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,power.limit \
    --format=csv,noheader >"$PARTS/nvidia_smi.csv" 2>/dev/null || true
fi
"$PY" - "$MODE" >"$PARTS/devices.json" <<'EOF'
import json, sys
info = {"mode": sys.argv[1]}
try:
    import jax
    devices = jax.devices()
    info.update(jax_backend=jax.default_backend(), jax_version=jax.__version__,
                jax_devices=[d.device_kind for d in devices])
except Exception as err:  # noqa: BLE001
    info["jax_error"] = repr(err)
try:
    import torch
    info["torch_version"] = torch.__version__
    info["torch_cuda"] = bool(torch.cuda.is_available())
    if info["torch_cuda"]:
        info["torch_device"] = torch.cuda.get_device_name()
except ImportError:
    info["torch_version"] = None
print(json.dumps(info))
EOF
cat "$PARTS/devices.json"
BACKEND=$("$PY" -c "import json,sys; print(json.load(open(sys.argv[1])).get('jax_backend','none'))" "$PARTS/devices.json")
TORCH_OK=$("$PY" -c "import json,sys; d=json.load(open(sys.argv[1])); print(int(bool(d.get('torch_version')) and (d.get('torch_cuda') or d['mode']=='smoke')))" "$PARTS/devices.json")
if [ "$MODE" = full ] && [ "$BACKEND" != gpu ] && [ "$BACKEND" != cuda ] && [ "$BACKEND" != tpu ]; then
  echo "gpu_check.sh: JAX sees no accelerator (backend $BACKEND): install jax[cuda12] or run --smoke" >&2
  exit 1
fi
[ "$TORCH_OK" = 1 ] || echo "PyTorch with CUDA not available: the PyTorch rows are left out"

# ---- the dataset (the project's prep), shared by the e2e and input measurements -------
# (or the one given: --dataset, e.g. a bundle's, made where the prep's dependencies are)
WORKERS=$(nproc)
[ "$WORKERS" -gt 16 ] && WORKERS=16
if [ -n "$GIVEN_DATASET" ]; then
  DATASET=$GIVEN_DATASET
  [ -f "$DATASET/dataset_info.json" ] || { echo "gpu_check.sh: $DATASET holds no dataset_info.json" >&2; exit 2; }
else
  step dataset "$(left)" "$PY" bench/input.py --make-only --patients "$PATIENTS" --slices "$SLICES" \
    --image-size "$SIZE" --workers "$WORKERS"
  DATASET=$(grep "^{" "$PARTS/dataset.log" | tail -n 1 | "$PY" -c "import json,sys; print(json.loads(sys.stdin.read())['zlib'])" 2>/dev/null)
fi
[ -n "$DATASET" ] || echo "no dataset: the e2e, cli and input rows will be missing"
# A given dataset (a bundle's 240 slices) is repeated until its train split holds 4 batches
# of the largest size, so the e2e and cli rows run at the batches measured without input.
if [ -n "$GIVEN_DATASET" ]; then
  MAX_BATCH=$(echo "$BATCHES,$COMPILE_BATCH" | tr ',' '\n' | sort -n | tail -n 1)
  DATASET=$("$PY" bench/replicate_dataset.py "$GIVEN_DATASET" "$PARTS/dataset" \
    --min-train $(( 4 * MAX_BATCH ))) || { echo "gpu_check.sh: could not repeat $GIVEN_DATASET" >&2; exit 2; }
fi
# The train split's size: the e2e and cli batches must fit in it (a bundle's small dataset
# has fewer slices than the full check's batches: those runs then use the largest power of
# two that fits, and the JSON says so).
TRAIN_EXAMPLES=0
[ -n "$DATASET" ] && TRAIN_EXAMPLES=$("$PY" -c "import json,sys
info = json.load(open(sys.argv[1] + '/dataset_info.json'))
print(sum(int(n) for s in info['splits'] if s['name'] == 'train' for n in s['shardLengths']))" "$DATASET" 2>/dev/null || echo 0)
fitting_batches() {  # the batches of $1 (comma-separated) that fit, else the largest power of two
  local fit="" b
  for b in ${1//,/ }; do [ "$b" -le "$TRAIN_EXAMPLES" ] && fit="${fit:+$fit,}$b"; done
  if [ -z "$fit" ]; then fit=1; while [ $((fit * 2)) -le "$TRAIN_EXAMPLES" ]; do fit=$((fit * 2)); done; fi
  echo "$fit"
}
E2E_BATCHES=$(fitting_batches "$BATCHES")
[ -n "$DATASET" ] && [ "$E2E_BATCHES" != "$BATCHES" ] && echo "the train split has $TRAIN_EXAMPLES slices: e2e batch $E2E_BATCHES (not $BATCHES)"

# ---- the measurements -----------------------------------------------------------------
TRAIN_ARGS=(--sizes "$SIZE" --steps "$STEPS" --dtype "$DTYPE" --config "$CONFIG" --model "$MODEL")
PREDICT_VARIANTS=jax,e2e  # (the smoke leaves PyTorch inference out: the train rows run PyTorch)
[ "$TORCH_OK" = 1 ] && [ "$MODE" = full ] && PREDICT_VARIANTS=jax,torch,e2e

# training: the project's step on a device-resident synthetic batch
train_jax() {
  step train_jax "$(left)" "$PY" bench/train.py "${TRAIN_ARGS[@]}" --batch "$BATCHES" \
    --variants jax_xla --out "$PARTS/train_jax.json"
}
# training end to end: the training input pipeline over the TFRecord files, then the step.
# With input.cache: the first epoch reads the files, later ones the decoded images in memory
# (without it, each of gpu.py's 64 logical shards re-reads the split's file from its start).
train_e2e() {
  [ -n "$DATASET" ] || return 0
  step train_e2e "$(left)" "$PY" bench/train.py "${TRAIN_ARGS[@]}" --steps "$E2E_STEPS" \
    --batch "$E2E_BATCHES" --variants jax_e2e --dataset "$DATASET" --input-cache on \
    --out "$PARTS/train_e2e.json"
}
train_torch() {
  [ "$TORCH_OK" = 1 ] || return 0
  step train_torch "$(left)" "$PY" bench/train.py "${TRAIN_ARGS[@]}" --batch "$BATCHES" \
    --variants torch --out "$PARTS/train_torch.json"
}
# torch.compile: its compile time is the least predictable, so it runs last
train_torch_compile() {
  [ "$TORCH_OK" = 1 ] || return 0
  step train_torch_compile "$(left)" "$PY" bench/train.py "${TRAIN_ARGS[@]}" --batch "$COMPILE_BATCH" \
    --variants torch_compile --out "$PARTS/train_torch_compile.json"
}
predict() {
  IAP_BENCH_E2E_IMAGES=$E2E_IMAGES step predict "$(left)" "$PY" bench/predict.py --sizes "$SIZE" \
    --batch "$PREDICT_BATCH" --batches "$PREDICT_BATCHES" --repeats 1 --dtype "$DTYPE" \
    --variants "$PREDICT_VARIANTS" --out "$PARTS/predict.json"
}
# The commands themselves ("cli"): iap-train (configs/gpu.py; the smoke's runlocal switch: the
# tiny model at 32 px) from the dataset's TFRecord shards for two epochs, halted after the
# first (config.halt_after_steps, saved as if preempted) and run again in the same workdir,
# which resumes from its latest checkpoint; then iap-predict over the dataset's test split.
cli() {
  [ -n "$DATASET" ] || return 0
  local work=$PARTS/cli_train batch shards per_epoch
  batch=$(fitting_batches "$CLI_BATCH")
  shards=$(( batch < CLI_SHARDS ? batch : CLI_SHARDS ))
  per_epoch=$(( TRAIN_EXAMPLES / batch ))
  local args=(--config="$CLI_CONFIG" --workdir="$work" --config.dataset_dir="$DATASET"
              --config.batch_size="$batch" --config.eval_batch_size="$batch"
              --config.input.logical_shards="$shards" --config.num_epochs=2
              --config.log_every_steps=1 --config.progress_bar=False)
  echo "{\"config\": \"$CLI_CONFIG\", \"batch\": $batch, \"steps_per_epoch\": $per_epoch, \"halt_after_steps\": $per_epoch}" >"$PARTS/cli.json"
  rm -rf "$work" "$PARTS/cli_predict"
  step cli_train "$(left)" env JAX_COMPILATION_CACHE_DIR="$CLI_CACHE" "$PY" -m iap_jax.training.train_cli "${args[@]}" \
    --config.halt_after_steps="$per_epoch"
  step cli_resume "$(left)" env JAX_COMPILATION_CACHE_DIR="$CLI_CACHE" "$PY" -m iap_jax.training.train_cli "${args[@]}"
  step cli_predict "$(left)" env JAX_COMPILATION_CACHE_DIR="$CLI_CACHE" "$PY" -m iap_jax.prediction.predict_cli \
    --workdir "$work" --input "$DATASET" --split test --out "$PARTS/cli_predict" --quiet
}
# training input per core and per host (threads 0: every core)
# On a given dataset (--dataset: no prep here), bench/input.py finds it where it keeps its own
# (links named as its dataset_dirs names them) and measures the training loop's reader on
# that dataset's image encoding only (zlib, or raw for iap-prep --image-encoding none).
input() {
  local data=(--patients "$PATIENTS" --slices "$SLICES" --image-size "$SIZE") paths=$INPUT_PATHS
  local batch=$COMPILE_BATCH
  if [ -n "$GIVEN_DATASET" ]; then  # the given dataset's own encoding (--dataset)
    data=(--dataset "$DATASET")
    paths=$(echo "$INPUT_PATHS" | tr ',' '\n' | grep "^train_batches:" | paste -sd,)
    batch=$(fitting_batches "$COMPILE_BATCH")
  fi
  step input "$(left)" "$PY" bench/input.py "${data[@]}" --threads "$INPUT_THREADS" \
    --seconds "$INPUT_SECONDS" --paths "$paths" --batch "$batch" --out "$PARTS/input.json"
}

if [ "$MODE" = smoke ]; then  # a check of the code paths, not a measurement: two at a time
  ( train_jax; cli; train_torch; train_torch_compile; input ) &
  ( train_e2e; predict ) &
  wait
else  # one at a time, so that no measurement shares the card or the host's cores
  train_jax; train_e2e; train_torch; predict; input; cli; train_torch_compile
fi

# ---- one JSON and the table ------------------------------------------------------------
GC_COMMIT=$COMMIT GC_COMMIT_DIRTY=$COMMIT_DIRTY GC_DATASET=$DATASET GC_TRAIN_EXAMPLES=$TRAIN_EXAMPLES \
GC_E2E_BATCHES=$E2E_BATCHES "$PY" - "$PARTS" "$OUT" "$MODE" "$(elapsed)" <<'EOF'
import json, os, re, sys
sys.path.insert(0, "bench")
import train as train_bench  # bench/train.py

parts, out, mode, elapsed = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
env = os.environ

def load(name):
    path = os.path.join(parts, name)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)

devices = load("devices.json") or {}
card = (devices.get("jax_devices") or ["?"])[0]
smi = os.path.join(parts, "nvidia_smi.csv")
if os.path.exists(smi):
    with open(smi) as f:
        devices["nvidia_smi"] = [line.strip() for line in f if line.strip()]
        if devices["nvidia_smi"]:
            card = devices["nvidia_smi"][0].split(",")[0].strip()
peak = train_bench.peak_tflops(card)
train_rows = []
for name in ("train_jax.json", "train_e2e.json", "train_torch.json", "train_torch_compile.json"):
    train_rows += (load(name) or {}).get("results", [])
train_bench.add_ratios(train_rows)
predict = load("predict.json") or {}
input_report = load("input.json") or {}
status = {}
if os.path.exists(os.path.join(parts, "status.txt")):
    with open(os.path.join(parts, "status.txt")) as f:
        status = dict(line.split(" rc=") for line in f.read().split("\n") if " rc=" in line)


def cli_report():
    """The iap-train (halted, resumed) and iap-predict runs on the dataset."""
    report = load("cli.json")
    if report is None:
        return None
    metrics = os.path.join(parts, "cli_train", "metrics.jsonl")
    rows = []
    if os.path.exists(metrics):
        with open(metrics) as f:
            rows = [json.loads(line) for line in f if line.strip()]
    train_rows = [r for r in rows if "train/images_per_s" in r]
    report["final_step"] = max((r["step"] for r in rows), default=None)
    report["train_images_per_s_last"] = train_rows[-1]["train/images_per_s"] if train_rows else None
    report["val_mean_top1"] = next((r["val/mean_top1"] for r in reversed(rows) if "val/mean_top1" in r), None)
    resumed = None
    log = os.path.join(parts, "cli_resume.log")
    if os.path.exists(log):
        with open(log) as f:
            found = re.findall(r"resumed from step (\d+)", f.read())
        resumed = int(found[-1]) if found else None
    report["resumed_from_step"] = resumed
    predicted = load(os.path.join("cli_predict", "predict_report.json"))
    if predicted:
        run = predicted.get("run", {})
        report["predict"] = {"split": "test", **predicted.get("counts", {}),
                             **{k: run.get(k) for k in ("images_per_s", "compile_s", "batch_size", "dtype",
                                                       "device_kind", "input_wait_share", "convolutions")}}
    report["rc"] = {k: status.get(k, "not run").strip() for k in ("cli_train", "cli_resume", "cli_predict")}
    return report


host_input = max((r["images_per_s"] for r in input_report.get("rows", [])
                  if "error" not in r and r.get("path") == "train_batches"), default=None)
dataset = env.get("GC_DATASET") or None
report = {
    "benchmark": "gpu_check", "mode": mode, "seconds": elapsed, "card": card,
    "commit": env.get("GC_COMMIT") or None, "commit_dirty": env.get("GC_COMMIT_DIRTY") == "true",
    "dataset": {"path": dataset, "train_examples": int(env.get("GC_TRAIN_EXAMPLES") or 0),
                "e2e_batches": env.get("GC_E2E_BATCHES")} if dataset else None,
    "peak_bf16_tflops": peak,
    "peak_source": "NVIDIA H100 / H200 datasheets: dense BF16 Tensor Core = half the "
                   "with-sparsity figure (H100 SXM and H200 SXM 1,979 -> 989.4 TFLOP/s)",
    "devices": devices, "steps_rc": status,
    "train": train_rows, "predict": predict.get("rows", []),
    "input": input_report.get("rows", []),
    "input_record_bytes_per_image": {  # of the formats measured
        fmt: n for fmt, n in (input_report.get("record_bytes_per_image") or {}).items()
        if any(r.get("format") == fmt for r in input_report.get("rows", []))} or None,
    "input_host_images_per_s_train_batches": host_input,
    "cli": cli_report(),
}
with open(out, "w") as f:
    json.dump(report, f, indent=1)

print(f"\n{mode} check on {card} ({elapsed} s); dense bf16 peak {peak or '?'} TFLOP/s")
print("\ntraining (bench/train.py, configs/gpu.py)")
train_bench.print_table(train_rows)
print("\nprediction (bench/predict.py)")
for row in predict.get("rows", []):
    wait = f", input wait {row['input_wait_share']:.0%}" if "input_wait_share" in row else ""
    print(f"  {row['size']} px {row['variant']:>6}: {row['images_per_s']:9.1f} img/s "
          f"(compile {row['compile_s']:.1f} s{wait}) {row.get('detail', '')}")
cli = report["cli"]
if cli:
    print(f"\niap-train {cli['config']} batch {cli['batch']}: halted at step {cli['halt_after_steps']}, "
          f"resumed from step {cli['resumed_from_step']}, finished at step {cli['final_step']} "
          f"({cli['train_images_per_s_last'] or 0:.1f} img/s at the last log; rc {cli['rc']})")
    if cli.get("predict"):
        p = cli["predict"]
        print(f"iap-predict test split: {p.get('slices')} slices, {p.get('series')} series, "
              f"{p.get('images_per_s')} img/s (compile {p.get('compile_s')} s)")
print("\ninput (bench/input.py; cores = cores the process was pinned to)")
for row in input_report.get("rows", []):
    if "error" in row:
        print(f"  {row['label']:<38} x{row['threads']}: {row['error'][:80]}")
    else:
        print(f"  {row['label']:<38} {row['cores']:>3} cores {row['images_per_s']:9.0f} img/s "
              f"{row['images_per_s_per_core']:8.0f} img/s/core {row['images_per_cpu_s']:8.0f} img/CPU-s")
failed = [k for k, v in status.items() if v.strip() != "0"]
if failed:
    print(f"\nsteps that failed or ran out of time: {failed} (logs in {parts})")
print(f"\ncommit {report['commit']}{' (with uncommitted changes)' if report['commit_dirty'] else ''}")
print(f"wrote {out}")
EOF
echo "total $(elapsed)s"
