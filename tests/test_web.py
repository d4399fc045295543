"""The search page in a real browser (Debian's Chromium, driven by Selenium) and the API behind it:
filters equal a brute-force pass over the library, exports equal the JSON, errors read inline."""

import csv
import io
import os
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from rdkit import Chem

from tmr.chem import properties
from tmr.model import from_pretrained

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
QUERY = "The molecule is a monocarboxylic acid anion obtained by deprotonation of the carboxy group."


def library_ranking(root: Path, text: str) -> list[dict]:
    """Every library molecule, best first, by brute force over the index's embeddings."""
    model = from_pretrained(root / "model")
    scores = np.load(root / "molecule/embeddings.npy") @ model.encode_text([text])[0].numpy()
    rows = pq.read_table(root / "molecule/metadata.parquet").to_pylist()
    return [rows[i] for i in sorted(range(len(rows)), key=lambda i: (-scores[i], i))]


def test_filtered_search_equals_brute_force_over_the_library(served):
    client, root = served
    ranking = library_ranking(root, QUERY)
    for filters in ({"smarts": "c1ccccc1"}, {"mw": [None, 250]}, {"mw": [200, 400], "hbd": [None, 2], "lipinski": True},
                    {"smarts": "[#7]", "tpsa": [50, None]}):
        answer = client.post("/search/text", json={"text": QUERY, "k": 8, "filters": filters})
        assert answer.status_code == 200, answer.text
        pattern = Chem.MolFromSmarts(filters.get("smarts", "*"))

        def passes(row):
            values = properties(row["smiles"])
            return (Chem.MolFromSmiles(row["smiles"]).HasSubstructMatch(pattern)
                    and all((bounds[0] is None or values[key] >= bounds[0]) and (bounds[1] is None or values[key] <= bounds[1])
                            for key, bounds in filters.items() if key not in ("smarts", "lipinski"))
                    and values["lipinski"] == filters.get("lipinski", values["lipinski"]))

        expected = [row["id"] for row in ranking if passes(row)]
        body = answer.json()
        assert [r["id"] for r in body["results"]] == expected[:8] and [r["rank"] for r in body["results"]] == list(range(1, len(expected[:8]) + 1))
        assert body["filter"]["passed"] >= len(body["results"]) and body["filter"]["looked_at"] <= 120


def test_results_carry_properties_links_and_depictions(served):
    client, _ = served
    result = client.post("/search/text", json={"text": QUERY, "k": 3}).json()["results"][0]
    assert result["properties"] == properties(result["smiles"])
    assert result["url"] == f"https://pubchem.ncbi.nlm.nih.gov/compound/{result['id']}"  # ChEBI-20 ids are CIDs
    svg = client.get("/" + result["depiction"])
    assert svg.status_code == 200 and svg.headers["content-type"].startswith("image/svg+xml") and "<path" in svg.text
    molfile = Chem.MolToMolBlock(Chem.MolFromSmiles("OC(=O)CCc1ccccc1"))
    by_file = client.post("/search/molecule", json={"molfile": molfile, "k": 4}).json()
    by_smiles = client.post("/search/molecule", json={"smiles": "OC(=O)CCc1ccccc1", "k": 4}).json()
    assert by_file == by_smiles and "query=O%3DC%28O%29CCc1ccccc1" in by_smiles["results"][0]["depiction"]


@pytest.mark.parametrize("path, body, reason", [
    ("/search/text", {"text": QUERY, "filters": {"smarts": "c1ccc("}}, "invalid SMARTS 'c1ccc('"),
    ("/search/text", {"text": QUERY, "filters": {"weight": [1, 2]}}, "weight"),
    ("/search/text", {"text": QUERY, "filters": {"mw": [500, 100]}}, "above maximum"),
    ("/search/molecule", {"k": 3}, "exactly one of smiles or molfile"),
    ("/search/molecule", {"molfile": "garbage"}, "cannot read"),
    ("/search/molecule", {"smiles": "C" * 301}, "301 heavy atoms; at most 300"),
    ("/describe", {"smiles": "C" * 301}, "at most 300"),
    ("/search/text", {"text": QUERY, "filters": {"smarts": "C" * 31}}, "31 atoms; at most 30"),
    ("/search/text", {"text": QUERY, "filters": {"smarts": "[$(CO)][$(CN)][$(CS)]"}}, "at most 2"),
])
def test_bad_filters_and_structures_get_422_with_the_reason(served, path, body, reason):
    client, _ = served
    answer = client.post(path, json=body)
    assert answer.status_code == 422 and reason in answer.text, answer.text
    assert client.get("/depict", params={"smiles": "C1CC"}).status_code == 422
    too_big = client.get("/depict", params={"smiles": "C" * 301})
    assert too_big.status_code == 422 and "at most 300" in too_big.text
    assert client.get("/export", params={"mode": "text", "q": QUERY, "format": "xlsx"}).status_code == 422


@pytest.mark.parametrize("path", ["/static/..%2Fapp.py", "/static/%2E%2E%2Fapp.py", "/static/..%252Fapp.py",
                                  "/static/%2Fetc%2Fpasswd", "/static/..%2F..%2Fpyproject.toml"])
def test_static_files_cannot_be_left_through_encoded_paths(served, path):
    client, _ = served
    answer = client.get(path)
    assert answer.status_code == 404, (path, answer.text[:200])
    assert "import" not in answer.text and "root:" not in answer.text and "[project]" not in answer.text
    assert client.get("/static/app.js").status_code == 200  # the page's own files still come back


def test_the_static_handler_serves_only_the_pages_own_files(tmp_path, monkeypatch):
    """The handler itself, past any URL normalisation: a name that leaves the static folder (relative,
    absolute, through a link) is refused even when the file it points at exists and has a web type."""
    import sys

    from fastapi import HTTPException

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import serve.requests as app

    static = tmp_path / "static"
    static.mkdir()
    (static / "index.html").write_text("<p>the page</p>")
    outside = tmp_path / "secret.html"
    outside.write_text("<p>not the page's</p>")
    (static / "link.html").symlink_to(outside)
    monkeypatch.setattr(app, "STATIC", static)
    for name in (str(outside), "../secret.html", "../" * 40 + str(outside).lstrip("/"), "link.html", "../index.html"):
        with pytest.raises(HTTPException) as refused:
            app.static_file(name)
        assert refused.value.status_code == 404, name
    assert app.static_file("index.html").read_text() == "<p>the page</p>"


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    for path in (CHROMIUM, CHROMEDRIVER):
        if not path.exists():  # CI installs them (.ci/run): a missing browser is a failure, not a skip
            pytest.fail(f"{path} not found: apt-get install chromium chromium-driver")
    from selenium import webdriver

    os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager must not try to download a browser
    downloads = tmp_path_factory.mktemp("downloads")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"):
        options.add_argument(flag)
    options.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                              "download.prompt_for_download": False})
    driver = webdriver.Chrome(service=webdriver.ChromeService(str(CHROMEDRIVER)), options=options)
    driver.set_window_size(1280, 1100)
    yield driver, downloads
    driver.quit()


def wait_for(condition, timeout: float = 60, what: str = "the page"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def test_a_chemist_searches_filters_exports_and_reads_errors(served, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    client, root = served
    driver, downloads = browser
    base = str(client.base_url).rstrip("/")
    find, find_all = driver.find_element, driver.find_elements

    def cards() -> list:
        return find_all(By.CSS_SELECTOR, "#results .card")

    def searched(before: str) -> str:  # the status line changes once the answer is drawn
        return wait_for(lambda: (s := find(By.ID, "status").text) != before and "result" in s and s, what="results")

    driver.get(base + "/")
    wait_for(lambda: "molecules" in find(By.ID, "library").text, what="/info")
    box = find(By.ID, "q-text")
    box.send_keys(QUERY, Keys.ENTER)  # the keyboard alone searches
    searched("")
    api = client.post("/search/text", json={"text": QUERY, "k": 10}).json()["results"]
    assert [c.get_attribute("data-id") for c in cards()] == [r["id"] for r in api]
    wait_for(lambda: driver.execute_script(
        "const i = [...document.querySelectorAll('#results img.depiction')];"
        "return i.length === 10 && i.every(x => x.complete && x.naturalWidth > 0);"), what="structure images")
    source = find(By.CSS_SELECTOR, "#results img.depiction").get_attribute("src")
    assert "<svg" in client.get(source.removeprefix(base)).text
    first = cards()[0]
    assert first.find_element(By.CSS_SELECTOR, "a.id").get_attribute("href").startswith("https://pubchem.ncbi.nlm.nih.gov/compound/")
    assert first.find_element(By.CSS_SELECTOR, "code.smiles").text == api[0]["smiles"]
    assert first.find_element(By.CSS_SELECTOR, "[data-prop=lipinski]").text.split()[0] in ("pass", "fail")
    driver.save_screenshot(os.environ.get("TMR_SCREENSHOT", str(downloads.parent / "search.png")))

    # a MW filter: every card obeys it, the URL carries it, and the CSV export equals the JSON API
    find(By.CSS_SELECTOR, "#filters summary").click()
    find(By.ID, "f-mw-max").send_keys("250")
    status = find(By.ID, "status").text
    find(By.ID, "search").click()
    assert "passed the filters" in searched(status)
    weights = [float(c.find_element(By.CSS_SELECTOR, "[data-prop=mw]").get_attribute("data-value")) for c in cards()]
    assert weights and all(w <= 250 for w in weights)
    assert "mw_max=250" in driver.current_url
    filtered = client.post("/search/text", json={"text": QUERY, "k": 10, "filters": {"mw": [None, 250]}}).json()["results"]
    assert [c.get_attribute("data-id") for c in cards()] == [r["id"] for r in filtered]
    find(By.ID, "export-csv").click()
    exported = wait_for(lambda: [p for p in downloads.glob("*.csv")], what="the CSV download")[0]
    rows = wait_for(lambda: list(csv.DictReader(io.StringIO(exported.read_text()))), what="the CSV rows")
    assert [r["id"] for r in rows] == [r["id"] for r in filtered]
    assert [float(r["mw"]) for r in rows] == pytest.approx([r["properties"]["mw"] for r in filtered])
    assert [float(r["score"]) for r in rows] == pytest.approx([r["score"] for r in filtered], abs=1e-6)

    # the URL is the search: reloading it draws the same cards
    driver.get(driver.current_url)
    searched("")
    assert [c.get_attribute("data-id") for c in cards()] == [r["id"] for r in filtered]

    # "similar molecules" from a hit: a structure search with Tanimoto shown
    status = find(By.ID, "status").text
    cards()[0].find_element(By.CSS_SELECTOR, "button.similar").click()
    searched(status)
    assert "mode=molecule" in driver.current_url and "Tanimoto" in cards()[0].text

    # a bad SMILES and a bad SMARTS: the API's reason, inline
    smiles = find(By.ID, "q-smiles")
    smiles.clear()
    smiles.send_keys("C1CC", Keys.ENTER)
    error = wait_for(lambda: (e := find(By.ID, "error")).is_displayed() and e.text, what="the error")
    assert "invalid SMILES 'C1CC'" in error and not cards()
    smiles.clear()
    smiles.send_keys("CCO")
    find(By.ID, "f-smarts").send_keys("c1ccc(")
    find(By.ID, "search").click()
    wait_for(lambda: "invalid SMARTS" in find(By.ID, "error").text, what="the SMARTS error")
