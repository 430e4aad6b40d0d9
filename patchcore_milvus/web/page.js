// The station's page: inspect an image, see its verdict and map, follow the recent inspections.
// Everything goes through the JSON API of the same server; text from it is set as text, never as HTML.
"use strict";

const POLL_MS = 2000;
const $ = (id) => document.getElementById(id);
const pictures = new Map(); // "id side" -> object URL of a picture already fetched
let shown = null; // the record in the main panel
const reviewed = new Set(); // inspections queued for the bank (or added to it) on review

function token() {
  return sessionStorage.getItem("patchcore-token") || "";
}

async function api(path, options = {}) {
  const headers = new Headers(options.headers || {});
  if (token()) headers.set("Authorization", `Bearer ${token()}`);
  const response = await fetch(path, { ...options, headers });
  if (response.status === 401) {
    $("token-box").hidden = false;
    throw new Error("this station needs its API token (above)");
  }
  if (!response.ok) {
    let reason = `${response.status} ${response.statusText}`;
    try {
      const body = await response.json();
      if (body.detail) reason = typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail);
    } catch (_) { /* not JSON: keep the status */ }
    throw new Error(reason);
  }
  return response;
}

async function picture(record, side) {
  const key = `${record.id} ${side}`;
  if (!pictures.has(key)) {
    const blob = await (await api(`${record.links.heat}?side=${side}`)).blob();
    pictures.set(key, URL.createObjectURL(blob));
  }
  return pictures.get(key);
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

async function loadCategories() {
  const { categories } = await (await api("/v1/categories")).json();
  for (const select of [$("category"), $("filter-category")]) {
    const chosen = select.value;
    for (const option of [...select.options]) if (option.value) option.remove();
    for (const bank of categories) {
      const option = document.createElement("option");
      option.value = option.textContent = bank.category;
      select.append(option);
    }
    if (chosen) select.value = chosen;
  }
  const current = categories.find((bank) => bank.category === $("category").value);
  $("bank").textContent = current ? `bank ${current.version}, ${current.vectors} vectors` : "no bank yet: ingest one";
}

async function inspect(file) {
  const category = $("category").value;
  if (!category) {
    showError("no category to inspect against: ingest a bank first");
    return;
  }
  showError("");
  $("busy").hidden = false;
  try {
    const query = new URLSearchParams({ category, name: file.name });
    const response = await api(`/v1/inspect?${query}`, { method: "POST", body: file });
    await show(await response.json());
    await refreshRecent();
  } catch (error) {
    showError(`${file.name}: ${error.message}`);
  } finally {
    $("busy").hidden = true;
  }
}

async function show(record) {
  const url = await picture(record, 1024); // first, so that the panel changes all at once
  shown = record;
  const verdict = record.verdict || "no threshold";
  $("verdict").textContent = verdict;
  $("verdict").className = record.verdict || "";
  $("name").textContent = `${record.name} · ${record.category} · ${record.time}`;
  const threshold = record.threshold;
  $("score").textContent = threshold == null
    ? `score ${record.score.toFixed(2)} (this bank has no threshold)`
    : `score ${record.score.toFixed(2)} against the threshold ${threshold.toFixed(2)}`;
  const share = threshold ? Math.min(record.score / (2 * threshold), 1) : 0;
  $("gauge-fill").style.width = `${(100 * share).toFixed(1)}%`;
  $("gauge-fill").className = record.verdict || "";
  $("color-low").textContent = record.colors.low.toFixed(1);
  $("color-high").textContent = record.colors.high.toFixed(1);
  $("heat").src = url;
  drawRegions(record);
  $("review").hidden = record.verdict !== "DEFECT";
  $("review-good").disabled = reviewed.has(record.id);
  $("review-state").textContent = reviewed.has(record.id) ? "queued for the bank" : "";
  $("result").hidden = false;
}

async function reviewGood() {
  const record = shown;
  $("review-good").disabled = true;
  try {
    const response = await api(`/v1/inspections/${record.id}/review`, {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ decision: "good" }),
    });
    reviewed.add(record.id);
    await response.json();
    $("review-state").textContent = "queued for the bank";
    await loadQueue();
  } catch (error) {
    $("review-good").disabled = false;
    showError(error.message);
  }
}

async function loadQueue() {
  const category = $("category").value;
  if (!category) return;
  const { queued, added, set_aside } = await (await api(`/v1/review/${encodeURIComponent(category)}`)).json();
  for (const decision of [...queued, ...added]) reviewed.add(decision.id);
  for (const id of set_aside) reviewed.add(id);
  $("queue").hidden = queued.length === 0 && !$("queue-state").dataset.done;
  $("review-append").hidden = queued.length === 0;
  if (queued.length) {
    $("queue-state").textContent = `${queued.length} part${queued.length > 1 ? "s" : ""} found good on review wait for the ${category} bank`;
  }
}

async function appendReviewed() {
  const category = $("category").value;
  $("review-append").disabled = true;
  $("queue-state").textContent = "adding them to the bank…";
  try {
    const answer = await (await api(`/v1/review/${encodeURIComponent(category)}/append`, { method: "POST" })).json();
    const aside = answer.set_aside.length ? ` (${answer.set_aside.length} unusable, set aside)` : "";
    $("queue-state").textContent = answer.published
      ? `${answer.added} added: the bank is now ${answer.version}${aside}`
      : `${answer.added} added: ${answer.version} covered them already, no new version${aside}`;
    $("queue-state").dataset.done = "1";
    await loadQueue();
    await loadCategories();
  } catch (error) {
    showError(error.message);
    await loadQueue().catch(() => {});
  } finally {
    $("review-append").disabled = false;
  }
}

function drawRegions(record) {
  for (const box of [...document.querySelectorAll("#picture .region")]) box.remove();
  $("regions").replaceChildren();
  for (const [index, region] of record.regions.entries()) {
    const [left, top, right, bottom] = region.box;
    const box = document.createElement("div");
    box.className = "region";
    box.style.left = `${(100 * left) / record.width}%`;
    box.style.top = `${(100 * top) / record.height}%`;
    box.style.width = `${(100 * (right - left)) / record.width}%`;
    box.style.height = `${(100 * (bottom - top)) / record.height}%`;
    $("picture").append(box);
    const item = document.createElement("li");
    item.textContent = `region ${index + 1}: ${right - left} × ${bottom - top} px at (${left}, ${top}), `
      + `${region.area} px above the pixel threshold, peak ${region.peak.toFixed(2)}`;
    $("regions").append(item);
  }
}

async function refreshRecent() {
  const query = new URLSearchParams();
  if ($("filter-category").value) query.set("category", $("filter-category").value);
  if ($("filter-verdict").value) query.set("verdict", $("filter-verdict").value);
  const { keep, inspections } = await (await api(`/v1/inspections?${query}`)).json();
  const rows = [];
  for (const record of inspections) {
    const row = document.createElement("tr");
    row.dataset.id = record.id;
    const thumbnail = document.createElement("img");
    thumbnail.alt = record.name;
    const cells = [thumbnail, record.verdict || "-", record.score.toFixed(2),
      record.time.slice(11, 19), record.category, record.name];
    for (const value of cells) {
      const cell = document.createElement("td");
      if (value instanceof Node) cell.append(value); else cell.textContent = value;
      row.append(cell);
    }
    row.children[1].className = record.verdict || "";
    row.addEventListener("click", () => show(record).catch((error) => showError(error.message)));
    rows.push(row);
    picture(record, 128).then((url) => { thumbnail.src = url; }).catch(() => {});
  }
  $("recent").replaceChildren(...rows);
  const live = new Set(inspections.map((record) => record.id));
  if (shown) live.add(shown.id);
  for (const [key, url] of pictures) {
    if (!live.has(key.split(" ")[0])) {
      URL.revokeObjectURL(url); // the station no longer keeps it: let the browser forget it too
      pictures.delete(key);
    }
  }
  $("recent-note").textContent = `the last ${keep} inspections of this station are kept`;
}

function setUp() {
  const drop = $("drop");
  $("file").addEventListener("change", () => {
    if ($("file").files.length) inspect($("file").files[0]);
    $("file").value = "";
  });
  drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    if (event.dataTransfer.files.length) inspect(event.dataTransfer.files[0]);
  });
  $("category").addEventListener("change", () => {
    delete $("queue-state").dataset.done;
    loadCategories().then(loadQueue).catch((error) => showError(error.message));
  });
  for (const filter of [$("filter-category"), $("filter-verdict")]) {
    filter.addEventListener("change", () => refreshRecent().catch((error) => showError(error.message)));
  }
  $("review-good").addEventListener("click", reviewGood);
  $("review-append").addEventListener("click", appendReviewed);
  $("token-form").addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem("patchcore-token", $("token").value);
    $("token-box").hidden = true;
    start();
  });
  start();
  setInterval(() => refreshRecent().catch(() => {}), POLL_MS);
}

function start() {
  showError("");
  loadCategories().then(refreshRecent).then(loadQueue).catch((error) => showError(error.message));
}

setUp();
