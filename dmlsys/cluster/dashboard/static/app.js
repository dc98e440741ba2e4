// The dmlsys dashboard: one server-sent event per second carries the whole picture (see
// dmlsys/cluster/dashboard/server.py); this script draws it. No framework, no build step.
"use strict";

const $ = (sel) => document.querySelector(sel);
const esc = (v) => String(v ?? "").replace(/[&<>"']/g, (c) => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"}[c]));
const ms = (s) => (s == null ? "–" : s < 0.001 ? (s * 1e6).toFixed(0) + " µs" : s < 1 ? (s * 1e3).toFixed(1) + " ms" : s.toFixed(2) + " s");
const num = (v, d = 1) => (v == null ? "–" : Number(v).toFixed(d));
const badge = (s) => `<span class="badge s-${esc(s)}">${esc(s)}</span>`;

function uptime(s) {
  if (s == null) return "–";
  if (s < 60) return s.toFixed(0) + " s";
  if (s < 3600) return (s / 60).toFixed(1) + " min";
  return (s / 3600).toFixed(1) + " h";
}

// A small line chart of one field of a node's points, as inline SVG.
function chart(points, field, cls) {
  const W = 120, H = 28, values = points.map((p) => p[field]).filter((v) => v != null);
  const last = values.length ? values[values.length - 1] : null;
  if (points.length < 2) return `<svg class="chart ${cls}" data-points="${points.length}"></svg>`;
  const t0 = points[0].t, t1 = points[points.length - 1].t, top = Math.max(...values, 1e-9);
  const xy = points.filter((p) => p[field] != null).map((p) =>
    `${((p.t - t0) / Math.max(t1 - t0, 1e-9) * (W - 2) + 1).toFixed(1)},${(H - 2 - (p[field] / top) * (H - 13)).toFixed(1)}`);
  const label = field === "p99" ? ms(last) : num(last, field === "in_flight" ? 0 : 1);
  return `<svg class="chart ${cls}" data-points="${points.length}" data-last="${last ?? ""}" viewBox="0 0 ${W} ${H}">` +
    `<polyline points="${xy.join(" ")}"/><text x="${W - 2}" y="9" text-anchor="end">${esc(label)}</text></svg>`;
}

function renderNodes(nodes) {
  const rows = nodes.map((n) => {
    const p = n.points.length ? n.points[n.points.length - 1] : {};
    const drain = n.drainable && n.pid ? `<button class="drain" data-node="${esc(n.name)}">drain</button>` : "";
    return `<tr data-node="${esc(n.name)}" data-state="${esc(n.state)}" data-restarts="${n.restarts ?? 0}">` +
      `<td>${esc(n.name)}</td><td>${esc(n.role)}</td><td title="${esc(n.why || "")}">${badge(n.state)}</td>` +
      `<td class="num">${esc(n.pid ?? "–")}</td><td class="num restarts">${esc(n.restarts ?? 0)}</td>` +
      `<td class="num">${uptime(n.uptime_s)}</td><td class="num">${num(p.rate)}</td>` +
      `<td class="num">${ms(p.p50)}</td><td class="num">${ms(p.p99)}</td><td class="num">${esc(n.in_flight ?? "–")}</td>` +
      `<td>${chart(n.points, "rate", "rate")}</td><td>${chart(n.points, "p99", "p99")}</td>` +
      `<td>${chart(n.points, "in_flight", "inflight")}</td><td>${drain}</td></tr>`;
  });
  $("#nodes tbody").innerHTML = rows.join("");
}

// Groups keep their inputs between updates (a user may be typing): only the counts change.
function renderGroups(groups) {
  const box = $("#groups");
  $("#groups-section").hidden = !Object.keys(groups).length;
  for (const [name, g] of Object.entries(groups)) {
    let el = box.querySelector(`.group[data-group="${CSS.escape(name)}"]`);
    if (!el) {
      el = document.createElement("div");
      el.className = "group";
      el.dataset.group = name;
      el.innerHTML = `<b>${esc(name)}</b> <span class="muted">${esc(g.role)}</span> <span class="count"></span>` +
        `<input type="number" min="0" max="64" value="${g.replicas}" aria-label="replicas of ${esc(name)}">` +
        `<button class="scale">scale</button>`;
      box.appendChild(el);
    }
    el.querySelector(".count").textContent = `${g.replicas} running`;
    el.dataset.replicas = g.replicas;
  }
}

function renderModels(models) {
  const names = Object.keys(models);
  $("#models-section").hidden = !names.length;
  const body = $("#models tbody");
  for (const name of names) {
    const m = models[name];
    const ejected = Object.entries(m.replicas || {}).filter(([, r]) => r.ejected_for > 0)
      .map(([r, v]) => `${r} (${v.ejected_for.toFixed(1)} s)`);
    let tr = body.querySelector(`tr[data-model="${CSS.escape(name)}"]`);
    if (!tr) {
      tr = document.createElement("tr");
      tr.dataset.model = name;
      tr.innerHTML = `<td>${esc(name)}</td><td class="versions"></td><td class="ready"></td><td class="policy"></td>` +
        `<td class="ejected"></td><td class="num queued"></td><td><input type="number" min="1" placeholder="latest" ` +
        `aria-label="version of ${esc(name)}"> <button class="rollout">roll out</button></td>`;
      body.appendChild(tr);
    }
    tr.querySelector(".versions").textContent = (m.versions || []).map((v) => "v" + v).join(", ") || "–";
    const total = typeof m.replicas === "object" ? Object.keys(m.replicas || {}).length : (m.replicas ?? 0);
    tr.querySelector(".ready").textContent = `${(m.ready_replicas || []).length} / ${total}: ${(m.ready_replicas || []).join(", ")}`;
    tr.querySelector(".policy").textContent = m.policy ?? "–";
    tr.querySelector(".ejected").textContent = ejected.join(", ") || "none";
    tr.querySelector(".queued").textContent = m.queued ?? 0;
  }
}

function renderTraining(jobs) {
  $("#training-section").hidden = !jobs.length;
  $("#training").innerHTML = jobs.map((j) => {
    const last = j.epochs[j.epochs.length - 1] || {};
    const done = j.epochs.length, total = j.epochs_total || done;
    const pts = j.epochs.map((e, i) => ({t: i, loss: e.loss, acc: e.test_accuracy}));
    return `<div class="job"><b>${esc(j.model || j.job)}</b> on ${esc(j.worker)}: epoch ${done} / ${esc(total)} ` +
      `<span class="bar"><span style="width:${(100 * done / Math.max(total, 1)).toFixed(0)}%"></span></span> ` +
      `loss ${num(last.loss, 4)}, test accuracy ${num(last.test_accuracy, 4)} ${chart(pts, "loss", "rate")}</div>`;
  }).join("");
}

// A pipeline run as a timeline: one bar per step, cache hits marked.
function renderRuns(runs) {
  $("#runs-section").hidden = !runs.length;
  $("#runs").innerHTML = runs.map((run) => {
    const steps = run.steps.filter((st) => st.start != null || st.cache === "hit");
    const end = Math.max(1e-6, ...steps.map((st) => st.end ?? st.start ?? 0));
    const W = 700, X = 150, R = 80, row = 16;
    const bars = steps.map((st, i) => {
      const a = st.start ?? 0, b = st.end ?? a, x = X + (a / end) * (W - X - R);
      const w = Math.max(2, ((b - a) / end) * (W - X - R)), hit = st.cache === "hit";
      return `<g class="step ${hit ? "hit" : ""}" data-step="${esc(st.name)}" data-cache="${esc(st.cache)}">` +
        `<text x="${X - 6}" y="${i * row + 12}" text-anchor="end">${esc(st.name)}</text>` +
        `<rect x="${x.toFixed(1)}" y="${i * row + 3}" width="${w.toFixed(1)}" height="${row - 5}" class="s-${esc(st.state)}"/>` +
        `<text x="${(x + w + 4).toFixed(1)}" y="${i * row + 12}">${hit ? "hit" : (b - a).toFixed(2) + " s"}</text></g>`;
    }).join("");
    return `<div class="run"><b>${esc(run.name)}</b> ${run.wall_s != null ? run.wall_s.toFixed(1) + " s" : ""}, ` +
      `finished ${new Date(run.finished * 1000).toLocaleTimeString()}, cache hits: ${esc(run.hits.join(", ") || "none")}` +
      `<svg class="timeline" viewBox="0 0 ${W} ${steps.length * row + 4}" width="${W}" height="${steps.length * row + 4}">${bars}</svg></div>`;
  }).join("");
}

// A service's status as rows of scalars (nested keys joined with dots): whatever it exposes.
function kv(obj, prefix = "", out = []) {
  for (const [k, v] of Object.entries(obj || {})) {
    const key = prefix ? `${prefix}.${k}` : k;
    if (v && typeof v === "object" && !Array.isArray(v)) kv(v, key, out);
    else if (!Array.isArray(v) || v.length <= 8) out.push([key, Array.isArray(v) ? v.join(", ") : v]);
  }
  return out;
}
const dl = (pairs) => `<dl class="kv">${pairs.map(([k, v]) => `<dt>${esc(k)}</dt><dd>${esc(v)}</dd>`).join("")}</dl>`;

function renderSections(sections) {
  const shards = sections.shard || {};
  $("#shard-section").hidden = !Object.keys(shards).length;
  $("#shard").innerHTML = Object.keys(shards).length ? "<table><tr><th>shard</th><th>keys</th><th>bytes</th><th>moving</th></tr>" +
    Object.entries(shards).map(([n, s]) => `<tr><td>${esc(n)}</td><td class="num">${esc(s.shard?.keys)}</td>` +
      `<td class="num">${esc(s.shard?.bytes)}</td><td class="num">${esc(s.shard?.moving)}</td></tr>`).join("") + "</table>" : "";
  $("#events-section").hidden = !Object.keys(sections.events || {}).length;
  $("#events").innerHTML = Object.entries(sections.events || {}).map(([n, svc]) => {
    const s = svc.events || Object.values(svc)[0] || {};
    return `<h3>${esc(n)}</h3><b>queue per tier</b>${dl(kv(s.gate))}<b>pool</b>${dl(kv(s.pool))}`;
  }).join("");
  $("#ps-section").hidden = !Object.keys(sections.ps || {}).length;
  $("#ps").innerHTML = Object.entries(sections.ps || {}).map(([n, svc]) => `<h3>${esc(n)}</h3>${dl(kv(svc))}`).join("");
  $("#other-section").hidden = !Object.keys(sections.router || {}).length;
  $("#other").innerHTML = Object.entries(sections.router || {}).map(([n, svc]) => `<h3>${esc(n)}</h3>${dl(kv(svc))}`).join("");
}

function render(s) {
  $("#cluster").textContent = s.cluster;
  $("#state").className = `badge s-${s.state}`;
  $("#state").textContent = s.state;
  $("#error").textContent = s.error || "";
  $("#updated").textContent = "updated " + new Date(s.updated * 1000).toLocaleTimeString();
  renderNodes(s.nodes);
  renderGroups(s.groups);
  renderModels(s.models);
  renderTraining(s.training);
  renderRuns(s.runs || []);
  renderSections(s.sections);
}

// -- actions: confirmed, then the supervisor's own admin RPCs ----------------------------------

function confirmAction(text) {
  const dialog = $("#confirm");
  $("#confirm-text").textContent = text;
  dialog.showModal();
  return new Promise((resolve) => dialog.addEventListener("close", () => resolve(dialog.returnValue === "ok"), {once: true}));
}

function toast(text, bad) {
  const el = $("#toast");
  el.textContent = text;
  el.className = "show" + (bad ? " bad" : "");
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => (el.className = ""), 5000);
}

async function act(path, body, what) {
  if (!(await confirmAction(what + "?"))) return;
  toast(what + " …");
  try {
    const r = await fetch(path, {method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)});
    const reply = await r.json().catch(() => ({error: r.statusText}));
    toast(reply.ok ? what + ": done" : `${what}: ${reply.error || r.status}`, !reply.ok);
  } catch (e) {
    toast(`${what}: ${e}`, true);
  }
}

document.addEventListener("click", (ev) => {
  const b = ev.target.closest("button");
  if (!b) return;
  if (b.classList.contains("scale")) {
    const g = b.closest(".group"), n = parseInt(g.querySelector("input").value, 10);
    act("/api/scale", {group: g.dataset.group, replicas: n}, `Scale ${g.dataset.group} from ${g.dataset.replicas} to ${n}`);
  } else if (b.classList.contains("rollout")) {
    const tr = b.closest("tr"), v = tr.querySelector("input").value;
    act("/api/rollout", {model: tr.dataset.model, version: v ? parseInt(v, 10) : null},
        `Roll out ${tr.dataset.model} ${v ? "v" + v : "(latest)"} to every replica, one at a time`);
  } else if (b.classList.contains("drain")) {
    act("/api/drain", {name: b.dataset.node}, `Drain and stop ${b.dataset.node} (it is not restarted)`);
  }
});

// -- the stream ----------------------------------------------------------------------------------

function connect() {
  const source = new EventSource("/events");
  source.onopen = () => $("#live").classList.add("on");
  source.onmessage = (ev) => render(JSON.parse(ev.data));
  source.onerror = () => $("#live").classList.remove("on");  // EventSource reconnects by itself
}
connect();
