"""Builds the accelerator bundle: one folder (at most 60 MiB) that a host whose Python 3.12
image has only the packages of bench/bundle/accelerator_packages.txt, and no network, needs
to run bench/gpu_check.sh:

  wheels/      the project as a wheel (pip wheel --no-deps of the working tree) and every
               other runtime dependency of setup.py that the image lacks, transitively
               (resolved by pip for CPython 3.12 on manylinux x86-64, binary wheels only,
               minus the image's packages and their dependencies)
  data/        a 224 px dataset made by the project's own iap-synth + iap-prep, raw records
               (--image-encoding none), as bench/input.py makes its dataset
  bench/, configs/   the measurement scripts and configs (gpu_check.sh runs from here)
  run.sh       [--smoke]: installs the wheels into site/ (once), then runs gpu_check.sh
               on the bundle's dataset; writes results/gpu_check.json
  COMMIT       the git commit of the working tree it was built from; BUNDLE.json: what
               is in the bundle (commit, wheels and sizes, the dataset)

  python bench/bundle/build.py DIR [--patients 24] [--slices 10] [--image-size 224]
  (bash bench/gpu_check.sh --bundle DIR runs it)

It runs on the CPU machine that has the project's environment (the dataset is made with
it) and PyPI; pip resolves with a Python 3.12 interpreter where one is found (PATH, pyenv,
$IAP_BUNDLE_PYTHON: environment markers are then evaluated for 3.12), else with this one.
"""
from __future__ import annotations

import argparse
import datetime
import email.parser
import glob
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
MAX_MIB = 60
PYTHON_VERSION = "3.12"
# Binary wheels only, for CPython 3.12 on manylinux x86-64 (any glibc up to 2.28's tags).
PLATFORMS = ([f"manylinux_2_{minor}_x86_64" for minor in range(28, 4, -1)]
             + ["manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64"])
TARGET_FLAGS = ["--only-binary=:all:", "--python-version", PYTHON_VERSION, "--implementation", "cp",
                "--abi", "cp312"] + [flag for p in PLATFORMS for flag in ("--platform", p)]
BUNDLE_MARK = "BUNDLE.json"


class BundleError(RuntimeError):
    pass


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_list(path: str) -> list[str]:
    """Non-comment lines of a data file (the first field of each)."""
    with open(path) as f:
        lines = [line.split("#", 1)[0].strip() for line in f]
    return [line for line in lines if line]


def image_requirements() -> list[str]:
    return read_list(os.path.join(HERE, "accelerator_packages.txt"))


# ------------------------------------------------------------------ interpreters and pip


def find_python312() -> str | None:
    """A CPython 3.12 interpreter: $IAP_BUNDLE_PYTHON, python3.12 on PATH, or pyenv's."""
    candidates = [os.environ.get("IAP_BUNDLE_PYTHON"), shutil.which("python3.12")]
    pyenv = shutil.which("pyenv")
    if pyenv:
        done = subprocess.run([pyenv, "root"], capture_output=True, text=True)
        root = done.stdout.strip() if done.returncode == 0 else ""
        if root:
            candidates += sorted(glob.glob(os.path.join(root, "versions", "3.12*", "bin", "python3.12")),
                                 reverse=True)
    candidates += sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.12*/bin/python3.12")),
                         reverse=True)
    for path in filter(None, candidates):
        done = subprocess.run([path, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                              capture_output=True, text=True)
        if done.returncode == 0 and done.stdout.strip() == PYTHON_VERSION:
            return path
    return None


def _has_pip(python: str) -> bool:
    return subprocess.run([python, "-m", "pip", "--version"], capture_output=True).returncode == 0


def pip(python: str, *args: str) -> subprocess.CompletedProcess:
    command = [python, "-m", "pip", *args]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        # pip's complaints about the machine's extra local index dirs are noise here.
        lines = [line for line in (done.stdout + done.stderr).splitlines() if "is ignored" not in line]
        raise BundleError(f"pip {' '.join(args[:2])} failed (rc {done.returncode}):\n"
                          + "\n".join(lines[-40:]))
    return done


def resolve(python: str, requirement_sets: dict[str, list[str]], scratch: str) -> dict[str, dict[str, str]]:
    """{label: {canonical name: version}}: what pip installs for each set of requirements on
    the target (3.12, manylinux x86-64, wheels only), from metadata alone (nothing is
    installed); the sets are resolved side by side."""
    start = time.perf_counter()
    running = {}
    for label, requirements in requirement_sets.items():
        report = os.path.join(scratch, f"resolve_{label}.json")
        command = [python, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
                   "--report", report, "--target", os.path.join(scratch, f"target_{label}"),
                   *TARGET_FLAGS, *requirements]
        log = open(os.path.join(scratch, f"resolve_{label}.log"), "w+")
        running[label] = (subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, text=True), log, report)
    resolved = {}
    for label, (process, log, report) in running.items():
        rc = process.wait()
        log.seek(0)
        output = [line.rstrip() for line in log if "is ignored" not in line]
        log.close()
        if rc != 0:
            raise BundleError(f"pip could not resolve the {label}'s requirements for CPython "
                              f"{PYTHON_VERSION} on manylinux x86-64 from wheels alone (rc {rc}):\n"
                              + "\n".join(output[-40:]))
        with open(report) as f:
            items = json.load(f)["install"]
        resolved[label] = {canonical(i["metadata"]["name"]): i["metadata"]["version"] for i in items}
    print("  resolved " + ", ".join(f"{label} ({len(r)} packages)" for label, r in resolved.items())
          + f" in {time.perf_counter() - start:.0f} s", flush=True)
    return resolved


# ------------------------------------------------------------------ the project's files


def git(*args: str) -> str:
    done = subprocess.run(["git", "-C", REPO, *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise BundleError(f"git {' '.join(args)} failed: {done.stderr.strip()}")
    return done.stdout


def working_tree_files() -> list[str]:
    """Tracked and untracked-but-not-ignored files of the working tree that exist."""
    names = git("ls-files", "-co", "--exclude-standard", "-z").split("\0")
    return sorted(n for n in set(names) if n and os.path.isfile(os.path.join(REPO, n)))


def snapshot(target: str) -> None:
    """A copy of the working tree (what the wheel and the scripts are made from)."""
    for name in working_tree_files():
        os.makedirs(os.path.join(target, os.path.dirname(name)), exist_ok=True)
        shutil.copy2(os.path.join(REPO, name), os.path.join(target, name))


def project_wheel(source: str, wheels: str) -> str:
    """pip wheel --no-deps of the snapshot; the wheel's path."""
    before = set(os.listdir(wheels))
    args = ["wheel", "--no-deps", "--quiet", "-w", wheels, source]
    try:  # with the project's own environment's setuptools: no build backend to download
        if importlib.util.find_spec("setuptools") is None:
            raise BundleError("no setuptools here")
        pip(sys.executable, *args[:1], "--no-build-isolation", *args[1:])
    except BundleError:
        pip(sys.executable, *args)
    made = [n for n in os.listdir(wheels) if n not in before and n.endswith(".whl")]
    if len(made) != 1:
        raise BundleError(f"pip wheel made {made!r}, expected one wheel")
    return os.path.join(wheels, made[0])


def wheel_requirements(path: str) -> tuple[str, list[str]]:
    """(name, Requires-Dist without extras) of a wheel's METADATA."""
    with zipfile.ZipFile(path) as z:
        meta_name = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        meta = email.parser.Parser().parsestr(z.read(meta_name).decode())
    requires = [r for r in meta.get_all("Requires-Dist") or [] if "extra ==" not in r.replace("'", '"')]
    return meta["Name"], requires


# ------------------------------------------------------------------ the dataset


def make_dataset(data_dir: str, patients: int, slices: int, image_size: int, workers: int) -> str:
    """iap-synth + iap-prep (raw records) the way bench/input.py makes its dataset; the
    dataset dir (TFDS layout) under data_dir."""
    sys.path.insert(0, os.path.join(REPO, "bench"))
    import input as input_bench  # bench/input.py: runs the project's console scripts

    scratch = tempfile.mkdtemp(prefix="iap_bundle_data_")
    try:
        dicom = os.path.join(scratch, "dicom")
        start = time.perf_counter()
        input_bench._run_cli("data_prep.synthetic.cli:main", [
            "--out", dicom, "--patients", str(patients), "--seed", "0", "--preset", "small",
            "--slices", str(slices), "--workers", str(workers)])
        prepared = os.path.join(scratch, "data")
        input_bench._run_cli("data_prep.cli:main", [
            "--dicom-root", dicom, "--data-dir", prepared, "--image-size", str(image_size),
            "--workers", str(workers), "--salt", "accelerator-bundle", "--image-encoding", "none"])
        found = glob.glob(os.path.join(prepared, "iap_dataset", "*", "*", "dataset_info.json"))
        if len(found) != 1:
            raise BundleError(f"iap-prep made {len(found)} datasets under {prepared}, expected one")
        leaf = os.path.dirname(found[0])
        relative = os.path.relpath(leaf, prepared)  # iap_dataset/<config>/<version>
        target = os.path.join(data_dir, relative)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.move(leaf, target)  # (prep_report.json names local paths: it stays behind)
        print(f"  dataset made with iap-synth + iap-prep in {time.perf_counter() - start:.0f} s", flush=True)
        return target
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def split_sizes(dataset: str) -> dict[str, int]:
    with open(os.path.join(dataset, "dataset_info.json")) as f:
        info = json.load(f)
    return {s["name"]: sum(int(n) for n in s["shardLengths"]) for s in info["splits"]}


# ------------------------------------------------------------------ the bundle


def folder_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def prepare_out(out: str) -> None:
    """An empty folder, or an earlier bundle (emptied); anything else is refused."""
    if os.path.exists(out):
        if os.listdir(out) and not os.path.exists(os.path.join(out, BUNDLE_MARK)):
            raise BundleError(f"{out} exists, is not empty and is not a bundle: refusing to overwrite it")
        shutil.rmtree(out)
    os.makedirs(out)


def build(out: str, patients: int, slices: int, image_size: int, workers: int,
          max_mib: float = MAX_MIB) -> dict:
    start = time.perf_counter()
    out = os.path.abspath(out)
    commit = git("rev-parse", "HEAD").strip()
    dirty = bool(git("status", "--porcelain").strip())
    prepare_out(out)
    wheels = os.path.join(out, "wheels")
    os.makedirs(wheels)
    scratch = tempfile.mkdtemp(prefix="iap_bundle_")
    try:
        # 1. the working tree: the project's wheel, the scripts and configs
        print(f"bundle of {commit[:12]}{' (with uncommitted changes)' if dirty else ''} into {out}", flush=True)
        source = os.path.join(scratch, "src")
        snapshot(source)
        wheel = project_wheel(source, wheels)
        name, requires = wheel_requirements(wheel)
        for folder in ("bench", "configs"):
            shutil.copytree(os.path.join(source, folder), os.path.join(out, folder),
                            ignore=shutil.ignore_patterns("results", "__pycache__", "bundle"))
        shutil.copy2(os.path.join(HERE, "run.sh"), os.path.join(out, "run.sh"))
        os.chmod(os.path.join(out, "run.sh"), 0o755)

        # 2. the runtime dependencies the image lacks
        python = find_python312()
        if python and not _has_pip(python):
            python = None
        if not python:
            python = sys.executable
            print(f"  no Python {PYTHON_VERSION} with pip found: resolving with {python} "
                  f"(environment markers are evaluated for this interpreter)", flush=True)
        resolved = resolve(python, {"project": requires, "image": image_requirements()}, scratch)
        needed, image = resolved["project"], resolved["image"]
        ship = {n: v for n, v in sorted(needed.items()) if n not in image and n != canonical(name)}
        if ship:
            pip(python, "download", "--no-deps", "--quiet", "-d", wheels, *TARGET_FLAGS,
                *[f"{n}=={v}" for n, v in ship.items()])
        files = sorted(f for f in os.listdir(wheels) if f.endswith(".whl"))
        strays = [f for f in os.listdir(wheels) if not f.endswith(".whl")]
        if strays:
            raise BundleError(f"pip download brought files that are not wheels: {strays}")
        got = {canonical(f.split("-")[0]) for f in files}
        missing = sorted(set(ship) - got)
        if missing:
            raise BundleError(f"no wheel downloaded for {missing}")

        # 3. the dataset
        data = os.path.join(out, "data")
        dataset = make_dataset(data, patients, slices, image_size, workers)

        # 4. what the bundle holds, and its size
        with open(os.path.join(out, "COMMIT"), "w") as f:  # line 2: the tree was dirty
            f.write(commit + "\n" + ("uncommitted changes\n" if dirty else ""))
        wheel_sizes = {f: os.path.getsize(os.path.join(wheels, f)) for f in files}
        manifest = {
            "commit": commit, "dirty": dirty,
            "built": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "python": PYTHON_VERSION, "platforms": PLATFORMS,
            "image_packages": image_requirements(), "image_resolved": image,
            "project_wheel": os.path.basename(wheel),
            "wheels": wheel_sizes,
            "dataset": {"path": os.path.relpath(dataset, out), "patients": patients, "slices": slices,
                        "image_size": image_size, "image_encoding": "none",
                        "splits": split_sizes(dataset), "bytes": folder_bytes(dataset)},
        }
        with open(os.path.join(out, BUNDLE_MARK), "w") as f:
            json.dump(manifest, f, indent=1)
        total = folder_bytes(out)

        print(f"\nwheels ({len(files)}, {mib(sum(wheel_sizes.values()))}):")
        for f, size in sorted(wheel_sizes.items(), key=lambda kv: -kv[1]):
            print(f"  {size / 2**20:7.2f} MiB  {f}")
        splits = manifest["dataset"]["splits"]
        print(f"dataset: {manifest['dataset']['path']} ({mib(manifest['dataset']['bytes'])}; "
              + ", ".join(f"{k} {v}" for k, v in splits.items()) + " slices)")
        print(f"scripts and configs: {mib(folder_bytes(os.path.join(out, 'bench')) + folder_bytes(os.path.join(out, 'configs')))}")
        print(f"bundle: {mib(total)} of at most {max_mib:g} MiB, built in {time.perf_counter() - start:.0f} s")
        if total > max_mib * 2**20:
            raise BundleError(f"the bundle is {mib(total)}, over the {max_mib:g} MiB cap: the largest "
                              "wheels are listed above (a smaller dataset: --patients / --slices)")
        return manifest
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="the bundle folder (made, or an earlier bundle replaced)")
    parser.add_argument("--patients", type=int, default=24)
    parser.add_argument("--slices", type=int, default=10, help="pre-contrast slices per patient")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--workers", type=int, default=min(os.cpu_count() or 1, 8))
    parser.add_argument("--max-mib", type=float, default=MAX_MIB)
    args = parser.parse_args(argv)
    try:
        build(args.out, args.patients, args.slices, args.image_size, args.workers, args.max_mib)
    except BundleError as err:
        print(f"\nbundle failed: {err}", file=sys.stderr)
        return 1
    out = os.path.abspath(args.out)
    rel = os.path.relpath(out, REPO)
    print("\nto carry the folder to the accelerator host and run it there (Python 3.12 image, no network):")
    print(f"  rsync -a {out}/ HOST:iap_bundle/")
    print("  ssh HOST bash iap_bundle/run.sh      # (--smoke: the CPU check)")
    if not rel.startswith(".."):
        print(f"(with this repository's device runner: carry [\"{rel}\"], command "
              f"\"bash {rel}/run.sh --out $OUT/gpu_check.json\")")
    return 0


if __name__ == "__main__":
    sys.exit(main())
