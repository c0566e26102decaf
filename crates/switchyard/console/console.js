// Switchyard's web console: reads the admin API with the admin token and keeps the
// shown section up to date by asking again every two seconds. Everything from the
// API is put on the page as text (never as HTML), and the token stays in this tab's
// session storage.
"use strict";

const POLL_MS = 2000;
const TOKEN_KEY = "switchyard.adminToken";

const state = {
  token: sessionStorage.getItem(TOKEN_KEY),
  info: null,
  timer: null,
  // Per trigger: the last counts seen and when, for rates.
  samples: new Map(),
  deadLetterTrigger: null,
  // The page of dead letters shown: those after this sequence.
  deadLetterAfter: 0,
  shownLog: null,
};

const $ = (id) => document.getElementById(id);

class Refused extends Error {}

async function api(path, options = {}) {
  const headers = Object.assign({}, options.headers || {});
  if (state.token) headers["Authorization"] = "Bearer " + state.token;
  const response = await fetch(path, Object.assign({}, options, { headers, cache: "no-store" }));
  if (response.status === 401 || response.status === 403) {
    let message = "the admin token was refused";
    try {
      const body = await response.json();
      if (body && body.error) message = body.error;
    } catch (_) { /* not JSON */ }
    // The token guard says so with WWW-Authenticate; a dead-letter call refused
    // because no token is configured is not a sign-in problem.
    if (response.headers.get("WWW-Authenticate")) throw new Refused(message);
    throw new Error(message);
  }
  return response;
}

async function apiJson(path, options) {
  const response = await api(path, options);
  let body = null;
  try { body = await response.json(); } catch (_) { /* empty */ }
  if (!response.ok) {
    throw new Error((body && body.error) || path + " answered " + response.status);
  }
  return body;
}

// ---- page building (text only) ----

function el(tag, attributes = {}, text) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (value === undefined || value === null) continue;
    if (name === "className") node.className = value;
    else node.setAttribute(name, value);
  }
  if (text !== undefined && text !== null) node.textContent = String(text);
  return node;
}

// Updates `tbody` to one row per item, keyed: rows that stay keep their elements (and
// focus), cells change only when their text does. `cells(item)` gives each cell as a
// string or {text, className, title}; `actions(item, row)`, when given, fills the last
// cell once, when the row is made.
function renderRows(tbody, items, key, cells, actions) {
  const existing = new Map();
  for (const row of Array.from(tbody.rows)) {
    if (existing.has(row.dataset.key)) row.remove();
    else existing.set(row.dataset.key, row);
  }
  const wanted = new Set();
  let previous = null;
  for (const item of items) {
    const id = String(key(item));
    wanted.add(id);
    let row = existing.get(id);
    const values = cells(item);
    if (!row) {
      row = el("tr");
      row.dataset.key = id;
      values.forEach((_, index) => row.appendChild(el(index === 0 ? "th" : "td", index === 0 ? { scope: "row" } : {})));
      if (actions) {
        const cell = el("td");
        actions(item, cell, row);
        row.appendChild(cell);
      }
    }
    values.forEach((value, index) => {
      const cell = row.cells[index];
      const spec = typeof value === "object" && value !== null ? value : { text: value };
      const text = spec.text === undefined || spec.text === null ? "" : String(spec.text);
      if (spec.node) {
        if (!cell.firstChild || cell.dataset.value !== text) {
          cell.replaceChildren(spec.node);
          cell.dataset.value = text;
        }
      } else if (cell.dataset.value !== undefined || cell.textContent !== text) {
        delete cell.dataset.value;
        cell.textContent = text;
      }
      const className = spec.className || "";
      if (cell.className !== className) cell.className = className;
      if (spec.title) cell.title = spec.title;
    });
    const expectedPosition = previous ? previous.nextSibling : tbody.firstChild;
    if (expectedPosition !== row) tbody.insertBefore(row, expectedPosition);
    previous = row;
  }
  for (const [id, row] of existing) if (!wanted.has(id)) row.remove();
}

// Listed by name, so rows keep their places whatever order the API gives.
function byName(items) {
  return items.slice().sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0));
}

function number(value) {
  return value === undefined || value === null ? "" : String(value);
}

function ms(value) {
  return value === undefined || value === null ? "" : value.toFixed(2);
}

function rate(value) {
  return value === null ? "…" : value.toFixed(value >= 10 ? 0 : 1);
}

function when(rfc3339) {
  if (!rfc3339) return "";
  const date = new Date(rfc3339);
  return isNaN(date) ? rfc3339 : date.toLocaleString();
}

// ---- sections ----

async function showOverview() {
  const [sources, triggers] = await Promise.all([apiJson("/v1/sources"), apiJson("/v1/triggers")]);
  renderRows($("sources").tBodies[0], byName(sources.sources), (s) => s.name, (s) => [
    s.name,
    s.kind,
    { text: s.state, className: "state-" + s.state },
    when(s.since),
    { text: number(s.restarts), className: "num" },
    { text: s.last_error || "", className: "wrap" },
  ]);
  const now = performance.now();
  renderRows($("triggers").tBodies[0], byName(triggers.triggers), (t) => t.name, (t) => {
    const errors = t.retried + t.rejected;
    const last = state.samples.get(t.name);
    let delivered = null;
    let failing = null;
    if (last && now > last.at) {
      const seconds = (now - last.at) / 1000;
      delivered = Math.max(0, t.succeeded - last.succeeded) / seconds;
      failing = Math.max(0, errors - last.errors) / seconds;
    }
    state.samples.set(t.name, { at: now, succeeded: t.succeeded, errors });
    return [
      t.superseded ? t.name + " (superseded)" : t.name,
      t.function,
      { text: number(t.lag), className: "num" },
      { text: number(t.in_flight), className: "num" },
      { text: number(t.retrying), className: "num" },
      { text: rate(delivered), className: "num" },
      { text: rate(failing), className: "num" + (failing ? " state-failed" : "") },
      { text: number(t.succeeded), className: "num" },
      { text: number(t.retried), className: "num" },
      { text: number(t.rejected), className: "num" },
    ];
  });
}

function decoded(text) {
  try { return decodeURIComponent(text); } catch (_) { return null; }
}

function selectedFunction() {
  const match = location.hash.match(/^#\/functions\/(.+)$/);
  return match ? decoded(match[1]) : null;
}

async function showFunctions() {
  const body = await apiJson("/v1/functions");
  const selected = selectedFunction();
  const tbody = $("functions").tBodies[0];
  renderRows(tbody, byName(body.functions), (f) => f.name, (f) => {
    const link = el("a", { href: "#/functions/" + encodeURIComponent(f.name) }, f.name);
    if (f.name === selected) link.setAttribute("aria-current", "true");
    const durations = f.recent_duration_ms;
    const problem = f.last_init_error ? f.last_init_error.error_type + ": " + f.last_init_error.message : "";
    return [
      { node: link, text: f.name + (f.name === selected ? "*" : "") },
      f.type,
      { text: number(f.instances.starting), className: "num" },
      { text: number(f.instances.idle), className: "num" },
      { text: number(f.instances.busy), className: "num" },
      { text: number(f.cold_starts), className: "num" },
      { text: number(f.invocations), className: "num" },
      { text: number(f.errors), className: "num" + (f.errors ? " state-failed" : "") },
      { text: durations ? ms(durations.p50) : "", className: "num" },
      { text: durations ? ms(durations.p95) : "", className: "num" },
      { text: problem, className: "wrap" + (problem ? " state-failed" : "") },
    ];
  });
  for (const row of tbody.rows) row.classList.toggle("selected", row.dataset.key === selected);
  const detail = $("function-detail");
  if (!selected) {
    detail.hidden = true;
    return;
  }
  detail.hidden = false;
  $("function-name").textContent = selected;
  let invocations = [];
  try {
    invocations = (await apiJson("/v1/functions/" + encodeURIComponent(selected) + "/invocations")).invocations;
  } catch (problem) {
    if (problem instanceof Refused) throw problem;
  }
  // A retried event's attempts share its request id.
  renderRows($("invocations").tBodies[0], invocations, (i) => i.request_id + "@" + i.started, (i) => [
    when(i.started),
    i.request_id,
    { text: i.error_type ? i.status + " (" + i.error_type + ")" : i.status, className: "status-" + i.status },
    { text: ms(i.duration_ms), className: "num" },
    { text: ms(i.init_duration_ms), className: "num" },
    i.instance,
    traceCell(i.trace_id),
  ], (i, cell) => {
    const button = el("button", { type: "button", className: "link", "aria-label": "Show the log of invocation " + i.request_id }, "Log");
    button.addEventListener("click", () => showLog(selected, i));
    cell.appendChild(button);
  });
}

function traceCell(traceId) {
  if (!traceId) return state.info && state.info.telemetry ? "not sampled" : "";
  if (state.info && state.info.trace_url) {
    const link = el("a", {
      href: state.info.trace_url.split("{trace_id}").join(encodeURIComponent(traceId)),
      target: "_blank",
      rel: "noopener noreferrer",
      title: "Trace " + traceId,
      "aria-label": "Trace " + traceId,
    }, traceId.slice(0, 12) + "…");
    return { node: link, text: traceId };
  }
  return { text: traceId };
}

async function showLog(functionName, invocation) {
  const pre = $("log");
  const key = invocation.request_id + "@" + invocation.started;
  $("log-title").hidden = false;
  $("log-request").textContent = invocation.request_id;
  pre.hidden = false;
  pre.textContent = "Reading…";
  state.shownLog = key;
  try {
    const response = await api("/v1/functions/" + encodeURIComponent(functionName) + "/logs?request_id=" +
      encodeURIComponent(invocation.request_id) + "&start=" + encodeURIComponent(invocation.started));
    const text = await response.text();
    if (!response.ok) throw new Error(text);
    const lines = text.split("\n").filter((line) => line).map((line) => {
      try {
        const parsed = JSON.parse(line);
        return parsed.time + "  " + parsed.stream.padEnd(8) + " " + parsed.message;
      } catch (_) { return line; }
    });
    if (state.shownLog === key) {
      pre.textContent = lines.length ? lines.join("\n") : "No stored lines for this invocation (yet).";
    }
  } catch (problem) {
    if (problem instanceof Refused) return signOut(problem.message);
    if (state.shownLog === key) pre.textContent = "Reading the log failed: " + problem.message;
  }
}

function selectedTrigger() {
  const match = location.hash.match(/^#\/dead-letters\/(.+)$/);
  return match ? decoded(match[1]) : null;
}

async function showDeadLetters() {
  const off = state.info && !state.info.dead_letters;
  $("dead-letters-off").hidden = !off;
  $("dead-letter-pick").hidden = off;
  if (off) return;
  const triggers = byName((await apiJson("/v1/triggers")).triggers).map((t) => t.name);
  const select = $("dead-letter-trigger");
  const names = Array.from(select.options).map((option) => option.value);
  if (names.join("\n") !== triggers.join("\n")) {
    select.replaceChildren(...triggers.map((name) => el("option", { value: name }, name)));
  }
  let trigger = selectedTrigger() || state.deadLetterTrigger || triggers[0] || null;
  if (trigger && !triggers.includes(trigger) && !trigger.startsWith("source:")) trigger = triggers[0] || null;
  if (trigger !== state.deadLetterTrigger) {
    state.deadLetterAfter = 0;
    hideDeadLetter();
  }
  state.deadLetterTrigger = trigger;
  if (trigger && select.value !== trigger && triggers.includes(trigger)) select.value = trigger;
  if (!trigger) {
    renderRows($("dead-letters").tBodies[0], [], () => "", () => []);
    $("dead-letters-empty").hidden = false;
    $("dead-letters-next").hidden = true;
    $("dead-letters-first").hidden = true;
    return;
  }
  const page = await apiJson("/v1/dead-letters/" + encodeURIComponent(trigger) + "?limit=100&after=" + state.deadLetterAfter);
  const letters = page.dead_letters;
  $("dead-letters-empty").hidden = letters.length > 0;
  state.deadLetterNext = page.next_after;
  $("dead-letters-next").hidden = page.next_after === null || page.next_after === undefined;
  $("dead-letters-first").hidden = state.deadLetterAfter === 0;
  renderRows($("dead-letters").tBodies[0], letters, (d) => trigger + "/" + d.sequence, (d) => [
    number(d.sequence),
    when(d.last_attempt_at || d.received_at),
    d.reason,
    { text: number(d.attempts), className: "num" },
    { text: (d.last_status ? d.last_status + " " : "") + (d.last_error || ""), className: "wrap" },
    { text: d.event && d.event.id ? d.event.type + " " + d.event.id : "(not a whole event)", className: "wrap" },
    d.replays ? d.replays.count + " (last " + when(d.replays.last_replayed_at) + ")" : "0",
  ], (d, cell) => {
    const show = el("button", { type: "button", "aria-label": "Show dead letter " + d.sequence }, "Show");
    show.addEventListener("click", () => showDeadLetter(trigger, d.sequence));
    const replay = el("button", { type: "button", "aria-label": "Replay dead letter " + d.sequence }, "Replay");
    replay.addEventListener("click", () => act(trigger, "replay", { sequences: [d.sequence] }, "dead letter " + d.sequence));
    const purge = el("button", { type: "button", className: "danger", "aria-label": "Purge dead letter " + d.sequence }, "Purge");
    purge.addEventListener("click", () => act(trigger, "purge", { sequences: [d.sequence] }, "dead letter " + d.sequence));
    cell.append(show, " ", replay, " ", purge);
  });
}

function hideDeadLetter() {
  $("dead-letter-title").hidden = true;
  $("dead-letter").hidden = true;
  $("dead-letter").textContent = "";
}

async function showDeadLetter(trigger, sequence) {
  const pre = $("dead-letter");
  $("dead-letter-title").hidden = false;
  $("dead-letter-sequence").textContent = sequence + " of " + trigger;
  pre.hidden = false;
  try {
    pre.textContent = JSON.stringify(await apiJson("/v1/dead-letters/" + encodeURIComponent(trigger) + "/" + sequence), null, 2);
  } catch (problem) {
    if (problem instanceof Refused) return signOut(problem.message);
    pre.textContent = "Reading it failed: " + problem.message;
  }
}

async function act(trigger, action, selection, what) {
  const verb = action === "replay" ? "Replay" : "Purge";
  if (!window.confirm(verb + " " + what + " of trigger " + trigger + "?")) return;
  const result = $("action-result");
  result.textContent = verb + "ing " + what + "…";
  try {
    const body = await apiJson("/v1/dead-letters/" + encodeURIComponent(trigger) + "/" + action, {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(selection),
    });
    const count = action === "replay" ? body.replayed : body.purged;
    if (action === "purge") hideDeadLetter();
    result.textContent = (action === "replay" ? "Replayed " : "Purged ") + count + " dead letter" + (count === 1 ? "" : "s") + " of " + trigger + ".";
  } catch (problem) {
    if (problem instanceof Refused) return signOut(problem.message);
    result.textContent = verb + " failed: " + problem.message;
  }
  refresh();
}

// ---- navigation, polling, signing in ----

const VIEWS = { overview: showOverview, functions: showFunctions, "dead-letters": showDeadLetters };

function currentView() {
  const name = (location.hash.match(/^#\/([a-z-]+)/) || [])[1];
  if (VIEWS[name]) state.view = name;
  return state.view || "overview";
}

let refreshing = null;
let again = false;
async function refresh() {
  if (!state.info) return;
  // Asked while one runs (a click, a new section): once more when it ends.
  if (refreshing) {
    again = true;
    return refreshing;
  }
  const view = currentView();
  refreshing = (async () => {
    try {
      await VIEWS[view]();
      $("problem").textContent = "";
      const live = $("live");
      live.classList.remove("stale");
      live.textContent = "Live · " + new Date().toLocaleTimeString();
    } catch (problem) {
      if (problem instanceof Refused) return signOut(problem.message);
      $("live").classList.add("stale");
      $("problem").textContent = "Could not read " + view + ": " + problem.message;
    } finally {
      refreshing = null;
      if (again) {
        again = false;
        refresh();
      }
    }
  })();
  return refreshing;
}

function showView() {
  const view = currentView();
  for (const name of Object.keys(VIEWS)) $("view-" + name).hidden = name !== view;
  for (const link of document.querySelectorAll("#nav a")) {
    if (link.dataset.view === view) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  const trigger = selectedTrigger();
  if (trigger) state.deadLetterTrigger = trigger;
  refresh();
}

function startPolling() {
  stopPolling();
  state.timer = setInterval(() => { if (!document.hidden) refresh(); }, POLL_MS);
}

function stopPolling() {
  if (state.timer) clearInterval(state.timer);
  state.timer = null;
}

function enter(info) {
  state.info = info;
  $("sign-in").hidden = true;
  $("nav").hidden = false;
  $("live").hidden = false;
  $("sign-out").hidden = !state.token;
  if (!location.hash) history.replaceState(null, "", "#/overview");
  showView();
  startPolling();
  $("main").focus();
}

function signOut(message) {
  stopPolling();
  state.token = null;
  state.info = null;
  sessionStorage.removeItem(TOKEN_KEY);
  for (const name of Object.keys(VIEWS)) $("view-" + name).hidden = true;
  $("nav").hidden = true;
  $("live").hidden = true;
  $("sign-out").hidden = true;
  $("sign-in").hidden = false;
  $("sign-in-error").textContent = message || "";
  $("token").value = "";
  $("token").focus();
}

async function signIn(event) {
  event.preventDefault();
  state.token = $("token").value.trim();
  $("sign-in-error").textContent = "";
  try {
    const info = await apiJson("/v1/console");
    sessionStorage.setItem(TOKEN_KEY, state.token);
    $("token").value = "";
    enter(info);
  } catch (problem) {
    state.token = null;
    $("token").value = "";
    $("sign-in-error").textContent = problem instanceof Refused ? "That token was refused." : "Signing in failed: " + problem.message;
  }
}

async function start() {
  $("sign-in-form").addEventListener("submit", signIn);
  $("sign-out").addEventListener("click", () => signOut("Signed out."));
  $("dead-letter-trigger").addEventListener("change", (event) => {
    location.hash = "#/dead-letters/" + encodeURIComponent(event.target.value);
  });
  $("replay-all").addEventListener("click", () => {
    if (state.deadLetterTrigger) act(state.deadLetterTrigger, "replay", { all: true }, "all dead letters");
  });
  $("purge-all").addEventListener("click", () => {
    if (state.deadLetterTrigger) act(state.deadLetterTrigger, "purge", { all: true }, "all dead letters");
  });
  $("dead-letters-next").addEventListener("click", () => {
    if (state.deadLetterNext) { state.deadLetterAfter = state.deadLetterNext; refresh(); }
  });
  $("dead-letters-first").addEventListener("click", () => { state.deadLetterAfter = 0; refresh(); });
  // Only the console's own places (#/...); the skip link's #main is not one.
  window.addEventListener("hashchange", () => { if (location.hash.startsWith("#/")) showView(); });
  document.addEventListener("visibilitychange", () => { if (!document.hidden) refresh(); });
  try {
    // With a token kept from before, or none when the admin listener needs none.
    enter(await apiJson("/v1/console"));
  } catch (problem) {
    if (problem instanceof Refused) {
      signOut(state.token ? "The kept token was refused; sign in again." : "");
    } else {
      // Switchyard unreachable or restarting: the kept token stays for the next try.
      const kept = state.token;
      signOut("Could not reach the admin API (" + problem.message + "); try again.");
      if (kept) sessionStorage.setItem(TOKEN_KEY, kept);
    }
  }
}

document.addEventListener("DOMContentLoaded", start);
