// chattune ui: one page, four views (#/runs, #/new, #/run/<id>, #/chat/<id>). Everything shown is read
// from the server, which reads the run directories; a reload re-attaches to the same run stream.
"use strict";

const $ = (sel) => document.querySelector(sel);
const el = (tag, attrs = {}, ...kids) => {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "text") e.textContent = v;
    else if (k.startsWith("data-") || k === "class" || k === "type" || k === "name" || k === "href" || k === "for") e.setAttribute(k, v);
    else e[k] = v;
  }
  for (const kid of kids) e.append(kid);
  return e;
};

// ---- languages: English and Chinese from i18n.json; the browser's language first, then the toggle ----
let STRINGS = {}, LANG = "en";
const t = (key) => (STRINGS[LANG] && STRINGS[LANG][key]) || STRINGS.en[key] || key;
const LANG_HOOKS = {}; // texts drawn from data (states, chart titles, the system prompt line), redrawn on a switch
function applyLang() {
  document.documentElement.lang = LANG === "zh" ? "zh-CN" : "en";
  for (const e of document.querySelectorAll("[data-i18n]")) e.textContent = t(e.dataset.i18n);
  $("#lang-toggle").textContent = LANG === "zh" ? "English" : "中文";
  for (const hook of Object.values(LANG_HOOKS)) hook();
}
$("#lang-toggle").addEventListener("click", () => {
  LANG = LANG === "zh" ? "en" : "zh";
  localStorage.setItem("chattune-lang", LANG);
  applyLang();
});

async function api(path, opts = {}) {
  const init = { ...opts, headers: { ...(opts.headers || {}) } };
  if (opts.json !== undefined) {
    init.method = init.method || "POST";
    init.body = JSON.stringify(opts.json);
    init.headers["Content-Type"] = "application/json";
  }
  const r = await fetch(path, init);
  const body = await r.json().catch(() => ({ error: `HTTP ${r.status}` }));
  if (!r.ok) throw Object.assign(new Error(body.error || `HTTP ${r.status}`), { field: body.field, status: r.status });
  return body;
}
function showError(node, err) {
  node.hidden = !err;
  node.textContent = err ? String(err.message || err) : "";
}
const fmt = (v, d = 4) => (v === null || v === undefined ? "—" : typeof v === "number" ? (Number.isInteger(v) ? String(v) : v.toPrecision(d)) : String(v));
const fmtTime = (s) => (s === null || s === undefined ? "—" : s < 90 ? `${Math.round(s)} s` : s < 5400 ? `${Math.round(s / 60)} min` : `${(s / 3600).toFixed(1)} h`);

// ---- copy buttons ----
document.addEventListener("click", (ev) => {
  const b = ev.target.closest("button.copy");
  if (!b) return;
  const text = document.getElementById(b.dataset.copy).textContent;
  (navigator.clipboard ? navigator.clipboard.writeText(text) : Promise.reject()).catch(() => {
    const ta = el("textarea", { value: text });
    document.body.append(ta); ta.select(); document.execCommand("copy"); ta.remove();
  });
});

// ---- views ----
let leaveView = () => {};
async function route() {
  leaveView(); leaveView = () => {};
  const [, view, ...rest] = (location.hash || "#/runs").split("/");
  const arg = decodeURIComponent(rest.join("/"));
  for (const s of document.querySelectorAll("main > section")) s.hidden = s.id !== `view-${view}`;
  for (const a of document.querySelectorAll("nav a")) a.classList.toggle("active", a.dataset.tab === view);
  if (view === "runs") leaveView = showRuns();
  else if (view === "new") await showNew(arg);
  else if (view === "run") leaveView = showRun(arg);
  else if (view === "chat") await showChat(arg);
  else location.hash = "#/runs";
}
window.addEventListener("hashchange", route);

// ---- Runs ----
function showRuns() {
  let timer = null;
  const load = async () => {
    try {
      const rows = await api("/api/runs");
      const body = $("#runs-table tbody");
      body.replaceChildren(...rows.map((r) => el("tr", { "data-run": r.id },
        el("td", {}, el("input", { type: "checkbox", value: r.id, class: "pick" })),
        el("td", {}, el("a", { href: `#/run/${encodeURIComponent(r.id)}`, text: r.id })),
        el("td", {}, el("span", { class: `state ${r.state}`, "data-state": r.state, text: t(`state.${r.state}`), title: r.why })),
        el("td", { text: fmt(r.model) }), el("td", { text: fmt(Array.isArray(r.data) ? r.data.join(", ") : r.data) }),
        el("td", { text: fmt(r.steps) }), el("td", { text: fmt(r.best_eval_loss) }), el("td", { text: fmtTime(r.wall_s) }),
        el("td", {}, r.report ? el("a", { href: `/runs/${r.id}/report.html`, target: "_blank", text: "report.html" }) : ""))));
      $("#runs-empty").hidden = rows.length > 0;
      showError($("#banner"), null);
    } catch (e) { showError($("#banner"), e); }
  };
  load();
  timer = setInterval(load, 3000);
  return () => clearInterval(timer);
}
$("#compare").addEventListener("click", () => {
  const ids = [...document.querySelectorAll("input.pick:checked")].map((c) => c.value);
  if (ids.length < 2) { showError($("#banner"), t("runs.pick2")); return; }
  window.open("/api/compare?" + ids.map((i) => "id=" + encodeURIComponent(i)).join("&"), "_blank");
});

// ---- New run: the form is built from /api/schema (the config dataclasses) ----
let SCHEMA = null;
function fieldInput(f) {
  const id = "f-" + f.key;
  if (f.kind === "bool") return el("input", { type: "checkbox", id, name: f.key, checked: f.text });
  if (f.kind === "choice") {
    const s = el("select", { id, name: f.key });
    if (f.nullable) s.append(el("option", { value: "", text: "(null)" }));
    for (const c of f.choices) s.append(el("option", { value: c, text: c }));
    s.value = f.text;
    return s;
  }
  return el("input", { type: "text", id, name: f.key, value: f.text, placeholder: f.nullable ? "null" : "" });
}
function buildForm() {
  const form = $("#config-form");
  form.replaceChildren();
  for (const sec of SCHEMA) {
    const fs = el("fieldset", { "data-section": sec.section }, el("legend", { text: sec.section }));
    if (sec.doc) fs.append(el("p", { class: "muted", text: sec.doc }));
    for (const f of sec.fields) {
      fs.append(el("div", { class: "field", "data-key": f.key },
        el("label", { for: "f-" + f.key }, el("code", { text: f.key })),
        fieldInput(f),
        el("span", { class: "type", text: `${f.type} = ${JSON.stringify(f.default)}` }),
        el("div", { class: "doc", text: f.doc }),
        el("div", { class: "error field-error", "data-error-for": f.key, hidden: true })));
    }
    form.append(fs);
  }
}
function setValues(values) {
  for (const sec of SCHEMA) for (const f of sec.fields) {
    const input = document.getElementById("f-" + f.key);
    const v = f.key in values ? values[f.key] : f.text;
    if (f.kind === "bool") input.checked = !!v; else input.value = v;
  }
}
function formValues() {
  const values = {};
  for (const sec of SCHEMA) for (const f of sec.fields) {
    const input = document.getElementById("f-" + f.key);
    values[f.key] = f.kind === "bool" ? input.checked : input.value;
  }
  return values;
}
function showFieldError(err) {
  for (const e of document.querySelectorAll(".field-error")) { e.hidden = true; e.textContent = ""; }
  document.querySelectorAll(".field.bad").forEach((f) => f.classList.remove("bad"));
  showError($("#form-error"), err);
  if (!err || !err.field) return;
  const key = err.field.replace(/\[\d+\]$/, "");
  const slot = document.querySelector(`[data-error-for="${CSS.escape(key)}"]`);
  if (slot) {
    slot.hidden = false; slot.textContent = err.message;
    slot.parentElement.classList.add("bad");
    slot.parentElement.scrollIntoView({ block: "center" });
  }
}
async function showNew(arg) {
  if (!SCHEMA) { SCHEMA = await api("/api/schema"); buildForm(); }
  const meta = await api("/api/meta");
  const runs = await api("/api/runs"), shipped = await api("/api/configs");
  const from = $("#start-from");
  from.replaceChildren(el("option", { value: "", text: t("new.defaults") }),
    ...shipped.map((name) => el("option", { value: "configs/" + name, text: `configs/${name}` })),
    ...runs.filter((r) => r.model).map((r) => el("option", { value: r.id, text: `${t("new.previous")} ${r.id}` })));
  setValues({ "train.output_dir": meta.default_output_dir });
  if (arg) { from.value = arg; await loadFrom(arg, meta); }
  $("#preview").hidden = true;
  showFieldError(null);
}
async function loadFrom(id, meta) {
  try {
    const path = id.startsWith("configs/") ? `/api/configs/${encodeURIComponent(id.slice(8))}` : `/api/runs/${id}/config`;
    const values = id ? (await api(path)).values : {};
    setValues({ ...values, "train.output_dir": (meta || (await api("/api/meta"))).default_output_dir });
    showFieldError(null);
  } catch (e) { showFieldError(e); }
}
$("#start-from").addEventListener("change", (ev) => loadFrom(ev.target.value));
$("#upload").addEventListener("change", async (ev) => {
  const file = ev.target.files[0];
  if (!file) return;
  try {
    const { values } = await api("/api/config/from-yaml", { json: { text: await file.text() } });
    setValues({ ...values, "train.output_dir": (await api("/api/meta")).default_output_dir });
    showFieldError(null);
  } catch (e) { showFieldError(e); }
});
$("#check").addEventListener("click", async () => {
  try {
    const r = await api("/api/config/check", { json: { values: formValues() } });
    $("#preview-command").textContent = r.command;
    $("#preview-yaml").textContent = r.yaml;
    $("#preview").hidden = false;
    showFieldError(null);
  } catch (e) { $("#preview").hidden = true; showFieldError(e); }
});
$("#start").addEventListener("click", async () => {
  try {
    const r = await api("/api/runs", { json: { values: formValues() } });
    location.hash = `#/run/${encodeURIComponent(r.id)}`;
  } catch (e) { showFieldError(e); }
});

// ---- Data: `chattune data check | stats | preview` on the form's config; trained tokens highlighted ----
function showDataOutput(text) {
  const out = $("#data-output");
  out.replaceChildren();
  for (const [k, part] of text.split(/\[\[|\]\]/).entries()) out.append(k % 2 ? el("mark", { text: part }) : document.createTextNode(part));
  out.hidden = false;
}
$("#data-upload").addEventListener("change", async (ev) => {
  const file = ev.target.files[0];
  if (!file) return;
  try {
    const r = await fetch(`/api/upload?name=${encodeURIComponent(file.name)}`, { method: "POST", headers: { "Content-Type": "application/octet-stream" }, body: file });
    const body = await r.json();
    if (!r.ok) throw Object.assign(new Error(body.error), { field: body.field });
    document.getElementById("f-data.train_path").value = body.path;
    showFieldError(null);
  } catch (e) { showFieldError(e); }
});
for (const b of document.querySelectorAll("button.data-cmd")) {
  b.addEventListener("click", async () => {
    for (const x of document.querySelectorAll("button.data-cmd")) x.disabled = true;
    $("#data-output").dataset.done = "";
    try {
      const r = await api("/api/data", { json: { values: formValues(), command: b.dataset.command } });
      $("#data-command").textContent = `$ ${r.command}   (exit ${r.exit_code})`;
      $("#data-command").hidden = false;
      showDataOutput(r.output.replace(/^\(trained tokens are shown \[\[like this\]\]\)$/m, t("data.marked")));
      $("#data-output").dataset.done = b.dataset.command;
      showFieldError(null);
    } catch (e) { showFieldError(e); }
    for (const x of document.querySelectorAll("button.data-cmd")) x.disabled = false;
  });
}

// ---- Run page: server-sent events from /api/runs/<id>/events ----
const CHARTS = [
  ["train/loss", "chart.loss"], ["eval/loss", "chart.evalloss"], ["train/lr", "chart.lr"],
  ["train/grad_norm", "chart.gradnorm"], ["train/tokens_per_s", "chart.tps"], ["train/mfu", "chart.mfu"],
  ["train/peak_mem_gib", "chart.mem"],
];
const TERMINAL = ["finished", "interrupted", "failed"];
let RUN = null;

function smooth(ys, weight = 0.6) { // TensorBoard's debiased exponential moving average
  let last = 0, n = 0;
  return ys.map((y) => { if (y === null) return null; n += 1; last = last * weight + (1 - weight) * y; return last / (1 - weight ** n); });
}
function chartData(key) {
  const rows = RUN.metrics.filter((r) => typeof r[key] === "number" && typeof r.step === "number");
  const xs = rows.map((r) => r.step), ys = rows.map((r) => r[key]);
  return key === "train/loss" ? [xs, ys, smooth(ys)] : [xs, ys];
}
function ticks(u, vals) { // as many digits as tell neighbouring ticks apart (lr 1.9995e-4 vs 2e-4)
  const step = vals.length > 1 ? Math.abs(vals[1] - vals[0]) : 0, big = Math.max(...vals.map(Math.abs));
  const digits = step > 0 && big > 0 ? Math.min(8, Math.max(2, Math.ceil(Math.log10(big / step)) + 1)) : 3;
  return vals.map((v) => (v === 0 ? "0" : Math.abs(v) < 1e-2 || Math.abs(v) >= 1e5 ? v.toExponential(digits - 1) : String(+v.toPrecision(digits))));
}
const STEP_INCRS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1e3, 2e3, 5e3, 1e4, 2e4, 5e4, 1e5, 2e5, 5e5, 1e6];
function drawCharts() {
  const box = $("#charts");
  const log = $("#log-scale").checked;
  if (!box.children.length) { // one slot per chart, in a fixed order, shown once it has points
    for (const [key] of CHARTS) box.append(el("div", { class: "chart", "data-chart": key, hidden: true }));
  }
  for (const [key, label] of CHARTS) {
    const data = chartData(key);
    const holder = box.querySelector(`[data-chart="${CSS.escape(key)}"]`);
    if (!data[0].length) { holder.hidden = true; continue; }
    holder.hidden = false;
    holder.dataset.points = String(data[0].length);
    const wantLog = log && key.endsWith("loss");
    if (!RUN.plots[key] || RUN.plots[key].log !== wantLog) {
      if (RUN.plots[key]) RUN.plots[key].plot.destroy();
      holder.replaceChildren();
      const series = [{ label: "step" }, { label: t(label), stroke: "#0072B2", width: 1.5, points: { show: data[0].length < 60 } }];
      if (data.length > 2) series.push({ label: t("chart.smoothed"), stroke: "#D55E00", width: 2 });
      const axes = [{ incrs: STEP_INCRS }, { values: ticks, size: 70 }];
      const opts = { title: t(label), width: 460, height: 240, series, axes, scales: { x: { time: false }, y: wantLog ? { distr: 3 } : {} } };
      RUN.plots[key] = { plot: new uPlot(opts, data, holder), log: wantLog };
    } else {
      RUN.plots[key].plot.setData(data);
    }
  }
}
$("#log-scale").addEventListener("change", () => RUN && drawCharts());

function drawEvals() {
  const rows = {}; // one evaluation may come as two rows (loss, then generation metrics)
  for (const r of RUN.metrics) {
    if (!("tag" in r) && !Object.keys(r).some((k) => k.startsWith("eval/"))) continue;
    const key = `${r.tag || ""}@${r.step}`;
    rows[key] = { ...(rows[key] || {}), ...r };
  }
  const list = Object.values(rows);
  const keys = [...new Set(list.flatMap((r) => Object.keys(r).filter((k) => k.startsWith("eval/"))))];
  $("#eval-table thead").replaceChildren(el("tr", {}, el("th", { text: t("run.tag") }), el("th", { text: "step" }), ...keys.map((k) => el("th", { text: k }))));
  $("#eval-table tbody").replaceChildren(...list.map((r) => el("tr", {}, el("td", { text: r.tag || "" }), el("td", { text: fmt(r.step) }), ...keys.map((k) => el("td", { text: fmt(r[k]) })))));
}
function drawSamples() { // one row per prompt: its reference, then the answer at each evaluation, in order
  const tags = [], rows = new Map();
  for (const p of RUN.predictions) {
    const tag = p.tag || `step ${p.step}`;
    if (!tags.includes(tag)) tags.push(tag);
    const key = p.prompt || "";
    if (!rows.has(key)) rows.set(key, { reference: p.reference || "", answers: {} });
    rows.get(key).answers[tag] = p.prediction || "";
  }
  $("#samples-table thead").replaceChildren(el("tr", {}, el("th", { text: t("run.prompt") }), el("th", { text: t("run.reference") }), ...tags.map((tag) => el("th", { text: tag }))));
  $("#samples-table tbody").replaceChildren(...[...rows].map(([prompt, r]) => el("tr", {},
    el("td", { text: prompt }), el("td", { text: r.reference }),
    ...tags.map((tag) => el("td", { class: "answer", text: r.answers[tag] ?? "" })))));
}
function drawHead(ev) {
  LANG_HOOKS.run = () => {
    if (!RUN || RUN.lastEvent !== ev) return;
    drawHead(ev); drawEvals(); drawSamples();
    for (const p of Object.values(RUN.plots)) p.plot.destroy();
    RUN.plots = {};
    for (const h of document.querySelectorAll("#charts .chart")) h.replaceChildren();
    drawCharts();
  };
  RUN.lastEvent = ev;
  const o = ev.overview;
  RUN.state = o.state;
  const st = $("#run-state");
  st.className = `state ${o.state}`; st.dataset.state = o.state; st.textContent = t(`state.${o.state}`);
  $("#run-why").textContent = o.why || "";
  const p = ev.progress || {};
  $("#run-progress").value = p.fraction || 0;
  $("#run-eta").textContent = (p.fraction !== null && p.fraction !== undefined ? `${Math.round(p.fraction * 100)} %` : "") + (p.eta_s ? ` · ${t("run.eta")} ${fmtTime(p.eta_s)}` : "");
  $("#run-stop").disabled = !["starting", "running"].includes(o.state);
  $("#run-resume").disabled = !["interrupted", "failed"].includes(o.state);
  $("#run-report").hidden = !o.report; $("#run-report").href = `/runs/${RUN.id}/report.html`;
  $("#run-chat").hidden = !o.adapter; $("#run-chat").href = `#/chat/${encodeURIComponent(RUN.id)}`;
  $("#run-tracker").textContent = ev.tracker ? `${t("run.tracker")}: ${ev.tracker}` : "";
  RUN.path = o.path;
  $("#run-export").hidden = !o.adapter;
  if (o.adapter) drawExport();
  const log = $("#run-log");
  const atEnd = log.scrollTop + log.clientHeight >= log.scrollHeight - 4;
  log.textContent = ev.log || t("run.nolog");
  if (atEnd) log.scrollTop = log.scrollHeight;
}
function drawExport() { // the CLI commands that merge, export and run the adapter (Export)
  const dtype = $("#export-dtype").value, name = RUN.id.replace(/\//g, "-");
  const gguf = `${RUN.path}/${name}-${dtype}.gguf`;
  $("#export-commands").textContent = [
    `chattune chat ${RUN.path}/adapter`,
    `chattune merge ${RUN.path}/adapter --output ${RUN.path}/merged`,
    `chattune export ${RUN.path}/adapter --format gguf --output ${gguf} --dtype ${dtype}`,
    `ollama create ${name} -f ${gguf.replace(/\.gguf$/, ".Modelfile")}`,
    `llama-cli -m ${gguf} --jinja`,
  ].join("\n");
  api(`/api/runs/${RUN.id}/gguf-size?dtype=${dtype}`).then((r) => {
    $("#export-size").textContent = r.bytes ? `${t("run.ggufsize")}: ${(r.bytes / 2 ** 20).toFixed(1)} MiB (${t("run.ggufplus")})` : "";
  }).catch(() => { $("#export-size").textContent = ""; });
}
$("#export-dtype").addEventListener("change", () => RUN && drawExport());
function showRun(id) {
  RUN = { id, metrics: [], predictions: [], plots: {}, state: null };
  $("#run-id").textContent = id;
  $("#charts").replaceChildren();
  showError($("#run-error"), null);
  const source = new EventSource(`/api/runs/${id}/events`);
  source.addEventListener("run", (msg) => {
    const ev = JSON.parse(msg.data);
    if (ev.kind === "snapshot") {
      for (const p of Object.values(RUN.plots)) p.plot.destroy();
      RUN.metrics = []; RUN.predictions = []; RUN.plots = {};
      $("#charts").replaceChildren();
      $("#run-command").textContent = ev.command || t("run.shell");
      $("#run-yaml").textContent = ev.config_yaml || "";
    }
    RUN.metrics.push(...ev.metrics);
    RUN.predictions.push(...ev.predictions);
    drawHead(ev); drawCharts(); drawEvals(); drawSamples();
  });
  source.addEventListener("end", () => source.close());
  source.onerror = () => { if (source.readyState === EventSource.CLOSED && !TERMINAL.includes(RUN.state)) showError($("#run-error"), t("run.lost")); };
  return () => source.close();
}
$("#run-stop").addEventListener("click", async () => {
  try { await api(`/api/runs/${RUN.id}/stop`, { method: "POST" }); } catch (e) { showError($("#run-error"), e); }
});
$("#run-resume").addEventListener("click", async () => {
  try { await api(`/api/runs/${RUN.id}/resume`, { method: "POST" }); leaveView(); leaveView = showRun(RUN.id); } catch (e) { showError($("#run-error"), e); }
});

// ---- Chat: the fine-tune and its base, each answer streamed (SSE over a POST) ----
async function showChat(arg) {
  const runs = (await api("/api/runs")).filter((r) => r.adapter);
  const sel = $("#chat-run");
  sel.replaceChildren(...runs.map((r) => el("option", { value: r.id, text: r.id })));
  if (arg) sel.value = arg;
  $("#chat-system").textContent = runs.length ? "" : t("chat.none");
  if (sel.value) showSystem(sel.value);
}
async function showSystem(id) {
  try {
    const info = await api(`/api/chat/${id}/info`);
    LANG_HOOKS.chat = () => {
      $("#chat-system").textContent = info.system ? `${t("chat.system")}: ${info.system}` : info.template_default ? `${t("chat.templatesystem")}: ${info.template_default}` : t("chat.nosystem");
    };
    LANG_HOOKS.chat();
  } catch (e) { showError($("#chat-error"), e); }
}
$("#chat-run").addEventListener("change", (ev) => showSystem(ev.target.value));
async function streamInto(id, messages, base, out) {
  out.textContent = ""; out.dataset.done = "";
  const r = await fetch(`/api/chat/${id}`, { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ messages, base, max_new_tokens: 64 }) });
  if (!r.ok) throw new Error((await r.json()).error);
  const reader = r.body.getReader(), dec = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buf += dec.decode(value, { stream: true });
    let cut;
    while ((cut = buf.indexOf("\n\n")) >= 0) {
      const line = buf.slice(0, cut); buf = buf.slice(cut + 2);
      if (!line.startsWith("data: ")) continue;
      const ev = JSON.parse(line.slice(6));
      if (ev.text) { out.textContent += ev.text; out.dataset.pieces = String(Number(out.dataset.pieces || 0) + 1); }
      if (ev.error) throw new Error(ev.error);
      if (ev.done) out.dataset.done = ev.done;
    }
  }
}
$("#chat-send").addEventListener("click", async () => {
  const id = $("#chat-run").value, text = $("#chat-input").value.trim();
  if (!id || !text) return;
  const messages = [{ role: "user", content: text }];
  showError($("#chat-error"), null);
  $("#chat-send").disabled = true;
  try {
    await streamInto(id, messages, true, $("#chat-base"));
    await streamInto(id, messages, false, $("#chat-tuned"));
  } catch (e) { showError($("#chat-error"), e); }
  $("#chat-send").disabled = false;
});

// ---- start ----
(async () => {
  STRINGS = await (await fetch("/static/i18n.json")).json();
  const saved = localStorage.getItem("chattune-lang");
  LANG = saved || ((navigator.language || "en").toLowerCase().startsWith("zh") ? "zh" : "en");
  applyLang();
  try { $("#runs-dir").textContent = (await api("/api/meta")).runs_dir; } catch (e) { showError($("#banner"), e); }
  route();
})();
