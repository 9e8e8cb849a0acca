// The dashboard's traces: one request's calls as a waterfall (GET
// /api/trace/<id>: the tree `sky trace` prints, gathered from every host's
// daemon) and the slowest recent calls of the cluster (GET /api/slow), each
// opening its trace.  The logs view opens a trace from a line's request id;
// /#trace=ID opens one directly.
//
// Service and method names, addresses and outcomes come from the cluster:
// they are only ever set as textContent.  Bars are placed with CSSOM
// (element.style), which the page's CSP allows; no markup is built.
(function () {
  "use strict";

  const SLOW_EVERY_MS = 10000;
  const SLOW_LIMIT = 15;
  const $ = (id) => document.getElementById(id);

  const view = {
    request: "",      // the request whose trace is shown
    generation: 0,    // a newer trace drops the answer of an older one
    calls: 0,
    slowTimer: null,
    slowBusy: false,
  };

  function ms(seconds) {
    if (typeof seconds !== "number" || !isFinite(seconds)) return "?";
    const v = seconds * 1000;
    return (v >= 100 ? v.toFixed(0) : v >= 10 ? v.toFixed(1) : v.toFixed(2)) + " ms";
  }

  function el(tag, cls, text, title) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined) e.textContent = String(text);
    if (title) e.title = String(title);
    return e;
  }

  function failed(outcome) {
    return String(outcome || "") !== "ok";
  }

  function flatten(calls, depth, out) {
    for (const call of calls || []) {
      out.push({ call, depth });
      flatten(call.children, depth + 1, out);
    }
    return out;
  }

  function status(id, text, bad) {
    const p = $(id);
    p.textContent = text;
    p.classList.toggle("bad", !!bad);
  }

  async function getJSON(url) {
    const response = await fetch(url, { credentials: "same-origin" });
    let body = null;
    try { body = await response.json(); } catch (e) { body = null; }
    if (!response.ok || !body || !body.ok) {
      throw new Error((body && body.error) || ("HTTP " + response.status));
    }
    return body;
  }

  function render(body) {
    const rows = flatten(body.calls, 0, []);
    let end = 0;
    for (const { call } of rows) {
      end = Math.max(end, (Number(call.start) || 0) + (Number(call.duration) || 0));
    }
    if (!(end > 0)) end = 1e-9;
    const list = $("trace-rows");
    list.textContent = "";
    const frag = document.createDocumentFragment();
    let errors = 0;
    for (const { call, depth } of rows) {
      const li = el("li", "trace-row");
      li.dataset.depth = String(depth);
      const bad = failed(call.outcome);
      if (bad) { li.classList.add("error"); errors++; }
      const name = String(call.service) + "." + String(call.method);
      const label = el("span", "trace-label");
      label.style.paddingLeft = (depth * 14) + "px";
      label.append(el("span", "trace-name", name), el("span", "trace-addr", call.address || "?"));
      const lane = el("span", "trace-lane");
      const start = Number(call.start) || 0;
      const duration = Number(call.duration) || 0;
      const bar = el("span", "trace-bar", "", name + " +" + ms(start) + " for " + ms(duration)
        + (typeof call.server_duration === "number" ? " (served in " + ms(call.server_duration) + ")" : ""));
      bar.style.left = (100 * start / end) + "%";
      bar.style.width = Math.max(100 * duration / end, 0.4) + "%";
      lane.append(bar);
      // A retried or hedged call: each attempt that arrived, under the bar.
      const arrived = Array.isArray(call.arrived) ? call.arrived : [];
      if (arrived.length > 1) {
        arrived.forEach((a, n) => {
          const aStart = Number(a.start) || 0;
          const aDuration = Number(a.duration) || 0;
          const mark = el("span", failed(a.outcome) ? "trace-attempt error" : "trace-attempt", "",
            "attempt " + (n + 1) + " at " + (a.address || "?") + ": +" + ms(aStart) + " for "
            + ms(aDuration) + ", " + String(a.outcome));
          mark.style.left = (100 * aStart / end) + "%";
          mark.style.width = Math.max(100 * aDuration / end, 0.4) + "%";
          lane.append(mark);
        });
      }
      const info = el("span", "trace-info");
      info.append(el("span", "trace-dur", ms(duration)),
        el("span", "trace-outcome", bad ? "✗ " + String(call.outcome) : "ok", call.outcome));
      const attempts = Number(call.attempts) || 1;
      if (attempts > 1) {
        info.append(el("span", "trace-retries", attempts + " attempts",
          "Sent " + attempts + " times: retried or hedged on another instance"));
      }
      if (call.retry) info.append(el("span", "trace-retries", "retry " + call.retry, "The server saw it as a retry"));
      li.append(label, lane, info);
      frag.append(li);
    }
    list.append(frag);
    view.calls = rows.length;
    $("trace-summary").textContent = rows.length + (rows.length === 1 ? " call" : " calls")
      + " · " + ms(end) + (errors ? " · " + errors + " failed" : "");
  }

  // The address names the trace shown (#trace=ID), so that it can be
  // shared or reloaded.
  function remember(requestId) {
    const hash = requestId ? "#trace=" + encodeURIComponent(requestId) : "";
    if (location.hash !== hash) {
      history.replaceState(null, "", location.pathname + location.search + hash);
    }
  }

  function fromAddress() {
    const m = /^#trace=(.+)$/.exec(location.hash);
    if (!m) return "";
    try { return decodeURIComponent(m[1]); } catch (e) { return ""; }
  }

  async function open(requestId) {
    const generation = ++view.generation;
    view.request = String(requestId);
    remember(view.request);
    view.calls = 0;
    $("trace").hidden = false;
    $("trace-id").textContent = "request " + view.request;
    $("trace-rows").textContent = "";
    $("trace-summary").textContent = "";
    status("trace-status", "asking every host…");
    $("trace").scrollIntoView({ block: "start" });
    try {
      const body = await getJSON("/api/trace/" + encodeURIComponent(view.request));
      if (generation !== view.generation) return;
      render(body);
      status("trace-status", body.errors.length
        ? "not every instance answered: " + body.errors.join(" · ") : "", false);
    } catch (e) {
      if (generation === view.generation) status("trace-status", String(e.message || e), true);
    }
  }

  function close() {
    view.generation++;
    view.request = "";
    remember("");
    $("trace").hidden = true;
  }

  function renderSlow(calls) {
    const list = $("slow-list");
    list.textContent = "";
    const frag = document.createDocumentFragment();
    for (const c of calls) {
      const li = el("li", failed(c.outcome) ? "slow-call error" : "slow-call");
      const b = el("button", "slow-open", undefined, "Open the trace of request " + c.request_id);
      b.type = "button";
      b.dataset.request = String(c.request_id);
      b.append(
        el("span", "slow-dur", ms(c.duration)),
        el("span", "slow-name", String(c.service) + "." + String(c.method)),
        el("span", "slow-addr", c.address || ""),
        el("span", "slow-outcome", failed(c.outcome) ? "✗ " + String(c.outcome) : "ok"),
      );
      li.append(b);
      frag.append(li);
    }
    list.append(frag);
  }

  async function loadSlow() {
    if (view.slowBusy) return;
    view.slowBusy = true;
    try {
      const p = new URLSearchParams({ limit: String(SLOW_LIMIT), since: $("slow-since").value || "1h" });
      // The page's service filter is the list's too.
      const f = (window.skynetDashboard && window.skynetDashboard.state.filter) || {};
      if (f.service) p.set("service", f.service);
      const body = await getJSON("/api/slow?" + p.toString());
      renderSlow(body.calls);
      status("slow-status", body.calls.length ? (body.errors.length
        ? body.errors.length + " instance(s) not asked" : "") : "no calls recorded in this window",
        false);
      $("slow-status").title = body.errors.join("\n");
    } catch (e) {
      status("slow-status", String(e.message || e), true);
    } finally {
      view.slowBusy = false;
    }
  }

  function scheduleSlow() {
    clearTimeout(view.slowTimer);
    view.slowTimer = setTimeout(() => {
      // A tab nobody looks at asks no host.
      if (!document.hidden) loadSlow();
      scheduleSlow();
    }, SLOW_EVERY_MS);
  }

  function start() {
    $("trace-close").addEventListener("click", close);
    $("slow-refresh").addEventListener("click", loadSlow);
    $("slow-since").addEventListener("change", loadSlow);
    $("service-filter").addEventListener("change", loadSlow);
    $("slow-list").addEventListener("click", (e) => {
      const b = e.target.closest("[data-request]");
      if (b) open(b.dataset.request);
    });
    loadSlow();
    scheduleSlow();
    const linked = fromAddress();
    if (linked) open(linked);
  }

  // For the logs view, tests and the curious.
  window.skynetTrace = {
    open,
    close,
    loadSlow,
    view,
    bars: () => $("trace-rows").querySelectorAll(".trace-bar").length,
  };

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
