"""The accelerator bundle (bash bench/gpu_check.sh --bundle DIR, bench/bundle/): built here,
then run (DIR/run.sh --smoke) by a Python 3.12 virtualenv that holds only the accelerator
image's packages (bench/bundle/accelerator_packages.txt; CPU builds, torch left out) -- no
TensorFlow, no pydicom, no ml_collections, nothing of the project.

The virtualenv is made once and kept in .venv-accelerator/ (ignored by git); it is remade
when the package list changes. Needs PyPI (the bundle's wheels) and a Python 3.12.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time

import pytest

pytestmark = [pytest.mark.accelerator, pytest.mark.slow]

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = os.path.join(REPO, "bench", "bundle", "accelerator_packages.txt")
VENV = os.path.join(REPO, ".venv-accelerator")
MAX_BYTES = 60 * 2**20


def _build_module():
    spec = importlib.util.spec_from_file_location("bundle_build", os.path.join(REPO, "bench", "bundle", "build.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _image_requirements(build) -> list[str]:
    """The image's packages as CPU builds: extras (jax[cuda12]) dropped, torch left out
    (the smoke leaves its PyTorch rows out without it)."""
    names = [r.split("[", 1)[0].strip() for r in build.image_requirements()]
    return [n for n in names if build.canonical(n) != "torch"]


def _image_venv(python: str, requirements: list[str]) -> str:
    """.venv-accelerator: a virtualenv of `python` with only `requirements`, made once."""
    stamp = hashlib.sha256(json.dumps([os.path.realpath(python), requirements]).encode()).hexdigest()
    stamp_file = os.path.join(VENV, ".image-packages")
    venv_python = os.path.join(VENV, "bin", "python")
    if os.path.exists(stamp_file) and os.path.exists(venv_python):
        with open(stamp_file) as f:
            if f.read().strip() == stamp:
                return venv_python
    shutil.rmtree(VENV, ignore_errors=True)
    subprocess.run([python, "-m", "venv", VENV], check=True)
    done = subprocess.run([venv_python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                           *requirements], capture_output=True, text=True)
    assert done.returncode == 0, f"pip install of the image's packages failed:\n{done.stderr[-3000:]}"
    with open(stamp_file, "w") as f:
        f.write(stamp)
    return venv_python


def _clean_env(**extra: str) -> dict:
    """This process's environment without what would point another Python at this checkout
    or at this environment's packages."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME", "JAX_PLATFORMS",
                        "JAX_COMPILATION_CACHE_DIR", "XLA_FLAGS")}
    env.update(extra)
    return env


def _folder_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def test_bundle_runs_on_the_accelerator_image(tmp_path):
    build = _build_module()
    python312 = build.find_python312()
    if python312 is None:
        pytest.skip("no Python 3.12 interpreter (PATH, pyenv, $IAP_BUNDLE_PYTHON): the bundle's "
                    "wheels are for CPython 3.12")
    start = time.perf_counter()
    venv_python = _image_venv(python312, _image_requirements(build))
    print(f"image venv ready in {time.perf_counter() - start:.0f} s")

    # The image has none of these: the bundle must bring what the project needs of them.
    for module in ("tensorflow", "tensorflow_datasets", "pydicom", "ml_collections", "iap_jax"):
        done = subprocess.run([venv_python, "-c", f"import {module}"], capture_output=True,
                              text=True, env=_clean_env(), cwd=str(tmp_path))
        assert done.returncode != 0, f"the accelerator image's venv imports {module}"

    # Build (with this, the project's environment: its prep makes the dataset).
    bundle = tmp_path / "bundle"
    start = time.perf_counter()
    done = subprocess.run(["bash", os.path.join(REPO, "bench", "gpu_check.sh"), "--bundle", str(bundle)],
                          capture_output=True, text=True, env=_clean_env(PYTHON=sys.executable),
                          timeout=1200)
    print(done.stdout[-4000:])
    assert done.returncode == 0, f"bundle build failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    print(f"bundle built in {time.perf_counter() - start:.0f} s")
    size = _folder_bytes(str(bundle))
    assert size <= MAX_BYTES, f"bundle is {size / 2**20:.1f} MiB"
    assert "run.sh" in done.stdout.split("to carry the folder")[-1]
    with open(bundle / "BUNDLE.json") as f:
        manifest = json.load(f)
    commit = subprocess.run(["git", "-C", REPO, "rev-parse", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    assert (bundle / "COMMIT").read_text().split("\n")[0] == commit == manifest["commit"]
    wheels = sorted(os.listdir(bundle / "wheels"))
    assert manifest["project_wheel"] in wheels
    assert set(wheels) == set(manifest["wheels"])
    for wheel in wheels:
        assert wheel.endswith(".whl"), wheel
        tags = wheel[:-4].split("-")[-3:]  # python, abi, platform
        assert tags[0] in ("py3", "py2.py3", "cp312") or tags[0].startswith("cp3"), wheel
        assert tags[2] == "any" or "manylinux" in tags[2] and tags[2].endswith("x86_64"), wheel
    names = {build.canonical(w.split("-")[0]) for w in wheels}
    assert not names & {"tensorflow", "tensorflow-cpu", "tensorflow-datasets"}, names
    image = set(manifest["image_resolved"])
    assert not names & image, f"wheels the image already has: {names & image}"
    assert {"pydicom", "ml-collections"} <= names, names  # setup.py needs them, the image lacks them
    assert manifest["dataset"]["image_size"] == 224 and manifest["dataset"]["image_encoding"] == "none"
    splits = manifest["dataset"]["splits"]
    assert splits.get("train", 0) > 0 and splits.get("test", 0) > 0, splits

    # Run it as the accelerator host would, on the CPU: only the venv's Python, no checkout.
    start = time.perf_counter()
    done = subprocess.run(["bash", str(bundle / "run.sh"), "--smoke"], capture_output=True, text=True,
                          env=_clean_env(PYTHON=venv_python), cwd=str(tmp_path), timeout=1200)
    seconds = time.perf_counter() - start
    print(done.stdout[-6000:])
    parts = bundle / "bench" / "results" / "gpu_check_parts"
    logs = ""
    if parts.exists():
        for log in sorted(parts.glob("*.log")):
            logs += f"\n--- {log.name}\n" + log.read_text()[-1500:]
    assert done.returncode == 0, f"run.sh --smoke failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}{logs}"
    print(f"run.sh --smoke took {seconds:.0f} s")
    assert (bundle / "site" / "iap_jax").is_dir()

    with open(bundle / "results" / "gpu_check.json") as f:
        report = json.load(f)
    failed = {k: v for k, v in report["steps_rc"].items() if v.strip() != "0"}
    assert not failed, f"steps failed: {failed}{logs}"
    assert report["commit"] == commit
    assert report["mode"] == "smoke"
    train = [r for r in report["train"] if "error" not in r]
    assert {r["variant"] for r in train} >= {"jax_xla", "jax_e2e"}, report["train"]
    assert all(r["images_per_s"] > 0 for r in train)
    predict = [r for r in report["predict"] if "error" not in r]
    assert {r["variant"] for r in predict} >= {"jax", "e2e"}, report["predict"]
    cli = report["cli"]
    assert cli["rc"] == {"cli_train": "0", "cli_resume": "0", "cli_predict": "0"}, cli
    assert cli["resumed_from_step"] == cli["halt_after_steps"] > 0, cli
    assert cli["final_step"] == 2 * cli["steps_per_epoch"], cli
    # The check repeats the bundle's dataset (bench/replicate_dataset.py): every split alike.
    copies = report["dataset"]["train_examples"] // splits["train"]
    assert copies >= 2 and report["dataset"]["train_examples"] == copies * splits["train"]
    assert cli["predict"]["slices"] == copies * splits["test"], cli

    # A rerun finds the wheels installed (it does not install them again).
    done = subprocess.run(["bash", str(bundle / "run.sh"), "--install-only"], capture_output=True,
                          text=True, env=_clean_env(PYTHON=venv_python), cwd=str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert "already installed" in done.stdout, done.stdout
    # ... and every module the wheels installed imports on the image's Python (namespace
    # packages such as google.* beside the image's protobuf included).
    assert "warning" not in done.stdout, done.stdout
    imported = next(line for line in done.stdout.splitlines() if line.startswith("imports: "))
    count, total = imported.split()[1], imported.split()[4]
    assert count == total and int(total) >= len(wheels), imported
