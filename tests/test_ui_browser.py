"""The UIs as a user meets them, in headless Chromium.

`scripts/ui.sh` (what `make ui` runs) starts `dagster dev` and the MLflow UI on a throwaway home
with a dozen real photos; the asset graph shows the recipe; one partition is materialized through
Dagster's GraphQL API (what the UI's Materialize button calls) and succeeds; MLflow's UI lists the
training runs; a Ctrl-C to the script stops every process it started. Screenshots are written to
$PRECOMPUTE_TEST_ARTIFACTS (default var/test-artifacts/ui, git-ignored).

Needs Debian's `chromium` and `chromium-driver` (.ci/run installs them) and the `selenium` package.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import DOGSCATS, copy_tree

PROJECT = Path(__file__).resolve().parents[1]
ARTIFACTS = Path(os.environ.get("PRECOMPUTE_TEST_ARTIFACTS", PROJECT / "var" / "test-artifacts" / "ui"))
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
PARTITION = "tf_efficientnet_lite0|0"
RECIPE = ["image_manifest", "activations", "head_on_cache", "head_augmented", "finetuned", "evaluation_report"]
# A tiny run: 64 px, one epoch per stage, in one process (no per-step interpreter start).
RUN_CONFIG = {
    "execution": {"config": {"in_process": {}}},
    "ops": {
        "activations": {"config": {"size": 64, "chunk_rows": 8}},
        "head_on_cache": {"config": {"epochs": 1, "batch_size": 8}},
        "head_augmented": {"config": {"epochs": 1, "batch_size": 8}},
        "finetuned": {"config": {"epochs": 1, "batch_size": 8}},
    },
}
START_TIMEOUT = 240   # both servers up and the code location loaded; on a loaded 2-core machine
RUN_TIMEOUT = 300

if not (CHROMIUM and CHROMEDRIVER):
    pytest.skip("chromium and chromedriver are not installed: apt-get install -y chromium chromium-driver "
                "(.ci/run does this)", allow_module_level=True)
import psutil  # noqa: E402  (the test extra: pip install -e '.[test]')
from selenium import webdriver  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str, timeout: float = 5) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read()


def answers(url: str) -> bool:
    try:
        get(url)
        return True
    except (urllib.error.URLError, OSError):
        return False


class UI:
    """scripts/ui.sh on a temporary home, its ports and log; GraphQL helper for the Dagster side."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.dagster = f"http://127.0.0.1:{free_port()}"
        self.mlflow = f"http://127.0.0.1:{free_port()}"
        home = tmp / "home"
        (home / "dagster_home").mkdir(parents=True)
        (home / "dagster_home" / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
        self.env = {
            **os.environ,
            "PRECOMPUTE_HOME": str(home),
            "DAGSTER_HOME": str(home / "dagster_home"),
            "PRECOMPUTE_DATA": str(copy_tree(DOGSCATS, tmp / "images", {"train": 4, "valid": 2})),
            "PRECOMPUTE_STORE": str(tmp / "store"),
            "MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlflow.db'}",
            "PRECOMPUTE_ARTIFACTS": str(tmp / "mlartifacts"),
            "PRECOMPUTE_ARCHS": "tf_efficientnet_lite0,resnet34",
            "PRECOMPUTE_CUTS": "0,1",
            "PRECOMPUTE_DEVICE": "cpu",
            "DAGSTER_PORT": self.dagster.rsplit(":", 1)[1],
            "MLFLOW_PORT": self.mlflow.rsplit(":", 1)[1],
            "UI_STOP_TIMEOUT": "60",
        }
        for var in ("PRECOMPUTE_CONFIG", "PRECOMPUTE_DATA_ROOT", "PRECOMPUTE_STORE_OPTIONS"):
            self.env.pop(var, None)
        self.log_path = tmp / "ui.log"
        self.proc: subprocess.Popen | None = None
        self.started: list = []  # psutil.Process of everything the script started, for the finalizer

    def start(self) -> None:
        self.proc = subprocess.Popen(["bash", "scripts/ui.sh"], cwd=PROJECT, env=self.env,
                                     stdout=self.log_path.open("w"), stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True,
                                     preexec_fn=_terminal_signals)
        deadline = time.time() + START_TIMEOUT
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"scripts/ui.sh exited with {self.proc.returncode}:\n{self.log()}")
            if answers(self.mlflow + "/health") and answers(self.dagster + "/server_info") and self.location_loaded():
                self.remember_children()
                print(f"Dagster and MLflow UIs up after {time.time() - deadline + START_TIMEOUT:.0f}s")
                return
            time.sleep(2)
        raise AssertionError(f"the UIs did not come up within {START_TIMEOUT}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:]

    def remember_children(self) -> None:
        self.started = psutil.Process(self.proc.pid).children(recursive=True)

    def graphql(self, query: str, variables: dict | None = None) -> dict:
        body = json.dumps({"query": query, "variables": variables or {}}).encode()
        req = urllib.request.Request(self.dagster + "/graphql", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as r:
            out = json.loads(r.read())
        assert "errors" not in out, out["errors"]
        return out["data"]

    def location_loaded(self) -> bool:
        try:
            data = self.graphql("""{ workspaceOrError { ... on Workspace { locationEntries {
                name loadStatus locationOrLoadError { __typename ... on PythonError { message } } } } } }""")
        except (urllib.error.URLError, OSError, AssertionError):
            return False
        entries = data["workspaceOrError"]["locationEntries"]
        for e in entries:
            if (e["locationOrLoadError"] or {}).get("__typename") == "PythonError":
                raise AssertionError(f"code location {e['name']} failed to load: {e['locationOrLoadError']['message']}")
        return bool(entries) and all(e["loadStatus"] == "LOADED" and e["locationOrLoadError"] for e in entries)

    def stop(self, timeout: float = 120) -> int:
        """Ctrl-C as a terminal sends it: SIGINT to the script's process group. ui.sh gives the
        servers UI_STOP_TIMEOUT (60 s, both at once) before SIGKILL."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.remember_children()
            os.killpg(self.proc.pid, signal.SIGINT)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            alive = []
            for p in self.started:
                try:
                    alive.append(p.cmdline()[:4])
                except psutil.Error:  # gone meanwhile
                    pass
            raise AssertionError(f"ui.sh still running {timeout:.0f}s after Ctrl-C; alive: {alive}\n{self.log()}") from None

    def kill_leftovers(self) -> None:
        for p in self.started:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)


def _terminal_signals() -> None:
    """SIGINT and SIGQUIT as a terminal leaves them. A test run started in the background by a
    non-interactive shell (`make test &`, nohup) inherits them ignored, and bash cannot trap a
    signal that was ignored when it started: ui.sh would never see the Ctrl-C this test sends."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGQUIT, signal.SIG_DFL)


@pytest.fixture(scope="module")
def ui(tmp_path_factory):
    if not (DOGSCATS / "train").is_dir():
        pytest.skip(f"real photos not found at {DOGSCATS}")
    ui = UI(tmp_path_factory.mktemp("ui"))
    try:
        ui.start()
        yield ui
    finally:
        try:
            ui.stop()
        except subprocess.TimeoutExpired:
            pass
        ui.kill_leftovers()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--no-first-run", "--window-size=1600,1000",
                f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def screenshot(driver, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    driver.save_screenshot(str(path))
    print(f"screenshot: {path}")
    return path


def wait_for_text(driver, texts: list[str], timeout: float, name: str, any_of: bool = False) -> str:
    """Wait until every text (or one, with any_of) is in the page's rendered text; on timeout save a
    screenshot and say what is missing."""
    seen = {"body": ""}

    def shown(d) -> bool:
        seen["body"] = d.find_element(By.TAG_NAME, "body").text
        hits = [t in seen["body"] for t in texts]
        return any(hits) if any_of else all(hits)

    try:
        WebDriverWait(driver, timeout, poll_frequency=1).until(shown)
    except Exception:
        screenshot(driver, f"{name}-timeout")
        missing = [t for t in texts if t not in seen["body"]]
        raise AssertionError(f"{driver.current_url}: {missing} not shown after {timeout}s; "
                             f"page text:\n{seen['body'][:3000]}") from None
    return seen["body"]


def dismiss_dialogs(driver) -> None:
    """Dagster greets a new browser profile with a "Join the community" dialog: skip it."""
    for button in driver.find_elements(By.XPATH, "//*[@role='dialog']//button[normalize-space()='Skip']"):
        try:
            button.click()
        except Exception:
            pass


def test_asset_graph_shows_the_recipe(ui, browser):
    browser.get(ui.dagster + "/asset-groups")  # Lineage: the global asset graph
    wait_for_text(browser, RECIPE, 90, "asset-graph")
    # the names are on the graph's nodes (HTML inside the SVG), not only in the list beside it
    node_names = lambda d: {n.text.strip() for n in d.find_elements(By.XPATH, "//*[local-name()='foreignObject']")}
    try:
        WebDriverWait(browser, 60, poll_frequency=1).until(lambda d: set(RECIPE) <= node_names(d))
    except Exception:
        screenshot(browser, "asset-graph-timeout")
        raise AssertionError(f"graph nodes: {node_names(browser)}; expected {RECIPE}") from None
    time.sleep(1)
    dismiss_dialogs(browser)
    assert screenshot(browser, "asset-graph").stat().st_size > 10_000


def test_schedules_and_sensor_are_listed_stopped(ui, browser):
    data = ui.graphql("""{ workspaceOrError { ... on Workspace { locationEntries { locationOrLoadError {
        ... on RepositoryLocation { repositories { schedules { name cronSchedule scheduleState { status } }
                                                   sensors { name sensorState { status } } } } } } } } }""")
    repo = data["workspaceOrError"]["locationEntries"][0]["locationOrLoadError"]["repositories"][0]
    states = {s["name"]: s["scheduleState"]["status"] for s in repo["schedules"]}
    states |= {s["name"]: s["sensorState"]["status"] for s in repo["sensors"]}
    assert states == {"daily_recipe_refresh": "STOPPED", "weekly_cache_housekeeping": "STOPPED",
                      "new_images_sensor": "STOPPED"}
    browser.get(ui.dagster + "/automation")
    wait_for_text(browser, list(states), 60, "automation")
    screenshot(browser, "automation")


LAUNCH = """mutation($params: ExecutionParams!) { launchRun(executionParams: $params) {
    __typename ... on LaunchRunSuccess { run { runId } } ... on Error { message }
    ... on RunConfigValidationInvalid { errors { message } } } }"""


def test_materialize_one_partition(ui, browser):
    arch, cut = PARTITION.split("|")
    params = {
        "selector": {"repositoryLocationName": "pipelines.definitions", "repositoryName": "__repository__",
                     "jobName": "recipe"},
        "runConfigData": RUN_CONFIG,
        "executionMetadata": {"tags": [{"key": "dagster/partition", "value": PARTITION},
                                       {"key": "dagster/partition/arch", "value": arch},
                                       {"key": "dagster/partition/cut", "value": cut}]},
    }
    launched = ui.graphql(LAUNCH, {"params": params})["launchRun"]
    assert launched["__typename"] == "LaunchRunSuccess", launched
    run_id = launched["run"]["runId"]

    deadline, status = time.time() + RUN_TIMEOUT, None
    while time.time() < deadline:
        status = ui.graphql("query($id: ID!) { runOrError(runId: $id) { ... on Run { status } } }",
                            {"id": run_id})["runOrError"]["status"]
        if status in ("SUCCESS", "FAILURE", "CANCELED"):
            break
        time.sleep(3)
    print(f"run {run_id} {status} after {time.time() - deadline + RUN_TIMEOUT:.0f}s")
    browser.get(f"{ui.dagster}/runs/{run_id}")
    # the run page: its id, its partition and, once loaded, its status
    wait_for_text(browser, [run_id[:8], PARTITION, "Success" if status == "SUCCESS" else "Fail"], 90, "run")
    dismiss_dialogs(browser)
    screenshot(browser, "run")
    assert status == "SUCCESS", f"run {run_id} ended {status}; the run page is in {ARTIFACTS}\n{ui.log()}"

    # the partition shows as materialized: its evaluation report is in the asset's metadata
    data = ui.graphql("""query($p: String!) { assetOrError(assetKey: {path: ["evaluation_report"]}) { ... on Asset {
        assetMaterializations(partitions: [$p], limit: 1) { runId partition } } } }""", {"p": PARTITION})
    assert data["assetOrError"]["assetMaterializations"] == [{"runId": run_id, "partition": PARTITION}]
    browser.get(f"{ui.dagster}/assets/evaluation_report")
    wait_for_text(browser, ["evaluation_report", PARTITION, "mlflow_run_id"], 90, "evaluation-report")
    screenshot(browser, "evaluation-report")

    # MLflow's UI lists the experiment and the recipe's runs
    exp = json.loads(get(f"{ui.mlflow}/api/2.0/mlflow/experiments/get-by-name?experiment_name=precompute-pipeline"))
    exp_id = exp["experiment"]["experiment_id"]
    req = urllib.request.Request(f"{ui.mlflow}/api/2.0/mlflow/runs/search",
                                 json.dumps({"experiment_ids": [exp_id], "max_results": 100}).encode(),
                                 {"Content-Type": "application/json"})
    mlflow_runs = json.loads(urllib.request.urlopen(req, timeout=30).read())["runs"]
    tags = [{t["key"]: t["value"] for t in r["data"].get("tags", [])} for r in mlflow_runs]
    assert {"head_on_cache", "head_augmented", "finetuned", "evaluation"} <= {t.get("stage") for t in tags}
    assert all(t.get("dagster.run_id") == run_id for t in tags if t.get("stage"))
    browser.get(f"{ui.mlflow}/#/experiments")
    wait_for_text(browser, ["precompute-pipeline"], 90, "mlflow-experiments")
    browser.get(f"{ui.mlflow}/#/experiments/{exp_id}/runs")  # "Training runs" (MLflow 3 opens on GenAI)
    names = [t["mlflow.runName"] for t in tags if "mlflow.runName" in t]
    wait_for_text(browser, names, 90, "mlflow-runs", any_of=True)
    screenshot(browser, "mlflow-runs")


def test_ctrl_c_stops_both_servers(ui):
    ui.remember_children()
    assert len(ui.started) >= 3  # dagster dev (+ webserver, daemon, code server) and mlflow (+ uvicorn)
    t0 = time.time()
    rc = ui.stop()
    assert rc == 130, ui.log()
    gone, alive = psutil.wait_procs(ui.started, timeout=5)
    assert not alive, f"still running after Ctrl-C: {[p.cmdline()[:4] for p in alive]}"
    assert not answers(ui.dagster + "/server_info") and not answers(ui.mlflow + "/health")
    assert "SIGKILL" not in ui.log(), f"a server had to be killed:\n{ui.log()}"
    print(f"stopped in {time.time() - t0:.1f}s")
