"""Operator at scale: many TrainingRuns created at once against the API emulator.

The job runner completes every pod at once (no training), so what is measured is the
operator: time from a run's creation to its prepare Job and to its training Job, the
operator process's peak memory, and API requests per run. The operator runs as its own
process (`kopf run`), exactly as in its container.

Baseline: the same operator, same process, with one run at a time (--lone runs created one
after another, each once the previous one has Succeeded): the latency a run sees on an idle
operator. The burst's latencies are printed as a ratio to it.

    python bench/operator_scale.py [--runs 500] [--lone 5]
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.operator.emulator import ApiServer  # noqa: E402
from tests.operator.jobrunner import JobRunner  # noqa: E402

NAMESPACE = "bench"
SPEC = {"model": {"nameOrPath": "models/tiny"}, "dataset": {"path": "data/qa.jsonl"}, "resources": {"gpu": 0}}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=500)
    parser.add_argument("--lone", type=int, default=5, help="baseline: runs created one at a time, first")
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--verbose", action="store_true", help="requests per run by kind")
    args = parser.parse_args()

    server = ApiServer().start()
    created: dict[str, dict[str, float]] = {}

    def record(kind: str, res, obj) -> None:
        if kind != "ADDED":
            return
        name = obj["metadata"]["name"]
        if res.plural == "trainingruns":
            created.setdefault(name, {})["run"] = time.monotonic()
        elif res.plural == "jobs":
            run, _, component = name.rpartition("-")
            created.setdefault(run, {})[component] = time.monotonic()

    server.call(lambda: server.subscribers.append(record))
    server.call(lambda: server.create(server.resource("", "namespaces"), None, {"metadata": {"name": NAMESPACE}}))
    with tempfile.TemporaryDirectory() as tmp:
        runner = JobRunner(server, Path(tmp), instant=True).start()
        kubeconfig = server.kubeconfig(Path(tmp) / "kubeconfig")
        env = {
            **os.environ,
            "KUBECONFIG": str(kubeconfig),
            "KUBETUNE_RESYNC_SECONDS": "30",
            "KUBETUNE_METRICS_PORT": "0",
        }
        operator = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "kopf",
                "run",
                "--standalone",
                "--quiet",
                "--namespace",
                NAMESPACE,
                "-m",
                "kubetune_operator.handlers",
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        # Ready once kopf's watches on TrainingRuns and on Jobs are open in the emulator: from then on it sees
        # every run created and every Job the runner completes (the emulator lists and registers a watch at once).
        wanted = {"trainingruns", "jobs"}

        def watched() -> set[str]:
            return server.call(lambda: {w.resource.plural for w in server.watchers if w.namespace in (None, NAMESPACE)})

        deadline = time.monotonic() + 60
        while not wanted <= watched():
            if operator.poll() is not None:
                sys.exit(f"the operator exited with {operator.returncode} before watching")
            if time.monotonic() > deadline:
                sys.exit(f"the operator never watched {sorted(wanted - watched())} within 60s")
            time.sleep(0.1)
        runs = server.resource("kubetune.io", "trainingruns")

        def create(name: str) -> None:
            body = {
                "apiVersion": "kubetune.io/v1alpha1",
                "kind": "TrainingRun",
                "metadata": {"name": name, "namespace": NAMESPACE},
                "spec": SPEC,
            }
            server.call(lambda: server.create(runs, NAMESPACE, body))

        def succeeded(prefix: str) -> int:
            return sum(
                1
                for r in server.call(lambda: server.list(runs, NAMESPACE))
                if r["metadata"]["name"].startswith(prefix) and (r.get("status") or {}).get("phase") == "Succeeded"
            )

        for i in range(args.lone):  # the baseline: each run alone on an idle operator
            create(f"lone-{i:02d}")
            deadline = time.monotonic() + 120
            while succeeded(f"lone-{i:02d}") < 1:
                if time.monotonic() > deadline:
                    sys.exit(f"lone-{i:02d} did not succeed within 120s")
                time.sleep(0.1)

        before = sum(server.requests.values())
        started = time.monotonic()
        for i in range(args.runs):
            create(f"run-{i:04d}")

        while succeeded("run-") < args.runs:
            if time.monotonic() - started > args.timeout:
                sys.exit(f"only {succeeded('run-')} of {args.runs} runs succeeded within {args.timeout}s")
            time.sleep(0.5)
        all_done = time.monotonic() - started
        # kopf posts Events from a queue of its own: count them once it has drained (no new one for 2 s).
        settled, count = time.monotonic(), -1
        while time.monotonic() - settled < 2 and time.monotonic() - started < args.timeout:
            now = sum(n for kind, n in server.requests.items() if kind.endswith("/events"))
            if now != count:
                settled, count = time.monotonic(), now
            time.sleep(0.2)
        requests = sum(server.requests.values()) - before
        by_kind = dict(server.requests)
        rss = peak_rss_mb(operator.pid)
        operator.terminate()
        operator.wait(30)
        runner.stop()
    server.stop()

    def latencies(prefix: str, job: str) -> list[float]:
        return [t[job] - t["run"] for n, t in created.items() if n.startswith(prefix) and job in t and "run" in t]

    print(f"{args.runs} TrainingRuns created at once; pods complete instantly (no training)")
    print(f"baseline: {args.lone} runs one at a time on the same operator, each after the previous one Succeeded")
    for job, label in (("prepare", "create -> prepare Job"), ("train", "create -> train Job  ")):
        burst, lone = latencies("run-", job), latencies("lone-", job)
        p50, p99, alone = statistics.median(burst), percentile(burst, 0.99), statistics.median(lone)
        print(
            f"{label}: burst p50 {p50:.2f}s, p99 {p99:.2f}s; baseline (alone) {alone:.2f}s; "
            f"ratio p50/alone {p50 / alone:.1f}x"
        )
    print(f"all {args.runs} Succeeded after {all_done:.1f}s")
    print(f"operator peak RSS: {rss:.0f} MB")
    # The job runner works on the store in-process: every request counted here is the operator's.
    print(f"operator API requests per run: {requests / args.runs:.1f}")
    kinds: Counter[str] = Counter()
    for kind, count in by_kind.items():  # one line per kind of request, not per run
        kinds[re.sub(r"/trainingruns/[^/]+", "/trainingruns/*", kind)] += count
    status = kinds["PATCH /apis/kubetune.io/v1alpha1/namespaces/*/trainingruns/*/status"]
    events = kinds["POST /api/v1/namespaces/*/events"]
    print(f"status patches per run: {status / args.runs:.2f}; Events per run: {events / args.runs:.2f}")
    if args.verbose:
        for kind, count in kinds.most_common(12):
            print(f"  {count / args.runs:6.2f}  {kind}")


if __name__ == "__main__":
    main()
