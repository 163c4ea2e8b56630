#!/usr/bin/env bash
# Runs the accelerator check from a bundle made by `bash bench/gpu_check.sh --bundle DIR`
# (bench/bundle/build.py), on a host whose Python 3.12 has jax, flax, optax, ... (the image
# of bench/bundle/accelerator_packages.txt) and no network:
#
#   bash DIR/run.sh [--smoke] [--out FILE] [--install-only]   (PYTHON=...: the Python 3.12)
#
# 1. installs the bundle's wheels (the project and what the image lacks) into DIR/site,
#    once: a rerun with the same wheels skips it
# 2. runs DIR/bench/gpu_check.sh on the bundle's dataset (DIR/data), recording the bundle's
#    commit (DIR/COMMIT); the JSON lands in DIR/results/gpu_check.json (or --out FILE), the
#    logs in DIR/bench/results/gpu_check_parts/
# --smoke: the same code paths on the CPU in minutes (a check of the bundle, not a measurement).
# --install-only: step 1 and the import check, then stop.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
PY=${PYTHON:-python3}
ARGS=()
INSTALL_ONLY=0
OUT=$HERE/results/gpu_check.json
while [ $# -gt 0 ]; do
  case "$1" in
    --smoke) ARGS+=(--smoke) ;;
    --out) case "$2" in /*) OUT=$2 ;; *) OUT=$PWD/$2 ;; esac; shift ;;
    --install-only) INSTALL_ONLY=1 ;;
    -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
    *) echo "run.sh: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done

if ! "$PY" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null; then
  echo "run.sh: $PY is not Python 3.12 (the bundle's wheels are for CPython 3.12): set PYTHON" >&2
  exit 1
fi

SITE=$HERE/site
STAMP=$(cd "$HERE/wheels" && ls -l -- *.whl | awk '{print $5, $NF}' | sort | cksum | cut -d' ' -f1)
if [ "$(cat "$SITE/.installed" 2>/dev/null)" = "$STAMP" ]; then
  echo "wheels already installed in $SITE"
else
  echo "installing $(ls "$HERE"/wheels/*.whl | wc -l) wheels into $SITE"
  rm -rf "$SITE"
  PIP_DISABLE_PIP_VERSION_CHECK=1 "$PY" -m pip install --quiet --no-index --no-deps \
    --target "$SITE" "$HERE"/wheels/*.whl
  echo "$STAMP" >"$SITE/.installed"
fi
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
export PATH="$SITE/bin:$PATH"
export PYTHON="$PY"

# What the check needs must import (a clear message now rather than a failed step later);
# every other module the wheels installed is tried too, and a failure named (a warning).
"$PY" - "$SITE" <<'EOF'
import importlib, os, sys
site = sys.argv[1]

def modules(folder, prefix=""):
    """Top-level modules and packages under folder; namespace packages (no __init__.py,
    e.g. google) are entered, so google.cloud.storage is tried rather than google."""
    for entry in sorted(os.listdir(folder)):
        path = os.path.join(folder, entry)
        if entry in ("bin", "__pycache__") or entry.startswith(".") or entry.endswith((".dist-info", ".libs", ".pth", ".txt")):
            continue
        if os.path.isdir(path):
            if os.path.exists(os.path.join(path, "__init__.py")):
                yield prefix + entry
            elif entry.isidentifier():
                yield from modules(path, prefix + entry + ".")
        elif entry.endswith((".py", ".so")):
            yield prefix + entry.split(".")[0]

def failures(names):
    out = []
    for module in names:
        try:
            importlib.import_module(module)
        except Exception as err:  # noqa: BLE001
            out.append(f"{module}: {type(err).__name__}: {err}")
    return out

needed = failures(("jax", "flax", "optax", "orbax.checkpoint", "numpy", "iap_jax", "iap_jax.training.train_cli",
                   "iap_jax.prediction.predict_cli"))
if needed:
    sys.exit("run.sh: this Python cannot import what the check needs:\n  " + "\n  ".join(needed))
bundled = sorted(set(modules(site)))
others = failures(bundled)
for line in others:
    print(f"run.sh: warning: a bundled module does not import: {line}")
print(f"imports: {len(bundled) - len(others)} of the {len(bundled)} bundled modules")
EOF
[ "$INSTALL_ONLY" = 1 ] && { echo "installed; the image imports what the check needs"; exit 0; }

DATASETS=("$HERE"/data/iap_dataset/*/*/dataset_info.json)
if [ ${#DATASETS[@]} -ne 1 ] || [ ! -f "${DATASETS[0]}" ]; then
  echo "run.sh: expected one dataset under $HERE/data/iap_dataset, found ${#DATASETS[@]}" >&2
  exit 1
fi
mkdir -p "$(dirname "$OUT")"
exec bash "$HERE/bench/gpu_check.sh" "${ARGS[@]}" --dataset "$(dirname "${DATASETS[0]}")" --out "$OUT"
