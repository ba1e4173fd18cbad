"""jobs.status on a synthetic run directory (no training): last-record-wins, torn line, committed checkpoints,
ETA by hand, the CLI (table, --json, --watch, --help) and the missing-run error."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

from jobs.status import main, render, sparkline, summarize

ROOT = Path(__file__).resolve().parents[1]
T = 1_700_000_000.0
ENDPOINT = "http://127.0.0.1:9100/metrics"


def rec(step, t, stage="low-res", idx=0, **kw):
    return {"time": T + t, "step": step, "total_steps": 100, "stage": stage, "stage_index": idx, **kw}


def write_run(run: Path) -> Path:
    """Attempt 1 logs steps 10..50 every 10 s (1 s/step) and dies after committing step 40; attempt 2 resumes
    from 40, redoes step 50 after 100 s of downtime and runs 60, 70 at 2 s/step; the file ends in a torn line."""
    v = run / "videoar"
    (v / "checkpoints").mkdir(parents=True)
    old = {"time": T + 10, "step": 10, "stage": "low-res", "loss": 0.9, "tokens_per_s": 1000.0}  # older run: few keys
    first = [rec(s, s, loss=1.0 - s / 100, tokens_per_s=2000.0, mfu=0.30, data_wait_frac=0.10) for s in (20, 30, 40)]
    crashed = rec(50, 50, loss=9.9, tokens_per_s=1.0, mfu=0.01, data_wait_frac=0.99)
    redo = [rec(50, 150, "high-res", 1, loss=0.5, tokens_per_s=3000.0, mfu=0.40, data_wait_frac=0.20),
            rec(60, 170, "high-res", 1, loss=0.45, tokens_per_s=3500.0, mfu=0.41, data_wait_frac=0.10),
            rec(70, 190, "high-res", 1, loss=0.4, tokens_per_s=4096.0, tokens_per_s_per_device=1024.0, mfu=0.42,
                data_wait_frac=0.05, consumed_tokens=123456, lr=1e-4, grad_norm=0.5, bit_acc=0.75)]
    first[-1].update({"eval/loss": 0.8, "eval/bit_acc": 0.6})  # held-out evaluation at 40 and 60
    crashed.update({"eval/loss": 9.9})  # replaced by the redo: never shown
    redo[1].update({"eval/loss": 0.5, "eval/bit_acc": 0.7})
    lines = [json.dumps(r) for r in [old, *first, crashed, *redo]]
    (v / "metrics.jsonl").write_text("\n".join(lines) + '\n{"time": 1700000200.0, "step": 80, "sta')
    for step in (20, 40):
        d = v / "checkpoints" / f"step-{step:08d}"
        d.mkdir()
        (d / "metadata.json").write_text(json.dumps({"step": step}))
        os.utime(d / "metadata.json", (T + step + 5, T + step + 5))
    (v / "checkpoints" / "step-00000050").mkdir()  # uncommitted: no metadata.json
    (v / "checkpoints" / "step-00000050" / "rank-00000.pt").write_bytes(b"partial")
    (v / "checkpoints" / "latest").write_text("step-00000040\n")
    (v / "metrics_endpoint").write_text(ENDPOINT + "\n")
    (run / "preprocess").mkdir()
    (run / "preprocess" / "metrics.jsonl").write_text(json.dumps(
        {"step": 3, "inputs_done": 30, "inputs_total": 40, "clips": 120, "clips_per_s": 4.5, "bytes": 2_500_000,
         "bytes_per_s": 90_000.0, "quarantined": 1, "shards": 6, "elapsed_s": 26.7, "startup_s": 5.0}) + "\n")
    return run


@pytest.fixture
def run(tmp_path):
    return write_run(tmp_path / "run")


def test_sparkline():
    assert sparkline(list(range(8))) == "▁▂▃▄▅▆▇█"
    assert sparkline([1, 5, 3, None, float("nan"), 9]) == "▁▅▃█"
    assert sparkline([3, 3, 3]) == "▄▄▄"
    assert sparkline([]) == sparkline([None]) == ""
    assert sparkline(list(range(80)), width=8) == "▁▂▃▄▅▆▇█"  # 8 bucket means of 10 values each
    assert len(sparkline(list(range(1000)))) == 40


def test_summarize(run):
    s = summarize(run, now=T + 200)
    assert summarize(run / "videoar", now=T + 200) == s  # RUN_DIR/videoar is accepted too
    assert (s["step"], s["total_steps"], s["progress"]) == (70, 100, 0.7)  # the torn step-80 line is ignored
    assert (s["stage"], s["stage_index"], s["status"]) == ("high-res", 1, "running")
    assert (s["tokens_per_s"], s["tokens_per_s_per_device"], s["mfu"], s["data_wait_frac"]) == (4096.0, 1024.0, 0.42,
                                                                                                 0.05)
    assert (s["loss"], s["bit_acc"], s["consumed_tokens"], s["age_s"]) == (0.4, 0.75, 123456.0, 10.0)
    assert s["skipped_steps"] is None and s["mem/peak_rss_gb"] is None  # absent keys stay None
    assert (s["records"], s["replaced_records"]) == (7, 1)
    # step 50: the redo (resumed attempt) wins over the crashed attempt's record
    assert s["trends"]["loss"] == sparkline([0.9, 0.8, 0.7, 0.6, 0.5, 0.45, 0.4])
    assert s["trends"]["tokens_per_s"] == sparkline([1000, 2000, 2000, 2000, 3000, 3500, 4096]) == "▁▃▃▃▆▇█"
    assert s["trends"]["mfu"] == sparkline([0.30, 0.30, 0.30, 0.40, 0.41, 0.42])  # step 10 has no mfu
    # ETA: intervals 10->20->30->40 (10 s each), 50->60->70 (20 s each); 40->50 spans the 100 s restart gap
    # (11 s/step > 5 x median 2 s/step) and is dropped: 70 s / 50 steps = 1.4 s/step, 30 steps left
    assert s["sec_per_step"] == pytest.approx(70 / 50, rel=1e-12)
    assert s["eta_s"] == pytest.approx(30 * 70 / 50, rel=1e-12)
    ck = s["checkpoint"]  # newest committed step: 40, not the uncommitted step-00000050
    assert (ck["step"], Path(ck["path"]).name, ck["age_s"]) == (40, "step-00000040", 200 - 45)
    assert s["metrics_endpoint"] == ENDPOINT
    assert s["eval"] == {"step": 60, "loss": 0.5, "bit_acc": 0.7, "trend": sparkline([0.8, 0.5])}
    assert s["preprocess"]["clips"] == 120 and s["preprocess"]["inputs_total"] == 40


def test_status_stopped_and_finished(run):
    assert summarize(run, now=T + 190 + 601)["status"] == "stopped"
    with open(run / "videoar" / "metrics.jsonl", "a") as f:  # complete the torn line, then finish
        f.write('ge": "high-res"}\n' + json.dumps(rec(100, 250, "high-res", 1, loss=0.3)) + "\n")
    s = summarize(run, now=T + 99999)
    assert (s["step"], s["status"], s["eta_s"], s["mfu"]) == (100, "finished", 0.0, None)


def test_total_steps_from_config(tmp_path):
    v = tmp_path / "videoar"
    v.mkdir()
    (v / "metrics.jsonl").write_text(json.dumps({"time": T, "step": 5, "stage": "main"}) + "\n")
    (v / "config.yaml").write_text("videoar_train:\n  steps: 200\ncurriculum:\n- name: a\n  until_step: 150\n"
                                   "- name: b\n  until_step: 300\n")
    s = summarize(tmp_path, now=T + 1)
    assert (s["total_steps"], s["eta_s"], s["checkpoint"], s["preprocess"]) == (300, None, None, None)


def test_cli_table_json_watch_help(run, capsys):
    out = subprocess.run([sys.executable, "-m", "jobs.status", str(run), "--no-color"], cwd=ROOT, text=True,
                         capture_output=True, env={**os.environ, "COLUMNS": "120"}, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "high-res" in out.stdout and "70 / 100" in out.stdout and "\x1b[" not in out.stdout
    assert "held-out loss" in out.stdout and "0.5000 (bit acc 0.700, step 60)" in out.stdout
    assert "step 40" in out.stdout and "preprocess: 30/40 inputs" in out.stdout \
        and "27s (5s start-up)" in " ".join(out.stdout.split())
    assert ENDPOINT not in out.stdout  # the run stopped long ago: its endpoint is gone
    live = render({**summarize(run), "status": "running"})
    console = Console(file=io.StringIO(), width=120, record=True, no_color=True)
    console.print(live)
    assert f"prometheus: {ENDPOINT}" in console.export_text()
    assert main([str(run), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["step"] == 70
    with open(run / "videoar" / "metrics.jsonl", "a") as f:
        f.write("\n" + json.dumps(rec(100, 250, "high-res", 1)) + "\n")
    assert main([str(run), "--watch", "0.01"]) == 0  # a finished run: one view, no waiting
    assert "finished" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0 and "--watch" in capsys.readouterr().out


def test_cli_missing_run(tmp_path):
    missing = tmp_path / "nope"
    out = subprocess.run([sys.executable, "-m", "jobs.status", str(missing)], cwd=ROOT, text=True,
                         capture_output=True, timeout=120)
    assert out.returncode == 2 and str(missing) in out.stderr and "metrics.jsonl" in out.stderr


def test_no_records_yet(tmp_path):
    """A just-started run: metrics.jsonl exists with only a torn line; its mtime says it is alive."""
    from rich.console import Console

    (tmp_path / "videoar").mkdir()
    path = tmp_path / "videoar" / "metrics.jsonl"
    path.write_text('{"time": 1700000000.0, "st')
    s = summarize(tmp_path / "videoar", now=path.stat().st_mtime + 1)
    assert (s["step"], s["stage"], s["status"], s["records"], s["trends"]["loss"]) == (None, None, "running", 0, "")
    console = Console(record=True, width=100, file=io.StringIO())
    console.print(render(s))
    assert "running" in console.export_text()
