// The dashboard's logs view: a search of every host's logs through the
// dashboard server (GET /api/logs, which asks the daemons as `sky logs`
// does), then a live tail that polls with the answer's cursor, so that it
// misses nothing and shows nothing twice.
//
// The page's filters (service, region tab) are the view's too; a "logs"
// button on an instance row or an event narrows it to that instance; a
// line's request id narrows it to that request and opens its trace.
// Log text comes from the cluster: it is only ever set as textContent.
(function () {
  "use strict";

  const POLL_MS = 500;
  const MAX_LINES = 2000;
  const $ = (id) => document.getElementById(id);

  const view = {
    uuid: "",          // one instance, from a "logs" button
    host: "",          // one host, from a host header's "logs" button
    request: "",       // one request, from a line's request id
    generation: 0,     // a new search drops the answers of the old one
    cursor: null,
    timer: null,
    busy: false,
    count: 0,
  };

  function page() {
    return (window.skynetDashboard && window.skynetDashboard.state.filter) || {};
  }

  function params() {
    const f = page();
    const p = new URLSearchParams();
    const grep = $("log-grep").value;
    if (grep) p.set("grep", grep);
    if ($("log-level").value) p.set("level", $("log-level").value);
    if ($("log-since").value) p.set("since", $("log-since").value);
    if (view.uuid) p.set("uuid", view.uuid);
    else if (f.service) p.set("service", f.service);
    if (view.host) p.set("host", view.host);
    if (view.request) p.set("request_id", view.request);
    if (f.region && f.region !== "*") p.set("region", f.region);
    return p;
  }

  function describe() {
    const f = page();
    const parts = [];
    if (view.uuid) parts.push("instance " + view.uuid);
    else if (f.service) parts.push("service " + f.service);
    if (view.host) parts.push("host " + view.host);
    if (view.request) parts.push("request " + view.request);
    if (f.region && f.region !== "*") parts.push("region " + f.region);
    $("log-scope").textContent = parts.length ? parts.join(" · ") : "every host";
    $("log-instance-clear").hidden = !view.uuid && !view.host && !view.request;
    $("log-instance-clear").textContent = view.request ? "× request"
      : view.uuid ? "× instance" : "× host";
  }

  function stamp(t) {
    if (typeof t !== "number") return "—";
    const d = new Date(t * 1000);
    const two = (n) => String(n).padStart(2, "0");
    return two(d.getHours()) + ":" + two(d.getMinutes()) + ":" + two(d.getSeconds()) + "."
      + String(d.getMilliseconds()).padStart(3, "0");
  }

  function span(cls, text, title) {
    const s = document.createElement("span");
    s.className = cls;
    s.textContent = text;
    if (title) s.title = title;
    return s;
  }

  function addLines(events, fresh) {
    const list = $("log-lines");
    const atBottom = list.scrollTop + list.clientHeight >= list.scrollHeight - 4;
    const frag = document.createDocumentFragment();
    for (const e of events) {
      const li = document.createElement("li");
      li.className = "lvl-" + String(e.level || "info");
      if (e.uuid) li.dataset.uuid = e.uuid;
      const uuid = String(e.uuid || "?");
      li.append(
        span("time", stamp(e.time), e.time ? new Date(e.time * 1000).toISOString() : ""),
        span("host", String(e.host || e.daemon_host || "")),
        span("inst", String(e.service || "?") + "/" + uuid.slice(0, 8), uuid),
        span("level", String(e.level || "").toUpperCase()),
        span("text", String(e.text === undefined ? "" : e.text)),
      );
      if (e.request_id) {
        // A button, so that a keyboard reaches it too.
        const rid = document.createElement("button");
        rid.type = "button";
        rid.className = "rid";
        rid.textContent = "request " + e.request_id;
        rid.title = "Its trace, and every line of this request on every host";
        rid.dataset.request = e.request_id;
        li.append(rid);
      }
      if (fresh) li.classList.add("fresh");
      frag.append(li);
      view.count++;
    }
    list.append(frag);
    while (list.children.length > MAX_LINES) list.firstChild.remove();
    if (atBottom || !fresh) list.scrollTop = list.scrollHeight;
    $("log-count").textContent = view.count + (view.count === 1 ? " line" : " lines");
  }

  function status(text, bad) {
    const el = $("log-status");
    el.textContent = text;
    el.classList.toggle("bad", !!bad);
  }

  async function ask(p) {
    const response = await fetch("/api/logs?" + p.toString(), { credentials: "same-origin" });
    let body = null;
    try { body = await response.json(); } catch (e) { body = null; }
    if (!response.ok || !body || !body.ok) {
      throw new Error((body && body.error) || ("HTTP " + response.status));
    }
    return body;
  }

  function schedule(soon) {
    clearTimeout(view.timer);
    view.timer = null;
    if ($("log-live").checked && view.cursor) view.timer = setTimeout(poll, soon ? 0 : POLL_MS);
  }

  async function search() {
    const generation = ++view.generation;
    clearTimeout(view.timer);
    view.cursor = null;
    view.count = 0;
    $("log-lines").textContent = "";
    $("log-count").textContent = "";
    describe();
    status("searching…");
    try {
      const body = await ask(params());
      if (generation !== view.generation) return;
      view.cursor = body.cursor;
      addLines(body.events, false);
      status(body.errors.length ? body.errors.join(" · ") : (body.events.length ? ""
        : "no matching lines"), body.errors.length > 0);
    } catch (e) {
      if (generation !== view.generation) return;
      status(String(e.message || e), true);
      return;
    }
    schedule();
  }

  async function poll() {
    const generation = view.generation;
    let more = false;
    if (view.busy) return;
    // A tab nobody looks at asks no daemon; it catches up (the cursor) when shown.
    if (document.hidden) { schedule(); return; }
    view.busy = true;
    try {
      const p = params();
      p.set("cursor", view.cursor);
      const body = await ask(p);
      if (generation !== view.generation) return;
      view.cursor = body.cursor;
      more = !!body.more;  // a daemon stopped early: the rest at once
      if (body.events.length) addLines(body.events, true);
      if (body.errors.length) status(body.errors.join(" · "), true);
      else if (view.count) status("");
    } catch (e) {
      if (generation === view.generation) status(String(e.message || e), true);
    } finally {
      view.busy = false;
    }
    if (generation === view.generation) schedule(more);
  }

  function openFor(uuid, host) {
    view.uuid = uuid;
    view.host = host;
    view.request = "";
    $("logs").scrollIntoView({ block: "start" });
    search();
  }

  function wire() {
    let timer = null;
    $("log-grep").addEventListener("input", () => {
      clearTimeout(timer);
      timer = setTimeout(search, 300);
    });
    $("log-form").addEventListener("submit", (e) => { e.preventDefault(); search(); });
    $("log-level").addEventListener("change", search);
    $("log-since").addEventListener("change", search);
    $("log-live").addEventListener("change", () => { if ($("log-live").checked) poll(); else schedule(); });
    $("log-instance-clear").addEventListener("click", () => {
      view.uuid = "";
      view.host = "";
      view.request = "";
      search();
    });
    // The page's filters are the view's: re-search when they change.
    $("service-filter").addEventListener("change", () => { view.uuid = ""; search(); });
    $("tabs").addEventListener("click", (e) => { if (e.target.closest("button")) search(); });
    $("log-lines").addEventListener("click", (e) => {
      const rid = e.target.closest("[data-request]");
      if (!rid) return;
      view.uuid = "";
      view.host = "";
      view.request = rid.dataset.request;
      $("log-grep").value = "";
      search();
      // ...and its trace (trace.js), the waterfall of the calls it made.
      if (window.skynetTrace) window.skynetTrace.open(rid.dataset.request);
    });
    // Captured before the row's own click (which would select it).
    document.addEventListener("click", (e) => {
      const b = e.target.closest && e.target.closest("button[data-logs], button[data-logs-host]");
      if (!b) return;
      e.stopPropagation();
      e.preventDefault();
      openFor(b.dataset.logs || "", b.dataset.logsHost || "");
    }, true);
  }

  function start() {
    wire();
    search();
  }

  // For tests and the curious.
  window.skynetLogs = {
    lines: () => Array.from($("log-lines").children).map((li) => li.querySelector(".text").textContent),
    view,
    search,
  };

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
