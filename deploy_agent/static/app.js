// The status page: reads the agent's own JSON API every second while the tab is visible.
// No framework, no build step; everything it loads comes from this agent.

const POLL_MS = 1000;
const EVENTS_SHOWN = 20;
const TOKEN_KEY = "deploy-agent-token";

const state = {
  token: sessionStorage.getItem(TOKEN_KEY),
  timer: null,
  busy: false,
  events: [],
  lastEvent: null,
  logs: null, // {name, controller}
};

class Unauthorized extends Error {}

const $ = (id) => document.getElementById(id);

function el(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attributes)) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "text") node.textContent = value;
    else if (key === "style") Object.assign(node.style, value); // CSSOM: allowed by the page's CSP
    else node.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children) if (child !== null && child !== undefined) node.append(child);
  return node;
}

function headers() {
  return state.token ? { Authorization: `Bearer ${state.token}` } : {};
}

async function api(path) {
  const response = await fetch(path, { headers: headers(), cache: "no-store" });
  if (response.status === 401) throw new Unauthorized();
  if (!response.ok) throw new Error(`${path} answered ${response.status}`);
  return response.json();
}

// -- formatting -------------------------------------------------------------------------

function gb(value) {
  if (value === null || value === undefined) return "–";
  return `${Number(value.toFixed(1))} GB`;
}

function duration(seconds) {
  if (seconds < 60) return `${seconds}s`;
  if (seconds < 3600) return `${Math.floor(seconds / 60)}m${String(seconds % 60).padStart(2, "0")}s`;
  if (seconds < 86400) return `${Math.floor(seconds / 3600)}h${String(Math.floor(seconds % 3600 / 60)).padStart(2, "0")}m`;
  return `${Math.floor(seconds / 86400)}d${Math.floor(seconds % 86400 / 3600)}h`;
}

function clock(iso) {
  const moment = new Date(iso);
  return Number.isNaN(moment.getTime()) ? iso : moment.toLocaleTimeString();
}

// -- the agent, its warnings ------------------------------------------------------------

function renderAgent(health) {
  $("node").textContent = health.hostname;
  document.title = `${health.hostname} · deploy-agent`;
  $("version").textContent = health.version;
  $("engine").textContent = health.engine;
  $("engine").className = health.engine === "reachable" ? "status-healthy" : "status-exited";
  $("auth").textContent = health.auth === "token" ? "token required" : "off";
  $("running").textContent = String(health.services_running);
  const list = $("warnings");
  list.replaceChildren(...health.warnings.map((w) => el("li", {}, el("strong", { text: w.code }), ` ${w.message}`)));
  $("warnings-section").hidden = health.warnings.length === 0;
}

// -- GPUs -------------------------------------------------------------------------------

function renderGpus(gpus, colours) {
  $("no-gpus").hidden = gpus.length > 0;
  $("gpus").replaceChildren(...gpus.map((gpu) => gpuCard(gpu, colours)));
}

function gpuCard(gpu, colours) {
  const total = gpu.vram_total_gb || 1;
  const share = (value) => `${Math.max(0, Math.min(100, (value / total) * 100))}%`;
  const bar = el("div", { class: "bar", role: "img",
    "aria-label": `GPU ${gpu.id}: ${gb(gpu.vram_committed_gb)} committed of ${gb(gpu.vram_total_gb)}, ${gb(gpu.vram_free_gb)} free` });
  const legend = el("ul", { class: "legend" });
  for (const service of gpu.service_vram) {
    const committed = Math.max(service.declared_gb, service.used_gb ?? 0);
    const segment = el("span", { class: `service ${colours.get(service.name)}`, style: { width: share(committed) },
      title: `${service.name}: declared ${gb(service.declared_gb)}, used ${gb(service.used_gb)}` });
    if (service.used_gb !== null && committed > 0) {
      segment.append(el("span", { class: "used", style: { width: `${(service.used_gb / committed) * 100}%` } }));
    }
    bar.append(segment);
    const used = service.used_gb === null ? "" : `, uses ${gb(service.used_gb)}`;
    legend.append(el("li", {}, el("span", { class: `swatch ${colours.get(service.name)}` }),
      `${service.name}: declared ${gb(service.declared_gb)}${used}`));
  }
  if (gpu.vram_foreign_gb > 0) {
    bar.append(el("span", { class: "foreign", style: { width: share(gpu.vram_foreign_gb) },
      title: `other processes: ${gb(gpu.vram_foreign_gb)}` }));
    legend.append(el("li", {}, el("span", { class: "swatch foreign" }), `other processes: ${gb(gpu.vram_foreign_gb)}`));
  }
  legend.append(el("li", {}, el("span", { class: "swatch free" }), `free: ${gb(gpu.vram_free_gb)}`));
  const utilisation = gpu.utilization_pct === null ? "" : ` · ${gpu.utilization_pct}% busy`;
  return el("article", { class: "gpu", "data-gpu": String(gpu.id) },
    el("header", {}, el("h3", { text: `${gpu.node_name ? `${gpu.node_name} · ` : ""}GPU ${gpu.id} · ${gpu.name}` })),
    el("p", { class: "numbers",
      text: `${gb(gpu.vram_total_gb)} total · ${gb(gpu.vram_reserved_gb)} reserved · ${gb(gpu.vram_used_gb)} in use${utilisation}` }),
    bar, legend);
}

// -- services ---------------------------------------------------------------------------

const COLUMNS = [
  { label: "Name", cell: (s) => el("th", { scope: "row", text: s.name }) },
  { label: "Status", cell: (s) => el("td", { class: `status status-${s.status}`, title: s.reason,
    text: s.exit_code !== null ? `${s.status} (${s.exit_code})` : s.reason ? `${s.status}: ${s.reason}` : s.status }) },
  { label: "URL", cell: (s) => s.host === null ? el("td", { text: "–" })
    : el("td", {}, el("a", { href: s.host, rel: "noopener", text: s.host, "data-key": `url:${s.name}` })) },
  { label: "Node", when: (all) => new Set(all.map((s) => s.node_name)).size > 1,
    cell: (s) => el("td", { text: s.node_name }) },
  { label: "GPU", cell: (s) => el("td", { class: "num", text: s.gpu === null ? "–" : String(s.gpu) }) },
  { label: "VRAM declared", cell: (s) => el("td", { class: "num", text: s.gpu === null && !s.vram_gb ? "–" : gb(s.vram_gb) }) },
  { label: "VRAM used", when: (all) => all.some((s) => s.vram_used_gb !== null),
    cell: (s) => el("td", { class: s.vram_over ? "num over" : "num",
      text: s.vram_used_gb === null ? "–" : `${gb(s.vram_used_gb)}${s.vram_over ? " (over)" : ""}` }) },
  { label: "Uptime", cell: (s) => el("td", { class: "num", text: duration(s.uptime) }) },
  { label: "Restarts", cell: (s) => el("td", { class: "num", text: String(s.restarts) }) },
  { label: "Leases", when: (all) => all.some((s) => s.leases !== undefined),
    cell: (s) => el("td", { class: "num",
      text: s.leases ? `${s.leases} until ${clock(s.lease_expires_at)}` : "–" }) },
  { label: "Image", cell: (s) => el("td", { text: s.image }) },
  { label: "Logs", cell: (s) => el("td", {}, logsButton(s.name)) },
];

function logsButton(name) {
  const button = el("button", { type: "button", text: "Logs", "aria-label": `Logs of ${name}`,
    "data-key": `logs:${name}` });
  button.addEventListener("click", () => openLogs(name));
  return button;
}

// Redrawing replaces elements: whatever had the keyboard focus gets it back afterwards.
function keepingFocus(container, redraw) {
  const key = container.contains(document.activeElement) ? document.activeElement.dataset.key : undefined;
  redraw();
  if (key) container.querySelector(`[data-key="${CSS.escape(key)}"]`)?.focus();
}

function renderServices(services) {
  keepingFocus($("services"), () => drawServices(services));
}

function drawServices(services) {
  const columns = COLUMNS.filter((c) => !c.when || c.when(services));
  const table = $("services");
  table.tHead.rows[0].replaceChildren(...columns.map((c) => el("th", { scope: "col", text: c.label })));
  table.tBodies[0].replaceChildren(...services.map((service) => {
    const cells = columns.map((c) => {
      const cell = c.cell(service);
      cell.setAttribute("data-label", c.label);
      return cell;
    });
    return el("tr", { "data-service": service.name }, ...cells);
  }));
  table.hidden = services.length === 0;
  $("no-services").hidden = services.length > 0;
}

// -- events -----------------------------------------------------------------------------

function renderEvents(fresh) {
  for (const event of fresh) {
    state.events.unshift(event);
    state.lastEvent = Math.max(state.lastEvent ?? 0, event.id);
  }
  state.events.length = Math.min(state.events.length, EVENTS_SHOWN);
  $("events").tBodies[0].replaceChildren(...state.events.map((event) => {
    const details = Object.entries(event.details).filter(([, v]) => v !== null && v !== "" &&
      !(Array.isArray(v) && v.length === 0)).map(([k, v]) => `${k}=${Array.isArray(v) ? v.join(",") : v}`).join(" ");
    return el("tr", { "data-event": String(event.id) },
      el("td", { "data-label": "Time", text: clock(event.time) }),
      el("td", { "data-label": "Event", text: event.kind }),
      el("td", { "data-label": "Service", text: event.service ?? "–" }),
      el("td", { "data-label": "Reason", text: event.reason ?? "–" }),
      el("td", { "data-label": "Details", text: details || "–" }));
  }));
  $("events").hidden = state.events.length === 0;
  $("no-events").hidden = state.events.length > 0;
}

// -- the queue: GPU deploys waiting for room ----------------------------------------------

function renderQueue(queue) {
  $("queue").replaceChildren(...queue.map((w) => el("li", { "data-name": w.name },
    el("strong", { text: w.name }),
    ` needs ${gb(w.needs_gb)} · priority ${w.priority} · waiting since ${clock(w.since)}`)));
  $("queue-section").hidden = queue.length === 0;
}

// -- logs: the tail, then what follows, through fetch (EventSource can't send a token) ---

function openLogs(name) {
  closeLogs();
  state.logs = { name, controller: null };
  $("logs-name").textContent = name;
  $("logs").textContent = "";
  $("logs-section").hidden = false;
  startLogs();
  $("logs").focus();
}

function closeLogs() {
  if (state.logs?.controller) state.logs.controller.abort();
  state.logs = null;
  $("logs-section").hidden = true;
}

async function startLogs() {
  const logs = state.logs;
  if (!logs || document.visibilityState !== "visible") return;
  if (logs.controller) logs.controller.abort();
  const controller = new AbortController();
  logs.controller = controller;
  const follow = $("logs-follow").checked;
  const pre = $("logs");
  pre.textContent = "";
  try {
    const response = await fetch(`/services/${encodeURIComponent(logs.name)}/logs?tail=200&follow=${follow ? 1 : 0}`,
      { headers: headers(), signal: controller.signal, cache: "no-store" });
    if (!response.ok) {
      pre.textContent = response.status === 404 ? "This service is gone." : `The agent answered ${response.status}.`;
      return;
    }
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      const atBottom = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 4;
      pre.append(decoder.decode(value, { stream: true }));
      if (atBottom) pre.scrollTop = pre.scrollHeight;
    }
  } catch (error) {
    if (error.name !== "AbortError") pre.append(`\n[the log stream ended: ${error.message}]\n`);
  }
}

// -- the loop ---------------------------------------------------------------------------

async function refresh() {
  const health = await (await fetch("/health", { cache: "no-store" })).json();
  renderAgent(health);
  const needsToken = health.auth === "token";
  if (needsToken && !state.token) {
    showTokenPrompt(false);
    return false;
  }
  $("token-section").hidden = true;
  const since = state.lastEvent === null ? `limit=${EVENTS_SHOWN}` : `since=${state.lastEvent}`;
  const [services, gpus, events, queue] = await Promise.all([api("/services"), api("/gpus"),
    api(`/events?${since}`), health.queued ? api("/queue") : Promise.resolve([])]);
  const colours = new Map(services.map((s, i) => [s.name, `s${i % 6}`]));
  renderGpus(gpus, colours);
  renderServices(services);
  renderQueue(queue);
  renderEvents(events);
  if (state.logs && !services.some((s) => s.name === state.logs.name)) {
    $("logs").append("\n[the service was stopped]\n");
    state.logs.controller?.abort();
  }
  return true;
}

function showTokenPrompt(refused) {
  $("token-section").hidden = false;
  $("token-refused").hidden = !refused;
  for (const id of ["gpus-section", "services-section", "events-section", "logs-section", "queue-section"]) {
    $(id).hidden = true;
  }
}

function showData() {
  for (const id of ["gpus-section", "services-section", "events-section"]) $(id).hidden = false;
}

async function tick() {
  clearTimeout(state.timer);
  if (state.busy || document.visibilityState !== "visible") return;
  state.busy = true;
  try {
    if (await refresh()) {
      showData();
      $("updated").textContent = `Updated ${new Date().toLocaleTimeString()}`;
    }
  } catch (error) {
    if (error instanceof Unauthorized) {
      state.token = null;
      sessionStorage.removeItem(TOKEN_KEY);
      showTokenPrompt(true);
    } else {
      $("updated").textContent = `The agent did not answer (${error.message}); trying again.`;
    }
  } finally {
    state.busy = false;
    if (document.visibilityState === "visible") state.timer = setTimeout(tick, POLL_MS);
  }
}

document.addEventListener("visibilitychange", () => {
  if (document.visibilityState === "visible") {
    tick();
    startLogs();
  } else {
    clearTimeout(state.timer);
    state.logs?.controller?.abort();
  }
});

$("token-form").addEventListener("submit", (event) => {
  event.preventDefault();
  state.token = $("token").value.trim();
  $("token").value = "";
  sessionStorage.setItem(TOKEN_KEY, state.token);
  tick();
});
$("logs-close").addEventListener("click", closeLogs);
$("logs-follow").addEventListener("change", startLogs);

tick();
