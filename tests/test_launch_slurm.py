"""launch/slurm_gpu.sbatch's requeue logic, run by bash with stand-ins for the two SLURM
commands it calls (there is no SLURM here): `srun` exits with the status a training would,
`scontrol` records its arguments."""
import os
import stat
import subprocess

import pytest

from iap_jax.training.train_cli import EXIT_PREEMPTED

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "launch", "slurm_gpu.sbatch")


def _command(folder, name: str, body: str) -> None:
    path = folder / name
    path.write_text("#!/bin/bash\n" + body + "\n")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


@pytest.mark.parametrize("training_status, requeued, script_status", [
    (EXIT_PREEMPTED, True, 0),   # saved before the time limit: requeued, the job ends well
    (0, False, 0),               # done
    (1, False, 1),               # a failure is not requeued, and the job fails
])
def test_requeues_only_a_preempted_run(tmp_path, training_status, requeued, script_status):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _command(bin_dir, "srun", f'echo "$@" > "{tmp_path}/srun.args"; exit {training_status}')
    _command(bin_dir, "scontrol", f'echo "$@" > "{tmp_path}/scontrol.args"')
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_ID="4242")
    result = subprocess.run(["bash", SCRIPT, "/shared/data", "gs://bucket/run", "--config.seed=3"],
                            env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == script_status, result.stderr
    args = (tmp_path / "srun.args").read_text()
    assert "--workdir=gs://bucket/run" in args and "--config.seed=3" in args
    assert "--config.dataset_dir=/shared/data" in args
    assert (tmp_path / "scontrol.args").exists() == requeued
    if requeued:
        assert (tmp_path / "scontrol.args").read_text().split() == ["requeue", "4242"]
