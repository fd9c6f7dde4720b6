// cxr SMART app — plain JS, same-origin JSON only (tokens never reach the browser).
"use strict";

const FINDINGS = ["Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule",
  "Pneumonia", "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis",
  "Pleural_Thickening", "Hernia"];

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    // CSSOM, not a style attribute: the page's CSP allows no inline styles.
    else if (k === "style") Object.assign(node.style, v);
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children) if (c !== null && c !== undefined) node.append(c);
  return node;
}

class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

async function api(path) {
  const resp = await fetch(path, { headers: { Accept: "application/json" }, credentials: "same-origin" });
  const body = await resp.json().catch(() => ({}));
  if (!resp.ok) throw new ApiError(resp.status, body.error || `HTTP ${resp.status}`);
  return body;
}

function showError(err) {
  const box = document.getElementById("error");
  if (!box) return;
  if (!err) { box.hidden = true; box.textContent = ""; return; }
  box.hidden = false;
  box.textContent = err.status === 401 ? "Not signed in: open this app from your EHR." : `Could not load: ${err.message}`;
}

// "patient": one patient's record (a patient launch); "user": all recent studies.
const app = { mode: "patient" };

function fmt(p) { return p === null || p === undefined ? "–" : Number(p).toFixed(2); }
// Operating points go down to 0.00044: four significant digits, never "0.00".
function fmtThreshold(t) { return t === null || t === undefined ? "–" : Number(Number(t).toPrecision(4)).toString(); }

function since(iso) {
  if (!iso) return "–";
  const s = Math.max(0, (Date.now() - Date.parse(iso)) / 1000);
  if (s < 60) return `${Math.round(s)} s ago`;
  if (s < 3600) return `${Math.round(s / 60)} min ago`;
  if (s < 86400) return `${Math.round(s / 3600)} h ago`;
  return `${Math.round(s / 86400)} d ago`;
}

function setBanner(untrained) {
  const banner = document.getElementById("banner");
  banner.hidden = !untrained;
  banner.textContent = untrained
    ? "UNTRAINED MODEL — NOT A FINDING. These AI-generated numbers come from a model without trained weights (test/demo mode) and carry no clinical meaning."
    : "";
}

async function signOut() {
  // The CSRF token comes from /app/api/context, which only same-origin script can read.
  await fetch("/app/logout", { method: "POST", credentials: "same-origin", headers: { "X-Cxr-Csrf": app.csrf } });
  location.href = "/app/";
}

async function loadContext() {
  const ctx = await api("/app/api/context");
  app.mode = ctx.mode;
  app.csrf = ctx.csrf;
  const logout = document.getElementById("logout");
  logout.hidden = false;
  logout.addEventListener("click", signOut);
  document.body.dataset.mode = ctx.mode;
  const label = document.getElementById("patient");
  if (ctx.mode === "user") {
    label.textContent = `All patients · signed in as ${ctx.user || "the EHR user"}`;
  } else {
    const p = ctx.patient;
    label.textContent =
      `${p.name}${p.gender ? " · " + p.gender : ""}${p.birthDate ? " · born " + p.birthDate : ""}`;
  }
  return ctx;
}

// --- worklist -----------------------------------------------------------------------------

function statusBadge(row) {
  const badge = el("span", { class: `badge status-${row.status}`, title: row.reason || null, text: row.status });
  if (row.status !== "done") return badge;
  const review = row.reviewed
    ? el("span", { class: "badge reviewed", "data-reviewed": "true", text: `reviewed (${row.report_status})` })
    : el("span", { class: "badge unreviewed", "data-reviewed": "false", text: "AI only, unreviewed" });
  return el("span", {}, badge, " ", review);
}

function renderWorklist(rows) {
  const body = document.querySelector("#worklist tbody");
  const user = app.mode === "user";
  const trs = rows.map((row, i) => {
    const findings = (row.top_findings || []).map((f) =>
      `${f.text} ${fmt(f.score)}${f.positive ? " ▲" : ""}`).join(", ");
    const patient = row.patient || null;
    return el("tr", { "data-study": row.id, "data-status": row.status, "data-patient": patient ? patient.id : null,
      "data-priority": row.priority || null,
      "data-reviewed": row.status === "done" ? String(Boolean(row.reviewed)) : null,
      class: row.pneumothorax_positive ? "critical" : null },
      el("td", { text: String(i + 1) }),
      user ? el("td", { class: "patient-cell", text: patient ? patient.name : "–" }) : null,
      el("td", {}, el("a", { href: `/app/study/${encodeURIComponent(row.id)}` }, `${row.description} (${row.id})`)),
      el("td", { class: `priority priority-${row.priority || "routine"}`, title: row.priority_source || "no order priority",
        text: (row.priority || "routine").toUpperCase() }),
      el("td", {}, statusBadge(row)),
      el("td", { class: "num", text: row.status !== "done" ? "–"
        : `${fmt(row.urgency)}${row.pneumothorax_positive ? " · pneumothorax ▲" : ""}` }),
      el("td", { text: findings || (row.status === "failed" ? row.reason : "–") }),
      el("td", { "data-posted": row.posted || "", text: since(row.posted) }),
      el("td", { class: "why muted", text: row.why || "" }));
  });
  body.replaceChildren(...trs);
  if (!rows.length) body.append(el("tr", {}, el("td", { colspan: user ? 9 : 8, text: user ? "No recent studies." : "No studies for this patient." })));
  setBanner(rows.some((r) => r.untrained) || Boolean(app.adhocUntrained));
  const table = document.getElementById("worklist");
  table.dataset.rendered = String(rows.length);
  table.dataset.polls = String(Number(table.dataset.polls || 0) + 1);
  document.getElementById("updated").textContent = `Updated ${new Date().toLocaleTimeString()}`;
}

function showMode() {
  const user = app.mode === "user";
  document.getElementById("col-patient").hidden = !user;
  const note = document.getElementById("scope-note");
  note.hidden = !user;
  note.textContent = user ? "User-level launch: the most recently updated studies of every patient." : "";
  document.getElementById("worklist-caption").textContent = user
    ? "Recent studies of all patients, most urgent first" : "Studies of the launched patient, most urgent first";
}

async function uploadImage(file) {
  const status = document.getElementById("upload-status");
  const type = imageType(file);
  if (!["image/png", "image/jpeg", "application/dicom"].includes(type)) {
    status.textContent = `${file.name} is not a PNG, JPEG or DICOM image.`;
    return;
  }
  status.textContent = `Uploading ${file.name}…`;
  try {
    const body = { image: await fileBase64(file), content_type: type, name: file.name };
    const { study } = await postJson("/app/api/upload", body);
    status.textContent = `Saved as study ${study}; opening it…`;
    location.href = `/app/study/${encodeURIComponent(study)}?uploaded=${Date.now()}`;
  } catch (err) {
    status.textContent = `Upload failed: ${err.message}`;
  }
}

// A launch that may write saves the image to the patient's record (and the pipeline reads
// it); any other launch gets an ad-hoc analysis that is shown here and saved nowhere.
async function analyzeImage(file) {
  const status = document.getElementById("upload-status");
  const type = imageType(file);
  if (!["image/png", "image/jpeg", "application/dicom"].includes(type)) {
    status.textContent = `${file.name} is not a PNG, JPEG or DICOM image.`;
    return;
  }
  status.textContent = `Analysing ${file.name} (not saved)…`;
  try {
    const body = { image: await fileBase64(file), content_type: type, name: file.name };
    renderAdhoc(await postJson("/app/api/analyze", body));
    status.textContent = `${file.name} analysed; not saved to the record.`;
  } catch (err) {
    status.textContent = `Analysis failed: ${err.message}`;
  }
}

function renderAdhoc(result) {
  const section = document.getElementById("adhoc");
  document.getElementById("adhoc-title").textContent = `Ad-hoc analysis of ${result.name}`;
  document.getElementById("adhoc-conclusion").textContent = result.conclusion;
  const items = result.findings.map((f) => el("li", { "data-finding": f.finding, "data-positive": String(f.positive) },
    el("span", { class: "fname", text: f.text + (f.positive ? " ▲" : "") }),
    el("span", { class: "fval", text: ` ${f.score_kind} ${fmt(f.score)}, threshold ${fmtThreshold(f.threshold)}` }),
    result.heatmaps[f.finding]
      ? el("img", { src: result.heatmaps[f.finding], alt: `Heatmap: where the model looked for ${f.text}`, width: 256, height: 256 }) : null));
  document.getElementById("adhoc-findings").replaceChildren(...items);
  app.adhocUntrained = result.untrained;
  setBanner(result.untrained || document.getElementById("banner").hidden === false);
  section.dataset.count = String(items.length);
  section.hidden = false;
}

function wireUpload(ctx) {
  const zone = document.getElementById("upload");
  const saves = ctx.mode === "patient" && ctx.can_upload;
  document.getElementById("upload-note").hidden = saves;
  if (!saves) {
    document.getElementById("upload-label").textContent = "Analyse an X-ray (not saved to the record)";
    document.getElementById("upload-hint").textContent = "or drop a PNG, JPEG or DICOM here: the AI reads it; nothing is written to the record.";
  }
  zone.dataset.saves = String(saves);
  zone.hidden = false;
  const send = saves ? uploadImage : analyzeImage;
  const input = document.getElementById("upload-image");
  input.addEventListener("change", () => { if (input.files.length) send(input.files[0]); });
  zone.addEventListener("dragover", (ev) => { ev.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (ev) => {
    ev.preventDefault(); zone.classList.remove("over");
    if (ev.dataTransfer.files.length) send(ev.dataTransfer.files[0]);
  });
}

async function worklistPage() {
  let interval = 3;
  let ctx;
  try { ctx = await loadContext(); interval = ctx.poll_interval_s; } catch (err) { showError(err); return; }
  showMode();
  wireUpload(ctx);
  const poll = async () => {
    try { renderWorklist((await api("/app/api/worklist")).studies); showError(null); }
    catch (err) { showError(err); if (err.status === 401) return; }
    setTimeout(poll, interval * 1000);
  };
  await poll();
}

// --- study viewer -------------------------------------------------------------------------

const viewer = { study: null, xray: null, overlay: null, overlayFinding: null, token: 0 };

function loadImage(src) {
  return new Promise((resolve, reject) => {
    const img = new Image();
    img.onload = () => resolve(img);
    img.onerror = () => reject(new Error(`cannot load ${src}`));
    img.src = src;
  });
}

function draw() {
  const canvas = document.getElementById("xray");
  const ctx = canvas.getContext("2d");
  ctx.globalAlpha = 1;
  ctx.fillStyle = "#000";
  ctx.fillRect(0, 0, canvas.width, canvas.height);
  const img = viewer.xray;
  if (img) {
    // The model (and the heatmap) sees the centre square of the image.
    const side = Math.min(img.naturalWidth, img.naturalHeight);
    const sx = (img.naturalWidth - side) / 2, sy = (img.naturalHeight - side) / 2;
    ctx.drawImage(img, sx, sy, side, side, 0, 0, canvas.width, canvas.height);
  }
  if (viewer.overlay) {
    ctx.globalAlpha = Number(document.getElementById("opacity").value) / 100;
    ctx.drawImage(viewer.overlay, 0, 0, canvas.width, canvas.height);
    ctx.globalAlpha = 1;
  }
  canvas.dataset.overlay = viewer.overlay ? viewer.overlayFinding : "";
}

async function showHeatmap(finding, button) {
  const token = ++viewer.token;
  const status = document.getElementById("overlay-status");
  document.querySelectorAll(".finding-button").forEach((b) => b.setAttribute("aria-pressed", String(b === button && viewer.overlayFinding !== finding)));
  if (viewer.overlayFinding === finding) {
    viewer.overlay = null; viewer.overlayFinding = null; draw();
    status.textContent = "No heatmap shown."; return;
  }
  status.textContent = `Loading heatmap for ${finding.replace("_", " ")}…`;
  try {
    const img = await loadImage(`/app/api/heatmap/${encodeURIComponent(viewer.study)}/${encodeURIComponent(finding)}`);
    if (token !== viewer.token) return;
    viewer.overlay = img; viewer.overlayFinding = finding; draw();
    status.textContent = `Heatmap (class activation map): ${finding.replace("_", " ")} — where the model looked, not a segmentation.`;
  } catch (err) {
    if (token === viewer.token) status.textContent = `Heatmap unavailable: ${err.message}`;
  }
}

function findingItem(f) {
  const pct = (x) => `${Math.max(0, Math.min(1, Number(x))) * 100}%`;
  const bar = el("span", { class: "bar", "aria-hidden": "true" },
    f.band_low !== null && f.band_high !== null
      ? el("span", { class: "band", style: { left: pct(f.band_low), width: `calc(${pct(f.band_high)} - ${pct(f.band_low)})` } }) : null,
    el("span", { class: `fill${f.positive ? " positive" : ""}`, style: { width: pct(f.score) } }),
    f.threshold !== null ? el("span", { class: "threshold", style: { left: pct(f.threshold) } }) : null);
  const band = f.band_kind ? `, ${f.band_kind} ${fmt(f.band_low)} to ${fmt(f.band_high)}` : "";
  const label = `${f.text}: ${f.score_kind} ${fmt(f.score)}${band}, operating threshold ${fmtThreshold(f.threshold)}${f.positive ? ", at or above threshold" : ""}. Show heatmap.`;
  const button = el("button", { type: "button", class: "finding-button", "aria-pressed": "false", "aria-label": label, "data-finding": f.finding },
    el("span", { class: "fname", text: f.text + (f.positive ? " ▲" : "") }),
    el("span", { class: "fval", text: `${fmt(f.score)}${f.band_kind ? ` [${fmt(f.band_low)}–${fmt(f.band_high)}]` : ""} thr ${fmtThreshold(f.threshold)}`, title: f.band_kind ? `${f.score_kind}; ${f.band_kind}` : f.score_kind }),
    bar);
  button.addEventListener("click", () => showHeatmap(f.finding, button));
  return el("li", { "data-finding": f.finding, "data-observation": f.observation,
    "data-status": f.status || "", "data-reviews": String((f.reviews || []).length) },
  button, reviewBox(f));
}

// --- review: agree / disagree / uncertain on each finding -----------------------------------

const VERDICT_TEXT = { agree: "agreed", disagree: "disagreed", uncertain: "uncertain" };

function reviewBox(f) {
  const reviews = f.reviews || [];
  const done = reviews.map((r) =>
    el("li", { class: `review-${r.verdict}`, "data-verdict": r.verdict },
      `${r.reviewer.replace("Practitioner/", "")} ${VERDICT_TEXT[r.verdict]}${r.comment ? ": " + r.comment : ""}`));
  const box = el("div", { class: "review" },
    done.length ? el("ul", { class: "reviews", "aria-label": `Reviews of ${f.text}` }, ...done) : null);
  if (!viewer.canReview) return box;
  const label = `Comment on ${f.text} (optional)`;
  const comment = el("input", { type: "text", class: "review-comment", "aria-label": label, maxlength: 2000,
    placeholder: "comment (optional)" });
  const status = el("span", { class: "review-status muted", "aria-live": "polite" });
  const buttons = ["agree", "disagree", "uncertain"].map((verdict) =>
    el("button", { type: "button", class: `verdict verdict-${verdict}`, "data-verdict": verdict,
      "aria-label": `${verdict[0].toUpperCase() + verdict.slice(1)} with ${f.text}`,
      onclick: () => submitReview(f, verdict, comment, status, buttons) },
    verdict[0].toUpperCase() + verdict.slice(1)));
  box.append(el("div", { class: "review-actions" }, ...buttons, comment, status));
  return box;
}

function reviewId() {
  const bytes = new Uint8Array(16);
  crypto.getRandomValues(bytes);
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

async function submitReview(f, verdict, comment, status, buttons) {
  buttons.forEach((b) => { b.disabled = true; });
  status.textContent = "Saving…";
  // One id per submission: resending it (a retry) records nothing twice.
  const body = { review_id: reviewId(), decisions: [{ observation: f.observation, verdict, comment: comment.value.trim() || null }] };
  try {
    const answer = await postJson(`/app/api/review/${encodeURIComponent(viewer.study)}`, body);
    status.textContent = `Saved (${Math.round(answer.transaction_ms)} ms).`;
    document.getElementById("findings").dataset.lastReviewMs = String(answer.transaction_ms);
    renderStudy(await api(`/app/api/study/${encodeURIComponent(viewer.study)}`));
  } catch (err) {
    status.textContent = `Not saved: ${err.message}`;
    buttons.forEach((b) => { b.disabled = false; });
  }
}

function pendingText() {
  const uploaded = Number(new URLSearchParams(location.search).get("uploaded"));
  if (!uploaded) return "Analysis pending…";
  const s = Math.max(0, Math.round((Date.now() - uploaded) / 1000));
  return `Uploaded to the record; waiting for the AI result (${s} s)… the page updates by itself.`;
}

function reviewSummary(s) {
  const r = s.review || { reviewed: 0, total: 0 };
  const report = s.report;
  if (!report) return "";
  const by = (report.interpreters || []).map((p) => p.replace("Practitioner/", "")).join(", ");
  if (["final", "amended", "corrected"].includes(report.status))
    return `Report ${report.status}: reviewed by ${by || "a radiologist"} (${r.reviewed}/${r.total} findings).`;
  return `AI-generated report, status ${report.status} (not reviewed by a radiologist; ${r.reviewed}/${r.total} findings reviewed).`;
}

function renderStudy(s) {
  document.getElementById("study-title").textContent = `${s.description} (${s.id})`;
  document.title = `Study ${s.id} — cxr`;
  document.getElementById("study-meta").textContent =
    `${s.patient ? s.patient.name + " · " : ""}${s.modality || "X-ray"} · posted ${since(s.posted)} · status ${s.status}`;
  setBanner(s.untrained);
  const report = s.report;
  viewer.canReview = Boolean(s.review && s.review.can_review);
  const reportStatus = document.getElementById("report-status");
  reportStatus.textContent = report
    ? reviewSummary(s)
    : s.status === "failed" ? `Analysis failed: ${s.failure}` : pendingText();
  reportStatus.dataset.reportStatus = report ? report.status : "";
  document.getElementById("conclusion").textContent = report ? report.conclusion : "";
  const sorted = [...s.findings].sort((a, b) => b.score - a.score);
  document.getElementById("findings").replaceChildren(...sorted.map(findingItem));
  document.getElementById("findings").dataset.count = String(sorted.length);
}

function similarQuery(text) {
  const q = new URLSearchParams();
  if (text) q.set("text", text); else q.set("study", viewer.study);
  q.set("count", document.getElementById("filter-count").value);
  q.set("exclude-same-patient", document.getElementById("same-patient").checked ? "false" : "true");
  const finding = document.getElementById("filter-finding").value;
  if (finding) q.set("finding", finding);
  const view = document.getElementById("filter-view").value;
  if (view) q.set("view-position", view);
  return `/app/api/similar?${q}`;
}

function renderSimilar(results, what, query) {
  const note = document.getElementById("similar-note");
  const list = document.getElementById("similar-results");
  list.replaceChildren(...results.map((r) => el("li", { "data-study": r.id,
    "data-patient": r.patient ? r.patient.id : null, "data-same-patient": String(r.same_patient) },
    el("img", { src: `/app/api/image/${encodeURIComponent(r.id)}?size=96`, alt: `Thumbnail of study ${r.id}`, width: 96, height: 96, loading: "lazy" }),
    el("div", {},
      el("a", { href: `/app/study/${encodeURIComponent(r.id)}` }, `${r.description} (${r.id})`),
      el("div", { class: "muted", text: `score ${fmt(r.score)}${r.patient ? " · " + r.patient.name : ""}${r.same_patient ? " · same patient" : ""} · ${r.status}` }),
      el("div", { text: r.findings.map((f) => `${f.text} ${fmt(f.score)}`).join(", ") || "–" })))));
  // Say only what the app guarantees: in a patient launch it asks for this patient's
  // studies only and checks every result (the EHR need not filter them).
  const visible = app.mode === "user"
    ? "Studies of every patient your EHR account may read are included (user-level launch)."
    : "Only this patient's studies are searched and shown (patient launch).";
  note.textContent = `${results.length} result(s) ${what}. ${visible}`;
  list.dataset.query = query;
}

async function loadSimilar() {
  const text = document.getElementById("similar-text").value.trim();
  const note = document.getElementById("similar-note");
  note.textContent = "Searching…";
  try {
    const { results } = await api(similarQuery(text));
    renderSimilar(results, text ? `for “${text}”` : "similar to this study", text || `study:${viewer.study}`);
  } catch (err) {
    note.textContent = `Similar cases unavailable: ${err.message}`;
  }
}

// A dropped (or chosen) PNG, JPEG or DICOM: its bytes go to the server, which asks $similar.
function imageType(file) {
  if (["image/png", "image/jpeg", "application/dicom"].includes(file.type)) return file.type;
  const name = file.name.toLowerCase();
  if (name.endsWith(".dcm") || name.endsWith(".dicom")) return "application/dicom";
  if (name.endsWith(".png")) return "image/png";
  if (name.endsWith(".jpg") || name.endsWith(".jpeg")) return "image/jpeg";
  return file.type || "";
}

function fileBase64(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(String(reader.result).split(",", 2)[1] || "");
    reader.onerror = () => reject(new Error(`cannot read ${file.name}`));
    reader.readAsDataURL(file);
  });
}

async function postJson(path, body) {
  const resp = await fetch(path, { method: "POST", credentials: "same-origin",
    headers: { "Content-Type": "application/json", Accept: "application/json", "X-Cxr-Csrf": app.csrf },
    body: JSON.stringify(body) });
  const answer = await resp.json().catch(() => ({}));
  if (!resp.ok) throw new ApiError(resp.status, answer.error || `HTTP ${resp.status}`);
  return answer;
}

async function searchByImage(file) {
  const note = document.getElementById("similar-note");
  note.textContent = `Searching by ${file.name}…`;
  const params = { count: document.getElementById("filter-count").value,
    "exclude-same-patient": document.getElementById("same-patient").checked ? "false" : "true" };
  const finding = document.getElementById("filter-finding").value;
  if (finding) params.finding = finding;
  const view = document.getElementById("filter-view").value;
  if (view) params["view-position"] = view;
  const type = imageType(file);
  if (!["image/png", "image/jpeg", "application/dicom"].includes(type)) {
    // The server refuses it too; saying so here spares a round trip.
    note.textContent = `Search by image failed: ${file.name} is not a PNG, JPEG or DICOM image.`;
    return;
  }
  try {
    const body = { image: await fileBase64(file), content_type: type, params };
    const { results } = await postJson("/app/api/similar-image", body);
    renderSimilar(results, `similar to ${file.name}`, `image:${file.name}`);
  } catch (err) {
    note.textContent = `Search by image failed: ${err.message}`;
  }
}

function wireImageDrop() {
  const zone = document.getElementById("similar-drop");
  const input = document.getElementById("similar-image");
  input.addEventListener("change", () => { if (input.files.length) searchByImage(input.files[0]); });
  zone.addEventListener("dragover", (ev) => { ev.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (ev) => {
    ev.preventDefault(); zone.classList.remove("over");
    if (ev.dataTransfer.files.length) searchByImage(ev.dataTransfer.files[0]);
  });
}

async function studyPage() {
  viewer.study = decodeURIComponent(location.pathname.split("/").pop());
  const opacity = document.getElementById("opacity");
  opacity.addEventListener("input", () => {
    document.getElementById("opacity-value").textContent = `${opacity.value}%`;
    draw();
  });
  const sel = document.getElementById("filter-finding");
  for (const f of FINDINGS) sel.append(el("option", { value: f, text: f.replace("_", " ") }));
  document.getElementById("similar-form").addEventListener("submit", (ev) => { ev.preventDefault(); loadSimilar(); });
  document.getElementById("similar-reset").addEventListener("click", () => { document.getElementById("similar-text").value = ""; loadSimilar(); });
  wireImageDrop();
  for (const id of ["same-patient", "filter-finding", "filter-view", "filter-count"])
    document.getElementById(id).addEventListener("change", loadSimilar);
  let interval = 3;
  try { interval = (await loadContext()).poll_interval_s; } catch (err) { showError(err); return; }
  // A patient launch searches this patient's studies only: "exclude same patient" would
  // leave nothing, so the toggle is a user-level launch's alone.
  document.getElementById("same-patient-filter").hidden = app.mode !== "user";
  draw();
  let similarShown = false;
  const poll = async () => {
    try {
      const s = await api(`/app/api/study/${encodeURIComponent(viewer.study)}`);
      renderStudy(s); showError(null);
      if (s.status === "pending") { setTimeout(poll, interval * 1000); return; }
    } catch (err) { showError(err); }
    // A pending study (e.g. just uploaded) has no embedding yet: its similar cases come
    // once the result is there.
    if (!similarShown) { similarShown = true; loadSimilar(); }
  };
  const firstAnswer = poll();
  loadImage(`/app/api/image/${encodeURIComponent(viewer.study)}`)
    .then((img) => { viewer.xray = img; draw(); document.getElementById("xray").dataset.loaded = "true"; })
    // The study's own error (e.g. 403, another patient's study) says more than this one:
    // the image's error waits for the study's first answer and shows only if there is none.
    .catch((err) => firstAnswer.finally(() => {
      if (document.getElementById("error").hidden) showError(err);
    }));
  await firstAnswer;
}

document.addEventListener("DOMContentLoaded", () => {
  const page = document.body.dataset.page;
  if (page === "worklist") worklistPage();
  else if (page === "study") studyPage();
});
