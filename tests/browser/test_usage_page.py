"""The usage page in real Chromium: a chart of cost per day and tables by model and agent, as the API says."""

from __future__ import annotations

import httpx
from playwright.sync_api import expect

from ..relay_clients import demo_answer
from .conftest import save_screenshot


def test_the_usage_page_charts_cost_per_day_and_matches_the_api(page, paced_server):
    for text in ("usage one", "usage two"):
        res = httpx.post(paced_server.url + "/api/command-center/message", json={"message": text}, timeout=30)
        assert demo_answer(text).split()[0] in res.text
    api = httpx.get(paced_server.url + "/api/usage").json()
    by_model = httpx.get(paced_server.url + "/api/usage?groupBy=model").json()
    reports: list[str] = []
    page.on("console", lambda message: reports.append(message.text)
            if "Content Security Policy" in message.text else None)

    page.goto(paced_server.url + "/usage")
    expect(page.locator("body")).to_have_attribute("data-loaded", "true")
    bars = page.locator("[data-testid=chart] svg [data-testid=chart-bar]")
    expect(bars).to_have_count(30)
    today = bars.last
    assert today.get_attribute("data-day") == api["to"]
    assert today.get_attribute("data-cost") == api["rows"][-1]["cost"] == api["total"]["cost"]
    assert float(today.get_attribute("height")) > 100  # the only day with answers fills the chart's height
    expect(page.get_by_test_id("total-cost")).to_have_text(f"${api['total']['cost']}")
    expect(page.get_by_test_id("total-messages")).to_have_text(str(api["total"]["messages"]))
    expect(page.get_by_test_id("total-cache-read")).to_have_text(f"{api['total']['cacheReadInputTokens']:,}")
    expect(page.get_by_test_id("total-savings")).to_have_text(f"${api['total']['cacheSavings']}")
    row = page.locator("[data-testid=by-model] tbody tr").first
    expect(row.locator("th")).to_have_text("deltarelay-offline")
    expect(row.locator("td").last).to_have_text(f"${by_model['rows'][0]['cost']}")
    expect(row.locator("td").nth(4)).to_have_text(f"${by_model['rows'][0]['cacheSavings']}")
    expect(page.locator("[data-testid=by-agent] tbody tr th").first).to_have_text("default")
    save_screenshot(page, "usage-page")

    # A narrower range re-draws from the API: one day, one bar.
    page.fill("[data-testid=from]", api["to"])
    page.click("[data-testid=range] button")
    expect(bars).to_have_count(1)
    assert reports == []
