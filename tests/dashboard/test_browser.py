"""The dashboard in a real browser, against a real small cluster (issue 14, item 2).

``up --detach`` runs a gateway and one replica of a tiny random MLP (written to the store with
numpy first: no training); headless Chromium, driven by selenium, loads the dashboard while a
thread sends predict requests. Pinned down: the nodes and the model appear; a node's rate chart
grows without the page reloading; a replica killed with SIGKILL shows as restarting (or
starting again) with its restart counted, then ready; the scale action, confirmed in its
dialog, starts a second replica that appears ready; rolling out another version shows it served;
draining a replica takes it away. The screenshot is saved under the test's
temporary directory, and to ``$DMLSYS_DASHBOARD_SCREENSHOT`` when set (docs/dashboard.png is
made that way).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
import urllib.request

import pytest

from tests.cluster.helpers import Cli, alive, wait_for

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e '.[test]')")
if CHROMIUM is None or CHROMEDRIVER is None:
    pytest.skip("headless Chromium needs Debian's chromium and chromium-driver (apt-get install -y chromium "
                "chromium-driver)", allow_module_level=True)

from selenium.webdriver.common.by import By

SPEC = """
[cluster]
name = "browser"
store = "store"
dashboard = "127.0.0.1:0"

[[nodes]]
name = "gateway"
role = "gateway"
[nodes.config]
http = "127.0.0.1:0"

[[nodes]]
name = "replica"
role = "replica"
replicas = 1
[nodes.config]
model = "tiny"
"""


@pytest.fixture
def cluster(tmp_path):
    from tests.serving.helpers import make_store

    make_store(tmp_path / "store", "tiny", versions=2)  # serves v2, the latest; the test rolls out v1
    cli = Cli(tmp_path)
    seen: set[int] = set()
    try:
        cli("up", cli.write_spec(SPEC), "--detach", timeout=180)
        seen.update(cli.pids())
        yield cli
    finally:
        seen.update(cli.pids())
        cli("down", check=False, timeout=90)
        for pid in seen:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
def browser(tmp_path):
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-first-run", f"--user-data-dir={tmp_path / 'chromium'}", "--window-size=1400,900"):
        options.add_argument(flag)
    service = webdriver.ChromeService(executable_path=CHROMEDRIVER)
    driver = webdriver.Chrome(options=options, service=service)
    try:
        yield driver
    finally:
        driver.quit()


def _state(cli: Cli) -> dict:
    return json.loads((cli.cwd / ".dmlsys" / "state.json").read_text())


def _traffic(url: str, stop: threading.Event) -> None:
    body = json.dumps({"instances": [[0.0] * 784]}).encode()
    while not stop.is_set():
        request = urllib.request.Request(url, body, {"Content-Type": "application/json"})
        try:
            urllib.request.urlopen(request, timeout=5).read()
        except OSError:
            time.sleep(0.2)  # a replica restarting: the door may answer 503 meanwhile
        time.sleep(0.02)


def _node(driver, name: str) -> dict | None:
    """A node's row as the page shows it now (read in one script: the rows are redrawn each event)."""
    return driver.execute_script("""
        const row = document.querySelector(`#nodes tr[data-node="${arguments[0]}"]`);
        if (!row) return null;
        const chart = row.querySelector("svg.chart.rate");
        return {state: row.dataset.state, restarts: +row.dataset.restarts,
                points: chart ? +chart.dataset.points : 0, last: chart ? chart.dataset.last : null};
    """, name)


def _confirm(driver, text: str) -> None:
    wait_for(lambda: driver.find_element(By.ID, "confirm").is_displayed(), 5, "the confirmation dialog")
    assert text in driver.find_element(By.ID, "confirm-text").text
    driver.find_element(By.ID, "confirm-ok").click()


def _points(driver, name: str) -> int:
    return (_node(driver, name) or {}).get("points", 0)


def test_dashboard_shows_the_cluster_live_restarts_and_scales(cluster, browser, tmp_path):
    state = _state(cluster)
    dashboard = state["dashboard"]
    assert dashboard and dashboard.startswith("http://127.0.0.1:")
    gateway_admin = next(n["admin"] for n in state["nodes"] if n["role"] == "gateway")
    door = json.loads(urllib.request.urlopen(f"{gateway_admin}/status").read())["services"]["serving"]["http"]
    stop = threading.Event()
    sender = threading.Thread(target=_traffic, args=(f"{door}/v1/models/tiny:predict", stop), daemon=True)
    sender.start()
    try:
        browser.get(dashboard)
        browser.execute_script("window.__same_page = 1")  # gone if the page reloads
        wait_for(lambda: _node(browser, "gateway") and _node(browser, "replica-0"), 30, "the nodes' rows")
        wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, '#models tr[data-model="tiny"]'), 30, "the model's row")
        assert browser.find_element(By.CSS_SELECTOR, '#models tr[data-model="tiny"] .versions').text == "v2"

        # The chart grows as events arrive, on the same page.
        first = wait_for(lambda: _points(browser, "gateway") >= 2 and _points(browser, "gateway"), 30, "a chart")
        wait_for(lambda: _points(browser, "gateway") >= first + 2, 30, "the chart to update")
        rate = float(_node(browser, "gateway")["last"] or 0)
        assert rate > 0, "requests were sent: the gateway's rate is above zero"
        assert browser.execute_script("return window.__same_page") == 1

        # Roll out version 1 through the gateway, confirming in the dialog.
        row = browser.find_element(By.CSS_SELECTOR, '#models tr[data-model="tiny"]')
        row.find_element(By.CSS_SELECTOR, "input").send_keys("1")
        row.find_element(By.CSS_SELECTOR, "button.rollout").click()
        _confirm(browser, "Roll out tiny v1")
        wait_for(lambda: browser.execute_script(
            "return document.querySelector('#models tr[data-model=\"tiny\"] .versions').textContent") == "v1",
            60, "the model to be served at v1")

        # A killed replica shows as restarting (or starting), its restart counted, then ready.
        pid = next(n["pid"] for n in _state(cluster)["nodes"] if n["name"] == "replica-0")
        os.kill(pid, signal.SIGKILL)
        seen = set()

        def restarted():
            row = _node(browser, "replica-0")
            if row is None:
                return False
            seen.add(row["state"])
            return row["restarts"] >= 1 and row["state"] == "ready"

        wait_for(restarted, 90, "replica-0 to restart and be ready again", interval=0.1)
        assert seen & {"restarting", "starting", "alive", "unresponsive"}, f"states seen: {seen}"

        # Scale the group to two, confirming in the dialog.
        group = browser.find_element(By.CSS_SELECTOR, '.group[data-group="replica"]')
        box = group.find_element(By.CSS_SELECTOR, "input")
        box.clear()
        box.send_keys("2")
        group.find_element(By.CSS_SELECTOR, "button.scale").click()
        _confirm(browser, "replica from 1 to 2")
        wait_for(lambda: (_node(browser, "replica-1") or {}).get("state") == "ready",
                 120, "replica-1 to appear ready after scaling")
        wait_for(lambda: _points(browser, "replica-1") >= 2, 30, "replica-1's chart")
        assert browser.execute_script("return window.__same_page") == 1
        time.sleep(2)  # a few more points on every chart for the picture
        shot = tmp_path / "dashboard.png"
        browser.save_screenshot(str(shot))
        assert shot.stat().st_size > 10_000
        if os.environ.get("DMLSYS_DASHBOARD_SCREENSHOT"):
            shutil.copyfile(shot, os.environ["DMLSYS_DASHBOARD_SCREENSHOT"])

        # Drain replica-1: stopped, not restarted, gone from the page.
        browser.find_element(By.CSS_SELECTOR, '#nodes tr[data-node="replica-1"] button.drain').click()
        _confirm(browser, "Drain and stop replica-1")
        wait_for(lambda: _node(browser, "replica-1") is None, 60, "replica-1 to leave the page")
        assert _node(browser, "replica-0")["state"] == "ready"
    finally:
        stop.set()
        sender.join(timeout=10)
