import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "launch"))
import local_multiprocess  # noqa: E402


def test_two_processes_train_and_checkpoint(train_dataset_dir, tmp_path):
    dataset_dir = train_dataset_dir
    workdir = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    codes = local_multiprocess.launch(2, [
        f"--config={REPO}/configs/synthetic_cpu.py:runlocal", f"--workdir={workdir}",
        f"--config.dataset_dir={dataset_dir}", "--config.progress_bar=False"], env=env, timeout=300)
    assert codes == [0, 0]
    steps = sorted(int(p) for p in os.listdir(workdir / "checkpoints") if p.isdigit())
    assert steps and steps[-1] == 4  # 64 examples, global batch 16, one epoch
    assert (workdir / "metrics.jsonl").exists()
