// The dashboard: runs (live), one run's nodes (live) and the analytics, over the gateway's GraphQL.
"use strict";

// Every GraphQL document this page sends, and nothing else: tests/gateway/test_dashboard.py
// validates each one against the schema and runs it, so the page cannot drift from the schema.
// graphql-documents:begin
const DOCUMENTS = {
  me: `query Me { me { subject tenant roles } }`,
  runs: `query Runs($status: String, $first: Int!, $after: String) {
    runs(status: $status, first: $first, after: $after) {
      edges { cursor node { id workflow workflowVersion status startedAt finishedAt durationMs error } }
      pageInfo { hasNextPage endCursor }
    }
  }`,
  run: `query Run($id: String!) {
    run(id: $id) {
      id workflow workflowVersion status version error input outputs
      nodes { id status attempt errorClass error output }
      attempts { nodeId attempt attemptId nodeType status scheduledAt finishedAt durationMs errorClass message }
    }
  }`,
  metrics: `query Metrics($since: DateTime) {
    metrics(since: $since) { runsPerMinute nodeTypeFailureRates nodeDurations }
  }`,
  allRunEvents: `subscription AllRunEvents($fromPosition: Int) {
    allRunEvents(fromPosition: $fromPosition) { runId version type time }
  }`,
  runEvents: `subscription RunEvents($runId: String!, $fromVersion: Int!) {
    runEvents(runId: $runId, fromVersion: $fromVersion) { runId version type }
  }`,
};
// graphql-documents:end

const STATUSES = ["all", "running", "completed", "failed", "cancelled"];
const RUN_STATUS_OF_EVENT = { Started: "running", Completed: "completed", Failed: "failed", Cancelled: "cancelled" };
const PAGE = 25;
const $ = (id) => document.getElementById(id);

let token = null;
let live = null;
let chosenStatus = "all";
let endCursor = null;
let chosenRun = null;
let runWatch = null;

// ---- GraphQL over HTTP and over graphql-transport-ws -----------------------

class GraphQLError extends Error {
  constructor(errors) {
    super(errors.map((e) => e.message).join("; "));
    this.codes = errors.map((e) => (e.extensions || {}).code);
  }
}

async function request(name, variables = {}) {
  const response = await fetch("/graphql", {
    method: "POST",
    headers: { "content-type": "application/json", authorization: `Bearer ${token}` },
    body: JSON.stringify({ query: DOCUMENTS[name], variables }),
  });
  const body = await response.json();
  if (body.errors && body.errors.length) throw new GraphQLError(body.errors);
  return body.data;
}

// The client side of graphql-transport-ws: connection_init (the token in its payload, as the
// gateway expects), then subscribe / next / error / complete per id, and pong for ping.
class Live {
  constructor(onState) {
    this.onState = onState;
    this.subscriptions = new Map();
    this.nextId = 1;
    this.socket = null;
    this.acknowledged = false;
    this.retryDelay = 500;
    this.closed = false;
  }

  connect() {
    const url = `${location.protocol === "https:" ? "wss:" : "ws:"}//${location.host}/graphql`;
    const socket = new WebSocket(url, "graphql-transport-ws");
    this.socket = socket;
    this.acknowledged = false;
    socket.onopen = () => socket.send(JSON.stringify({ type: "connection_init", payload: { Authorization: `Bearer ${token}` } }));
    socket.onmessage = (message) => this.receive(JSON.parse(message.data));
    socket.onclose = (event) => {
      this.onState(false);
      if (this.closed) return;
      if (event.code === 4403 || event.code === 4401) return signOut("the token was refused: " + (event.reason || event.code));
      // Reconnect, and let each subscription resume where it stopped.
      setTimeout(() => this.connect(), this.retryDelay);
      this.retryDelay = Math.min(this.retryDelay * 2, 10000);
    };
  }

  receive(message) {
    const subscription = this.subscriptions.get(message.id);
    switch (message.type) {
      case "connection_ack":
        this.acknowledged = true;
        this.retryDelay = 500;
        this.onState(true);
        for (const [id, s] of this.subscriptions) this.send(id, s);
        break;
      case "ping":
        this.socket.send(JSON.stringify({ type: "pong" }));
        break;
      case "next":
        if (subscription) subscription.next(message.payload);
        break;
      case "error":
        if (subscription) {
          this.subscriptions.delete(message.id);
          subscription.error(new GraphQLError(message.payload));
        }
        break;
      case "complete":
        if (subscription) {
          this.subscriptions.delete(message.id);
          subscription.complete();
        }
        break;
    }
  }

  send(id, subscription) {
    const variables = subscription.variables();
    this.socket.send(JSON.stringify({ id, type: "subscribe", payload: { query: DOCUMENTS[subscription.name], variables } }));
  }

  // `variables` is a function: on a reconnect it is asked again, so a subscription resumes.
  subscribe(name, variables, handlers) {
    const id = String(this.nextId++);
    const subscription = { name, variables, next: () => {}, error: () => {}, complete: () => {}, ...handlers };
    this.subscriptions.set(id, subscription);
    if (this.acknowledged) this.send(id, subscription);
    return id;
  }

  unsubscribe(id) {
    if (this.subscriptions.delete(id) && this.acknowledged) this.socket.send(JSON.stringify({ id, type: "complete" }));
  }

  close() {
    this.closed = true;
    if (this.socket) this.socket.close(1000);
  }
}

// ---- small helpers ---------------------------------------------------------

function element(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attributes)) {
    if (key === "class") node.className = value;
    else node.setAttribute(key, value);
  }
  for (const child of children) node.append(child instanceof Node ? child : document.createTextNode(child ?? ""));
  return node;
}

function badge(status) {
  return element("span", { class: `status ${status}` }, status);
}

function duration(ms) {
  if (ms === null || ms === undefined) return "";
  if (ms < 1000) return `${Math.round(ms)} ms`;
  if (ms < 60000) return `${(ms / 1000).toFixed(1)} s`;
  return `${Math.floor(ms / 60000)} m ${Math.round((ms % 60000) / 1000)} s`;
}

function when(iso) {
  return iso ? new Date(iso).toLocaleTimeString() : "";
}

function shown(errorElement, error) {
  errorElement.hidden = !error;
  errorElement.textContent = error ? String(error.message || error) : "";
}

// Coalesces bursts of live events into one refresh.
function debounced(action, ms) {
  let timer = null;
  return () => {
    clearTimeout(timer);
    timer = setTimeout(action, ms);
  };
}

// ---- runs ------------------------------------------------------------------

function renderFilters() {
  const filters = $("filters");
  filters.replaceChildren(
    ...STATUSES.map((status) => {
      const button = element("button", { class: "quiet", "aria-pressed": String(status === chosenStatus) }, status);
      button.onclick = () => {
        chosenStatus = status;
        renderFilters();
        loadRuns();
      };
      return button;
    }),
  );
}

function runRow(run) {
  const row = element(
    "tr",
    { class: `run${run.id === chosenRun ? " chosen" : ""}`, "data-run": run.id },
    element("td", {}, element("span", { class: "mono" }, run.id.slice(0, 8))),
    element("td", {}, `${run.workflow} v${run.workflowVersion}`),
    element("td", {}, badge(run.status)),
    element("td", {}, when(run.startedAt)),
    element("td", { class: "num" }, duration(run.durationMs)),
  );
  row.onclick = () => chooseRun(run.id);
  return row;
}

async function loadRuns(append = false) {
  try {
    const variables = { status: chosenStatus === "all" ? null : chosenStatus, first: PAGE, after: append ? endCursor : null };
    const { runs } = await request("runs", variables);
    const rows = runs.edges.map((edge) => runRow(edge.node));
    if (append) $("runs").append(...rows);
    else $("runs").replaceChildren(...rows);
    endCursor = runs.pageInfo.endCursor;
    $("more").hidden = !runs.pageInfo.hasNextPage;
    shown($("runs-error"), null);
  } catch (error) {
    shown($("runs-error"), error);
  }
}

const refreshRuns = debounced(() => loadRuns(), 400);

// The run list comes from the projections, a moment behind the events: a live event updates
// its row at once, and the list is read again shortly after.
function watchAllRuns() {
  live.subscribe("allRunEvents", () => ({ fromPosition: null }), {
    next: ({ data }) => {
      const event = data.allRunEvents;
      const status = RUN_STATUS_OF_EVENT[event.type];
      const row = document.querySelector(`tr[data-run="${CSS.escape(event.runId)}"]`);
      if (row && status) row.children[2].replaceChildren(badge(status));
      if (status) refreshRuns();
    },
    error: (error) => shown($("runs-error"), error),
  });
}

// ---- one run ---------------------------------------------------------------

// A run is chosen by a click or by the link: #run=ID (shareable; the token is not in it).
function linkedRun() {
  const match = /^#run=([0-9a-fA-F-]{1,64})$/.exec(location.hash);
  return match ? match[1] : null;
}

function chooseRun(runId) {
  chosenRun = runId;
  if (linkedRun() !== runId) history.replaceState(null, "", `${location.pathname}#run=${runId}`);
  for (const row of document.querySelectorAll("tr.run")) row.classList.toggle("chosen", row.dataset.run === runId);
  if (runWatch) live.unsubscribe(runWatch);
  let seen = 0;
  const refresh = debounced(() => loadRun(runId), 150);
  runWatch = live.subscribe("runEvents", () => ({ runId, fromVersion: seen + 1 }), {
    next: ({ data }) => {
      seen = Math.max(seen, data.runEvents.version);
      refresh();
    },
    error: (error) => shown($("detail-error"), error),
    complete: () => loadRun(runId),
  });
  loadRun(runId);
}

async function loadRun(runId) {
  if (runId !== chosenRun) return;
  try {
    const { run } = await request("run", { id: runId });
    renderRun(run);
  } catch (error) {
    shown($("detail-error"), error);
  }
}

function renderRun(run) {
  $("detail-empty").hidden = true;
  $("detail-body").hidden = false;
  $("detail-title").textContent = `${run.workflow} v${run.workflowVersion} · ${run.id}`;
  $("detail-status").replaceWith(Object.assign(badge(run.status), { id: "detail-status" }));
  shown($("detail-error"), run.error);
  const attemptsOf = new Map();
  for (const attempt of run.attempts) {
    if (!attemptsOf.has(attempt.nodeId)) attemptsOf.set(attempt.nodeId, []);
    attemptsOf.get(attempt.nodeId).push(attempt);
  }
  $("nodes").replaceChildren(
    ...run.nodes.map((node) => {
      const attempts = attemptsOf.get(node.id) || [];
      const spent = attempts.reduce((total, a) => total + (a.durationMs || 0), 0);
      // A node that got through shows its output; its failed attempts before that, folded.
      const ended = node.status === "succeeded" || node.status === "skipped" || node.status === "reused";
      const failed = attempts.filter((a) => a.status === "failed");
      const retries = failed.map((a) => `attempt ${a.attempt}: ${a.errorClass}`);
      const detail = [];
      if (node.error && !ended) {
        detail.push(element("pre", { class: "error" }, `${node.errorClass || "Error"}: ${node.error}`));
      } else if (node.output !== null && node.output !== undefined) {
        detail.push(element("pre", {}, JSON.stringify(node.output, null, 2)));
      }
      if (ended && failed.length) {
        detail.push(
          element(
            "details",
            { class: "retries" },
            element("summary", {}, `after ${failed.length} failed attempt${failed.length > 1 ? "s" : ""}`),
            element("pre", { class: "error" }, failed.map((a) => `#${a.attempt} ${a.errorClass}: ${a.message || ""}`).join("\n")),
          ),
        );
      }
      return element(
        "tr",
        {},
        element("td", {}, element("span", { class: "mono" }, node.id)),
        element("td", {}, badge(node.status)),
        element("td", { class: "num", title: retries.join("\n") }, String(attempts.length || node.attempt)),
        element("td", { class: "num" }, attempts.length ? duration(spent) : ""),
        element("td", {}, ...detail),
      );
    }),
  );
  $("detail-io").textContent = JSON.stringify({ input: run.input, outputs: run.outputs }, null, 2);
}

// ---- metrics as inline SVG -------------------------------------------------

const SVG = "http://www.w3.org/2000/svg";

function svg(tag, attributes = {}, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [key, value] of Object.entries(attributes)) node.setAttribute(key, value);
  if (text !== undefined) node.textContent = text;
  return node;
}

// Bars for labelled values; each series is [values, class]. Empty data says so. A label is a
// string or [line, line]; each line is cut to the width of its bar's slot, and labels that
// would overlap are thinned out.
function barChart(container, labels, series, format) {
  const twoLines = labels.some(Array.isArray);
  const width = 480, height = twoLines ? 190 : 180, left = 44, bottom = twoLines ? 38 : 28, top = 8;
  const chart = svg("svg", { viewBox: `0 0 ${width} ${height}`, role: "img" });
  if (!labels.length) {
    chart.append(svg("text", { x: width / 2, y: height / 2, "text-anchor": "middle", class: "empty" }, "no data yet"));
    container.replaceChildren(chart);
    return;
  }
  const max = Math.max(...series.flatMap(([values]) => values), 0) || 1;
  const slot = (width - left) / labels.length;
  const bar = Math.max(1, (slot * 0.8) / series.length);
  const y = (value) => top + (height - top - bottom) * (1 - value / max);
  const charWidth = 6.2; // at the charts' 11px type
  const lines = (label) => (Array.isArray(label) ? label : [label]).map(String);
  const longest = Math.max(...labels.map((label) => Math.max(...lines(label).map((line) => line.length))));
  // Show every label whose text fits its slot; else one in `every`, with that much room.
  const every = Math.max(1, Math.min(Math.ceil(labels.length / 8), Math.ceil((longest * charWidth + 6) / slot)));
  const room = Math.max(3, Math.floor((slot * every - 6) / charWidth));
  const cut = (line) => (line.length > room ? `${line.slice(0, room - 1)}…` : line);
  chart.append(svg("line", { x1: left, x2: width, y1: height - bottom, y2: height - bottom, class: "axis" }));
  chart.append(svg("text", { x: left - 4, y: top + 8, "text-anchor": "end" }, format(max)));
  chart.append(svg("text", { x: left - 4, y: height - bottom, "text-anchor": "end" }, format(0)));
  labels.forEach((label, i) => {
    const name = lines(label).join(" · ");
    series.forEach(([values, kind], j) => {
      const x = left + i * slot + slot * 0.1 + j * bar;
      const rect = svg("rect", { x, y: y(values[i]), width: bar, height: height - bottom - y(values[i]), class: `bar ${kind}` });
      rect.append(svg("title", {}, `${name}: ${format(values[i])}`));
      chart.append(rect);
    });
    if (i % every === 0) {
      const text = svg("text", { x: left + i * slot + slot / 2, y: height - bottom + 14, "text-anchor": "middle" });
      text.append(svg("title", {}, name));
      lines(label).forEach((line, n) => {
        text.append(svg("tspan", { x: left + i * slot + slot / 2, dy: n ? 12 : 0 }, cut(line)));
      });
      chart.append(text);
    }
  });
  container.replaceChildren(chart);
}

// Failure rates come per workflow and node type; the chart shows them per node type.
function byNodeType(rows) {
  const types = new Map();
  for (const row of rows) {
    const [executions, failures] = types.get(row.node_type) || [0, 0];
    types.set(row.node_type, [executions + row.executions, failures + row.failures]);
  }
  return [...types]
    .map(([type, [executions, failures]]) => ({ type, rate: executions ? failures / executions : 0 }))
    .sort((a, b) => b.rate - a.rate || a.type.localeCompare(b.type));
}

async function loadMetrics() {
  try {
    const since = new Date(Date.now() - 24 * 3600 * 1000).toISOString();
    const { metrics } = await request("metrics", { since });
    const perMinute = new Map();
    for (const row of metrics.runsPerMinute) {
      const minute = new Date(row.minute).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
      const [done, failed] = perMinute.get(minute) || [0, 0];
      perMinute.set(minute, [done + row.completed + row.failed + row.cancelled, failed + row.failed]);
    }
    const minutes = [...perMinute.keys()].slice(-60);
    barChart($("chart-throughput"), minutes, [
      [minutes.map((m) => perMinute.get(m)[0]), ""],
      [minutes.map((m) => perMinute.get(m)[1]), "failed"],
    ], (v) => String(Math.round(v)));
    const types = byNodeType(metrics.nodeTypeFailureRates);
    barChart($("chart-failures"), types.map((r) => r.type), [[types.map((r) => r.rate * 100), "failed"]],
      (v) => `${v.toFixed(v < 10 ? 1 : 0)}%`);
    const durations = metrics.nodeDurations;
    barChart($("chart-durations"), durations.map((r) => [r.node_type, r.workflow]), [
      [durations.map((r) => r.p50_ms), ""],
      [durations.map((r) => r.p99_ms), "p99"],
    ], (v) => duration(v));
    shown($("metrics-error"), null);
  } catch (error) {
    shown($("metrics-error"), error);
  }
}

// ---- signing in and out ----------------------------------------------------

function signOut(reason) {
  localStorage.removeItem("citadel.token");
  token = null;
  if (live) live.close();
  live = null;
  $("board").hidden = true;
  $("signout").hidden = true;
  $("who").textContent = "";
  $("signin").hidden = false;
  shown($("signin-error"), reason || null);
}

async function signIn(candidate) {
  token = candidate;
  try {
    const { me } = await request("me");
    $("who").textContent = `${me.subject} · ${me.tenant} · ${me.roles.join(", ")}`;
  } catch (error) {
    return signOut(`that token does not open the gateway: ${error.message}`);
  }
  localStorage.setItem("citadel.token", candidate);
  $("signin").hidden = true;
  $("board").hidden = false;
  $("signout").hidden = false;
  live = new Live((on) => {
    $("live").textContent = on ? "live" : "reconnecting";
    $("live").classList.toggle("on", on);
  });
  live.connect();
  renderFilters();
  watchAllRuns();
  loadRuns();
  loadMetrics();
  if (linkedRun()) chooseRun(linkedRun());
}

document.addEventListener("DOMContentLoaded", () => {
  // A token in the link is taken once, then kept out of the address bar and the history.
  const fromLink = new URLSearchParams(location.search).get("token");
  if (fromLink) history.replaceState(null, "", location.pathname + location.hash);
  $("token-form").onsubmit = (event) => {
    event.preventDefault();
    signIn($("token").value.trim());
  };
  $("signout").onclick = () => signOut();
  $("more").onclick = () => loadRuns(true);
  $("refresh-metrics").onclick = loadMetrics;
  window.addEventListener("hashchange", () => {
    if (live && linkedRun() && linkedRun() !== chosenRun) chooseRun(linkedRun());
  });
  const known = fromLink || localStorage.getItem("citadel.token");
  if (known) signIn(known);
  else signOut();
});
