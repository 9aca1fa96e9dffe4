// The fl-node dashboard. One WebSocket (/ws) feeds every panel; the REST API supplies the
// history on connect and takes the control actions. Plain ES2020, no third-party code.

const TOKEN_KEY = "fl-node-token";
const MAX_EVENTS = 100;
const RETRY_FIRST_MS = 500;
const RETRY_MAX_MS = 15000;
const WS_UNAUTHORIZED = 4401;
const SVG_NS = "http://www.w3.org/2000/svg";
const COLORS = {
  axis: "#5b6470", grid: "#e3e6ea", text: "#3b424b",
  accuracy: "#1f6feb", loss: "#c2410c",
};
const PEER_STATE_ORDER = ["connected", "relayed", "suspect", "untrusted", "gone", "banned"];
const MAX_TOPOLOGY_LABELS = 16;

const $ = (id) => document.getElementById(id);

/** Everything the page knows; the renderers read it, the message handlers write it. */
const app = {
  token: null,
  ws: null,
  retryMs: RETRY_FIRST_MS,
  retryTimer: 0,
  status: null,
  rounds: new Map(), // round number -> round record
  liveEvents: null, // events received while the history loads, else null
  lastNet: null, // {ts, sent, recv} of the previous status, for rates
  topologyKey: "",
  config: {}, // the node's configuration as last read
  runtime: new Set(), // the keys POST /api/config may change
};

// -- formatting -------------------------------------------------------------------------

const isNum = (v) => typeof v === "number" && Number.isFinite(v);
const dash = (v) => (v === null || v === undefined || v === "" ? "—" : String(v));
const shortId = (id) => (typeof id === "string" && id.length > 12 ? id.slice(0, 12) : dash(id));

function bytes(n) {
  if (!isNum(n)) return "—";
  const units = ["B", "kB", "MB", "GB", "TB"];
  let i = 0;
  while (Math.abs(n) >= 1000 && i < units.length - 1) { n /= 1000; i += 1; }
  return `${n.toFixed(i === 0 ? 0 : 1)} ${units[i]}`;
}

function duration(seconds) {
  if (!isNum(seconds)) return "—";
  const s = Math.floor(seconds);
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${s % 60} s`;
  return `${Math.floor(s / 3600)} h ${String(Math.floor((s % 3600) / 60)).padStart(2, "0")} min`;
}

const accuracyText = (v) => (isNum(v) ? `${(v * 100).toFixed(1)} %` : "—");
const lossText = (v) => (isNum(v) ? v.toPrecision(4) : "—");
const clock = (ts) => new Date(ts * 1000).toLocaleTimeString([], { hour12: false });

function setText(id, text) {
  const node = $(id);
  if (node.textContent !== text) node.textContent = text;
}

function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  Object.assign(node, props);
  node.append(...children);
  return node;
}

// -- token ------------------------------------------------------------------------------

/** The token from #token=... (then scrubbed from the address bar) or this tab's storage. */
function takeToken() {
  const match = /(?:^#|&)token=([^&]*)/.exec(location.hash);
  if (match) {
    let token = match[1];
    try { token = decodeURIComponent(token); } catch { /* not %-encoded: use it as it is */ }
    sessionStorage.setItem(TOKEN_KEY, token);
    history.replaceState(null, "", location.pathname + location.search);
    return token;
  }
  return sessionStorage.getItem(TOKEN_KEY);
}

function askForToken(reason) {
  app.token = null;
  sessionStorage.removeItem(TOKEN_KEY);
  if (app.ws) app.ws.close();
  clearTimeout(app.retryTimer);
  setConn("unauthorized", "not connected: token needed");
  $("token-error").textContent = reason || "";
  $("token-form").hidden = false;
  $("token-input").focus();
}

function onTokenSubmit(event) {
  event.preventDefault();
  const token = $("token-input").value.trim();
  if (!token) return;
  app.token = token;
  sessionStorage.setItem(TOKEN_KEY, token);
  $("token-input").value = "";
  $("token-form").hidden = true;
  app.retryMs = RETRY_FIRST_MS;
  connect();
}

// -- REST -------------------------------------------------------------------------------

/** Call the node's API with the token; throws an Error carrying the server's message. */
async function api(method, path, body) {
  const headers = { Authorization: `Bearer ${app.token}` };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const res = await fetch(path, {
    method, headers, cache: "no-store",
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const data = await res.json().catch(() => null);
  if (res.status === 401) askForToken("The node refused the token.");
  if (!res.ok) throw new Error((data && data.error) || `${res.status} ${res.statusText}`);
  return data;
}

async function loadHistory() {
  app.liveEvents = [];
  try {
    const [metrics, log] = await Promise.all([
      api("GET", "/api/metrics"), api("GET", `/api/events?limit=${MAX_EVENTS}`),
    ]);
    app.rounds.clear();
    addRounds(metrics.rounds || []);
    const history = log.events || [];
    // An event can reach us live and again in the history fetched just after.
    const fresh = app.liveEvents.filter((e) => !history.some((h) =>
      h.kind === e.kind && h.detail === e.detail && Math.abs(h.ts - e.ts) < 5));
    addEvents([...history, ...fresh], { replace: true });
  } catch (err) {
    showError("control-error", `Could not load history: ${err.message}`);
  } finally {
    app.liveEvents = null;
  }
}

async function loadConfig() {
  try {
    renderConfig(await api("GET", "/api/config"));
  } catch (err) {
    showError("config-error", err.message);
  }
}

function showError(id, text) {
  $(id).textContent = text;
}

async function control(action) {
  const buttons = [$("start"), $("stop")];
  buttons.forEach((b) => { b.disabled = true; });
  showError("control-error", "");
  try {
    const result = await api("POST", `/api/${action}`);
    renderState(result.state);
  } catch (err) {
    showError("control-error", `${action}: ${err.message}`);
  } finally {
    buttons.forEach((b) => { b.disabled = false; });
  }
}

// -- WebSocket --------------------------------------------------------------------------

function setConn(state, text) {
  const conn = $("conn");
  conn.dataset.state = state;
  conn.textContent = text;
}

function connect() {
  clearTimeout(app.retryTimer);
  if (!app.token) { askForToken(""); return; }
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  const ws = new WebSocket(`${scheme}//${location.host}/ws`);
  app.ws = ws;
  setConn("connecting", "connecting…");
  ws.addEventListener("open", () => ws.send(JSON.stringify({ type: "auth", token: app.token })));
  ws.addEventListener("message", (event) => {
    let msg;
    try { msg = JSON.parse(event.data); } catch { return; }
    const handler = handlers[msg && msg.type];
    if (handler) handler(msg);
  });
  ws.addEventListener("close", (event) => onClose(ws, event));
}

function onClose(ws, event) {
  if (app.ws !== ws) return;
  app.ws = null;
  if (event.code === WS_UNAUTHORIZED) { askForToken("The node refused the token."); return; }
  const delay = Math.round(app.retryMs * (0.75 + Math.random() * 0.5));
  app.retryMs = Math.min(app.retryMs * 2, RETRY_MAX_MS);
  setConn("offline", `offline, retrying in ${Math.max(1, Math.round(delay / 1000))} s`);
  app.retryTimer = setTimeout(connect, delay);
}

const handlers = {
  hello(msg) {
    app.retryMs = RETRY_FIRST_MS;
    app.lastNet = null;
    setConn("live", "live");
    renderStatus(msg.data, msg.ts);
    loadHistory();
    loadConfig();
  },
  status_update(msg) { renderStatus(msg.data, msg.ts); },
  metrics_update(msg) { addRounds([msg.data]); },
  round_completed(msg) {
    if (app.status && msg.data && isNum(msg.data.round)) {
      renderRound(msg.data.round, app.status.rounds_total);
    }
  },
  event(msg) {
    if (!msg.data) return;
    const entry = { ts: msg.ts, kind: msg.data.kind, detail: msg.data.detail };
    if (app.liveEvents) app.liveEvents.push(entry);
    addEvents([entry]);
  },
  error(msg) { showError("control-error", dash(msg.error)); },
};

// -- status -----------------------------------------------------------------------------

function renderStatus(status, ts) {
  if (!status || typeof status !== "object") return;
  app.status = status;
  setText("name", dash(status.name));
  document.title = `${dash(status.name)} · fl-node`;
  setText("node-id", shortId(status.node_id));
  $("node-id").title = dash(status.node_id);
  setText("federation", dash(status.federation));
  setText("uptime", duration(status.uptime_s));
  renderState(status.state);
  setText("mode", dash(status.mode));
  setText("role", status.is_aggregator ? "aggregator" : "participant");
  setText("aggregator", aggregatorText(status));
  const q = status.quorum;
  setText("quorum", q && isNum(q.have) ? `${q.have} present, ${q.need} needed` : "—");
  renderRound(status.round, status.rounds_total);
  const evaluated = isNum(status.evaluated_round) ? ` (round ${status.evaluated_round})` : "";
  setText("accuracy", accuracyText(status.accuracy) + (isNum(status.accuracy) ? evaluated : ""));
  setText("loss", lossText(status.loss));
  setText("model-hash", shortId(status.model_hash));
  $("model-hash").title = dash(status.model_hash);
  renderResources(status, ts);
  renderPrivacy(status.privacy);
  const peers = Array.isArray(status.peers) ? status.peers : [];
  renderPeers(peers);
  renderTopology(status, peers);
}

function renderState(state) {
  const badge = $("state");
  badge.dataset.state = dash(state);
  setText("state", dash(state).split("_").join(" "));
}

function renderRound(done, total) {
  const roundEl = $("round");
  const n = isNum(done) ? done : 0;
  roundEl.dataset.round = String(n);
  setText("round", String(n));
  setText("rounds-total", isNum(total) ? String(total) : "—");
  const bar = $("round-progress");
  bar.max = isNum(total) && total > 0 ? total : 1;
  bar.value = Math.min(n, bar.max);
}

function peerName(id) {
  const peer = (app.status.peers || []).find((p) => p.node_id === id);
  return peer && peer.name ? peer.name : shortId(id);
}

function aggregatorText(status) {
  if (!status.aggregator) return "—";
  if (status.aggregator === status.node_id) return "this node";
  return `${peerName(status.aggregator)} (${shortId(status.aggregator)})`;
}

function renderResources(status, ts) {
  const r = status.resources || {};
  setText("cpu", isNum(r.cpu_percent) ? `${r.cpu_percent.toFixed(1)} %` : "—");
  const share = isNum(r.memory_percent) ? ` (${r.memory_percent.toFixed(1)} %)` : "";
  setText("memory", isNum(r.memory_rss) ? bytes(r.memory_rss) + share : "—");
  let sentRate = "";
  let recvRate = "";
  if (isNum(r.net_bytes_sent) && isNum(r.net_bytes_recv) && isNum(ts)) {
    const prev = app.lastNet;
    if (prev && ts > prev.ts) {
      const dt = ts - prev.ts;
      sentRate = `, ${bytes((r.net_bytes_sent - prev.sent) / dt)}/s`;
      recvRate = `, ${bytes((r.net_bytes_recv - prev.recv) / dt)}/s`;
    }
    app.lastNet = { ts, sent: r.net_bytes_sent, recv: r.net_bytes_recv };
  }
  setText("net-sent", isNum(r.net_bytes_sent) ? bytes(r.net_bytes_sent) + sentRate : "—");
  setText("net-recv", isNum(r.net_bytes_recv) ? bytes(r.net_bytes_recv) + recvRate : "—");
  const t = status.traffic || {};
  setText("traffic", isNum(t.bytes_sent)
    ? `${bytes(t.bytes_sent)} out, ${bytes(t.bytes_received)} in` : "—");
}

function renderPrivacy(privacy) {
  const box = $("privacy");
  box.hidden = !privacy;
  if (!privacy) return;
  const target = isNum(privacy.target_epsilon) ? privacy.target_epsilon : null;
  setText("epsilon", isNum(privacy.epsilon)
    ? `${privacy.epsilon.toFixed(3)}${target !== null ? ` of ${target}` : ""}` : "—");
  setText("delta", isNum(privacy.delta) ? privacy.delta.toExponential(1) : "—");
  const meter = $("epsilon-meter");
  meter.hidden = target === null;
  if (target !== null) {
    meter.max = target;
    meter.high = target * 0.8;
    meter.value = isNum(privacy.epsilon) ? privacy.epsilon : 0;
  }
}

// -- peers and topology -----------------------------------------------------------------

function peerRank(peer) {
  const i = PEER_STATE_ORDER.indexOf(peer.state);
  return i < 0 ? PEER_STATE_ORDER.length : i;
}

function badge(state) {
  const span = el("span", { className: "badge", textContent: dash(state) });
  span.dataset.state = dash(state);
  return span;
}

function renderPeers(peers) {
  const sorted = [...peers].sort((a, b) => peerRank(a) - peerRank(b)
    || String(a.name).localeCompare(String(b.name)));
  setText("peer-count", peers.length ? `(${peers.length})` : "");
  const rows = sorted.map((p) => el("tr", {},
    el("td", { textContent: dash(p.name) }),
    el("td", {}, el("code", { textContent: shortId(p.node_id), title: dash(p.node_id) })),
    el("td", {}, badge(p.state)),
    el("td", { textContent: p.trusted === false ? "no" : dash(p.trust) }),
    el("td", { className: "num", textContent: isNum(p.rtt_ms) ? `${p.rtt_ms.toFixed(1)} ms` : "—",
    }),
    el("td", { className: "num", textContent: dash(p.round) })));
  if (!rows.length) {
    rows.push(el("tr", {},
      el("td", { colSpan: 6, className: "muted", textContent: "no peers yet" })));
  }
  $("peers").replaceChildren(...rows);
}

function svg(tag, attrs, text) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
  if (text !== undefined) node.textContent = text;
  return node;
}

/** Nodes on a circle (this node on top), an edge for every direct link. */
function renderTopology(status, allPeers) {
  const selfId = status.node_id;
  const peers = allPeers.filter((p) => typeof p.node_id === "string");
  const names = new Map([[selfId, status.name || "this node"]]);
  const dim = new Set();
  for (const p of peers) {
    names.set(p.node_id, p.name || shortId(p.node_id));
    if (p.state === "gone" || p.state === "untrusted" || p.state === "banned") dim.add(p.node_id);
  }
  const edges = new Map();
  const link = (a, b) => {
    if (!a || !b || a === b) return;
    if (!names.has(a)) names.set(a, shortId(a));
    if (!names.has(b)) names.set(b, shortId(b));
    edges.set(a < b ? `${a} ${b}` : `${b} ${a}`, [a, b]);
  };
  for (const p of peers) {
    if (p.state === "connected") link(selfId, p.node_id);
    for (const other of Array.isArray(p.links) ? p.links : []) link(p.node_id, other);
  }
  const ids = [selfId, ...[...names.keys()].filter((id) => id !== selfId).sort()];
  const key = JSON.stringify([ids, [...names.values()], [...dim], [...edges.keys()].sort()]);
  if (key === app.topologyKey) return;
  app.topologyKey = key;

  const box = $("topology");
  const [w, h] = [320, 260];
  const [cx, cy] = [w / 2, h / 2 - 4];
  const radius = ids.length > 1 ? Math.min(w, h) / 2 - 34 : 0;
  const pos = new Map(ids.map((id, i) => {
    const angle = -Math.PI / 2 + (2 * Math.PI * i) / ids.length;
    return [id, [cx + radius * Math.cos(angle), cy + radius * Math.sin(angle)]];
  }));
  const parts = [];
  for (const [a, b] of edges.values()) {
    const [x1, y1] = pos.get(a);
    const [x2, y2] = pos.get(b);
    const mine = a === selfId || b === selfId;
    parts.push(svg("line", { x1, y1, x2, y2, class: mine ? "edge self-edge" : "edge" }));
  }
  for (const id of ids) {
    const [x, y] = pos.get(id);
    const cls = id === selfId ? "node self" : dim.has(id) ? "node dim" : "node";
    const group = svg("g", { class: cls });
    group.append(svg("title", {}, `${names.get(id)} (${id})`));
    group.append(svg("circle", { cx: x, cy: y, r: id === selfId ? 11 : 8 }));
    if (ids.length <= MAX_TOPOLOGY_LABELS) { // beyond that they overlap; the title stays
      const name = names.get(id);
      const label = name.length > 14 ? `${name.slice(0, 13)}…` : name;
      const below = y >= cy - 1;
      group.append(svg("text", { x, y: below ? y + 24 : y - 16, "text-anchor": "middle" }, label));
    }
    parts.push(group);
  }
  if (ids.length === 1) {
    parts.push(svg("text", { x: cx, y: h - 12, "text-anchor": "middle", class: "muted" },
      "no direct links yet"));
  }
  box.replaceChildren(...parts);
}

// -- rounds and charts ------------------------------------------------------------------

function addRounds(records) {
  for (const r of records) {
    if (r && isNum(r.round)) app.rounds.set(r.round, r);
  }
  drawCharts();
}

function series(field) {
  return [...app.rounds.values()]
    .filter((r) => isNum(r[field]))
    .map((r) => [r.round, r[field]])
    .sort((a, b) => a[0] - b[0]);
}

function drawCharts() {
  drawChart($("acc-chart"), series("accuracy"), {
    color: COLORS.accuracy, label: "accuracy", unitRange: true,
    format: (v, step) => `${(v * 100).toFixed(decimalsFor(step * 100))}%`,
  });
  drawChart($("loss-chart"), series("loss"), {
    color: COLORS.loss, label: "loss", unitRange: false,
    format: (v, step) => v.toFixed(decimalsFor(step)),
  });
}

/** Enough decimals to tell apart labels `step` apart. */
const decimalsFor = (step) => Math.max(0, -Math.floor(Math.log10(step) + 1e-9));

/** A step of 1, 2 or 5 times a power of ten giving about `count` intervals over `span`. */
function niceStep(span, count) {
  const raw = span / Math.max(count, 1);
  const power = 10 ** Math.floor(Math.log10(raw));
  const m = raw / power;
  return (m <= 1 ? 1 : m <= 2 ? 2 : m <= 5 ? 5 : 10) * power;
}

/** A line chart of [x, y] points with axes, grid and labels, sharp at any pixel ratio. */
function drawChart(canvas, points, opts) {
  const dpr = window.devicePixelRatio || 1;
  const w = canvas.clientWidth;
  const h = canvas.clientHeight;
  if (!w || !h) return;
  if (canvas.width !== Math.round(w * dpr) || canvas.height !== Math.round(h * dpr)) {
    canvas.width = Math.round(w * dpr);
    canvas.height = Math.round(h * dpr);
  }
  const ctx = canvas.getContext("2d");
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  ctx.clearRect(0, 0, w, h);
  ctx.font = "12px system-ui, sans-serif";
  const pad = { left: 46, right: 14, top: 12, bottom: 34 };
  const plotW = w - pad.left - pad.right;
  const plotH = h - pad.top - pad.bottom;

  const xs = points.map((p) => p[0]);
  const ys = points.map((p) => p[1]);
  const xMin = xs.length ? Math.min(...xs) : 1;
  const xMax = Math.max(xs.length ? Math.max(...xs) : 1, xMin + 1);
  let yMin = 0;
  let yMax = 1;
  if (!opts.unitRange || ys.some((v) => v < 0 || v > 1)) {
    yMin = Math.min(0, ...ys);
    const top = Math.max(...ys, yMin + 1e-9);
    const step = niceStep(top - yMin, 4);
    yMax = ys.length ? Math.ceil(top / step) * step : 1;
  }
  const X = (x) => pad.left + ((x - xMin) / (xMax - xMin)) * plotW;
  const Y = (y) => pad.top + (1 - (y - yMin) / (yMax - yMin)) * plotH;

  // Grid and y labels.
  ctx.strokeStyle = COLORS.grid;
  ctx.fillStyle = COLORS.text;
  ctx.lineWidth = 1;
  ctx.textAlign = "right";
  ctx.textBaseline = "middle";
  const yStep = niceStep(yMax - yMin, 4);
  for (let v = yMin; v <= yMax + yStep / 1e6; v += yStep) {
    const y = Math.round(Y(v)) + 0.5;
    ctx.beginPath(); ctx.moveTo(pad.left, y); ctx.lineTo(pad.left + plotW, y); ctx.stroke();
    ctx.fillText(opts.format(v, yStep), pad.left - 6, y);
  }
  // x labels: whole rounds only.
  ctx.textAlign = "center";
  ctx.textBaseline = "top";
  const xStep = Math.max(1, Math.round(niceStep(xMax - xMin, Math.max(2, Math.floor(plotW / 60)))));
  for (let v = Math.ceil(xMin / xStep) * xStep; v <= xMax; v += xStep) {
    ctx.fillText(String(v), X(v), pad.top + plotH + 5);
  }
  ctx.fillText("round", pad.left + plotW / 2, pad.top + plotH + 19);
  // Axes.
  ctx.strokeStyle = COLORS.axis;
  ctx.beginPath();
  ctx.moveTo(pad.left + 0.5, pad.top);
  ctx.lineTo(pad.left + 0.5, pad.top + plotH + 0.5);
  ctx.lineTo(pad.left + plotW, pad.top + plotH + 0.5);
  ctx.stroke();

  if (!points.length) {
    ctx.textBaseline = "middle";
    ctx.fillText(`no ${opts.label} yet`, pad.left + plotW / 2, pad.top + plotH / 2);
  } else {
    ctx.strokeStyle = opts.color;
    ctx.fillStyle = opts.color;
    ctx.lineWidth = 2;
    ctx.lineJoin = "round";
    ctx.beginPath();
    points.forEach(([x, y], i) => (i ? ctx.lineTo(X(x), Y(y)) : ctx.moveTo(X(x), Y(y))));
    ctx.stroke();
    if (points.length <= 60) {
      for (const [x, y] of points) {
        ctx.beginPath(); ctx.arc(X(x), Y(y), 3, 0, 2 * Math.PI); ctx.fill();
      }
    }
  }
  canvas.dataset.points = String(points.length);
}

/** Redraw when the pixel ratio changes (zoom, another monitor). */
function watchPixelRatio() {
  matchMedia(`(resolution: ${window.devicePixelRatio}dppx)`)
    .addEventListener("change", () => { drawCharts(); watchPixelRatio(); }, { once: true });
}

// -- events -----------------------------------------------------------------------------

function eventItem(e) {
  return el("li", {},
    el("time", { textContent: clock(e.ts), dateTime: new Date(e.ts * 1000).toISOString() }),
    el("span", { className: "kind", textContent: dash(e.kind) }),
    el("span", { className: "detail", textContent: dash(e.detail) }));
}

// The list (the DOM is the only copy) shows the newest MAX_EVENTS events, newest first.
// A live event adds one item at the top and drops the oldest: no redraw of the whole list
// per event. ``replace`` starts the list over (the history, after a reconnect).
function addEvents(entries, { replace = false } = {}) {
  const fresh = entries.filter((e) => e && isNum(e.ts)).slice(-MAX_EVENTS);
  const list = $("events");
  if (replace || list.querySelector(".muted")) list.replaceChildren();  // or the placeholder
  list.prepend(...fresh.reverse().map(eventItem));
  while (list.children.length > MAX_EVENTS) list.lastElementChild.remove();
  if (!list.children.length) {
    list.append(el("li", { className: "muted", textContent: "no events yet" }));
  }
}

// -- configuration ----------------------------------------------------------------------

function kindOf(value) {
  if (typeof value === "boolean") return "bool";
  if (typeof value === "number") return "number";
  if (value === null || typeof value === "string") return "text";
  return "json";
}

/** The config form; `data` is a GET or POST /api/config answer (POST has no "runtime"). */
function renderConfig(data) {
  app.config = data.config || {};
  if (Array.isArray(data.runtime)) app.runtime = new Set(data.runtime);
  const runtime = app.runtime;
  const keys = Object.keys(app.config).sort((a, b) =>
    Number(runtime.has(b)) - Number(runtime.has(a)) || a.localeCompare(b));
  $("config-fields").replaceChildren(
    ...keys.map((key) => configField(key, app.config[key], runtime.has(key))));
}

function configField(key, value, editable) {
  const kind = kindOf(value);
  const input = el("input", { id: `cfg-${key}`, name: key, disabled: !editable });
  input.dataset.kind = kind;
  if (kind === "bool") {
    input.type = "checkbox";
    input.checked = value;
  } else {
    input.type = kind === "number" ? "number" : "text";
    if (kind === "number") input.step = "any";
    input.value = kind === "json" ? JSON.stringify(value) : value === null ? "" : String(value);
    if (value === null) input.placeholder = "not set";
  }
  const label = el("label", { htmlFor: input.id, textContent: key });
  return el("div", { className: editable ? "field runtime" : "field" }, label, input);
}

/** The edited runtime values that differ from the node's, typed like the originals. */
function configChanges() {
  const changes = {};
  for (const input of $("config-fields").querySelectorAll("input:not([disabled])")) {
    const key = input.name;
    let value;
    if (input.dataset.kind === "bool") {
      value = input.checked;
    } else if (input.dataset.kind === "number") {
      value = Number(input.value);
      if (input.value.trim() === "" || !Number.isFinite(value)) throw new Error(`${key}: a number`);
    } else if (input.dataset.kind === "json") {
      try { value = JSON.parse(input.value); } catch { throw new Error(`${key}: not valid JSON`); }
    } else {
      value = input.value === "" && app.config[key] === null ? null : input.value;
    }
    if (JSON.stringify(value) !== JSON.stringify(app.config[key])) changes[key] = value;
  }
  return changes;
}

async function onConfigSubmit(event) {
  event.preventDefault();
  showError("config-error", "");
  setText("config-status", "");
  let changes;
  try {
    changes = configChanges();
  } catch (err) {
    showError("config-error", err.message);
    return;
  }
  if (!Object.keys(changes).length) { setText("config-status", "nothing changed"); return; }
  try {
    const result = await api("POST", "/api/config", changes);
    renderConfig(result);
    setText("config-status", `applied: ${(result.applied || []).join(", ")}`);
  } catch (err) {
    showError("config-error", err.message);
  }
}

// -- start ------------------------------------------------------------------------------

function main() {
  $("token-form").addEventListener("submit", onTokenSubmit);
  $("config-form").addEventListener("submit", onConfigSubmit);
  $("start").addEventListener("click", () => control("start"));
  $("stop").addEventListener("click", () => control("stop"));
  const observer = new ResizeObserver(drawCharts);
  observer.observe($("acc-chart"));
  observer.observe($("loss-chart"));
  watchPixelRatio();
  addEvents([]);
  drawCharts();
  app.token = takeToken();
  connect();
}

main();
