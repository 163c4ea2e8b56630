"""Start N local processes of one training run, joined by jax.distributed on 127.0.0.1
(CPU devices, gloo collectives): the multi-host code path on one machine.

  python launch/local_multiprocess.py --num_processes=2 -- \
      --config=configs/synthetic_cpu.py:runlocal --workdir=/tmp/run --config.dataset_dir=D
"""
import argparse
import os
import socket
import subprocess
import sys


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(num_processes: int, main_args: list[str], env: dict | None = None,
          log_dir: str | None = None) -> list[subprocess.Popen]:
    """Starts the processes; with log_dir, process i writes its output to log_dir/i.log."""
    coordinator = f"127.0.0.1:{free_port()}"
    env = dict(env or os.environ)
    env.setdefault("JAX_PLATFORMS", "cpu")
    procs = []
    for index in range(num_processes):
        cmd = [sys.executable, "-m", "iap_jax.training.train_cli", *main_args,
               f"--config.distributed.coordinator={coordinator}",
               f"--config.distributed.num_processes={num_processes}",
               f"--config.distributed.process_id={index}"]
        out = None
        if log_dir is not None:
            out = open(os.path.join(log_dir, f"{index}.log"), "w")
        procs.append(subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT
                                      if out is not None else None))
        if out is not None:
            out.close()  # the child holds its own copy
    return procs


def launch(num_processes: int, main_args: list[str], env: dict | None = None,
           timeout: float | None = None, log_dir: str | None = None) -> list[int]:
    """Runs the processes to the end; returns their exit codes."""
    procs = start(num_processes, main_args, env, log_dir)
    codes = []
    try:
        for proc in procs:
            codes.append(proc.wait(timeout=timeout))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    return codes


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num_processes", type=int, default=2)
    parser.add_argument("main_args", nargs=argparse.REMAINDER,
                        help="arguments for iap_jax.training.train_cli, after --")
    args = parser.parse_args()
    main_args = [a for a in args.main_args if a != "--"]
    codes = launch(args.num_processes, main_args)
    print("exit codes:", codes)
    sys.exit(max(codes))


if __name__ == "__main__":
    main()
