// The search page: reads and writes its query in the URL, calls the JSON API, draws result cards.
"use strict";
const $ = (selector, root = document) => root.querySelector(selector);
const base = new URL(location.pathname.endsWith("/") ? location.pathname : location.pathname + "/", location.origin);
const api = (path) => new URL(path, base).toString();
const PROPS = [["mw", "MW", 2], ["clogp", "cLogP", 2], ["hbd", "HBD", 0], ["hba", "HBA", 0], ["tpsa", "TPSA", 1], ["rotatable_bonds", "Rot. bonds", 0]];
let uploaded = null;  // the text of an uploaded .mol/.sdf, until the next SMILES is typed

function mode() { return $("input[name=mode]:checked").value; }

function showMode() {
  const structure = mode() !== "text";
  $(".query[data-for=text]").hidden = structure;
  $(".query[data-for=structure]").hidden = !structure;
  $("#filters").hidden = mode() === "describe";
}

// The form as URL parameters (the page's state) and back.
function formParams() {
  const params = new URLSearchParams({ mode: mode() });
  params.set("q", mode() === "text" ? $("#q-text").value : $("#q-smiles").value);
  params.set("k", $("#k").value || "10");
  if (mode() !== "describe") {
    for (const [key] of PROPS) for (const end of ["min", "max"]) {
      const value = $(`#f-${key}-${end}`).value;
      if (value !== "") params.set(`${key}_${end}`, value);
    }
    if ($("#f-lipinski").value) params.set("lipinski", $("#f-lipinski").value);
    if ($("#f-smarts").value.trim()) params.set("smarts", $("#f-smarts").value.trim());
  }
  return params;
}

function fillForm(params) {
  const m = params.get("mode") || "text";
  const radio = $(`input[name=mode][value="${m}"]`);
  if (radio) radio.checked = true;
  (m === "text" ? $("#q-text") : $("#q-smiles")).value = params.get("q") || "";
  $("#k").value = params.get("k") || "10";
  for (const [key] of PROPS) for (const end of ["min", "max"]) $(`#f-${key}-${end}`).value = params.get(`${key}_${end}`) || "";
  $("#f-lipinski").value = params.get("lipinski") || "";
  $("#f-smarts").value = params.get("smarts") || "";
  const active = [...params.keys()].filter((k) => /_(min|max)$|^lipinski$|^smarts$/.test(k)).length;
  $("#filter-count").textContent = active ? `(${active} active)` : "";
  if (active) $("#filters").open = true;
  showMode();
}

// The same query as the JSON API takes it.
function apiBody(params) {
  const filters = {};
  for (const [key] of PROPS) {
    const low = params.get(`${key}_min`), high = params.get(`${key}_max`);
    if (low !== null || high !== null) filters[key] = [low === null ? null : Number(low), high === null ? null : Number(high)];
  }
  if (params.get("lipinski")) filters.lipinski = params.get("lipinski") === "pass";
  if (params.get("smarts")) filters.smarts = params.get("smarts");
  const body = { k: Number(params.get("k") || 10) };
  if (params.get("mode") === "text") body.text = params.get("q") || "";
  else if (uploaded && !params.get("q")) body.molfile = uploaded;
  else body.smiles = params.get("q") || "";
  if (Object.keys(filters).length && params.get("mode") !== "describe") body.filters = filters;
  return body;
}

function reason(detail) {
  if (typeof detail === "string") return detail;
  if (Array.isArray(detail)) return detail.map((e) => `${(e.loc || []).filter((p) => p !== "body").join(".")}: ${e.msg}`).join("\n");
  return JSON.stringify(detail);
}

async function search(params, push) {
  const endpoint = { text: "search/text", molecule: "search/molecule", describe: "describe" }[params.get("mode") || "text"];
  const error = $("#error"), status = $("#status"), main = document.querySelector("main");
  error.hidden = true;
  main.setAttribute("aria-busy", "true");
  status.textContent = "Searching…";
  $("#search").disabled = true;
  try {
    const response = await fetch(api(endpoint), { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify(apiBody(params)) });
    const answer = await response.json().catch(() => ({ detail: `${response.status} ${response.statusText}` }));
    if (!response.ok) throw new Error(reason(answer.detail));
    if (params.get("mode") !== "text" && !params.get("q")) { params.set("q", answer.query); $("#q-smiles").value = answer.query; uploaded = null; }
    if (push) history.pushState(null, "", "?" + params.toString());
    render(answer, params);
  } catch (failure) {
    error.textContent = failure.message;
    error.hidden = false;
    status.textContent = "";
    $("#results").replaceChildren();
    $(".export").hidden = true;
  } finally {
    main.setAttribute("aria-busy", "false");
    $("#search").disabled = false;
  }
}

function render(answer, params) {
  const results = $("#results");
  const cards = answer.results.map((r) => (params.get("mode") === "describe" ? descriptionCard(r) : moleculeCard(r)));
  results.replaceChildren(...cards);
  let line = `${answer.results.length} result${answer.results.length === 1 ? "" : "s"} for ${params.get("mode") === "text" ? "“" + answer.query + "”" : answer.query}`;
  if (answer.filter) line += ` · ${answer.filter.passed} of ${answer.filter.looked_at} candidates looked at passed the filters`;
  $("#status").textContent = line;
  const exportable = new URLSearchParams(params);
  $("#export-csv").href = api("export?" + exportable + "&format=csv");
  $("#export-sdf").href = api("export?" + exportable + "&format=sdf");
  $("#export-sdf").hidden = params.get("mode") === "describe";
  $(".export").hidden = false;
}

function moleculeCard(r) {
  const card = $("#molecule-card").content.firstElementChild.cloneNode(true);
  card.dataset.id = r.id;
  const img = $(".depiction", card);
  img.src = api(r.depiction);
  img.alt = `2D structure of ${r.name || r.id}`;
  $(".rank", card).textContent = `#${r.rank}`;
  const id = $(".id", card);
  id.textContent = r.id;
  if (r.url) id.href = r.url; else id.removeAttribute("href");
  $(".score", card).textContent = `score ${r.score.toFixed(3)}`;
  $(".tanimoto", card).textContent = r.tanimoto == null ? "" : `Tanimoto ${r.tanimoto.toFixed(2)}`;
  $(".name", card).textContent = r.name || "";
  $(".smiles", card).textContent = r.smiles;
  $(".inchikey", card).textContent = r.inchikey ? `InChIKey ${r.inchikey}` : "";
  const rows = [];
  for (let i = 0; i < PROPS.length; i += 2) {
    const tr = document.createElement("tr");
    for (const [key, label, digits] of PROPS.slice(i, i + 2)) {
      const name = document.createElement("td"), value = document.createElement("td");
      name.textContent = label;
      value.textContent = r.properties[key] == null ? "–" : Number(r.properties[key]).toFixed(digits);
      value.dataset.prop = key;
      value.dataset.value = r.properties[key];
      tr.append(name, value);
    }
    rows.push(tr);
  }
  const lipinski = document.createElement("tr");
  lipinski.innerHTML = `<td>Lipinski</td><td data-prop="lipinski" colspan="3"></td>`;
  const verdict = lipinski.lastElementChild;
  verdict.textContent = r.properties.lipinski ? `pass (${r.properties.lipinski_violations} violation${r.properties.lipinski_violations === 1 ? "" : "s"})` : `fail (${r.properties.lipinski_violations} violations)`;
  verdict.className = r.properties.lipinski ? "pass" : "fail";
  rows.push(lipinski);
  $(".props tbody", card).replaceChildren(...rows);
  $(".text", card).textContent = r.text || "";
  $(".copy", card).addEventListener("click", () => navigator.clipboard && navigator.clipboard.writeText(r.smiles));
  $(".similar", card).addEventListener("click", () => followUp("molecule", r.smiles));
  const describe = $(".describe", card);
  if (window.tmrInfo && window.tmrInfo.texts > 0) describe.addEventListener("click", () => followUp("describe", r.smiles));
  else describe.hidden = true;
  return card;
}

function descriptionCard(r) {
  const card = document.createElement("article");
  card.className = "card description";
  card.dataset.id = r.id;
  const body = document.createElement("div");
  body.className = "body";
  body.innerHTML = `<p class="head"><span class="rank"></span> <span class="id"></span> <span class="score"></span></p><p class="text"></p>`;
  $(".rank", body).textContent = `#${r.rank}`;
  $(".id", body).textContent = r.id;
  $(".score", body).textContent = `score ${r.score.toFixed(3)}`;
  $(".text", body).textContent = r.text;
  card.append(body);
  return card;
}

function followUp(newMode, smiles) {
  const params = formParams();
  params.set("mode", newMode);
  params.set("q", smiles);
  fillForm(params);
  window.scrollTo(0, 0);
  search(params, true);
}

document.addEventListener("DOMContentLoaded", async () => {
  for (const radio of document.querySelectorAll("input[name=mode]")) radio.addEventListener("change", showMode);
  $("#q-smiles").addEventListener("input", () => { uploaded = null; });
  $("#q-file").addEventListener("change", async (event) => {
    const file = event.target.files[0];
    if (!file) return;
    uploaded = await file.text();
    $("#q-smiles").value = "";
  });
  $("#q-text").addEventListener("keydown", (event) => {  // Enter searches; Shift+Enter is a new line
    if (event.key === "Enter" && !event.shiftKey) { event.preventDefault(); $("#search-form").requestSubmit(); }
  });
  $("#search-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const params = formParams();
    fillForm(params);
    search(params, true);
  });
  window.addEventListener("popstate", () => { fillForm(new URLSearchParams(location.search)); if (location.search) search(new URLSearchParams(location.search), false); });
  try {
    window.tmrInfo = await (await fetch(api("info"))).json();
    $("#library").textContent = `${window.tmrInfo.molecules.count.toLocaleString()} molecules` + (window.tmrInfo.texts ? ` · ${window.tmrInfo.texts.toLocaleString()} descriptions` : "");
    if (!window.tmrInfo.texts) $("input[name=mode][value=describe]").disabled = true;
  } catch (failure) { /* the page still searches */ }
  const params = new URLSearchParams(location.search);
  fillForm(params);
  if (params.get("q")) search(params, false);
});
