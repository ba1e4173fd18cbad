"""Start N training processes on this node with the torchrun environment (RANK, LOCAL_RANK, WORLD_SIZE,
MASTER_ADDR, MASTER_PORT), forward preemption signals to them, and report their outcome.

    python -m jobs.launch --nproc 2 -- --config configs/demo.yaml parallel.tp=2
    python -m jobs.launch --nproc 8 --nnodes 4 --node-rank $SLURM_NODEID --master-addr HEAD -- ...   (one per node)

Ranks are static: node_rank * nproc + local_rank; the first node hosts the rendezvous (MASTER_ADDR:MASTER_PORT).
SIGUSR1/SIGTERM are passed on to every process, which checkpoints and exits with EXIT_PREEMPTED (3); the
launcher then exits 3 too, so a job script can requeue. Any other failure stops the remaining processes.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time

from common.exit_codes import EXIT_FAILED, EXIT_PREEMPTED, SIGNALS  # stdlib only: the launcher starts fast


RESEND_S = 5.0  # how often a received preemption signal is passed on again while ranks run


def _ignore_usr1() -> None:
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)


def rank_env(nproc: int, nnodes: int, node_rank: int, local: int, master_addr: str, master_port: int,
             threads: int = 0) -> dict[str, str]:
    """The torchrun variables of local process `local` on node `node_rank`."""
    env = {"RANK": str(node_rank * nproc + local), "LOCAL_RANK": str(local), "WORLD_SIZE": str(nproc * nnodes),
           "LOCAL_WORLD_SIZE": str(nproc), "MASTER_ADDR": master_addr, "MASTER_PORT": str(master_port)}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def launch(nproc: int, args: list[str], module: str = "trainer.train_videoar", nnodes: int = 1, node_rank: int = 0,
           master_addr: str = "127.0.0.1", master_port: int = 29500, threads: int = 0) -> int:
    procs, pending = [], []

    def forward(signum, frame):
        pending[:] = [signum]  # re-sent until the ranks exit: one may not have installed its handler yet
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in SIGNALS}  # before any rank starts
    for local in range(nproc):
        env = {**os.environ, **rank_env(nproc, nnodes, node_rank, local, master_addr, master_port, threads)}
        # a rank starts with SIGUSR1 ignored until its trainer installs the preemption handler (its first act):
        # a preemption during Python/torch start-up is then re-sent, not a kill by the default action
        procs.append(subprocess.Popen([sys.executable, "-m", module, *args], env=env, preexec_fn=_ignore_usr1))
    last_resend = time.monotonic()
    try:
        codes: dict[int, int] = {}
        while len(codes) < len(procs):
            for i, p in enumerate(procs):
                if i not in codes and p.poll() is not None:
                    codes[i] = p.returncode
                    if p.returncode not in (0, EXIT_PREEMPTED):  # a crash: do not leave the others hanging
                        for q in procs:
                            if q.poll() is None:
                                q.terminate()
            if pending and time.monotonic() - last_resend > RESEND_S:
                forward(pending[0], None)
                last_resend = time.monotonic()
            time.sleep(0.2)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    values = set(codes.values())
    if values == {0}:
        return 0
    if values <= {0, EXIT_PREEMPTED}:
        return EXIT_PREEMPTED
    # a failure exits above EXIT_PREEMPTED, so srun (which returns its tasks' highest code) reports a crash on
    # one node as a crash even when the other nodes' launchers were preempted: no requeue into the same crash
    failures = sorted(c for c in values if c not in (0, EXIT_PREEMPTED))
    return failures[-1] if failures[-1] > EXIT_PREEMPTED else EXIT_FAILED


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--nproc", type=int, default=2, help="processes on this node (GPUs per node on a cluster)")
    parser.add_argument("--nnodes", type=int, default=1)
    parser.add_argument("--node-rank", type=int, default=int(os.environ.get("SLURM_NODEID", 0)))
    parser.add_argument("--master-addr", default="127.0.0.1", help="the first node (rendezvous host)")
    parser.add_argument("--master-port", type=int, default=29500)
    parser.add_argument("--threads", type=int, default=0, help="OMP_NUM_THREADS per process (0: leave as is)")
    parser.add_argument("--module", default="trainer.train_videoar", help="python -m module to run")
    parser.add_argument("--dry-run", action="store_true", help="print each process's RANK, LOCAL_RANK, WORLD_SIZE, "
                                                                  "MASTER_ADDR, MASTER_PORT (one JSON line each), "
                                                                  "start nothing")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="-- then the module's arguments")
    a = parser.parse_args(argv)
    rest = a.args[1:] if a.args[:1] == ["--"] else a.args
    if a.dry_run:
        for local in range(a.nproc):
            print(json.dumps({**rank_env(a.nproc, a.nnodes, a.node_rank, local, a.master_addr, a.master_port,
                                         a.threads), "NODE_RANK": str(a.node_rank), "args": rest}))
        return 0
    return launch(a.nproc, rest, a.module, a.nnodes, a.node_rank, a.master_addr, a.master_port, a.threads)


if __name__ == "__main__":
    sys.exit(main())
