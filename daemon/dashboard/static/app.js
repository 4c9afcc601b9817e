// The gridmesh dashboard: views fetched as JSON from /dashboard/api/VIEW, live numbers from
// the server-sent events of /dashboard/events. Every value from the network is put on the
// page as text (textContent), never as markup.
"use strict";

const TITLES = {
  node: "This node", network: "Network", models: "Models",
  jobs: "Sessions and jobs", money: "Money", registry: "Registries",
};
const $ = (id) => document.getElementById(id);
const spark = [];
let current = "node";
let lastModels = null;
let lastNodes = null;
const money = [];  // balance and stake over time: the money view's history, then `money` events
const earned = [];  // earnings over time: the payment store's history, then `money` events
let moneyError = null;  // why the newest point could not be taken (the plot keeps a gap)
let lastGenerations = [];  // this node's recent generations (views and `generations` events)

function el(tag, text, attrs) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  return node;
}

function show(value) {
  if (value === null || value === undefined) return "–";
  if (typeof value === "object") return JSON.stringify(value);
  return String(value);
}

function bytes(n) {
  if (typeof n !== "number") return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return n.toFixed(i ? 1 : 0) + " " + units[i];
}

function short(id) {
  return typeof id === "string" && id.length > 16 ? id.slice(0, 8) + "…" + id.slice(-6) : show(id);
}

// a table with a caption, header cells and one row per item
function table(caption, columns, rows, id) {
  const t = el("table", undefined, id ? { id } : {});
  t.appendChild(el("caption", caption));
  const head = el("tr");
  for (const [label] of columns) head.appendChild(el("th", label, { scope: "col" }));
  t.appendChild(el("thead")).appendChild(head);
  const body = t.appendChild(el("tbody"));
  for (const row of rows) {
    const tr = body.appendChild(el("tr"));
    for (const [, get] of columns) {
      const value = get(row);
      const td = tr.appendChild(el("td"));
      if (value instanceof Node) td.appendChild(value); else td.textContent = show(value);
    }
  }
  if (!rows.length) {
    const tr = body.appendChild(el("tr"));
    tr.appendChild(el("td", "none", { colspan: String(columns.length) }));
  }
  return t;
}

function pairs(caption, obj) {
  const rows = Object.entries(obj || {});
  return table(caption, [["field", (r) => r[0]], ["value", (r) => r[1]]], rows);
}

function errorText(part) {
  return part && typeof part === "object" && !Array.isArray(part) && part.error;
}

function partOr(caption, part, render) {
  const err = errorText(part);
  if (err) {
    const p = el("p", caption + ": " + err, { class: "error" });
    return p;
  }
  return render(part);
}

const RENDER = {
  node(data) {
    const out = [];
    const info = data.info || {};
    const res = info.resources || {};
    out.push(pairs("Identity", {
      "peer id": info.peer_id, version: info.version, network: info.network_id,
      "payout address": info.payout_address, "RPC URL": info.rpc_url,
      "OpenAI endpoint": info.openai_url,
    }));
    const list = (v) => (Array.isArray(v) ? v.join(" ") || "none" : v);
    out.push(pairs("Reachability", {
      "reachable from outside": info.reachability,
      "observed addresses": list(info.observed_addrs),
      "relayed addresses": list(info.relayed_addrs),
      relays: list(info.relays),
      "listening on": (info.listen_addrs || []).join(" "),
      "advertised in the DHT": (data.advertised || []).join(" ") || "not yet published",
      "record expires at": typeof data.record_expires_at === "number"
        ? new Date(1000 * data.record_expires_at).toISOString() : data.record_expires_at,
      "peers connected": data.peers_connected,
    }));
    const cpu = res.cpu || {}, mem = res.memory || {}, disk = res.disk || {};
    out.push(pairs("Resources", {
      CPU: `${show(cpu.model)} (${show(cpu.cores)} cores, ${show(cpu.arch)})`,
      memory: `${bytes(mem.available_bytes)} free of ${bytes(mem.total_bytes)}`,
      disk: `${bytes(disk.free_bytes)} free`, "GPU driver": res.gpu_driver, "GPU error": res.gpu_error,
    }));
    const checks = el("div", undefined, { id: "doctor" });
    const run = el("button", "Check reachability and more (gridmesh doctor)", { type: "button", id: "run-doctor" });
    run.addEventListener("click", () => runDoctor(checks, run));
    out.push(run, checks);
    out.push(table("GPUs", [
      ["index", (g) => g.index], ["name", (g) => g.name],
      ["utilisation", (g) => g.utilization_pct === null || g.utilization_pct === undefined ? "–" : g.utilization_pct + " %"],
      ["memory free", (g) => bytes(g.memory_free_bytes) + " of " + bytes(g.memory_total_bytes)],
      ["power", (g) => g.power_w === null || g.power_w === undefined ? "–" : g.power_w + " W"],
    ], res.gpus || [], "gpus"));
    return out;
  },
  network(data) {
    const out = [];
    out.push(partOr("Nodes", data.nodes, (nodes) => nodesTable(nodes)));
    out.push(partOr("Peer map", data.peers, (peers) => peerMap(peers)));
    out.push(partOr("Peers", data.peers, (peers) => table("Peers and measured round trips", [
      ["peer", (p) => short(p.peer_id)], ["connected", (p) => (p.connected ? "yes" : "no")],
      ["RTT", (p) => (typeof p.rtt_ms === "number" ? p.rtt_ms.toFixed(1) + " ms" : "–")],
      ["connection", (p) => p.connection],
      ["addresses", (p) => (p.addrs || []).join(" ")],
    ], peers, "peers")));
    out.push(table("Clusters", [
      ["name", (c) => c.name],
      ["coordinator", (c) => errorText(c.coordinator) || short((c.coordinator || {}).coordinator)],
      ["term", (c) => (c.coordinator || {}).term],
      ["admission", (c) => c.admission],
    ], data.clusters || [], "clusters"));
    return out;
  },
  models(data) {
    if (data.error) return [el("p", data.error, { class: "error" })];
    const out = [];
    if (!(data.models || []).length) out.push(el("p", "No model is announced on the network."));
    for (const m of data.models || []) out.push(layerMap(m));
    // the `models` event carries no routes: the feed's `generations` events do
    const gens = data.generations !== undefined ? data.generations : lastGenerations;
    if (Array.isArray(gens)) lastGenerations = gens;
    out.push(partOr("Routes", gens, routesTable));
    out.push(table("Blocks loaded on this node", [
      ["model", (b) => b.model], ["layers", (b) => `${show(b.start)}–${show(b.end)}`],
      ["KV cache free (tokens)", (b) => b.cache_tokens_free],
    ], data.local || [], "local-blocks"));
    return out;
  },
  jobs(data) {
    return [
      el("p", "Tokens per second, time to first token, sessions and queue update live above; below, this node's recent generations (live), then per model since this daemon started."),
      partOr("Generations", data.generations, (gens) => {
        lastGenerations = gens;
        return generationsTable(gens);
      }),
      table("Per model on this node", [
        ["model", (m) => m.model], ["sessions", (m) => m.sessions],
        ["KV cache used", (m) => bytes(m.kv_used_bytes)], ["waiting steps", (m) => m.waiting_steps],
        ["steps computed", (m) => m.steps], ["mean batch", (m) => m.mean_batch],
        ["OpenAI tokens in / out", (m) => `${m.tokens_in} / ${m.tokens_out}`],
        ["mean time to first token", (m) => (m.ttft_avg_s === null ? "–" : (1000 * m.ttft_avg_s).toFixed(0) + " ms")],
        ["queued", (m) => m.queued],
      ], data.per_model || [], "per-model"),
      partOr("Paid jobs", data.paid_jobs, (jobs) => jobsTable(jobs)),
    ];
  },
  money(data) {
    if (Array.isArray(data.history) && data.history.length > money.length) {
      money.splice(0, money.length, ...data.history);
    }
    const stored = (data.earnings || {}).history;
    if (Array.isArray(stored)) earned.splice(0, earned.length, ...stored);
    return [
      earningsPlot(), walletPlot(),
      partOr("Wallet", data.wallet, (w) => {
        const { stake, ...account } = w;
        return [pairs("Wallet", account), pairs("Stake", stake)];
      }),
      partOr("Earnings", data.earnings, (e) => table("Earnings per job and provider (receipts signed, the latest voucher acknowledged, settled on chain)", [
        ["job", (r) => short(r.job_id)], ["provider", (r) => short(r.provider)],
        ["receipts", (r) => r.receipts], ["signed", (r) => r.signed],
        ["acknowledged (voucher)", (r) => r.acknowledged], ["voucher nonce", (r) => r.nonce],
        ["settled", (r) => r.settled], ["pending", (r) => r.pending],
      ], e.jobs || [], "earnings")),
      partOr("Jobs", data.jobs, (jobs) => jobsTable(jobs)),
    ];
  },
  registry(data) {
    const out = [table(`Entries (${(data.items || []).length})`, [
      ["kind", (e) => e.kind], ["key", (e) => e.key], ["owner", (e) => short(e.owner)],
      ["version", (e) => e.version], ["updated", (e) => e.updated_at], ["value", (e) => e.value],
    ], data.items || [], "registry-entries")];
    if (data.next_cursor) {
      const more = el("button", "Next page", { type: "button", id: "reg-next" });
      more.addEventListener("click", () => loadRegistry(data.next_cursor));
      out.push(more);
    }
    fillKinds(data.kinds);
    return out;
  },
};

async function runDoctor(into, button) {
  button.disabled = true;
  into.replaceChildren(el("p", "checking… (dials peers, asks the chain: up to a minute)", { role: "status" }));
  try {
    const data = await getJSON("/dashboard/api/doctor");
    into.replaceChildren(partOr("Doctor", data.checks, (checks) => table("Doctor's checks", [
      ["check", (c) => c.name], ["status", (c) => c.status], ["detail", (c) => c.detail], ["fix", (c) => c.fix],
    ], checks, "doctor-checks")));
  } catch (err) {
    into.replaceChildren(el("p", String(err.message || err), { class: "error" }));
  } finally {
    button.disabled = false;
  }
}

function nodesTable(nodes) {
  return table(`Nodes found (${nodes.length})`, [
    ["peer", (n) => short(n.peer_id)],
    ["GPUs", (n) => ((n.resources || {}).gpus || []).map((g) => g.name).join(", ") || "none"],
    ["CPU cores", (n) => ((n.resources || {}).cpu || {}).cores],
    ["serves", (n) => ((n.resources || {}).blocks || []).map((b) => `${b.model} ${b.start}–${b.end}`).join(", ")],
    ["price per unit", (n) => n.price_per_unit],
    ["addresses", (n) => (n.addrs || []).join(" ")],
  ], nodes, "nodes");
}

// this node in the middle, each peer around it, farther the longer its round trip
function peerMap(peers) {
  const NS = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(NS, "svg");
  svg.setAttribute("viewBox", "-110 -110 220 220");
  svg.setAttribute("role", "img");
  svg.setAttribute("id", "peer-map");
  svg.setAttribute("aria-label", `Map of ${peers.length} peers, distance by round-trip time`);
  const top = Math.max(1, ...peers.map((p) => (typeof p.rtt_ms === "number" ? p.rtt_ms : 0)));
  const add = (tag, attrs, text) => {
    const node = document.createElementNS(NS, tag);
    for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
    if (text !== undefined) node.textContent = text;
    svg.appendChild(node);
    return node;
  };
  add("circle", { cx: 0, cy: 0, r: 6, class: "me" });
  peers.forEach((p, i) => {
    const angle = (2 * Math.PI * i) / Math.max(1, peers.length);
    const known = typeof p.rtt_ms === "number";
    const r = 25 + 70 * (known ? p.rtt_ms / top : 1);
    const x = (r * Math.cos(angle)).toFixed(1), y = (r * Math.sin(angle)).toFixed(1);
    add("line", { x1: 0, y1: 0, x2: x, y2: y, class: p.connected ? "link" : "link down" });
    add("circle", { cx: x, cy: y, r: 4, class: p.connected ? "peer" : "peer down" });
    const anchor = Number(x) > 20 ? "end" : Number(x) < -20 ? "start" : "middle";
    // above the dot, or below it for every other peer: labels of peers on opposite sides
    // (which run towards the middle) never share a line
    add("text", { x, y: Number(y) + (i % 2 ? 11 : -6), "text-anchor": anchor },
      `${short(p.peer_id)} ${known ? p.rtt_ms.toFixed(1) + " ms" : "?"}`);
  });
  const figure = el("figure");
  figure.appendChild(svg);
  figure.appendChild(el("figcaption", "Peers by measured round trip (farther is slower; grey: not connected)"));
  return figure;
}

// money over time from `money` (points with `at` in Unix seconds: the payment store's history
// for earnings, the daemon's samples every 30 s while a page is open for balance and stake),
// each placed by its time; `series`: [key, label, class]; `why`: say why the chain's numbers
// are missing (once per view is enough); `every`: where the points come from, for the caption
function moneyPlot(id, title, series, why, money, every) {
  const NS = "http://www.w3.org/2000/svg";
  const figure = el("figure", undefined, { id, class: "money-plot" });
  const svg = document.createElementNS(NS, "svg");
  svg.setAttribute("viewBox", "0 0 300 80");
  svg.setAttribute("preserveAspectRatio", "none");
  svg.setAttribute("role", "img");
  const last = money[money.length - 1] || {};
  const now = series.map(([key, label]) => `${label} ${show(last[key])}`).join(", ");
  svg.setAttribute("aria-label", `${title} over time: ${now}`);
  const top = Math.max(1, ...money.flatMap((m) => series.map(([k]) => m[k] || 0)));
  const first = (money[0] || {}).at, span = (last.at || 0) - (first || 0);
  const x = (m, i) => (span > 0 ? 300 * (m.at - first) / span : i * 300 / Math.max(1, money.length - 1));
  for (const [key, , cls] of series) {
    const line = document.createElementNS(NS, "polyline");
    line.setAttribute("points", money.map((m, i) => `${x(m, i).toFixed(1)},${(78 - 76 * (m[key] || 0) / top).toFixed(1)}`).join(" "));
    line.setAttribute("class", cls);
    svg.appendChild(line);
  }
  figure.appendChild(svg);
  const note = why ? moneyError || last.chain_error : null;
  const since = typeof first === "number" ? new Date(1000 * first).toISOString() : "now";
  const caption = el("figcaption", `${title} since ${since} (${money.length} points, ${every}): `);
  series.forEach(([key, label, cls], i) => {
    caption.appendChild(el("span", `${label} ${show(last[key])}`, { class: "key " + cls }));
    if (i < series.length - 1) caption.appendChild(document.createTextNode(", "));
  });
  if (note) caption.appendChild(document.createTextNode(` (${note})`));
  figure.appendChild(caption);
  return figure;
}

// what this node earned as a provider: receipts signed, vouchers acknowledged, settled
function earningsPlot() {
  return moneyPlot("earnings-plot", "Earnings", [
    ["signed", "signed in receipts", "signed"], ["acknowledged", "acknowledged by vouchers", "acked"],
    ["settled", "settled", "settled"], ["pending", "pending", "pending"],
  ], true, earned, "from this node's payment records");
}

// its token balance and stake on the chain
function walletPlot() {
  return moneyPlot("wallet-plot", "Balance and stake", [
    ["balance", "balance", "balance"], ["stake", "stake", "stake"],
  ], false, money, "every 30 s while a dashboard page is open");
}

function hopsText(route) {
  return (route || []).map((h) => `${short(h.peer)} ${show(h.start)}–${show(h.end)}`).join(" → ");
}

// which peer serves which layer range of one generation, as an ordered list
function routeList(g) {
  const list = el("ol", undefined, { class: "route" });
  for (const h of g.route || []) list.appendChild(el("li", `${short(h.peer)} layers ${show(h.start)}–${show(h.end)}`));
  return list;
}

// the same route drawn as bars over the layer range
function routeBar(g) {
  const hops = g.route || [];
  const layers = Math.max(1, ...hops.map((h) => h.end || 0));
  const bar = el("div", undefined, { class: "layers", role: "img", "aria-label": "route: " + (hopsText(hops) || "none") });
  hops.forEach((h, i) => {
    const span = bar.appendChild(el("span", `${show(h.start)}–${show(h.end)}`, i % 2 ? { class: "alt" } : {}));
    span.style.left = (100 * (h.start || 0) / layers) + "%";
    span.style.width = (100 * ((h.end || 0) - (h.start || 0)) / layers) + "%";
  });
  return bar;
}

function stateText(g) {
  return g.error ? `${g.state}: ${g.error}` : g.state;
}

function routesTable(gens) {
  return table("Live routes of this node's generations (newest first)", [
    ["generation", (g) => short(g.job)], ["model", (g) => g.model], ["state", stateText],
    ["route (peer and layers, in order)", routeList], ["map", routeBar],
    ["failovers", (g) => g.failovers],
  ], gens, "routes");
}

function generationsTable(gens) {
  const ms = (s) => (typeof s === "number" ? (1000 * s).toFixed(0) + " ms" : "–");
  return table("Generations from this node (newest first, live)", [
    ["generation", (g) => short(g.job)], ["model", (g) => g.model], ["state", stateText],
    ["tokens", (g) => g.tokens],
    ["tokens per second", (g) => (typeof g.tokens_per_s === "number" ? g.tokens_per_s.toFixed(1) : "–")],
    ["time to first token", (g) => ms(g.ttft_s)],
    ["failovers", (g) => g.failovers],
    ["what failed", (g) => (g.failed || []).map((f) => `${short(f.peer)} (from layer ${show(f.from_layer)}): ${f.reason}`).join("; ") || "–"],
    ["route", (g) => hopsText(g.route) || "–"],
  ], gens, "generations");
}

// a `generations` event: redraw the table of the view shown, nothing else
function redrawGenerations() {
  const swap = (id, make) => {
    const old = $(id);
    if (old && Array.isArray(lastGenerations)) old.replaceWith(make(lastGenerations));
  };
  if (current === "jobs") swap("generations", generationsTable);
  if (current === "models") swap("routes", routesTable);
}

function jobsTable(jobs) {
  return table("Paid jobs", [
    ["job", (j) => short(j.job_id)], ["name", (j) => j.name], ["state", (j) => j.state],
    ["deposit", (j) => j.deposit], ["max price per unit", (j) => j.max_price_per_unit],
  ], Array.isArray(jobs) ? jobs : [], "paid-jobs");
}

// which node serves which layers of one model, drawn as bars over the layer range
function layerMap(model) {
  const layers = Math.max(1, model.layers || 1);
  const caption = `Layer map of ${model.model} (${layers} layers, ${show(model.replicas)} replica(s) of its least served layer)`;
  return table(caption, [
    ["server", (s) => short(s.peer_id)],
    ["layers", (s) => `${show(s.start)}–${show(s.end)}`],
    ["map", (s) => {
      const bar = el("div", undefined, { class: "layers", role: "img",
        "aria-label": `layers ${s.start} to ${s.end} of ${layers}` });
      const span = bar.appendChild(el("span", `${s.start}–${s.end}`));
      span.style.left = (100 * (s.start || 0) / layers) + "%";
      span.style.width = (100 * ((s.end || 0) - (s.start || 0)) / layers) + "%";
      return bar;
    }],
    ["KV cache free (tokens)", (s) => s.cache_tokens_free],
    ["load (sessions)", (s) => (typeof s.sessions === "number" ? `${s.sessions} of ${show(s.max_sessions)}` : "–")],
    ["ms per layer", (s) => s.ms_per_layer],
    ["price per unit", (s) => s.price_per_unit],
  ], model.servers || [], "layer-map-" + model.model.replace(/[^A-Za-z0-9_-]/g, "_"));
}

function fillKinds(kinds) {
  const select = $("reg-kind");
  if (!Array.isArray(kinds) || select.options.length > 1) return;
  for (const k of kinds) select.appendChild(el("option", k, { value: k }));
}

function render(view, data) {
  const body = $("view-body");
  body.replaceChildren(...RENDER[view](data).flat());
  $("view").setAttribute("aria-busy", "false");
}

async function getJSON(url) {
  const response = await fetch(url, { credentials: "same-origin", cache: "no-store" });
  const data = await response.json().catch(() => ({ error: `HTTP ${response.status}` }));
  if (response.status === 401) { window.location.reload(); }
  if (!response.ok) throw new Error(data.error || `HTTP ${response.status}`);
  return data;
}

async function load(view) {
  $("view").setAttribute("aria-busy", "true");
  try {
    const data = await getJSON(`/dashboard/api/${view}`);
    if (view === current) render(view, data);
  } catch (err) {
    $("view-body").replaceChildren(el("p", String(err.message || err), { class: "error" }));
  }
}

async function loadRegistry(cursor) {
  const params = new URLSearchParams();
  const kind = $("reg-kind").value, filter = $("reg-filter").value.trim(), limit = $("reg-limit").value;
  if (kind) params.set("kind", kind);
  if (filter) params.set("filter", filter);
  if (limit) params.set("limit", limit);
  if (cursor) params.set("cursor", cursor);
  $("reg-error").textContent = "";
  try {
    render("registry", await getJSON(`/dashboard/api/registry?${params}`));
  } catch (err) {
    $("reg-error").textContent = String(err.message || err);
  }
}

function select(view) {
  if (!TITLES[view]) view = "node";
  current = view;
  for (const a of document.querySelectorAll("nav a")) {
    if (a.dataset.view === view) a.setAttribute("aria-current", "page"); else a.removeAttribute("aria-current");
  }
  $("view-title").textContent = TITLES[view];
  $("registry-form-section").hidden = view !== "registry";
  if (view === "registry") loadRegistry(); else load(view);
}

function liveUpdate(d) {
  if (d.error) { $("feed-state").textContent = d.error; return; }
  $("live-steps").textContent = d.steps_per_s.toFixed(1);
  $("live-tokens").textContent = d.tokens_per_s.toFixed(1);
  // the OpenAI endpoint's over the last second, else its average, else this node's newest
  // generation's (JSON-RPC and gRPC generations are not in the endpoint's histogram)
  const newest = (Array.isArray(lastGenerations) ? lastGenerations : []).find((g) => typeof g.ttft_s === "number");
  $("live-ttft").textContent = d.ttft_s !== null ? (1000 * d.ttft_s).toFixed(0) + " ms"
    : d.ttft_avg_s !== null ? (1000 * d.ttft_avg_s).toFixed(0) + " ms (average)"
    : newest ? (1000 * newest.ttft_s).toFixed(0) + " ms (newest generation)" : "–";
  $("live-sessions").textContent = d.sessions;
  $("live-kv").textContent = bytes(d.kv_used_bytes) + " of " + bytes(d.kv_budget_bytes);
  $("live-queue").textContent = d.queued + d.waiting_steps;
  $("live-peers").textContent = d.peers_connected;
  $("live-gone").textContent = d.client_gone_total;
  spark.push(d.steps_per_s + d.tokens_per_s);
  if (spark.length > 300) spark.shift();
  const top = Math.max(1, ...spark);
  $("spark-line").setAttribute("points", spark.map((v, i) => `${i},${(40 - 38 * v / top).toFixed(1)}`).join(" "));
}

function connect() {
  const source = new EventSource("/dashboard/events");
  source.addEventListener("open", () => { $("feed-state").textContent = "live"; });
  source.addEventListener("error", () => { $("feed-state").textContent = "live feed lost: reconnecting…"; });
  source.addEventListener("live", (e) => liveUpdate(JSON.parse(e.data)));
  source.addEventListener("models", (e) => {
    const text = e.data;
    if (text !== lastModels && current === "models") render("models", JSON.parse(text));
    lastModels = text;
  });
  source.addEventListener("generations", (e) => {
    lastGenerations = JSON.parse(e.data);
    redrawGenerations();
  });
  source.addEventListener("money", (e) => {
    const point = JSON.parse(e.data);
    moneyError = point.error || null;
    if (!point.error && (!money.length || money[money.length - 1].at !== point.at)) money.push(point);
    if (money.length > 240) money.shift();
    if (!point.error && point.at > ((earned[earned.length - 1] || {}).at || 0)) earned.push(point);
    if (earned.length > 480) earned.shift();
    if (current === "money" && $("earnings-plot")) {
      $("earnings-plot").replaceWith(earningsPlot());
      $("wallet-plot").replaceWith(walletPlot());
    }
  });
  source.addEventListener("nodes", (e) => {
    const text = e.data;
    if (text !== lastNodes && current === "network") load("network");
    lastNodes = text;
  });
}

document.addEventListener("DOMContentLoaded", () => {
  $("registry-form").addEventListener("submit", (e) => { e.preventDefault(); loadRegistry(); });
  window.addEventListener("hashchange", () => select(location.hash.slice(1)));
  select(location.hash.slice(1) || "node");
  connect();
});
