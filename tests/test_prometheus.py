"""A real Prometheus server (Debian's package, installed and started by jobs/prometheus_local.sh) runs the shipped
configs/prometheus/prometheus.yml: it finds a short training run through the run's file_sd target, scrapes it,
and its query API returns the tokens/s and loss of metrics.jsonl for every step it scraped, the last one
included. The shipped alert rules load, evaluate on the scraped series and pass their promtool unit tests."""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from common.metrics import TARGETS_FILE, MetricSinks, read_jsonl
from tests.conftest import make_cfg, wait_for
from trainer.train_videoar import VideoARTrainer

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "configs" / "prometheus"
STEPS = 12


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory):
    """The shipped config copied to STATE/configs/prometheus/ with 1 s intervals, so that its relative file_sd
    paths (../../runs/demo/...) point at the run STATE/runs/demo. Yields (server URL, STATE)."""
    state = tmp_path_factory.mktemp("prometheus")
    conf_dir = state / "configs" / "prometheus"
    conf_dir.mkdir(parents=True)
    shutil.copy(SHIPPED / "alerts.yml", conf_dir)
    conf = yaml.safe_load((SHIPPED / "prometheus.yml").read_text())
    conf["global"].update(scrape_interval="1s", evaluation_interval="1s")
    for job in conf["scrape_configs"]:
        job["file_sd_configs"][0]["refresh_interval"] = "1s"
    (conf_dir / "prometheus.yml").write_text(yaml.safe_dump(conf))
    (state / "runs" / "demo" / "videoar").mkdir(parents=True)  # exists at start-up, so Prometheus watches it
    script, server = str(ROOT / "jobs" / "prometheus_local.sh"), state / "server"
    res = subprocess.run(["bash", script, "start", str(server), str(conf_dir / "prometheus.yml")],
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr + res.stdout
    yield (server / "url").read_text().strip(), state
    subprocess.run(["bash", script, "stop", str(server)], timeout=120)


def api(url: str, path: str, **params) -> dict | list:
    query = urllib.parse.urlencode(params)
    body = json.load(urllib.request.urlopen(f"{url}/api/v1/{path}?{query}", timeout=10))
    assert body["status"] == "success", body
    return body["data"]


def samples(url: str, name: str) -> dict[float, float]:
    """Every sample Prometheus stored for the one series `name`, by scrape time (one scrape = one timestamp)."""
    (series,) = api(url, "query", query=f"{name}[10m]")["result"]
    return {t: float(v) for t, v in series["values"]}



def latest_step(url: str) -> float | None:
    result = api(url, "query", query="videoar_step")["result"]
    return float(result[0]["value"][1]) if result else None


@pytest.mark.slow
def test_prometheus_scrapes_the_run_and_matches_metrics_jsonl(prometheus, clips_dir, tokenizer_ckpt):
    url, state = prometheus
    out = state / "runs" / "demo" / "videoar"
    cfg = make_cfg(clips_dir, tokenizer_ckpt, out.parent, f"videoar_train.steps={STEPS}")
    sinks = MetricSinks(out, "videoar", prometheus_port=0)  # the trainer's own sinks, held open past the end
    try:
        VideoARTrainer(cfg, progress=False).train(sinks=sinks)
        # the endpoint keeps the last step until Prometheus has scraped it (a real run's ends when it exits)
        wait_for(lambda: latest_step(url) == STEPS, f"Prometheus to scrape step {STEPS}", timeout=60)
        (target,) = api(url, "targets", state="active")["activeTargets"]
        rules = api(url, "rules", type="alert")["groups"]
    finally:
        sinks.close()
    assert not (out / TARGETS_FILE).exists()  # a clean exit withdraws the target
    assert target["labels"]["job"] == "videoar" and target["health"] == "up"
    assert target["labels"]["metrics_dir"] == str(out.resolve()) and target["scrapeUrl"] == sinks.url

    records = {r["step"]: r for r in read_jsonl(out / "metrics.jsonl")}
    assert sorted(records) == list(range(1, STEPS + 1))
    steps, loss, tokens_per_s = (samples(url, f"videoar_{k}") for k in ("step", "loss", "tokens_per_s"))
    assert set(steps) == set(loss) == set(tokens_per_s)  # every scrape carried all three
    assert STEPS in steps.values()
    for t, step in steps.items():  # each scrape is one logged record, values exact
        assert loss[t] == records[int(step)]["loss"] and tokens_per_s[t] == records[int(step)]["tokens_per_s"]

    # the shipped alert rules were evaluated on the run's series without errors; a healthy run fires none
    got = {r["name"]: r for g in rules for r in g["rules"]}
    assert set(got) == {"VideoARStepStalled", "VideoARDataWaitHigh", "VideoARStepsSkipped", "VideoAREndpointDown"}
    assert all(r["health"] == "ok" for r in got.values()), got
    assert not [a for r in got.values() for a in r["alerts"] if a["state"] == "firing"]


@pytest.mark.slow
def test_shipped_config_and_alert_rules_pass_promtool(prometheus):
    """promtool ships with the package the fixture installed: the example config and rules load, and the rules'
    unit tests (configs/prometheus/alerts_test.yml: stalled step, data wait, skipped steps, endpoint down) pass."""
    for args in (["check", "config", "prometheus.yml"], ["check", "rules", "alerts.yml"],
                 ["test", "rules", "alerts_test.yml"]):
        res = subprocess.run(["promtool", *args], cwd=SHIPPED, capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, f"promtool {' '.join(args)}:\n{res.stdout}{res.stderr}"
