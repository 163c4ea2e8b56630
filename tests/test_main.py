"""The entry point's choices made before JAX starts: CPU device count."""
from train_data import tiny_config

from iap_jax.training.train_cli import cpu_device_count


def test_cpu_devices_auto_splits_two_cores_for_single_process_runs():
    config = tiny_config("unused")
    assert config.cpu_devices == 0  # auto
    assert cpu_device_count(config, 2, "", multi_process=False) == 2
    assert cpu_device_count(config, 16, "", multi_process=False) == 2
    assert cpu_device_count(config, 1, "", multi_process=False) == 1
    # Each process of a multi-process run keeps one device; a user's XLA_FLAGS wins.
    assert cpu_device_count(config, 2, "", multi_process=True) == 1
    assert cpu_device_count(config, 2, "--xla_force_host_platform_device_count=4",
                            multi_process=False) == 1


def test_cpu_devices_auto_needs_batches_that_divide_and_explicit_counts_are_kept():
    config = tiny_config("unused", batch_size=15)
    assert cpu_device_count(config, 2, "", multi_process=False) == 1
    config = tiny_config("unused", cpu_devices=4)
    assert cpu_device_count(config, 2, "", multi_process=True) == 4


def test_cpu_devices_auto_keeps_one_device_for_onednn_convolutions():
    config = tiny_config("unused")
    assert cpu_device_count(config, 2, "", multi_process=False, onednn_convs=True) == 1
    config = tiny_config("unused", cpu_devices=2)
    assert cpu_device_count(config, 2, "", multi_process=False, onednn_convs=True) == 2


def test_run_log_keeps_library_warnings_but_not_their_routine_chatter():
    import logging

    from iap_jax.training.train_cli import _LibraryInfoFilter

    def record(path, level, message):
        return logging.LogRecord("x", level, path, 1, message, None, None)

    keep = _LibraryInfoFilter().filter
    assert not keep(record("/site-packages/orbax/checkpoint/manager.py", logging.INFO, "saved step 10"))
    assert keep(record("/site-packages/orbax/checkpoint/manager.py", logging.WARNING, "disk full"))
    assert not keep(record("/site-packages/orbax/checkpoint/manager.py", logging.WARNING,
                           "Requested `tracked_metric`; did not provide metrics."))
    assert keep(record("/srv/project/iap_jax/training/train.py", logging.INFO, "step 10/100"))


def test_help_prints_the_usage_and_a_missing_dataset_is_one_line(tmp_path):
    import os
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=repo)
    script = "import sys; from iap_jax.training.train_cli import run; sys.argv[0] = 'iap-train'; run()"
    shown = subprocess.run([sys.executable, "-c", script, "--help"], env=env, cwd=repo,
                           capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0 and "--config.dataset_dir" in shown.stdout
    assert "--workdir" in shown.stdout
    workdir = tmp_path / "run"
    failed = subprocess.run([sys.executable, "-c", script, f"--config={repo}/configs/synthetic_cpu.py",
                             f"--workdir={workdir}", f"--config.dataset_dir={tmp_path / 'nope'}"],
                            env=env, cwd=repo, capture_output=True, text=True, timeout=120)
    assert failed.returncode == 2
    assert failed.stderr.strip().splitlines()[-1] == f"iap-train: error: {tmp_path / 'nope'}: no such dataset directory"
    assert not workdir.exists()
