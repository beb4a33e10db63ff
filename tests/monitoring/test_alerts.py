"""The chart's alert rules, checked and unit-tested by promtool (Debian's `prometheus` package)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.helm import CHART, MONITORING_ON, rendered

HERE = Path(__file__).parent


def test_promtool_accepts_the_rules(promtool, rule_file):
    result = subprocess.run([promtool, "check", "rules", str(rule_file)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 6 rules found" in result.stdout


def test_each_alert_fires_when_it_should_and_not_otherwise(promtool, rule_file, tmp_path):
    tests = yaml.safe_load((HERE / "alerts_test.yaml").read_text())
    tests["rule_files"] = [str(rule_file)]
    covered = {case["alertname"] for t in tests["tests"] for case in t["alert_rule_test"]}
    alerts = {r["alert"] for g in yaml.safe_load(rule_file.read_text())["groups"] for r in g["rules"]}
    assert covered == alerts, "every alert has its promtool test"
    path = tmp_path / "alerts_test.yaml"
    path.write_text(yaml.safe_dump(tests, sort_keys=False))
    result = subprocess.run([promtool, "test", "rules", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_thresholds_come_from_the_values():
    values = {"enabled": True, "stalledAfter": "1h", "pendingFor": "45m", "queuedFor": "1d"}
    rules = rendered("PrometheusRule", {**MONITORING_ON, "prometheusRule": values})
    by_name = {r["alert"]: r for g in rules["spec"]["groups"] for r in g["rules"]}
    assert "> 3600" in by_name["KubetuneRunStalled"]["expr"]
    assert "> 2700" in by_name["KubetuneRunPendingTooLong"]["expr"]
    assert "> 86400" in by_name["KubetuneRunQueuedTooLong"]["expr"]
    # Durations come from the status's timestamps; a `for:` would start over at each scrape gap.
    assert not {"for"} & (by_name["KubetuneRunPendingTooLong"].keys() | by_name["KubetuneRunQueuedTooLong"].keys())


@pytest.mark.parametrize(
    ("values", "alert", "seconds"),
    [
        ({"stalledAfter": "08m"}, "KubetuneRunStalled", 480),  # sprig's `int` reads "08" as octal: 0
        ({"pendingFor": "015m"}, "KubetuneRunPendingTooLong", 900),  # ... and "015" as 13
        ({"queuedFor": "010h"}, "KubetuneRunQueuedTooLong", 36000),
        ({"stalledAfter": "90s"}, "KubetuneRunStalled", 90),
    ],
)
def test_durations_are_read_as_decimal(values, alert, seconds, tmp_path):
    """The schema refuses a leading 0 (tests/chart); the template reads one as decimal all the same, as it
    must where the schema is skipped (helm --skip-schema-validation): the chart without its schema."""
    chart = tmp_path / "kubetune"
    shutil.copytree(CHART, chart)
    (chart / "values.schema.json").unlink()
    rules = rendered("PrometheusRule", {**MONITORING_ON, "prometheusRule": {"enabled": True, **values}}, chart=chart)
    (expr,) = [r["expr"] for g in rules["spec"]["groups"] for r in g["rules"] if r["alert"] == alert]
    assert re.search(r"> (\d+)\s*$", expr).group(1) == str(seconds), expr
