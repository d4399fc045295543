"""The search page as a chemist gets it: page weight, time to first results and a screenshot.

    serve run serve.app:app model_dir=runs/cpu/best molecules=runs/index/molecules texts=runs/index/texts &
    python serve/page_check.py --url http://127.0.0.1:8000 --query "..." --out results/page

Drives Debian's Chromium (headless, through Selenium) to `<url>/?mode=text&q=<query>` with a cold
cache, several times; prints and writes page.json (bytes of HTML / JS / CSS / the API's JSON / the
structure SVGs; milliseconds from navigation to the result cards and to every structure drawn,
median of the runs) and search.png (the first run's screenshot).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from urllib.parse import urlencode

from selenium import webdriver
from selenium.webdriver.common.by import By

MEASURE = """
const entries = performance.getEntriesByType("resource").concat(performance.getEntriesByType("navigation"));
const kind = (e) => e.entryType === "navigation" ? "html" : e.name.includes("/static/") ? e.name.split(".").pop()
  : e.name.includes("/depict") ? "svg" : "api";
const bytes = {};
for (const e of entries) bytes[kind(e)] = (bytes[kind(e)] || 0) + (e.encodedBodySize || e.transferSize || 0);
return bytes;
"""


def chromium(width: int = 1280, height: int = 960) -> webdriver.Chrome:
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={tempfile.mkdtemp()}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=webdriver.ChromeService("/usr/bin/chromedriver"), options=options)
    driver.set_window_size(width, height)
    return driver


def one_visit(url: str, screenshot: Path | None) -> dict:
    driver = chromium()  # a new profile each time: nothing cached
    try:
        started = time.perf_counter()
        driver.get(url)
        while "result" not in driver.find_element(By.ID, "status").text:
            if driver.find_element(By.ID, "error").is_displayed():
                raise RuntimeError(driver.find_element(By.ID, "error").text)
            time.sleep(0.01)
        cards = time.perf_counter() - started
        while not driver.execute_script("return [...document.images].every(i => i.complete && i.naturalWidth > 0)"):
            time.sleep(0.01)
        drawn = time.perf_counter() - started
        if screenshot:
            driver.save_screenshot(str(screenshot))
        return {"cards_ms": 1000 * cards, "structures_ms": 1000 * drawn, "bytes": driver.execute_script(MEASURE),
                "results": len(driver.find_elements(By.CSS_SELECTOR, "#results .card"))}
    finally:
        driver.quit()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--query", default="The molecule is a monocarboxylic acid that is propanoic acid in which one of the "
                        "hydrogens at position 2 is substituted by a 4-isobutylphenyl group. A non-steroidal anti-inflammatory drug.")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--out", default="results/page")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    url = f"{args.url.rstrip('/')}/?{urlencode({'mode': 'text', 'q': args.query, 'k': 10})}"
    visits = [one_visit(url, out / "search.png" if i == 0 else None) for i in range(args.runs)]
    bytes_ = visits[0]["bytes"]
    report = {"url": url, "runs": args.runs, "results": visits[0]["results"],
              "page_bytes": {k: bytes_.get(k, 0) for k in ("html", "js", "css")},
              "page_total_bytes": sum(bytes_.get(k, 0) for k in ("html", "js", "css")),
              "api_json_bytes": bytes_.get("api", 0), "structure_svg_bytes": bytes_.get("svg", 0),
              "first_results_ms_median": statistics.median(v["cards_ms"] for v in visits),
              "all_structures_ms_median": statistics.median(v["structures_ms"] for v in visits),
              "first_results_ms": [round(v["cards_ms"]) for v in visits]}
    (out / "page.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
