"""Submit preprocessing or training to a Ray cluster through the Ray Jobs API (DESIGN §7).

    python -m jobs.ray submit preprocess --address http://HEAD:8265 --config configs/demo.yaml [key=value ...]
    python -m jobs.ray submit train --address http://HEAD:8265 --workers 2 --config ... [key=value ...] [--wait]
    python -m jobs.ray status --address http://HEAD:8265 JOB_ID

The job runs this checkout's code (same path on the cluster: shared storage) with the resolved config written
to <run.dir>/ray-jobs/. Preprocessing joins the cluster (`preprocess.ray_address=auto`); training runs Ray Train
workers (`jobs.ray_train`) with the same trainer and parallel layout.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

from common.config import load_config, save_config

PROJECT = Path(__file__).resolve().parent.parent
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def client(address: str):
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(address)


def entrypoint(kind: str, config_path: Path, workers: int) -> str:
    module = {"preprocess": "data_pipeline.preprocess", "train": "jobs.ray_train"}[kind]
    args = [sys.executable, "-m", module, "--config", str(config_path)]
    if kind == "preprocess":
        args.append("preprocess.ray_address=auto")
    else:
        args += ["--workers", str(workers)]
    return f"cd {shlex.quote(str(PROJECT))} && " + " ".join(shlex.quote(a) for a in args)


def submit(kind: str, address: str, config: str | None, overrides: list[str], workers: int = 2) -> str:
    cfg = load_config(config, overrides)
    out = cfg.run_dir.resolve() / "ray-jobs"
    out.mkdir(parents=True, exist_ok=True)
    config_path = out / f"{kind}-{int(time.time())}.yaml"
    save_config(cfg, config_path)
    return client(address).submit_job(entrypoint=entrypoint(kind, config_path, workers),
                                       runtime_env={"env_vars": {"PYTHONPATH": str(PROJECT)}})


def wait(address: str, job_id: str, timeout: float = 3600) -> str:
    c, deadline = client(address), time.time() + timeout
    while (state := str(c.get_job_status(job_id)).split(".")[-1]) not in TERMINAL:
        if time.time() > deadline:
            raise TimeoutError(f"job {job_id} still {state} after {timeout:.0f} s")
        time.sleep(1)
    return state


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("submit")
    s.add_argument("kind", choices=["preprocess", "train"])
    s.add_argument("--address", default="http://127.0.0.1:8265", help="Ray dashboard / Jobs API address")
    s.add_argument("--config", default="configs/demo.yaml")
    s.add_argument("--workers", type=int, default=2, help="training: Ray Train workers (ranks)")
    s.add_argument("--wait", action="store_true", help="wait for the job and print its logs")
    s.add_argument("overrides", nargs="*", metavar="key.sub=value")
    st = sub.add_parser("status")
    st.add_argument("--address", default="http://127.0.0.1:8265")
    st.add_argument("job_id")
    a = parser.parse_args(argv)
    if a.command == "status":
        print(str(client(a.address).get_job_status(a.job_id)).split(".")[-1])
        return 0
    job = submit(a.kind, a.address, a.config, a.overrides, a.workers)
    print(f"submitted {a.kind} job {job} to {a.address}")
    if a.wait:
        state = wait(a.address, job)
        print(client(a.address).get_job_logs(job))
        print(f"job {job}: {state}")
        return 0 if state == "SUCCEEDED" else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
