"""A stand-in rank for tests/test_launch.py: a slow start-up (as importing torch and loading a tokenizer are),
then the trainer's preemption handler, then work until preempted: exits EXIT_PREEMPTED when signalled."""

from __future__ import annotations

import sys
import time

from trainer.preemption import EXIT_PREEMPTED, PreemptionFlag

if __name__ == "__main__":
    time.sleep(float(sys.argv[1]) if len(sys.argv) > 1 else 2.0)  # start-up: no handler installed yet
    flag = PreemptionFlag().install()
    deadline = time.monotonic() + 60
    while not flag.requested and time.monotonic() < deadline:
        time.sleep(0.1)
    sys.exit(EXIT_PREEMPTED if flag.requested else 0)
