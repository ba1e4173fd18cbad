"""Every `python -m <package>.<module>` entry point documents itself: `--help` exits 0 with its usage, and an unknown
flag exits 2 with the usage and the error (argparse's convention), before it does any work."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("benchmarks", "common", "data_pipeline", "jobs", "models", "parallel", "trainer")
ENTRY_POINTS = sorted(f"{p.parent.name}.{p.stem}" for pkg in PACKAGES for p in (ROOT / pkg).glob("*.py")
                      if 'if __name__ == "__main__":' in p.read_text())


def run(module: str, args: list[str], monkeypatch) -> int:
    monkeypatch.setattr(sys, "argv", [module, *args])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_module(module, run_name="__main__", alter_sys=False)
    code = exit_info.value.code
    return 0 if code is None else code


def test_the_entry_points_are_found():
    assert len(ENTRY_POINTS) >= 20 and {"trainer.train_videoar", "jobs.slurm", "data_pipeline.preprocess"} <= \
        set(ENTRY_POINTS)


@pytest.mark.parametrize("module", ENTRY_POINTS)
def test_help_exits_0_and_a_bad_flag_exits_2_with_the_usage(module, monkeypatch, capsys):
    assert run(module, ["--help"], monkeypatch) == 0
    assert "usage:" in capsys.readouterr().out
    assert run(module, ["--no-such-flag"], monkeypatch) == 2
    err = capsys.readouterr().err
    assert "usage:" in err and "error:" in err
