"""The operator console in a real browser: Debian's chromium, headless, driven by selenium through chromedriver.

The app (on the real PostgreSQL) is served by Werkzeug on a free loopback port in a thread. The tests
log in through the form, read the dashboard, search by MSH-10, open a message, replay a dead delivery
from the dead letters and pause a destination, and check that a `view` token sees no body. Each step
leaves a screenshot under the run's temporary folder (`console-screenshots`, printed at the end);
with COURIER_DOCS_SCREENSHOT=1 the dashboard's is also copied to docs/console.png for the README.

Needs /usr/bin/chromium and /usr/bin/chromedriver (`apt-get install chromium chromium-driver`; .ci/run
installs them).
"""
from __future__ import annotations

import os
import shutil
import tempfile
import threading
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select, update
from werkzeug.serving import make_server

from courier.app.store import tokens
from courier.app.store.models import Circuit, Delivery, utcnow
from tests.integration.test_console import MRN, post_hl7
from tests.integration.test_operations import drive, post, row

pytestmark = pytest.mark.postgres

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
DOCS_SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "console.png"
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1440,1000")


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("console-screenshots")
    yield folder
    print(f"\nconsole screenshots: {folder}")


@pytest.fixture
def server(app):
    """The app on a free loopback port; its base URL."""
    httpd = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_port}"
    httpd.shutdown()
    thread.join(10)


@pytest.fixture
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        pytest.fail(f"{CHROMIUM} and {CHROMEDRIVER} are needed: apt-get install -y chromium chromium-driver "
                    "(.ci/run does it)")
    profile = tempfile.mkdtemp(prefix="courier-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (*FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.implicitly_wait(5)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def token(store, scope: str, name: str) -> str:
    with store.session() as s:
        return tokens.create(s, scope=scope, source=None, name=name)[1]


def follow(browser, element) -> None:
    """Click what loads the next page and wait until the old page is gone: a lookup right after the click
    could otherwise find the old page's elements, which go stale under it (seen in a CI run under load)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    old = browser.find_element(By.TAG_NAME, "html")
    element.click()
    WebDriverWait(browser, 15).until(expected_conditions.staleness_of(old))


def log_in(browser, server, plaintext: str) -> None:
    from selenium.webdriver.common.by import By

    browser.get(f"{server}/console/")
    assert browser.current_url.startswith(f"{server}/console/login"), browser.current_url
    browser.find_element(By.ID, "token").send_keys(plaintext)
    follow(browser, browser.find_element(By.ID, "login"))
    browser.find_element(By.ID, "logout")  # waits (implicitly) for the logged-in page


def console_errors(browser) -> list[str]:
    """What the page's console said at level SEVERE: a CSP violation shows up here."""
    return [e["message"] for e in browser.get_log("browser") if e["level"] == "SEVERE"]


def test_an_operator_logs_in_reads_the_dashboard_searches_opens_a_message_replays_and_pauses(
        browser, server, client, make_token, store, app, shots):
    from selenium.webdriver.common.by import By

    ingest = make_token()
    for hours_ago in range(1, 23, 2):  # a day of history for the charts: delivered, an hour apart
        delivered = post(client, ingest)
        drive(store, app, {"billing": "delivered", "erp": "delivered"})
        with store.session() as s:
            s.execute(update(Delivery).where(Delivery.id.in_(delivered.values()))
                      .values(updated_at=utcnow() - timedelta(hours=hours_ago, minutes=5)))
    for _ in range(3):
        post(client, ingest)
        drive(store, app, {"billing": "permanent", "erp": "delivered"})
    hl7 = post_hl7(client, ingest, "BROWSER-1")
    drive(store, app, {"billing": "permanent", "erp": "delivered"})
    post(client, ingest)  # left pending
    dead_billing = next(d["id"] for d in hl7["deliveries"] if d["destination"] == "billing")

    log_in(browser, server, token(store, "operate", "ward-ops"))
    # the dashboard
    table = browser.find_element(By.ID, "destinations")
    billing = table.find_element(By.CSS_SELECTOR, 'tr[data-destination="billing"]')
    assert "4 / 4" in billing.text  # dead in the last hour / day
    assert billing.find_elements(By.CSS_SELECTOR, "svg.chart rect.bar-dead")
    assert browser.find_element(By.ID, "role").text == "operate"
    browser.save_screenshot(str(shots / "1-dashboard.png"))
    if os.environ.get("COURIER_DOCS_SCREENSHOT") == "1":
        shutil.copyfile(shots / "1-dashboard.png", DOCS_SCREENSHOT)

    # a search by MSH-10
    follow(browser, browser.find_element(By.ID, "nav-messages"))
    browser.find_element(By.ID, "msh10").send_keys("BROWSER-1")
    follow(browser, browser.find_element(By.ID, "search-go"))
    links = browser.find_elements(By.CSS_SELECTOR, "#results a.mono")
    assert [a.text for a in links] == [hl7["id"]]
    browser.save_screenshot(str(shots / "2-search.png"))

    # the message's detail: fields by name, the attempts
    follow(browser, links[0])
    body = browser.find_element(By.ID, "body")
    assert "Patient Name" in body.text and MRN in body.text
    assert "HTTP 400 from billing" in browser.find_element(By.ID, f"delivery-{dead_billing}").text
    browser.save_screenshot(str(shots / "3-message.png"))

    # a replay from the dead letters
    follow(browser, browser.find_element(By.ID, "nav-dead"))
    assert "HTTP 400 from billing" in browser.find_element(By.ID, "groups").text
    browser.find_element(By.CSS_SELECTOR, f'input.pick[value="{dead_billing}"]').click()
    follow(browser, browser.find_element(By.ID, "replay-selected"))
    assert browser.find_element(By.ID, "done").text == "replayed 1 of 1"
    assert row(store, dead_billing).status == "pending"
    browser.save_screenshot(str(shots / "4-dead-letters.png"))

    # a pause
    browser.get(f"{server}/console/destinations/erp")
    browser.find_element(By.ID, "pause-reason").send_keys("ERP upgrade tonight")
    follow(browser, browser.find_element(By.ID, "pause"))
    assert browser.find_element(By.ID, "done").text == "paused"
    assert "ERP upgrade tonight" in browser.find_element(By.ID, "paused").text
    with store.session() as s:
        assert s.get(Circuit, "erp").paused_at is not None
    browser.save_screenshot(str(shots / "5-paused.png"))
    assert console_errors(browser) == []  # nothing refused by the Content-Security-Policy


def test_a_view_token_sees_no_body_in_the_browser(browser, server, client, make_token, store, app, shots):
    from selenium.webdriver.common.by import By

    hl7 = post_hl7(client, make_token(), "BROWSER-2")
    log_in(browser, server, token(store, "view", "auditor"))
    browser.get(f"{server}/console/messages/{hl7['id']}")
    assert "does not see message bodies" in browser.find_element(By.ID, "body-hidden").text
    assert MRN not in browser.page_source and "DOE" not in browser.page_source
    assert not browser.find_elements(By.ID, "body")
    browser.save_screenshot(str(shots / "6-view-token-message.png"))
    browser.get(f"{server}/console/destinations/billing")
    assert not browser.find_elements(By.ID, "pause")
    with store.session() as s:
        assert s.scalars(select(Circuit)).all() == []
