"""Terminal summary of a running or finished VideoAR training run (read-only; safe while the trainer writes).

    python -m jobs.status runs/demo                 # table + sparkline trends
    python -m jobs.status runs/demo --watch 5       # refresh every 5 s until the run finishes
    python -m jobs.status runs/demo --json          # the summary dict, for scripts

Reads `<RUN_DIR>/videoar/metrics.jsonl` (a torn last line is ignored; when a resumed run re-logs a step, the
last record for that step wins), the committed checkpoints under `videoar/checkpoints/`, `videoar/config.yaml`
(total steps for records without "total_steps"), `videoar/metrics_endpoint` and, if present,
`<RUN_DIR>/preprocess/metrics.jsonl`. Missing keys (older runs) are shown as "-" (null in --json).
Shown: status, stage, step / total, loss, tokens/s, MFU, data-wait %, lr, last committed checkpoint (step, age),
ETA, the Prometheus URL, a preprocessing line; trends: loss, tokens/s, MFU, data wait over the whole run.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

from rich import box
from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from parallel.checkpoint_format import committed_steps, step_dir
from common.metrics import ENDPOINT_FILE, read_jsonl

SPARKS = "▁▂▃▄▅▆▇█"
TRENDS = ("loss", "tokens_per_s", "mfu", "data_wait_frac")
LATEST = ("loss", "bit_acc", "lr", "grad_norm", "tokens_per_s", "tokens_per_s_per_device", "mfu", "data_wait_frac",
          "step_time_s", "consumed_samples", "consumed_tokens", "skipped_steps", "mem/peak_rss_gb")
PREPROCESS = ("step", "inputs_done", "inputs_total", "clips", "clips_per_s", "bytes", "bytes_per_s", "quarantined",
              "shards", "elapsed_s", "startup_s")
RECENT = 20  # ETA / liveness from the last RECENT intervals between records
RUNNING_AGE_S = 600.0


def sparkline(values: list[float | None], width: int = 40) -> str:
    """One character per value: the min..max range in 8 equal bins, "▁" (lowest) .. "█" (highest). Missing or
    non-finite values are dropped; a series longer than `width` is resampled to `width` bucket means (a shorter
    one is not stretched); a flat series is all "▄"."""
    vals = [float(v) for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    n = len(vals)
    if n > width:
        vals = [sum(c) / len(c) for c in (vals[i * n // width:(i + 1) * n // width] for i in range(width))]
    lo, hi = min(vals, default=0.0), max(vals, default=0.0)
    if hi == lo:
        return SPARKS[3] * len(vals)
    return "".join(SPARKS[min(len(SPARKS) - 1, int((v - lo) / (hi - lo) * len(SPARKS)))] for v in vals)


def _num(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) else None


def _resolve(run_dir: str | Path) -> tuple[Path, Path]:
    """(run root, videoar dir) for RUN_DIR or RUN_DIR/videoar."""
    p = Path(run_dir)
    if not (p / "videoar" / "metrics.jsonl").is_file() and ((p / "metrics.jsonl").is_file() or p.name == "videoar"):
        return p.parent, p
    return p, p / "videoar"


def _config_total_steps(path: Path) -> int | None:
    try:
        import yaml
        cfg = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        stages = cfg.get("curriculum") or []
        return int(stages[-1]["until_step"]) if stages else int(cfg["videoar_train"]["steps"])
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError, ImportError):
        return None


def _sec_per_step(recs: list[dict[str, Any]]) -> tuple[float | None, float | None]:
    """(seconds per step, seconds between records) over the last RECENT intervals, from wall-clock "time" deltas
    divided by step deltas (works with any log_every); intervals over 5x the median rate (a restart gap) are
    dropped."""
    pts = [(r["step"], t) for r in recs[-(RECENT + 1):] if (t := _num(r.get("time"))) is not None]
    iv = [(t1 - t0, s1 - s0) for (s0, t0), (s1, t1) in zip(pts, pts[1:]) if s1 > s0 and t1 > t0]
    if not iv:
        return None, None
    median = sorted(dt / ds for dt, ds in iv)[len(iv) // 2]
    iv = [(dt, ds) for dt, ds in iv if dt / ds <= 5 * median]
    return sum(dt for dt, _ in iv) / sum(ds for _, ds in iv), sum(dt for dt, _ in iv) / len(iv)


def summarize(run_dir: str | Path, now: float | None = None, width: int = 40) -> dict[str, Any]:
    """Everything the table shows, as plain JSON-able values (fractions stay fractions: mfu, data_wait_frac)."""
    now = time.time() if now is None else now
    root, vdir = _resolve(run_dir)
    path = vdir / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no metrics.jsonl: {path} does not exist (is {run_dir} a VideoAR run directory?)")
    raw = [r for r in read_jsonl(path) if isinstance(r, dict) and isinstance(r.get("step"), int)]
    by_step = {r["step"]: r for r in raw}  # a redo after a resume: the last record for a step wins
    recs = [by_step[s] for s in sorted(by_step)]
    last = recs[-1] if recs else {}
    step = last.get("step")
    total = int(_num(last.get("total_steps")) or 0) or _config_total_steps(vdir / "config.yaml")
    sec_per_step, record_interval = _sec_per_step(recs)
    last_time = _num(last.get("time")) if recs else path.stat().st_mtime  # no record yet: when the file was made
    age = None if last_time is None else max(0.0, now - last_time)
    if step is not None and total and step >= total:
        status = "finished"
    elif age is not None and age < max(RUNNING_AGE_S, 5 * (record_interval or 0.0)):
        status = "running"
    else:
        status = "stopped"
    eta = None if step is None or not total else 0.0 if step >= total else \
        None if sec_per_step is None else (total - step) * sec_per_step
    ckpt = None
    if steps := committed_steps(vdir / "checkpoints"):
        meta = step_dir(vdir / "checkpoints", steps[-1]) / "metadata.json"
        ckpt = {"step": steps[-1], "path": str(meta.parent), "age_s": max(0.0, now - meta.stat().st_mtime)}
    endpoint = vdir / ENDPOINT_FILE
    evals = [r for r in recs if _num(r.get("eval/loss")) is not None]
    pre_path = root / "preprocess" / "metrics.jsonl"
    pre = [r for r in read_jsonl(pre_path) if isinstance(r, dict)] if pre_path.is_file() else []
    return {
        "run_dir": str(root), "metrics": str(path), "status": status, "stage": last.get("stage"),
        "stage_index": last.get("stage_index"), "step": step, "total_steps": total,
        "progress": step / total if step is not None and total else None,
        "records": len(recs), "replaced_records": len(raw) - len(recs), "last_time": last_time, "age_s": age,
        **{k: _num(last.get(k)) for k in LATEST},
        "sec_per_step": sec_per_step, "eta_s": eta, "checkpoint": ckpt,
        "metrics_endpoint": endpoint.read_text(encoding="utf-8").strip() if endpoint.is_file() else None,
        "trends": {k: sparkline([r.get(k) for r in recs], width) for k in TRENDS},
        "eval": {"step": evals[-1].get("step"), "loss": _num(evals[-1]["eval/loss"]),
                 "bit_acc": _num(evals[-1].get("eval/bit_acc")),
                 "trend": sparkline([r["eval/loss"] for r in evals], width)} if evals else None,
        "preprocess": {k: pre[-1].get(k) for k in PREPROCESS} if pre else None,
    }


def _dur(s: float | None) -> str:
    if s is None:
        return "-"
    s = int(round(s))
    d, h, m = s // 86400, s // 3600 % 24, s // 60 % 60
    return f"{d}d {h:02d}h" if d else f"{h}h {m:02d}m" if h else f"{m}m {s % 60:02d}s" if m else f"{s}s"


def _si(x: float | None, unit: str = "") -> str:
    if x is None:
        return "-"
    for div, p in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.2f}{p}{unit}"
    return f"{x:.3g}{unit}" if isinstance(x, float) and not x.is_integer() else f"{int(x)}{unit}"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _f(x: float | None, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def render(summary: dict[str, Any]):
    """A rich renderable: the run table (metric, latest value, trend) and, if present, a preprocessing line."""
    s, tr = summary, summary["trends"]
    colour = {"running": "green", "finished": "bold blue", "stopped": "yellow"}[s["status"]]
    table = Table(title=f"VideoAR run {s['run_dir']}", box=box.SIMPLE_HEAD, title_justify="left")
    table.add_column("metric", style="bold")
    table.add_column("value")
    table.add_column("trend", style="cyan", no_wrap=True)
    table.add_row("status", Text(s["status"], style=colour), "")
    table.add_row("last record", "-" if s["age_s"] is None else f"{_dur(s['age_s'])} ago", "")
    index = "" if s["stage_index"] is None else f" (#{s['stage_index']})"
    table.add_row("stage", ("-" if s["stage"] is None else str(s["stage"])) + index, "")
    step = f"{_f(s['step'], 'd')} / {_f(s['total_steps'], 'd')}"
    table.add_row("step", step + ("" if s["progress"] is None else f" ({_pct(s['progress'])})"), "")
    table.add_row("loss", f"{_f(s['loss'], '.4f')} (bit acc {_f(s['bit_acc'], '.3f')})", tr["loss"])
    if (ev := s["eval"]) is not None:
        table.add_row("held-out loss", f"{_f(ev['loss'], '.4f')} (bit acc {_f(ev['bit_acc'], '.3f')}, step "
                                       f"{_f(ev['step'], 'd')})", ev["trend"])
    per_dev = "" if s["tokens_per_s_per_device"] is None else f" ({_si(s['tokens_per_s_per_device'])}/dev)"
    table.add_row("tokens/s", _si(s["tokens_per_s"]) + per_dev, tr["tokens_per_s"])
    table.add_row("MFU", _pct(s["mfu"]), tr["mfu"])
    table.add_row("data wait", _pct(s["data_wait_frac"]), tr["data_wait_frac"])
    table.add_row("lr / grad norm", f"{_f(s['lr'], '.3g')} / {_f(s['grad_norm'], '.3g')}", "")
    if s["consumed_tokens"] is not None or s["mem/peak_rss_gb"] is not None:
        table.add_row("tokens seen / RSS", f"{_si(s['consumed_tokens'])} / {_f(s['mem/peak_rss_gb'], '.1f')} GB", "")
    if s["skipped_steps"]:
        table.add_row("skipped steps", Text(f"{s['skipped_steps']:.0f}", style="red"), "")
    ck = s["checkpoint"]
    table.add_row("last checkpoint", "-" if ck is None else f"step {ck['step']} ({_dur(ck['age_s'])} ago)", "")
    rate = "" if s["sec_per_step"] is None else f" ({s['sec_per_step']:.3g} s/step)"
    table.add_row("ETA", ("done" if s["status"] == "finished" else _dur(s["eta_s"])) + rate, "")
    parts: list[Any] = [table]
    if s["metrics_endpoint"] and s["status"] == "running":  # the endpoint lives as long as the trainer
        parts.append(Text(f"prometheus: {s['metrics_endpoint']}"))
    if (p := s["preprocess"]) is not None:
        done, tot = _num(p.get("inputs_done")), _num(p.get("inputs_total"))
        frac = f" ({_pct(done / tot)})" if done is not None and tot else ""
        g = {k: _num(v) for k, v in p.items()}
        parts.append(Text(f"preprocess: {_si(g['inputs_done'])}/{_si(g['inputs_total'])} inputs{frac}, "
                          f"{_si(g['clips'])} clips ({_si(g['clips_per_s'])}/s), {_si(g['bytes'], 'B')} "
                          f"({_si(g['bytes_per_s'], 'B')}/s), {_si(g['shards'])} shards, "
                          f"{_si(g['quarantined'])} quarantined, elapsed {_dur(g['elapsed_s'])}"
                          + (f" ({_dur(g['startup_s'])} start-up)" if g.get("startup_s") else "")))
    return Group(*parts)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m jobs.status", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=f"""\
status: finished (step >= total_steps), running (last record younger than {RUNNING_AGE_S:.0f} s or than 5x the
  recent interval between records), else stopped.
ETA: remaining steps x seconds/step over the last {RECENT} intervals between records (wall-clock "time" deltas /
  step deltas; an interval over 5x the median, i.e. a restart gap, is left out).
--json: the same numbers as the table; mfu, data_wait_frac and progress are fractions (0..1), ages and ETA in s.
exit status: 0; 2 when RUN_DIR has no videoar/metrics.jsonl (argparse also exits 2 on bad arguments).""")
    ap.add_argument("run_dir", metavar="RUN_DIR", help="the run directory (run.dir) or its videoar/ subdirectory")
    ap.add_argument("--watch", type=float, metavar="SECONDS", help="refresh every SECONDS until the run finishes "
                    "(Ctrl-C leaves, exit 0)")
    ap.add_argument("--json", action="store_true", help="print the summary dict as JSON instead of the table")
    ap.add_argument("--no-color", action="store_true", help="no colours (also automatic when stdout is not a "
                    "terminal, or with NO_COLOR set)")
    ap.add_argument("--width", type=int, default=40, help="sparkline width in characters (default 40)")
    a = ap.parse_args(argv)
    if a.watch is not None and (a.json or a.watch <= 0):
        ap.error("--watch takes SECONDS > 0 and does not combine with --json")
    try:
        summary = summarize(a.run_dir, width=a.width)
    except FileNotFoundError as e:
        print(f"jobs.status: {e}", file=sys.stderr)
        return 2
    if a.json:
        print(json.dumps(summary, indent=1))
        return 0
    console = Console(no_color=a.no_color or None)
    if a.watch is None:
        console.print(render(summary))
        return 0
    from rich.live import Live
    try:
        with Live(render(summary), console=console, auto_refresh=False) as live:
            while summary["status"] != "finished":
                time.sleep(a.watch)
                try:
                    summary = summarize(a.run_dir, width=a.width)
                except (FileNotFoundError, OSError):
                    continue  # the run directory is being rewritten: keep the last view
                live.update(render(summary), refresh=True)
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
