"""
What ships for running a fleet (deploy/): the Kubernetes manifests checked
against the Kubernetes schemas, the ConfigMap's lbws.ini checked by lbws
itself, the Prometheus rules checked and unit-tested by promtool, the
Grafana dashboard's queries parsed by promtool, and a real Prometheus
scraping two lbws instances.
"""

import json
import re
import subprocess
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import pytest_twisted
import yaml
from twisted.internet import threads

from lbws.config import closeWindow
from tests.support import ROOT, TWISTD, deferLater, stopProcess

DEPLOY = ROOT / "deploy"
MANIFESTS = sorted((DEPLOY / "kubernetes").glob("*.yaml"))
RULES = DEPLOY / "prometheus" / "lbws-rules.yml"
RULE_TESTS = DEPLOY / "prometheus" / "lbws-rules.test.yml"
GRAFANA = DEPLOY / "grafana" / "lbws-fleet.json"


def documents(path):
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def test_every_kind_the_fleet_needs_is_shipped():
    kinds = {doc["kind"] for path in MANIFESTS for doc in documents(path)}
    assert kinds == {"ConfigMap", "Deployment", "Service", "PodDisruptionBudget"}


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda path: path.name)
def test_manifest_is_valid_kubernetes(path):
    import kubernetes_validate

    for doc in documents(path):
        # strict: unknown fields are errors too (a typo would be ignored by
        # a cluster).
        kubernetes_validate.validate(doc, "1.30", strict=True)


def test_deployment_stops_gracefully_and_without_privileges():
    (deployment,) = documents(DEPLOY / "kubernetes" / "deployment.yaml")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    ini = _configMapIni()
    drain = float(re.search(r"^drain_timeout = (\S+)", ini, re.M).group(1))
    delay = float(re.search(r"^stop_delay = (\S+)", ini, re.M).group(1))
    spread = float(re.search(r"^close_spread = (\S+)", ini, re.M).group(1))
    preStop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert preStop[0] == "sleep"
    # The closes are spread as configured (not shortened to half of
    # drain_timeout), and the pod is killed only after preStop,
    # stop_delay, the spread and the last answers (the README's
    # arithmetic: the spread is part of drain_timeout).
    assert closeWindow(spread, drain) == spread > 0
    answers = drain - spread
    assert pod["terminationGracePeriodSeconds"] > float(preStop[1]) + delay + spread + answers
    assert container["readinessProbe"]["httpGet"]["path"] == "/healthz"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["resources"]["requests"]


def _configMapIni():
    (configMap,) = documents(DEPLOY / "kubernetes" / "configmap.yaml")
    return configMap["data"]["lbws.ini"]


def test_configmap_lbws_ini_passes_check(tmp_path):
    path = tmp_path / "lbws.ini"
    path.write_text(_configMapIni())
    result = subprocess.run(
        [str(TWISTD), "-n", "lbws", "--config", str(path), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "haproxy:tcp:8020" in result.stdout


def test_prometheus_rules_pass_promtool():
    check = subprocess.run(
        ["promtool", "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60
    )
    assert check.returncode == 0, check.stdout + check.stderr
    unit = subprocess.run(
        ["promtool", "test", "rules", RULE_TESTS.name],
        cwd=RULE_TESTS.parent,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert unit.returncode == 0, unit.stdout + unit.stderr
    assert "SUCCESS" in unit.stdout


def test_grafana_queries_parse(tmp_path):
    """
    Every query of the Grafana dashboard is valid PromQL: promtool parses
    each as a recording rule (with the dashboard's $job variable filled).
    """
    dashboard = json.loads(GRAFANA.read_text())
    exprs = [
        target["expr"].replace("$job", ".*")
        for panel in dashboard["panels"]
        for target in panel["targets"]
    ]
    assert len(exprs) >= 10
    rules = {
        "groups": [
            {
                "name": "grafana",
                "rules": [{"record": f"grafana:q{i}", "expr": e} for i, e in enumerate(exprs)],
            }
        ]
    }
    path = tmp_path / "grafana-rules.yml"
    path.write_text(yaml.safe_dump(rules))
    check = subprocess.run(
        ["promtool", "check", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    assert check.returncode == 0, check.stdout + check.stderr
    # Every metric the dashboard reads is one lbws (or the process
    # collector, or Prometheus itself) exports.
    names = set(re.findall(r"\b(lbws_[a-z_]+|process_[a-z_]+)\{", " ".join(exprs)))
    exported = _exportedNames()
    assert names <= exported, names - exported


def _exportedNames():
    from prometheus_client.parser import text_string_to_metric_families

    from lbws.config import parseConfig
    from lbws.telemetry.metrics import metricsRegistry
    from lbws.service import makeLbws
    from prometheus_client import generate_latest
    from twisted.internet import reactor

    settings = parseConfig("[backend:a]\nurl = ws://127.0.0.1:9\n", "test.ini")
    service = makeLbws(reactor, settings)
    text = generate_latest(metricsRegistry(service.view)).decode()
    names = set()
    for family in text_string_to_metric_families(text):
        names.update(sample.name for sample in family.samples)
        # A counter with no sample yet (no handshake so far) is named here
        # without its _total.
        names.add(family.name + ("_total" if family.type == "counter" else ""))
    return names


class Prometheus:
    """
    A real Prometheus server on a loopback port the OS chose, scraping
    C{targets} every second; its data lives in a temporary directory.
    """

    def __init__(self, targets):
        self.dir = tempfile.TemporaryDirectory()
        config = Path(self.dir.name) / "prometheus.yml"
        config.write_text(
            yaml.safe_dump(
                {
                    "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                    "rule_files": [str(RULES)],
                    "scrape_configs": [
                        {"job_name": "lbws", "static_configs": [{"targets": targets}]}
                    ],
                }
            )
        )
        self.process = subprocess.Popen(
            [
                "prometheus",
                f"--config.file={config}",
                f"--storage.tsdb.path={self.dir.name}/data",
                "--web.listen-address=127.0.0.1:0",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.url = None
        for line in self.process.stderr:
            match = re.search(r'msg="Listening on" address=(\S+)', line)
            if match:
                self.url = f"http://{match.group(1)}"
                break
        if self.url is None:
            self.stop()
            raise RuntimeError("prometheus did not start")

    def ready(self):
        """
        Whether Prometheus serves queries (it answers 503 while its storage
        starts).
        """
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=5):
                return True
        except urllib.error.HTTPError:
            return False

    def query(self, expr):
        url = f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        with urllib.request.urlopen(url, timeout=5) as response:
            return json.load(response)["data"]["result"]

    def stop(self):
        stopProcess(self.process, timeout=20)
        self.process.stderr.close()
        self.dir.cleanup()


def _value(result):
    return [float(sample["value"][1]) for sample in result]


@pytest_twisted.ensureDeferred
async def test_prometheus_sums_connections_across_instances(harness):
    backend = await harness.backend("a")
    dashboard = "tcp:0:interface=127.0.0.1"
    one = await harness.lbws([("a", backend.url)], dashboard=dashboard)
    two = await harness.lbws([("a", backend.url)], dashboard=dashboard)
    for _ in range(3):
        await harness.client(one.url)
    for _ in range(2):
        await harness.client(two.url)
    targets = [url.split("//", 1)[1] for url in (one.dashboardUrl, two.dashboardUrl)]
    prometheus = await threads.deferToThread(Prometheus, targets)
    harness.atEnd(lambda: threads.deferToThread(prometheus.stop))
    fleet = []

    def scraped():
        if not prometheus.ready():
            return False
        # Both instances scraped, and the fleet-wide sum is what they hold
        # between them (the recording rule and the raw query agree).
        fleet[:] = [
            _value(prometheus.query("count(up{job='lbws'} == 1)")),
            _value(prometheus.query("sum(lbws_connections_active)")),
            _value(prometheus.query("lbws:connections_active:sum")),
            _value(prometheus.query("lbws:backend_connections_active:sum")),
        ]
        return fleet == [[2.0], [5.0], [5.0], [5.0]]

    # Prometheus needs a scrape of each (every second) and a rule
    # evaluation after them; polled once a second for at most a minute.
    for _ in range(60):
        if await threads.deferToThread(scraped):
            break
        await deferLater(1)
    else:
        raise AssertionError(f"prometheus never saw both instances: {fleet}")
