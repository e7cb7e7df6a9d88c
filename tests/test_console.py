"""The web console in a real browser: headless Debian Chromium (selenium) against the real service.

One story, as a user lives it: the jobs page is open when a job on the sixty TREC fixture
questions is submitted; the page shows the new job and follows it to completion. The job
page's charts and filters are checked against SQL. A gold sample is drawn from the page;
"bob" labels it over the API, and "alice" labels five documents with the keyboard in the
console, which never sends the LLM's label to her browser. The quality page's numbers are
checked against the report API, and the taxonomy page diffs two versions. A screenshot of
every page goes to test-output/console/ (docs/console.md's pictures come from there).
"""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import FIXTURES, REPO, sql

pytest.importorskip("selenium")
from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service as DriverService  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

QUESTIONS = [json.loads(line) for line in (FIXTURES / "questions.jsonl").read_text().splitlines() if line.strip()]
HUMAN = {q["id"]: q["coarse"] for q in QUESTIONS}
SHOTS = REPO / "test-output" / "console"
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium, flags as this closed network needs (no background connections, no sandbox as root)."""
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.fail("chromium and chromedriver are missing: `make browser` installs Debian's packages")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                 "--no-first-run", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--window-size=1280,1000"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=DriverService(CHROMEDRIVER))
    SHOTS.mkdir(parents=True, exist_ok=True)
    yield driver
    driver.quit()


def shoot(driver, name: str) -> None:
    """A screenshot of a page the console rendered, the window grown to the page (up to 1,800 px)."""
    assert driver.find_elements(By.CSS_SELECTOR, "body[data-page]"), f"not a console page: {driver.page_source[:300]}"
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(1280, max(800, min(height + 40, 1800)))
    driver.save_screenshot(str(SHOTS / f"{name}.png"))
    driver.set_window_size(1280, 1000)


def wait(driver, condition, timeout: float = 300, message: str = ""):
    """Wait for a condition of the page, failing with what was expected."""
    return WebDriverWait(driver, timeout, poll_frequency=0.25).until(condition, message)


def marks(driver, chart: str) -> list[dict]:
    """The data of every mark of one chart kind on the page (the SVG carries its numbers)."""
    return driver.execute_script(
        "return [...document.querySelectorAll(`svg[data-chart='${arguments[0]}'] .mark`)].map(m => ({...m.dataset}))",
        chart)


def sign_in(browser, url: str, token: str) -> None:
    """The console sends a visitor without a token to its login page, and back once the token is good."""
    browser.get(f"{url}/console")
    field = wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "input[name=token]"), 30, "no login page")[0]
    assert "/console/login" in browser.current_url
    field.send_keys("ann_wrong_token")
    field.submit()
    assert "invalid API token" in wait(browser, lambda d: d.find_element(By.CSS_SELECTOR, ".problem").text, 30)
    browser.find_element(By.CSS_SELECTOR, "input[name=token]").send_keys(token)
    browser.find_element(By.CSS_SELECTOR, "input[name=token]").submit()
    wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "body[data-page=jobs]"), 30, "login did not lead to the jobs page")
    assert browser.get_cookie("annotate_token")["httpOnly"]


@pytest.fixture(scope="module")
def console_job(service, browser) -> str:
    """A job submitted while the jobs page is open, followed there until it succeeds."""
    with service.client() as client:
        assert client.post("/v1/taxonomies", content=(REPO / "taxonomy" / "trec-coarse.yaml").read_bytes()).is_success
        token = client.post("/v1/tokens", json={"name": "console test", "scope": "write"}).json()["token"]
        sign_in(browser, service.url, token)
        docs = [{"id": q["id"], "text": q["text"]} for q in QUESTIONS]
        response = client.post("/v1/jobs", json={"taxonomy": "trec-coarse", "model": "smollm2", "documents": docs})
        assert response.status_code == 202, response.text
        job_id = response.json()["job_id"]
    row = f"tr.job[data-job-id='{job_id}']"
    wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, row), 30, "the jobs page did not show the new job")
    shoot(browser, "jobs-running")
    wait(browser, lambda d: d.find_element(By.CSS_SELECTOR, row).get_attribute("data-status") == "succeeded",
         message="the jobs page did not follow the job to success")
    cells = {f: browser.find_element(By.CSS_SELECTOR, f"{row} [data-field='{f}']").text for f in ("progress", "done")}
    assert cells == {"progress": "100.0%", "done": "60 / 60"}
    shoot(browser, "jobs")
    return job_id


def test_job_page_charts_and_filters_match_sql(service, browser, console_job):
    """The label distribution chart and the document filters show what SQL counts."""
    with service.client() as client:
        counts = {r["label"]: r["n"] for r in sql(client, f"SELECT label, count(*) AS n FROM labels WHERE job_id = "
                                                           f"'{console_job}' AND NOT abstained GROUP BY label")}
        abstained = sql(client, f"SELECT count(*) AS n FROM labels WHERE job_id = '{console_job}' AND abstained")[0]["n"]
    browser.get(f"{service.url}/console/jobs/{console_job}")
    shown = {m["label"]: float(m["value"]) for m in marks(browser, "bar") if m["label"] in counts}
    assert shown == {label: float(n) for label, n in counts.items()}
    assert len(browser.find_elements(By.CSS_SELECTOR, "tr.document")) == min(60, 50)  # one page of 50
    shoot(browser, "job")
    top = max(counts, key=counts.get)
    browser.get(f"{service.url}/console/jobs/{console_job}?label={top}")
    rows = browser.find_elements(By.CSS_SELECTOR, "tr.document")
    assert len(rows) == min(counts[top], 50) and {r.get_attribute("data-label") for r in rows} == {top}
    first = rows[0].find_elements(By.CSS_SELECTOR, ".dist-row")
    assert first and float(first[0].get_attribute("data-value")) >= float(first[-1].get_attribute("data-value"))
    browser.get(f"{service.url}/console/jobs/{console_job}?show=abstained")
    assert len(browser.find_elements(By.CSS_SELECTOR, "tr.document")) == min(abstained, 50)


def test_gold_labelling_with_the_keyboard_then_the_quality_page(service, browser, console_job):
    """Draw the sample from the page, label five documents by keyboard, and see the report drawn right."""
    browser.get(f"{service.url}/console/jobs/{console_job}/gold")
    browser.find_element(By.CSS_SELECTOR, "#draw-sample input[name=size]").clear()
    browser.find_element(By.CSS_SELECTOR, "#draw-sample input[name=size]").send_keys("12")
    browser.find_element(By.CSS_SELECTOR, "#draw-sample button").click()
    name = wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#who input[name=annotator]"), 30,
                "drawing the sample did not lead to the name form")[0]
    with service.client() as client:  # a second person labels the whole sample over the API
        sample = client.get(f"/v1/jobs/{console_job}/gold-sample").json()
        bob = {"annotator": "bob", "labels": [{"doc_id": d["doc_id"], "label": HUMAN[d["doc_id"]]} for d in sample]}
        assert client.post(f"/v1/jobs/{console_job}/gold", json=bob).status_code == 200
    name.send_keys("alice")
    name.submit()
    labeller = wait(browser, lambda d: d.find_elements(By.ID, "labeller"), 30, "no labelling page")[0]
    page = browser.page_source
    assert "llm_label" not in page and "confidence" not in page  # nothing of the LLM's answer reaches her
    keys = {b.get_attribute("data-label"): b.get_attribute("data-key")
            for b in browser.find_elements(By.CSS_SELECTOR, ".choice[data-label]")}

    def current() -> str:
        return labeller.get_attribute("data-current")

    skipped = current()
    browser.find_element(By.TAG_NAME, "body").send_keys("s")
    wait(browser, lambda d: current() != skipped, 10, "'s' did not skip")
    answered = {}
    for i in range(5):
        doc_id = current()
        label = HUMAN[doc_id] if i else "none_of_these"  # one "none of these", to show it is a choice too
        browser.find_element(By.TAG_NAME, "body").send_keys(keys[label] if i else "n")
        wait(browser, lambda d, done=str(i + 1): d.find_element(By.CSS_SELECTOR, "[data-field=answered]").text == done, 30,
             f"answer {i + 1} was not saved: {d_status(browser)}")
        answered[doc_id] = label
    assert skipped not in answered
    shoot(browser, "gold")
    with service.client() as client:
        stored = sql(client, f"SELECT doc_id, label FROM gold_labels WHERE job_id = '{console_job}' "
                             "AND annotator = 'alice'")
        assert {r["doc_id"]: r["label"] for r in stored} == answered
    browser.get(f"{service.url}/console/jobs/{console_job}/quality")  # no report yet: the page offers to compute it
    browser.find_element(By.CSS_SELECTOR, "button[data-compute-report]").click()
    wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, ".metric"), 120, "the report was not computed")
    with service.client() as client:
        report = client.get(f"/v1/jobs/{console_job}/report").json()  # what the button computed and stored
    check_quality_page(browser, report)
    shoot(browser, "quality")


def d_status(browser) -> str:
    """The labelling page's status line (why an answer was not saved)."""
    return browser.find_element(By.CSS_SELECTOR, "[data-field=status]").text


def check_quality_page(browser, report: dict) -> None:
    """Every chart and headline on the quality page equals the report's numbers."""
    metric = {m.get_attribute("data-metric"): m.get_attribute("data-value")
              for m in browser.find_elements(By.CSS_SELECTOR, ".metric")}
    assert float(metric["accuracy"]) == pytest.approx(report["accuracy"]["estimate"], abs=1e-6)
    assert float(metric["coverage"]) == pytest.approx(report["coverage"], abs=1e-6)
    assert int(metric["n"]) == report["n"] == 12
    f1 = {m["label"]: m["value"] for m in marks(browser, "bar")}
    assert {k: float(v) if v else None for k, v in f1.items()} == pytest.approx(
        {r["label"]: r["f1"] for r in report["per_label"]}, abs=1e-6)
    cells = {(m["row"], m["col"]): float(m["value"]) for m in marks(browser, "heatmap")}
    for cell in report["confusion"]:
        assert cells[cell["gold"], cell["predicted"]] == pytest.approx(cell["weighted_n"], abs=1e-6)
    points = marks(browser, "line")
    bins = [r for r in report["reliability"] if r["n"]]
    reliability = [float(p[k]) for p in points if p["series"] == "LLM" for k in ("x", "y")]
    assert reliability == pytest.approx([r[k] for r in bins for k in ("confidence", "accuracy")], abs=1e-6)
    selective = [float(p[k]) for p in points if p["series"] == "accuracy" for k in ("x", "y")]
    assert selective == pytest.approx([s[k] for s in report["selective"] for k in ("coverage", "accuracy")], abs=1e-6)
    intervals = marks(browser, "interval")
    assert {m["series"] for m in intervals} == {"DSL", "naive", "gold only"}
    agreement = [float(a) for a in browser.execute_script(
        "return [...document.querySelectorAll('.human-pair')].map(r => r.dataset.agreement)")]
    assert agreement == pytest.approx([p["agreement"] for p in report["humans"]["pairs"]], abs=1e-6)
    assert report["humans"]["people"] == ["alice", "bob"] and report["humans"]["pairs"][0]["n"] == 5


def test_taxonomy_page_shows_versions_and_their_diff(service, browser):
    """Pushing a changed taxonomy makes a second version; the page diffs it against the first."""
    original = (REPO / "taxonomy" / "sms-spam.yaml").read_text().replace("name: sms-spam", "name: sms-console", 1)
    changed = original.replace("Short text messages (SMS)", "Short text messages (SMS and chat)")
    with service.client() as client:
        for text in (original, changed):
            assert client.post("/v1/taxonomies", content=text.encode()).is_success
    browser.get(f"{service.url}/console/taxonomies")
    assert browser.find_elements(By.LINK_TEXT, "sms-console")
    shoot(browser, "taxonomies")
    browser.get(f"{service.url}/console/taxonomies/sms-console")
    added = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "pre.diff .add")]
    removed = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "pre.diff .del")]
    assert any("SMS and chat" in line for line in added) and any("(SMS)" in line for line in removed)
    assert len(browser.find_elements(By.CSS_SELECTOR, "table.versions tbody tr")) >= 2
    shoot(browser, "taxonomy")
