// The skynet dashboard page: plain JavaScript, no build step, no library.
//
// The server sends one snapshot when the WebSocket opens, then delta
// messages (changed fields of rows, removed rows, host headers, events,
// new points of the time series).  Messages are queued and applied once
// per animation frame; only the cells whose fields changed are touched.
(function () {
  "use strict";

  const HISTORY_FALLBACK = 900;
  const MAX_EVENTS = 300;
  const MAX_LINES = 12;
  const COLORS = ["#4aa3ff", "#3fb950", "#f0883e", "#d2a8ff", "#ff7b72", "#e3b341",
    "#56d4dd", "#a5d6ff", "#7ee787", "#ffa198", "#bc8cff", "#79c0ff"];

  const $ = (id) => document.getElementById(id);

  const state = {
    config: { interval: 2, history: HISTORY_FALLBACK, actions: false },
    serverId: null,
    rows: new Map(),      // uuid -> {data, tr, cells, group}
    groups: new Map(),    // host -> {key, host, section, tbody, head, rows:Set}
    hosts: new Map(),     // host -> header figures
    series: new Map(),    // key -> {t: [], v: [[...]]}
    requested: new Set(), // series keys asked for and not yet received
    lastEventId: 0,
    eventCount: 0,
    skew: 0,              // server time minus local time, seconds
    token: null,
    authorized: false,
    filter: { reg: "all", service: "", text: "", region: "*" },
    scope: "services",
    selected: null,
    queue: [],
    flushScheduled: false,
    chartsDirty: true,
    lastDraw: [],
    stats: { messages: 0, deltas: 0, snapshots: 0, lastApplyMs: 0, maxApplyMs: 0, connects: 0 },
    ws: null,
    retryDelay: 500,
    connected: false,
  };

  // ---- formatting ---------------------------------------------------------

  const now = () => Date.now() / 1000 + state.skew;
  const blank = "—";

  // toLocaleString is slow enough to matter at 500 rows a second.
  function grouped(n) {
    const s = String(Math.abs(n));
    let out = "";
    for (let i = 0; i < s.length; i++) {
      if (i && (s.length - i) % 3 === 0) out += ",";
      out += s[i];
    }
    return n < 0 ? "-" + out : out;
  }
  function fmtNum(v, digits) {
    if (v === null || v === undefined) return blank;
    if (digits === undefined) return grouped(Math.round(v));
    return Number(v).toFixed(digits);
  }
  function fmtMs(v) {
    if (v === null || v === undefined) return blank;
    return v < 10 ? v.toFixed(2) : v < 100 ? v.toFixed(1) : Math.round(v).toString();
  }
  function fmtBytes(v) {
    if (v === null || v === undefined) return blank;
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    while (v >= 1024 && i < units.length - 1) { v /= 1024; i++; }
    return (i === 0 ? v.toFixed(0) : v.toFixed(v < 10 ? 1 : 0)) + " " + units[i];
  }
  function fmtDuration(seconds) {
    if (seconds === null || seconds === undefined || !isFinite(seconds)) return blank;
    seconds = Math.max(0, Math.floor(seconds));
    const d = Math.floor(seconds / 86400), h = Math.floor(seconds % 86400 / 3600);
    const m = Math.floor(seconds % 3600 / 60), s = seconds % 60;
    if (d) return d + "d " + h + "h";
    if (h) return h + "h " + m + "m";
    if (m) return m + "m " + s + "s";
    return s + "s";
  }
  function fmtAgo(t) {
    if (!t) return blank;
    return fmtDuration(now() - t) + " ago";
  }
  function fmtClock(t) {
    const d = new Date(t * 1000);
    return d.toTimeString().slice(0, 8);
  }

  // ---- table columns --------------------------------------------------------

  // deps: the row fields a cell shows; tick: re-rendered every second.
  const COLUMNS = [
    { key: "service", title: "service", deps: ["service", "is_daemon"], text: (d) => d.service },
    { key: "version", title: "version", deps: ["version"], text: (d) => d.version },
    { key: "address", title: "address", deps: ["address"], text: (d) => d.address },
    { key: "region", title: "region", deps: ["region"], text: (d) => d.region },
    { key: "registered", title: "state", deps: ["registered"], html: true,
      render: (td, d) => {
        td.textContent = "";
        const b = document.createElement("span");
        b.className = "badge " + (d.registered ? "on" : "off");
        b.textContent = d.registered ? "registered" : "unregistered";
        td.appendChild(b);
      } },
    { key: "clients", title: "clients", num: true, deps: ["clients"], text: (d) => fmtNum(d.clients) },
    { key: "uptime", title: "uptime", num: true, deps: ["start"], tick: true,
      text: (d) => d.start ? fmtDuration(now() - d.start) : blank },
    { key: "requests", title: "requests", num: true, deps: ["requests"], text: (d) => fmtNum(d.requests) },
    { key: "rps", title: "req/s", num: true, deps: ["rps"], text: (d) => fmtNum(d.rps, 1) },
    { key: "avg", title: "avg ms", num: true, deps: ["avg_ms"], text: (d) => fmtMs(d.avg_ms) },
    { key: "p99", title: "p99 ms", num: true, deps: ["p99_ms"], text: (d) => fmtMs(d.p99_ms) },
    { key: "errors", title: "errors", num: true, deps: ["errors"], text: (d) => fmtNum(d.errors),
      cls: (d) => (d.errors ? "bad" : "") },
    { key: "last", title: "last request", num: true, deps: ["last_request"], tick: true,
      text: (d) => fmtAgo(d.last_request) },
    { key: "cpu", title: "CPU %", num: true, deps: ["cpu"], text: (d) => fmtNum(d.cpu, 1) },
    { key: "rss", title: "RSS", num: true, deps: ["rss"], text: (d) => fmtBytes(d.rss) },
    { key: "actions", title: "actions", deps: ["registered", "daemon", "admin", "is_daemon"],
      html: true,
      render: renderActions },
    // The logs view (logs.js) opens on a click of [data-logs].
    { key: "logs", title: "", deps: ["is_daemon", "uuid"], html: true, render: renderLogsLink },
  ];
  const TICKING = COLUMNS.filter((c) => c.tick);

  function renderCell(col, td, d) {
    if (col.html) {
      col.render(td, d);
      return;
    }
    const text = col.text(d);
    if (td.textContent !== text) td.textContent = text;
    td.classList.toggle("blank", text === blank);
    if (col.cls) td.classList.toggle("bad", col.cls(d) === "bad");
  }

  function renderActions(td, d) {
    td.textContent = "";
    if (d.is_daemon) {
      // A daemon goes down with every service of its host: no button here,
      // as sky does not act on daemons either.
      const note = document.createElement("span");
      note.className = "daemon-note";
      note.textContent = "host daemon";
      note.title = "Not stopped or unregistered from here: it supervises this host's services,"
        + " which stop with it. Stop it on its host (SIGTERM to its process).";
      td.appendChild(note);
      return;
    }
    // Only the registration change that applies, to keep the column narrow.
    const actions = [
      d.registered ? ["unregister", "unreg", false, "Unregister: take no new clients"]
        : ["register", "reg", false, "Register: take new clients"],
      ["stop", "stop", false, "Stop the instance gracefully"],
      ["restart", "restart", !d.daemon,
        d.daemon ? "Restart through the host's skynet daemon"
          : "Restart needs a skynet daemon on this host (none runs here)"],
    ];
    for (const [action, label, disabled, title] of actions) {
      const b = document.createElement("button");
      b.type = "button";
      b.textContent = label;
      b.title = title;
      b.dataset.action = action;
      b.disabled = disabled || (action !== "restart" && !d.daemon && !d.admin);
      td.appendChild(b);
    }
  }

  function logsButton(uuid, title) {
    const b = document.createElement("button");
    b.type = "button";
    b.className = "logs-link";
    b.textContent = "logs";
    b.title = title;
    b.dataset.logs = uuid;
    return b;
  }

  function renderLogsLink(td, d) {
    td.textContent = "";
    if (!d.is_daemon) td.appendChild(logsButton(d.uuid, "This instance's logs"));
  }

  // ---- host groups ----------------------------------------------------------

  // One table per host, whatever the regions of its instances (a column).
  function groupKey(d) { return d.host; }

  function ensureGroup(d) {
    const key = groupKey(d);
    let g = state.groups.get(key);
    if (g) return g;
    const section = document.createElement("section");
    section.className = "host";
    section.dataset.host = d.host;
    const head = document.createElement("div");
    head.className = "host-head";
    const table = document.createElement("table");
    const thead = document.createElement("thead");
    const hr = document.createElement("tr");
    for (const col of COLUMNS) {
      const th = document.createElement("th");
      th.textContent = col.title;
      th.className = "c-" + col.key + (col.num ? " num" : "");
      hr.appendChild(th);
    }
    thead.appendChild(hr);
    const tbody = document.createElement("tbody");
    table.append(thead, tbody);
    section.append(head, table);
    g = { key, host: d.host, section, tbody, head, rows: new Set() };
    state.groups.set(key, g);
    // Keep sections sorted by host.
    const main = $("topology");
    let before = null;
    for (const el of main.querySelectorAll("section.host")) {
      if (el.dataset.host.localeCompare(key, undefined, { numeric: true }) > 0) {
        before = el;
        break;
      }
    }
    main.insertBefore(section, before);
    renderHostHead(g);
    return g;
  }

  function dropGroupIfEmpty(g) {
    if (g.rows.size || !state.groups.has(g.key)) return;
    state.groups.delete(g.key);
    setTimeout(() => { if (!state.groups.has(g.key)) g.section.remove(); }, 700);
  }

  function fig(label, value) {
    const span = document.createElement("span");
    span.className = "fig";
    span.append(label + " ");
    const b = document.createElement("b");
    b.textContent = value;
    span.appendChild(b);
    return span;
  }

  function renderHostHead(g) {
    const h = state.hosts.get(g.host);
    const head = g.head;
    head.textContent = "";
    const name = document.createElement("span");
    name.className = "name";
    name.textContent = g.host;
    const regions = new Set();
    for (const uuid of g.rows) {
      const r = state.rows.get(uuid);
      if (r) regions.add(r.data.region);
    }
    const region = document.createElement("span");
    region.className = "region";
    region.textContent = Array.from(regions).sort(collator.compare).join(", ");
    region.title = regions.size === 1 ? "region" : "regions of this host's instances";
    head.append(name, region);
    const v = (k) => (h && h[k] !== undefined && h[k] !== null ? h[k] : null);
    const load = [v("load1"), v("load5"), v("load15")];
    head.append(fig("load", load.every((x) => x === null) ? blank
      : load.map((x) => (x === null ? "?" : x.toFixed(2))).join(" ")));
    head.append(fig("CPU", v("cpu") === null ? blank : v("cpu").toFixed(1) + " %"));
    const mem = v("mem_used") !== null && v("mem_total") !== null
      ? fmtBytes(v("mem_used")) + " / " + fmtBytes(v("mem_total"))
        + (v("mem_percent") !== null ? " (" + v("mem_percent").toFixed(0) + " %)" : "")
      : v("mem_percent") !== null ? v("mem_percent").toFixed(0) + " %" : blank;
    head.append(fig("memory", mem));
    const up = v("boot_time") !== null ? now() - v("boot_time") : v("uptime");
    const upSpan = fig("uptime", up === null ? blank : fmtDuration(up));
    upSpan.classList.add("host-uptime");
    head.append(upSpan);
    head.append(fig("instances", String(g.rows.size)));
    const logs = logsButton("", "The logs of every instance on this host");
    delete logs.dataset.logs;
    logs.dataset.logsHost = g.host;
    head.append(logs);
    if (!h) {
      const note = document.createElement("span");
      note.className = "note";
      note.textContent = "no skynet daemon: host figures unknown, restart unavailable";
      head.append(note);
    }
  }

  // ---- rows -----------------------------------------------------------------

  function sortKey(d) { return [d.is_daemon ? 0 : 1, d.service, d.port]; }
  const collator = new Intl.Collator("en", { numeric: true });
  function compareRows(a, b) {
    const ka = sortKey(a), kb = sortKey(b);
    for (let i = 0; i < ka.length; i++) {
      const c = typeof ka[i] === "string" ? collator.compare(ka[i], kb[i])
        : (ka[i] < kb[i] ? -1 : ka[i] > kb[i] ? 1 : 0);
      if (c) return c;
    }
    return 0;
  }

  function createRow(d) {
    const tr = document.createElement("tr");
    tr.dataset.uuid = d.uuid;
    const cells = {};
    for (const col of COLUMNS) {
      const td = document.createElement("td");
      td.className = "c-" + col.key + (col.num ? " num" : "");
      renderCell(col, td, d);
      tr.appendChild(td);
      cells[col.key] = td;
    }
    const row = { data: d, tr, cells, group: null };
    if (screenObserver) screenObserver.observe(tr);
    state.rows.set(d.uuid, row); // before placeRow: the host head lists its regions
    placeRow(row);
    applyRowClasses(row);
    return row;
  }

  function placeRow(row) {
    const g = ensureGroup(row.data);
    if (row.group && row.group !== g) {
      row.group.rows.delete(row.data.uuid);
      dropGroupIfEmpty(row.group);
      renderHostHead(row.group);
    }
    row.group = g;
    g.rows.add(row.data.uuid);
    let before = null;
    for (const other of g.tbody.children) {
      const o = state.rows.get(other.dataset.uuid);
      if (o && o !== row && compareRows(row.data, o.data) < 0) { before = other; break; }
    }
    g.tbody.insertBefore(row.tr, before);
    renderHostHead(g);
  }

  function applyRowClasses(row) {
    row.tr.classList.toggle("unregistered", !row.data.registered);
    row.tr.classList.toggle("daemon", !!row.data.is_daemon);
    row.tr.classList.toggle("selected", state.selected === row.data.uuid);
    row.tr.hidden = !visible(row.data);
  }

  // Rows on screen: only those get highlights (hundreds of off-screen
  // animations per delta would cost frames and show nothing).
  const onScreen = new WeakSet();
  const screenObserver = "IntersectionObserver" in window
    ? new IntersectionObserver((entries) => {
      for (const e of entries) {
        if (e.isIntersecting) onScreen.add(e.target); else onScreen.delete(e.target);
      }
    })
    : null;

  function flash(el, color) {
    if (!el.animate) return;
    el.animate([{ backgroundColor: color }, { backgroundColor: "rgba(0,0,0,0)" }],
      { duration: 1400, easing: "ease-out" });
  }

  function updateRow(partial, flashChanges) {
    const row = state.rows.get(partial.uuid);
    if (!row) return createAndFlash(partial);
    const changed = new Set();
    for (const k in partial) {
      if (row.data[k] !== partial[k]) { changed.add(k); row.data[k] = partial[k]; }
    }
    if (!changed.size) return;
    if (changed.has("region") || changed.has("host") || changed.has("service")
      || changed.has("port")) placeRow(row);
    if (changed.has("region") && row.group) renderHostHead(row.group);
    const shown = flashChanges && (!screenObserver || onScreen.has(row.tr));
    for (const col of COLUMNS) {
      if (col.deps.some((k) => changed.has(k))) {
        const td = row.cells[col.key];
        const before = td.textContent;
        renderCell(col, td, row.data);
        if (shown && col.key === "registered") {
          flash(row.tr, "rgba(255, 214, 102, .5)");
        } else if (shown && !col.html && td.textContent !== before) {
          flash(td, "rgba(255, 214, 102, .28)");
        }
      }
    }
    if (FILTERED_FIELDS.some((k) => changed.has(k))) applyRowClasses(row);
  }

  // The fields the filters and row classes look at.
  const FILTERED_FIELDS = ["registered", "is_daemon", "service", "version", "address", "uuid",
    "host", "region", "admin"];

  function createAndFlash(d) {
    if (!d.service) return; // a partial row for an unknown instance: wait for the snapshot
    const row = createRow(d);
    flash(row.tr, "rgba(63, 185, 80, .45)");
    knownService(d.service);
  }

  function removeRow(uuid) {
    const row = state.rows.get(uuid);
    if (!row) return;
    state.rows.delete(uuid);
    state.series.delete("i:" + uuid);
    const g = row.group;
    g.rows.delete(uuid);
    row.tr.classList.add("leaving");
    row.tr.dataset.leaving = "1";
    setTimeout(() => {
      if (screenObserver) screenObserver.unobserve(row.tr);
      row.tr.remove();
    }, 650);
    renderHostHead(g);
    dropGroupIfEmpty(g);
    if (state.selected === uuid) state.selected = null;
  }

  // ---- filters and tabs -----------------------------------------------------

  function visible(d) {
    const f = state.filter;
    if (f.reg === "registered" && !d.registered) return false;
    if (f.reg === "unregistered" && d.registered) return false;
    if (f.service && d.service !== f.service) return false;
    if (f.region !== "*" && d.region !== f.region) return false;
    if (f.text) {
      const hay = (d.service + " " + d.version + " " + d.address + " " + d.uuid + " "
        + d.host + " " + d.region + " " + (d.admin || "")).toLowerCase();
      for (const word of f.text.split(/\s+/)) {
        if (word && !hay.includes(word)) return false;
      }
    }
    return true;
  }

  function applyFilters() {
    for (const row of state.rows.values()) row.tr.hidden = !visible(row.data);
    refreshCounts();
  }

  const knownServices = new Set();
  function knownService(name) {
    if (knownServices.has(name)) return;
    knownServices.add(name);
    const select = $("service-filter");
    const names = Array.from(knownServices).sort(collator.compare);
    const current = select.value;
    select.textContent = "";
    select.append(new Option("all services", ""));
    for (const n of names) select.append(new Option(n, n));
    select.value = current;
    state.chartsDirty = true;
    refreshScopes();
  }

  function refreshCounts() {
    let shown = 0;
    const regions = new Map();
    const services = new Set();
    let rps = 0;
    for (const row of state.rows.values()) {
      if (!row.tr.hidden) shown++;
      regions.set(row.data.region, (regions.get(row.data.region) || 0) + 1);
      services.add(row.data.service);
      rps += row.data.rps || 0;
    }
    for (const g of state.groups.values()) {
      let any = false;
      for (const uuid of g.rows) {
        const r = state.rows.get(uuid);
        if (r && !r.tr.hidden) { any = true; break; }
      }
      g.section.hidden = !any;
    }
    $("shown").textContent = shown + " of " + state.rows.size + " shown";
    const plural = (n, word) => n + " " + word + (n === 1 ? "" : "s");
    const hosts = new Set(Array.from(state.groups.values()).map((g) => g.host)).size;
    $("summary").textContent = plural(state.rows.size, "instance") + " · "
      + plural(services.size, "service") + " · " + plural(hosts, "host") + " · "
      + rps.toFixed(1) + " req/s";
    $("empty").hidden = state.rows.size > 0;
    $("empty").textContent = "No instances in the registry.";
    renderTabs(regions);
  }

  let tabsSignature = "";
  function renderTabs(regions) {
    const names = Array.from(regions.keys()).sort(collator.compare);
    const signature = state.filter.region + "#" + names.map((n) => n + ":" + regions.get(n)).join(",");
    if (signature === tabsSignature) return;
    tabsSignature = signature;
    const nav = $("tabs");
    nav.textContent = "";
    const total = Array.from(regions.values()).reduce((a, b) => a + b, 0);
    const tabs = [["*", "all regions", total]].concat(names.map((n) => [n, n, regions.get(n)]));
    if (state.filter.region !== "*" && !regions.has(state.filter.region)) {
      tabs.push([state.filter.region, state.filter.region, 0]);
    }
    for (const [value, label, count] of tabs) {
      const b = document.createElement("button");
      b.type = "button";
      b.dataset.region = value;
      b.className = value === state.filter.region ? "active" : "";
      b.append(label);
      const c = document.createElement("span");
      c.className = "count";
      c.textContent = count;
      b.appendChild(c);
      nav.appendChild(b);
    }
  }

  // ---- events ---------------------------------------------------------------

  function addEvents(events, flashNew) {
    const list = $("event-list");
    for (const e of events) {
      if (e.id <= state.lastEventId) continue;
      state.lastEventId = e.id;
      state.eventCount++;
      const li = document.createElement("li");
      li.dataset.kind = e.kind;
      if (e.uuid) li.dataset.uuid = e.uuid;
      const time = document.createElement("span");
      time.className = "time";
      time.textContent = fmtClock(e.time);
      const kind = document.createElement("span");
      kind.className = "kind " + e.kind;
      kind.textContent = e.kind;
      const text = document.createElement("span");
      text.className = "text";
      text.textContent = e.text;
      li.append(time, kind, text);
      if (e.uuid) li.append(logsButton(e.uuid, "The logs of this event's instance"));
      list.insertBefore(li, list.firstChild);
      if (flashNew) flash(li, "rgba(74, 163, 255, .35)");
    }
    while (list.children.length > MAX_EVENTS) list.lastChild.remove();
    $("event-count").textContent = state.eventCount
      ? state.eventCount + (state.eventCount === 1 ? " event" : " events") : "";
  }

  // ---- series ---------------------------------------------------------------

  function trimSeries(s, horizon) {
    let cut = 0;
    while (cut < s.t.length && s.t[cut] < horizon) cut++;
    if (cut) { s.t.splice(0, cut); s.v.splice(0, cut); }
  }

  function addPoints(points) {
    const history = state.config.history || HISTORY_FALLBACK;
    for (const p of points) {
      for (const key in p.s) {
        let s = state.series.get(key);
        if (!s) {
          // Services and hosts are always kept; instances once asked for.
          if (key.startsWith("i:")) continue;
          s = { t: [], v: [] };
          state.series.set(key, s);
        }
        if (s.t.length && s.t[s.t.length - 1] >= p.t) continue;
        s.t.push(p.t);
        s.v.push(p.s[key]);
        trimSeries(s, p.t - history);
      }
    }
    state.chartsDirty = true;
  }

  function requestSeries(keys) {
    const missing = keys.filter((k) => !state.series.has(k) && !state.requested.has(k));
    if (!missing.length || !state.ws || state.ws.readyState !== 1) return;
    for (const k of missing) state.requested.add(k);
    state.ws.send(JSON.stringify({ type: "series", keys: missing }));
  }

  function receiveSeries(msg) {
    for (const key in msg.series) {
      state.requested.delete(key);
      if (key.startsWith("i:") && !state.rows.has(key.slice(2))) continue;
      state.series.set(key, { t: msg.series[key].t.slice(), v: msg.series[key].v.slice() });
    }
    state.chartsDirty = true;
    scheduleFlush();
  }

  // ---- graphs ---------------------------------------------------------------

  const IF = { rps: 0, p50: 1, p99: 2, eps: 3, cpu: 4, rss: 5 };
  const HF = { cpu: 0, mem: 1, load: 2, rss: 3 };

  function refreshScopes() {
    const select = $("scope");
    const options = [["services", "all services"]];
    for (const name of Array.from(knownServices).sort(collator.compare)) options.push(["service:" + name, "service " + name]);
    for (const host of Array.from(state.hosts.keys()).sort(collator.compare)) options.push(["host:" + host, "host " + host]);
    if (state.scope.startsWith("instance:")) {
      const row = state.rows.get(state.scope.slice(9));
      options.push([state.scope, row ? "instance " + row.data.service + " " + row.data.address
        : "instance (gone)"]);
    }
    const signature = options.map((o) => o[0] + "=" + o[1]).join("\n");
    if (select.dataset.signature === signature) {
      select.value = state.scope;
      return;
    }
    select.dataset.signature = signature;
    select.textContent = "";
    for (const [value, label] of options) select.append(new Option(label, value));
    select.value = state.scope;
  }

  function line(label, key, field, i, dash) {
    return { label, key, field, color: COLORS[i % COLORS.length], dash: !!dash };
  }

  // The charts of the current scope: [{title, unit, lines}]
  function chartSpecs() {
    const scope = state.scope;
    if (scope === "services") {
      const names = Array.from(knownServices).sort(collator.compare);
      const per = (field) => names.map((n, i) => line(n, "s:" + n, IF[field], i));
      const lat = [];
      names.forEach((n, i) => {
        lat.push(line(n + " p99", "s:" + n, IF.p99, i));
        lat.push(line(n + " p50", "s:" + n, IF.p50, i, true));
      });
      const hosts = Array.from(state.hosts.keys()).sort(collator.compare);
      return [
        { title: "requests/s per service", unit: "", lines: per("rps") },
        { title: "latency p50 (dashed) / p99, ms", unit: "ms", lines: lat },
        { title: "errors/s per service", unit: "", lines: per("eps") },
        { title: "CPU % per host", unit: "%", lines: hosts.map((h, i) => line(h, "h:" + h, HF.cpu, i)),
          empty: "no skynet daemon reports host figures" },
        { title: "RSS per service", unit: "B", lines: per("rss"), empty: "no daemon: RSS unknown" },
      ];
    }
    if (scope.startsWith("service:")) {
      const name = scope.slice(8);
      const rows = Array.from(state.rows.values()).filter((r) => r.data.service === name)
        .sort((a, b) => compareRows(a.data, b.data)).slice(0, MAX_LINES);
      requestSeries(rows.map((r) => "i:" + r.data.uuid));
      const per = (field) => rows.map((r, i) => line(r.data.address, "i:" + r.data.uuid, IF[field], i));
      const lat = [];
      rows.forEach((r, i) => {
        lat.push(line(r.data.address + " p99", "i:" + r.data.uuid, IF.p99, i));
        lat.push(line(r.data.address + " p50", "i:" + r.data.uuid, IF.p50, i, true));
      });
      return [
        { title: name + ": requests/s per instance", unit: "", lines: per("rps") },
        { title: name + ": latency p50 (dashed) / p99, ms", unit: "ms", lines: lat },
        { title: name + ": errors/s per instance", unit: "", lines: per("eps") },
        { title: name + ": CPU % per instance", unit: "%", lines: per("cpu"), empty: "no daemon: CPU unknown" },
        { title: name + ": RSS per instance", unit: "B", lines: per("rss"), empty: "no daemon: RSS unknown" },
      ];
    }
    if (scope.startsWith("host:")) {
      const host = scope.slice(5);
      const rows = Array.from(state.rows.values()).filter((r) => r.data.host === host)
        .sort((a, b) => compareRows(a.data, b.data)).slice(0, MAX_LINES);
      requestSeries(rows.map((r) => "i:" + r.data.uuid));
      const label = (r) => r.data.service + " " + r.data.port;
      return [
        { title: host + ": host CPU %", unit: "%", lines: [line("CPU", "h:" + host, HF.cpu, 0)] },
        { title: host + ": host memory %", unit: "%", lines: [line("memory", "h:" + host, HF.mem, 1)] },
        { title: host + ": load (1 min)", unit: "", lines: [line("load1", "h:" + host, HF.load, 2)] },
        { title: host + ": CPU % per instance", unit: "%",
          lines: rows.map((r, i) => line(label(r), "i:" + r.data.uuid, IF.cpu, i)) },
        { title: host + ": RSS per instance", unit: "B",
          lines: rows.map((r, i) => line(label(r), "i:" + r.data.uuid, IF.rss, i)) },
      ];
    }
    const uuid = scope.slice(9);
    const row = state.rows.get(uuid);
    requestSeries(["i:" + uuid]);
    const title = row ? row.data.service + " " + row.data.address : uuid.slice(0, 8);
    const k = "i:" + uuid;
    return [
      { title: title + ": requests/s", unit: "", lines: [line("req/s", k, IF.rps, 0)] },
      { title: title + ": latency, ms", unit: "ms",
        lines: [line("p99", k, IF.p99, 2), line("p50", k, IF.p50, 0, true)] },
      { title: title + ": errors/s", unit: "", lines: [line("errors/s", k, IF.eps, 4)] },
      { title: title + ": CPU %", unit: "%", lines: [line("CPU", k, IF.cpu, 1)], empty: "no daemon: CPU unknown" },
      { title: title + ": RSS", unit: "B", lines: [line("RSS", k, IF.rss, 3)], empty: "no daemon: RSS unknown" },
    ];
  }

  function ensureCharts(n) {
    const box = $("charts");
    while (box.children.length < n) {
      const div = document.createElement("div");
      div.className = "chart";
      const h = document.createElement("h3");
      const canvas = document.createElement("canvas");
      div.append(h, canvas);
      box.appendChild(div);
    }
    while (box.children.length > n) box.lastChild.remove();
    return Array.from(box.children);
  }

  function niceMax(v) {
    if (!(v > 0)) return 1;
    const p = Math.pow(10, Math.floor(Math.log10(v)));
    for (const m of [1, 1.2, 1.6, 2, 2.4, 3, 4, 5, 6, 8, 10]) if (m * p >= v) return m * p;
    return 10 * p;
  }

  function fmtAxis(v, unit) {
    if (unit === "B") return fmtBytes(v);
    if (v >= 1000) return (v / 1000).toFixed(v >= 10000 ? 0 : 1) + "k";
    if (v >= 10 || v === 0) return v.toFixed(0);
    return v.toFixed(v >= 1 ? 1 : 2);
  }

  // The charts' size, kept up to date by a ResizeObserver: reading it from
  // the canvas after the tables changed would force a layout of them all.
  const chartBox = { width: 0 };
  const CHART_HEIGHT = 110;

  function drawChart(div, spec) {
    const canvas = div.querySelector("canvas");
    const title = div.querySelector("h3");
    if (title.textContent !== spec.title) title.textContent = spec.title;
    const dpr = window.devicePixelRatio || 1;
    if (!chartBox.width) chartBox.width = $("charts").clientWidth;
    const w = Math.max(100, chartBox.width), h = CHART_HEIGHT;
    if (canvas.width !== Math.round(w * dpr) || canvas.height !== Math.round(h * dpr)) {
      canvas.width = Math.round(w * dpr);
      canvas.height = Math.round(h * dpr);
    }
    const ctx = canvas.getContext("2d");
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.clearRect(0, 0, w, h);
    const history = state.config.history || HISTORY_FALLBACK;
    const t1 = now();
    // The window is the history, or less while there is less data (at
    // least a minute), so that a fresh dashboard's lines are readable.
    let oldest = t1;
    for (const l of spec.lines) {
      const s = state.series.get(l.key);
      if (s && s.t.length && s.t[0] < oldest) oldest = s.t[0];
    }
    const span = Math.min(history, Math.max(60, t1 - oldest));
    const t0 = t1 - span;
    const left = 46, right = 6, top = 6, bottom = 16;
    const pw = w - left - right, ph = h - top - bottom;

    // Pick the lines with data, the busiest first, at most MAX_LINES.
    const drawn = [];
    for (const l of spec.lines) {
      const s = state.series.get(l.key);
      if (!s) continue;
      let max = null, count = 0;
      for (let i = 0; i < s.t.length; i++) {
        if (s.t[i] < t0) continue;
        const v = s.v[i][l.field];
        if (v === null || v === undefined) continue;
        count++;
        if (max === null || v > max) max = v;
      }
      if (count) drawn.push({ line: l, series: s, max, count });
    }
    drawn.sort((a, b) => b.max - a.max);
    drawn.length = Math.min(drawn.length, MAX_LINES);
    const ymax = niceMax(Math.max(0, ...drawn.map((d) => d.max)) * 1.1);

    ctx.font = "10px system-ui, sans-serif";
    ctx.strokeStyle = "#2a3541";
    ctx.fillStyle = "#8593a3";
    ctx.lineWidth = 1;
    ctx.textAlign = "right";
    ctx.textBaseline = "middle";
    for (let i = 0; i <= 4; i++) {
      const y = top + ph - (ph * i) / 4;
      ctx.beginPath();
      ctx.moveTo(left, Math.round(y) + 0.5);
      ctx.lineTo(left + pw, Math.round(y) + 0.5);
      ctx.stroke();
      if (drawn.length) ctx.fillText(fmtAxis((ymax * i) / 4, spec.unit), left - 4, y);
    }
    ctx.textAlign = "center";
    ctx.textBaseline = "top";
    const step = [15, 30, 60, 120, 300, 600, 900].find((s) => span / s <= 5) || 1800;
    for (let ago = 0; ago <= span; ago += step) {
      const x = left + pw - (pw * ago) / span;
      const label = ago === 0 ? "now" : ago < 60 ? "-" + ago + "s" : "-" + ago / 60 + "m";
      ctx.fillText(label, Math.max(left + 8, Math.min(x, left + pw - 10)), top + ph + 3);
    }
    const record = { title: spec.title, lines: [] };
    for (const d of drawn) {
      const { line: l, series: s } = d;
      ctx.strokeStyle = l.color;
      ctx.lineWidth = 1.6;
      ctx.setLineDash(l.dash ? [4, 3] : []);
      ctx.beginPath();
      let pen = false, points = 0, last = null;
      for (let i = 0; i < s.t.length; i++) {
        if (s.t[i] < t0) continue;
        const v = s.v[i][l.field];
        if (v === null || v === undefined) { pen = false; continue; }
        const x = left + ((s.t[i] - t0) / span) * pw;
        const y = top + ph - (v / ymax) * ph;
        if (pen) ctx.lineTo(x, y); else ctx.moveTo(x, y);
        pen = true;
        points++;
        last = v;
      }
      ctx.stroke();
      record.lines.push({ label: l.label, key: l.key, points, last, max: d.max, color: l.color });
    }
    ctx.setLineDash([]);
    // Legend, top left.
    ctx.textAlign = "left";
    ctx.textBaseline = "top";
    let lx = left + 4, ly = top + 2;
    for (const d of drawn) {
      const label = d.line.label;
      const tw = ctx.measureText(label).width + 16;
      if (lx + tw > left + pw) { lx = left + 4; ly += 12; }
      if (ly > top + ph - 12) break;
      ctx.fillStyle = d.line.color;
      ctx.fillRect(lx, ly + 3, 8, 3);
      ctx.fillStyle = "#c9d1d9";
      ctx.fillText(label, lx + 11, ly);
      lx += tw;
    }
    if (!drawn.length) {
      ctx.fillStyle = "#5c6b7a";
      ctx.textAlign = "center";
      ctx.textBaseline = "middle";
      ctx.fillText(spec.lines.length ? "no data yet" : spec.empty || "nothing to show",
        left + pw / 2, top + ph / 2);
    }
    return record;
  }

  function drawCharts() {
    state.chartsDirty = false;
    refreshScopes();
    const specs = chartSpecs();
    const divs = ensureCharts(specs.length);
    state.lastDraw = specs.map((spec, i) => drawChart(divs[i], spec));
  }

  // ---- messages -------------------------------------------------------------

  function onSnapshot(msg) {
    state.stats.snapshots++;
    state.config = Object.assign({}, state.config, msg.config);
    if (state.serverId !== null && state.serverId !== msg.config.server_id) {
      // A new dashboard process: its events and series start afresh.
      state.lastEventId = 0;
      state.eventCount = 0;
      $("event-list").textContent = "";
      state.series.clear();
    }
    state.serverId = msg.config.server_id;
    // Instance series are fetched again when a graph needs them: the points
    // pushed while the page was away are missing.
    state.requested.clear();
    state.series.clear();
    for (const key in msg.series) state.series.set(key, msg.series[key]);
    state.chartsDirty = true;
    state.hosts = new Map(msg.hosts.map((h) => [h.host, h]));
    const seen = new Set();
    const fresh = state.rows.size > 0;
    for (const d of msg.rows) {
      seen.add(d.uuid);
      if (state.rows.has(d.uuid)) updateRow(d, true);
      else if (fresh) createAndFlash(d);
      else { createRow(d); knownService(d.service); }
    }
    for (const uuid of Array.from(state.rows.keys())) if (!seen.has(uuid)) removeRow(uuid);
    for (const g of state.groups.values()) renderHostHead(g);
    addEvents(msg.events, false);
    updateMode();
  }

  function onDelta(msg) {
    state.stats.deltas++;
    if (msg.removed) for (const uuid of msg.removed) removeRow(uuid);
    if (msg.rows) for (const d of msg.rows) updateRow(d, true);
    let hostsChanged = false;
    if (msg.hosts) for (const h of msg.hosts) { state.hosts.set(h.host, h); hostsChanged = true; }
    if (msg.hosts_removed) for (const h of msg.hosts_removed) { state.hosts.delete(h); hostsChanged = true; }
    if (hostsChanged) {
      for (const g of state.groups.values()) renderHostHead(g);
      state.chartsDirty = true;
    }
    if (msg.events) addEvents(msg.events, true);
    if (msg.points) addPoints(msg.points);
    if (msg.rows || msg.removed) state.chartsDirty = true;
  }

  function flush() {
    state.flushScheduled = false;
    const queue = state.queue;
    if (!queue.length && !state.chartsDirty) return;
    state.queue = [];
    const started = performance.now();
    for (const msg of queue) {
      state.skew = msg.time - Date.now() / 1000;
      if (msg.type === "snapshot") onSnapshot(msg);
      else if (msg.type === "delta") onDelta(msg);
      else if (msg.type === "series") receiveSeries(msg);
    }
    if (queue.length) refreshCounts();
    const applied = performance.now() - started;
    if (state.chartsDirty) drawCharts();
    const ms = performance.now() - started;
    state.stats.lastApplyMs = ms;
    state.stats.lastRowsMs = applied;
    if (ms > state.stats.maxApplyMs) state.stats.maxApplyMs = ms;
  }

  function scheduleFlush() {
    if (state.flushScheduled) return;
    state.flushScheduled = true;
    // An animation frame when visible; a timer keeps hidden tabs current.
    requestAnimationFrame(() => { if (state.flushScheduled) flush(); });
    setTimeout(() => { if (state.flushScheduled) flush(); }, 500);
  }

  // ---- connection -----------------------------------------------------------

  function setConn(up, text) {
    const el = $("conn");
    el.className = "conn " + (up ? "up" : "down");
    el.textContent = text;
  }

  function connect() {
    const url = (location.protocol === "https:" ? "wss://" : "ws://") + location.host + "/ws";
    let ws;
    try {
      ws = new WebSocket(url);
    } catch (e) {
      retry();
      return;
    }
    state.ws = ws;
    ws.onopen = () => {
      state.connected = true;
      state.stats.connects++;
      state.retryDelay = 500;
      setConn(true, "live");
    };
    ws.onmessage = (ev) => {
      let msg;
      try { msg = JSON.parse(ev.data); } catch (e) { return; }
      state.stats.messages++;
      state.queue.push(msg);
      scheduleFlush();
    };
    ws.onclose = () => {
      if (state.ws !== ws) return;
      state.connected = false;
      state.ws = null;
      retry();
    };
  }

  function retry() {
    const delay = state.retryDelay;
    state.retryDelay = Math.min(5000, delay * 2);
    setConn(false, "reconnecting in " + (delay / 1000).toFixed(1) + " s…");
    setTimeout(connect, delay);
  }

  // ---- token and actions ----------------------------------------------------

  function updateMode() {
    const mode = $("mode");
    const configured = !!state.config.actions;
    document.body.classList.toggle("can-act", configured && state.authorized);
    $("unlock").hidden = !configured || state.authorized;
    $("lock").hidden = !configured || !state.authorized;
    if (!configured) {
      mode.textContent = "read-only";
      mode.title = "No token is configured on the dashboard: actions are disabled";
      mode.classList.remove("armed");
    } else if (state.authorized) {
      mode.textContent = "actions enabled";
      mode.title = "Actions are sent with your token";
      mode.classList.add("armed");
    } else {
      mode.textContent = "read-only";
      mode.title = "Unlock with the dashboard's token to act on instances";
      mode.classList.remove("armed");
    }
  }

  // security (issue 12): the token is exchanged once for an HttpOnly session
  // cookie; only the session's CSRF token is kept, and sent with each action.
  async function checkToken(token) {
    try {
      const r = await fetch("/api/session", {
        method: "POST", headers: { Authorization: "Bearer " + token },
      });
      const body = await r.json().catch(() => ({}));
      return { ok: r.status === 200, csrf: body.csrf, error: body.error || "HTTP " + r.status };
    } catch (e) {
      return { ok: false, error: String(e) };
    }
  }

  async function adoptToken(token) {
    if (!token) return;
    const answer = await checkToken(token);
    if (answer.ok) {
      adoptSession(answer.csrf);
    } else {
      lock();
      toast("Token refused: " + answer.error, true);
    }
    updateMode();
  }

  function adoptSession(csrf) {
    state.token = csrf;
    state.authorized = true;
    try { sessionStorage.setItem("skynet-csrf", csrf); } catch (e) { /* private mode */ }
    updateMode();
  }

  async function resumeSession(csrf) {
    try {
      const r = await fetch("/api/auth");
      if (r.status === 200) adoptSession(csrf);
    } catch (e) { /* stays locked */ }
  }

  function lock() {
    if (state.token) {
      fetch("/api/session", { method: "DELETE", headers: { "X-Skynet-CSRF": state.token } })
        .catch(() => {});
    }
    state.token = null;
    state.authorized = false;
    try { sessionStorage.removeItem("skynet-csrf"); } catch (e) { /* private mode */ }
    updateMode();
  }

  let modalResolve = null;
  function modal(text, withInput) {
    $("modal-text").textContent = text;
    const input = $("modal-input");
    input.hidden = !withInput;
    input.value = "";
    $("modal").hidden = false;
    (withInput ? input : $("modal-ok")).focus();
    return new Promise((resolve) => { modalResolve = resolve; });
  }
  function closeModal(ok) {
    $("modal").hidden = true;
    const resolve = modalResolve;
    modalResolve = null;
    if (resolve) resolve(ok ? ($("modal-input").hidden ? true : $("modal-input").value) : null);
  }

  function toast(text, error) {
    const div = document.createElement("div");
    div.className = "toast" + (error ? " error" : "");
    div.textContent = text;
    $("toasts").appendChild(div);
    setTimeout(() => div.remove(), error ? 8000 : 4000);
  }

  async function act(action, uuid) {
    const row = state.rows.get(uuid);
    if (!row || !state.authorized) return;
    const d = row.data;
    if (d.is_daemon) return; // never from here (see renderActions)
    const ok = await modal(action.charAt(0).toUpperCase() + action.slice(1) + " " + d.service
      + " " + d.address + " (" + d.uuid + ")?", false);
    if (!ok) return;
    let r, body;
    try {
      r = await fetch("/api/instances/" + encodeURIComponent(uuid) + "/" + action, {
        method: "POST",
        headers: { "X-Skynet-CSRF": state.token },
      });
      body = await r.json().catch(() => ({}));
    } catch (e) {
      toast(action + " failed: " + e, true);
      return;
    }
    if (r.status === 403) {
      lock();
      toast(action + " refused: " + (body.error || "forbidden"), true);
    } else if (!r.ok) {
      toast(action + " failed: " + (body.error || r.status), true);
    } else {
      toast(action + " of " + d.service + " " + d.address + " sent (via " + body.via + ")");
    }
  }

  // ---- wiring ---------------------------------------------------------------

  function wire() {
    for (const input of document.querySelectorAll("input[name=reg]")) {
      input.addEventListener("change", () => { state.filter.reg = input.value; applyFilters(); });
    }
    $("service-filter").addEventListener("change", (e) => {
      state.filter.service = e.target.value;
      applyFilters();
    });
    let searchTimer = null;
    $("search").addEventListener("input", (e) => {
      clearTimeout(searchTimer);
      searchTimer = setTimeout(() => {
        state.filter.text = e.target.value.trim().toLowerCase();
        applyFilters();
      }, 120);
    });
    $("tabs").addEventListener("click", (e) => {
      const b = e.target.closest("button");
      if (!b) return;
      state.filter.region = b.dataset.region;
      tabsSignature = "";
      applyFilters();
    });
    $("topology").addEventListener("click", (e) => {
      const button = e.target.closest("button[data-action]");
      const tr = e.target.closest("tr[data-uuid]");
      if (!tr || tr.dataset.leaving) return;
      if (button) {
        e.stopPropagation();
        act(button.dataset.action, tr.dataset.uuid);
        return;
      }
      const previous = state.selected && state.rows.get(state.selected);
      state.selected = tr.dataset.uuid;
      if (previous) applyRowClasses(previous);
      const row = state.rows.get(state.selected);
      if (row) applyRowClasses(row);
      state.scope = "instance:" + tr.dataset.uuid;
      drawCharts();
    });
    $("scope").addEventListener("change", (e) => {
      state.scope = e.target.value;
      drawCharts();
    });
    $("unlock").addEventListener("click", async () => {
      const token = await modal("The dashboard's token (it stays in this tab only):", true);
      if (token) adoptToken(token.trim());
    });
    $("lock").addEventListener("click", lock);
    $("modal-cancel").addEventListener("click", () => closeModal(false));
    $("modal-box").addEventListener("submit", (e) => { e.preventDefault(); closeModal(true); });
    document.addEventListener("keydown", (e) => {
      if (e.key === "Escape" && !$("modal").hidden) closeModal(false);
    });
    if ("ResizeObserver" in window) {
      new ResizeObserver((entries) => {
        const width = Math.round(entries[entries.length - 1].contentRect.width);
        if (width && width !== chartBox.width) {
          chartBox.width = width;
          state.chartsDirty = true;
          scheduleFlush();
        }
      }).observe($("charts"));
    } else {
      window.addEventListener("resize", () => {
        chartBox.width = 0;
        state.chartsDirty = true;
        scheduleFlush();
      });
    }
    // Uptimes and "ago" cells, and the graphs' time axis, move with the clock.
    setInterval(() => {
      for (const row of state.rows.values()) {
        if (row.tr.hidden) continue;
        for (const col of TICKING) renderCell(col, row.cells[col.key], row.data);
      }
      for (const g of state.groups.values()) {
        const h = state.hosts.get(g.host);
        const el = g.head.querySelector(".host-uptime b");
        if (el && h && h.boot_time) el.textContent = fmtDuration(now() - h.boot_time);
      }
    }, 1000);
    setInterval(() => { state.chartsDirty = true; scheduleFlush(); }, 5000);
  }

  // The cluster's deployments: desired vs actual, failing rows, placement events
  // (GET /api/deployments, every 2 s; hidden while there are none).
  function cell(tr, text, title) {
    const td = document.createElement("td");
    td.textContent = text;
    if (title) td.title = title;
    tr.appendChild(td);
    return td;
  }

  function hostsText(hosts) {
    const parts = Object.keys(hosts || {}).sort().map((h) => {
      const c = hosts[h];
      return h + "=" + c.registered + (c.starting ? "(+" + c.starting + ")" : "");
    });
    return parts.join(" ") || "-";
  }

  function renderDeployments(doc) {
    const section = $("deployments");
    const rows = (doc && doc.deployments) || [];
    state.deployments = rows;
    section.hidden = rows.length === 0;
    const body = section.querySelector("tbody");
    body.textContent = "";
    for (const d of rows) {
      const tr = document.createElement("tr");
      tr.className = "deployment " + d.state;
      tr.dataset.name = d.name;
      cell(tr, d.name);
      cell(tr, d.state, d.reason || d.last_error || "");
      cell(tr, d.ready + "/" + d.desired + (d.starting ? " (+" + d.starting + ")" : ""));
      cell(tr, hostsText(d.hosts));
      body.appendChild(tr);
      const why = d.state === "failing" ? (d.last_error || d.reason) : d.reason;
      if (why && d.state !== "ok") {
        const more = document.createElement("tr");
        more.className = "why " + d.state;
        const td = cell(more, why + (d.restarts ? " (" + d.restarts + " restarts)" : ""));
        td.colSpan = 4;
        body.appendChild(more);
      }
    }
    $("deployment-leader").textContent = doc && doc.leader ? "leader: " + doc.leader : "no leader";
    const list = $("placement-list");
    list.textContent = "";
    for (const e of ((doc && doc.events) || []).slice(-8).reverse()) {
      const li = document.createElement("li");
      const t = typeof e.time === "number" ? new Date(e.time * 1000).toLocaleTimeString() : "";
      li.textContent = (t ? t + "  " : "") + (e.message || e.kind || "");
      list.appendChild(li);
    }
  }

  async function pollDeployments() {
    try {
      const response = await fetch("/api/deployments", { credentials: "same-origin" });
      if (response.ok) renderDeployments(await response.json());
    } catch (e) {
      // The dashboard is restarting: the next poll tries again.
    }
  }

  function start() {
    // A token given as ?token=... is kept for this tab and taken off the address bar.
    const params = new URLSearchParams(location.search);
    let token = params.get("token");
    if (token !== null) {
      params.delete("token");
      const rest = params.toString();
      history.replaceState(null, "", location.pathname + (rest ? "?" + rest : "") + location.hash);
    }
    let csrf = null;
    try { csrf = sessionStorage.getItem("skynet-csrf"); } catch (e) { csrf = null; }
    wire();
    updateMode();
    refreshScopes();
    connect();
    pollDeployments();
    setInterval(pollDeployments, 2000);
    if (token) adoptToken(token);
    else if (csrf) resumeSession(csrf);
  }

  // For tests and the curious: the live state, and what the graphs drew.
  window.skynetDashboard = {
    state,
    rows: () => Array.from(state.rows.values()).map((r) => Object.assign({}, r.data)),
    graphData: () => state.lastDraw,
    deployments: () => state.deployments || [],
    stats: () => Object.assign({}, state.stats, { rows: state.rows.size, connected: state.connected }),
    setScope: (scope) => { state.scope = scope; drawCharts(); },
  };

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
