// WebSocket Bridge dashboard: the few behaviours htmx attributes cannot express.
// Served from the appliance (script-src 'self'); no eval, no inline handlers.
(function () {
  "use strict";

  var paused = false;

  function stateEl() { return document.getElementById("live-state"); }

  function show(state, text) {
    var el = stateEl();
    if (!el) return;
    el.className = "state state-" + state;
    el.textContent = text;
  }

  var connected = false;
  var missed = false;  // A change the stream announced while the table was held or paused.

  // Why live refreshes of the table are held back, or "" (a refresh would clear what the
  // operator is doing: the ticked rows, the count typed to confirm a bulk disconnect).
  function holdReason() {
    var ticked = document.querySelectorAll("#clients-table input.select:checked").length;
    if (ticked) return ticked + (ticked === 1 ? " row is" : " rows are") + " ticked";
    var typed = document.querySelector("#clients-table input[name=confirm]");
    if (typed && typed.value) return "a confirmation is being typed";
    return "";
  }

  function showConnection() {
    var reason = holdReason();
    var waiting = missed ? "; changes are waiting" : "";
    if (paused) show("paused", "Paused: the table is not refreshed" + waiting);
    else if (!connected) show("lost", "Connection lost: reconnecting…");
    else if (reason) show("paused", "Held: " + reason + ", so the table is not refreshed" + waiting);
    else if (staleInstances()) show("stale", "Live, except " + staleInstances() + ": no heartbeat");
    else show("live", "Live");
  }

  // Instances that missed a heartbeat (the counters block names them): their rows are not live.
  function staleInstances() {
    var note = document.getElementById("stale-instances");
    return note ? note.getAttribute("data-instances") || "" : "";
  }
  document.addEventListener("htmx:sseMessage", function () { if (connected) showConnection(); });

  document.addEventListener("htmx:sseOpen", function () { connected = true; showConnection(); });
  document.addEventListener("htmx:sseError", function () { connected = false; showConnection(); });
  document.addEventListener("htmx:sseClose", function () { connected = false; showConnection(); });

  function hasSelection() {
    return holdReason() !== "";
  }

  // Paused, or rows selected for an action: table refreshes triggered by the stream are held back (a
  // refresh would clear the selection); the operator's own actions still run. The stream says
  // "changed" once per change, so a held-back refresh is remembered and runs as soon as the table
  // is live and nothing is ticked (after an action's own refresh, or when the last box is unticked).
  function isTable(elt) { return elt && elt.id === "clients-table"; }
  // A region the page refreshes on its own (the clients table, a client's page).
  function isLive(elt) { return Boolean(elt && elt.hasAttribute && elt.hasAttribute("data-background-header")); }

  function catchUp() {
    var table = document.getElementById("clients-table");
    if (missed && !paused && !hasSelection() && table && window.htmx) {
      missed = false;
      window.htmx.trigger(table, "refresh");
    }
    showConnection();
  }

  document.addEventListener("htmx:confirm", function (evt) {
    var trigger = evt.detail && evt.detail.triggeringEvent;
    var fromStream = trigger && typeof trigger.type === "string" && trigger.type.indexOf("sse:") === 0;
    if (fromStream && isTable(evt.detail.elt) && (paused || hasSelection())) {
      missed = true;
      evt.preventDefault();
      showConnection();
    }
  });

  document.addEventListener("htmx:afterSettle", function (evt) {
    if (isTable(evt.detail && evt.detail.elt) || isTable(evt.target)) catchUp();
  });

  // Live refreshes replace the table: keep the operator's place in it. The focused link, box or
  // button is found again in the new table (same row, same control) and the page and the table's
  // own sideways scroll stay where they were; a control whose row left hands focus to the table.
  var kept = null;

  function controlKey(el) {
    var row = el.closest("tr[data-client-id]");
    return [
      row ? row.getAttribute("data-client-id") + "\u0000" + (row.getAttribute("data-instance") || "") : "",
      el.tagName, el.getAttribute("name") || "", el.getAttribute("value") || "",
      el.tagName === "A" || el.tagName === "BUTTON" ? el.textContent.trim() : ""
    ].join("\u0001");
  }

  document.addEventListener("htmx:beforeSwap", function (evt) {
    var target = evt.detail.target;
    if (!isLive(target)) return;
    var active = document.activeElement;
    var wrap = target;
    kept = {
      key: active && active !== target && target.contains(active) ? controlKey(active) : null,
      tableFocused: active === target,
      x: window.scrollX, y: window.scrollY,
      left: wrap.scrollLeft
    };
  });

  document.addEventListener("htmx:afterSwap", function (evt) {
    var table = evt.target;
    if (!isLive(table) || !kept) return;
    var place = kept;
    kept = null;
    table.scrollLeft = place.left;
    if (place.key !== null) {
      var controls = table.querySelectorAll("a[href], button, input, select, textarea");
      var found = null;
      for (var i = 0; i < controls.length && !found; i++) {
        if (controlKey(controls[i]) === place.key) found = controls[i];
      }
      (found || table).focus({ preventScroll: true });
    } else if (place.tableFocused) {
      table.focus({ preventScroll: true });
    }
    window.scrollTo(place.x, place.y);
  });

  // Errors show in the page. An HTML answer with an error status is made for the element the
  // request targets (a banner for #action-result, the tokens panel with its error...): swap it
  // like a success (htmx 2 swaps only 2xx by default). Anything else (a 5xx, a 403 from the CSRF
  // check, a JSON error, no answer at all) goes to the page's #request-error banner, as text.
  function requestError(text) {
    var box = document.getElementById("request-error");
    if (!box) return;
    box.querySelector(".text").textContent = text;
    box.hidden = false;
  }

  function answerText(xhr) {
    var type = xhr.getResponseHeader("content-type") || "";
    var body = xhr.responseText || "";
    try {
      if (type.indexOf("json") >= 0) {
        var parsed = JSON.parse(body);
        body = parsed.detail || parsed.error || body;
      } else if (type.indexOf("html") >= 0) {
        body = new DOMParser().parseFromString(body, "text/html").body.textContent || "";
      }
    } catch (e) { /* keep the raw text */ }
    body = String(body).replace(/\s+/g, " ").trim();
    return body.length > 300 ? body.slice(0, 300) + "…" : body;
  }

  // A request the page made on its own (a live refresh, which carries the background header).
  function background(evt) {
    var config = evt.detail && evt.detail.requestConfig;
    if (!config) return false;
    var trigger = config.triggeringEvent;
    return (config.headers && config.headers["x-dashboard-background"] === "1") ||
      Boolean(trigger && typeof trigger.type === "string" && trigger.type.indexOf("sse:") === 0);
  }

  document.addEventListener("htmx:beforeSwap", function (evt) {
    var xhr = evt.detail.xhr;
    if (!xhr || xhr.status < 400) return;
    var type = xhr.getResponseHeader("content-type") || "";
    if (xhr.status < 500 && type.indexOf("text/html") === 0 && !background(evt)) {
      evt.detail.shouldSwap = true;
      evt.detail.isError = false;  // Shown in the page: not a console error.
      return;
    }
    var what = evt.detail.requestConfig ? evt.detail.requestConfig.verb.toUpperCase() + " " + evt.detail.requestConfig.path : "Request";
    var text = answerText(xhr);
    requestError(what + " failed: " + xhr.status + " " + (xhr.statusText || "") + (text ? ": " + text : ""));
  });

  document.addEventListener("htmx:sendError", function (evt) {
    if (background(evt)) return;  // The live badge already says the connection is lost.
    requestError("The appliance did not answer: check the connection and try again.");
  });
  document.addEventListener("htmx:timeout", function () {
    requestError("The appliance took too long to answer: try again.");
  });

  // A new action of the operator's clears the last failure's banner.
  document.addEventListener("htmx:beforeRequest", function (evt) {
    if (background(evt)) return;
    var box = document.getElementById("request-error");
    if (box) box.hidden = true;
  });

  // Live refreshes (of the clients table, of a client's page) say they are not the operator's
  // activity: they do not keep an idle session alive. The forms and links inside are the operator's own.
  document.addEventListener("htmx:configRequest", function (evt) {
    var elt = evt.detail.elt;
    if (elt && elt.getAttribute && elt.getAttribute("data-background-header")) {
      evt.detail.headers[elt.getAttribute("data-background-header")] = "1";
    }
  });

  // Send: a pending row appears at once and is replaced by the outcome when the server answers.
  var pendingSeq = 0;
  document.addEventListener("htmx:configRequest", function (evt) {
    var form = evt.detail.elt;
    if (!form || form.tagName !== "FORM" || !/\/send$/.test(form.getAttribute("hx-post") || "")) return;
    var rows = document.getElementById("sent-rows");
    if (!rows) return;
    var id = "pending-" + Date.now() + "-" + (pendingSeq++);
    evt.detail.headers["x-pending-row"] = id;
    var params = evt.detail.parameters;
    var get = function (name) { return params instanceof FormData ? params.get(name) : params[name]; };
    var row = document.createElement("tr");
    row.id = id;
    row.className = "pending";
    var cells = ["just now", get("kind") === "everyone" ? "*" : (get("target") || ""), get("message") || "", "pending…", "", "", ""];
    cells.forEach(function (text, i) {
      var td = document.createElement("td");
      td.textContent = text;  // Text, never markup.
      if (i === 3) td.className = "outcome";
      row.appendChild(td);
    });
    rows.insertBefore(row, rows.firstChild);
  });

  document.addEventListener("change", function (evt) {
    if (evt.target && evt.target.id === "live-toggle") {
      paused = !evt.target.checked;
      showConnection();
      var table = document.getElementById("clients-table");
      if (!paused && table && window.htmx) {
        missed = false;
        window.htmx.trigger(table, "refresh");
      }
    } else if (evt.target && evt.target.classList && evt.target.classList.contains("select")) {
      catchUp();
    }
  });

  document.addEventListener("input", function (evt) {
    if (evt.target && evt.target.name === "confirm" && evt.target.closest("#clients-table")) catchUp();
  });

  document.addEventListener("click", function (evt) {
    var button = evt.target && evt.target.closest ? evt.target.closest("[data-dismiss]") : null;
    if (!button) return;
    var box = document.getElementById(button.getAttribute("data-dismiss"));
    if (box) box.hidden = true;
  });

  // Times: relative in the page, absolute on hover, in UTC (as the server writes them) or, by the
  // operator's choice kept in this browser, in local time.
  var ZONE_KEY = "wsbridge.dashboard.times";
  function zone() {
    try { return window.localStorage.getItem(ZONE_KEY) === "local" ? "local" : "utc"; } catch (e) { return "utc"; }
  }
  function showTimes(root) {
    var local = zone() === "local";
    var times = (root || document).querySelectorAll("time[datetime]");
    for (var i = 0; i < times.length; i++) {
      var at = new Date(times[i].getAttribute("datetime"));
      if (isNaN(at.getTime())) continue;
      times[i].title = local
        ? at.toLocaleString(undefined, { hour12: false, timeZoneName: "short" })
        : at.toISOString().slice(0, 19).replace("T", " ") + " UTC";
    }
  }
  document.addEventListener("DOMContentLoaded", function () {
    var select = document.getElementById("time-zone");
    if (select) select.value = zone();
    showTimes(document);
  });
  document.addEventListener("htmx:load", function (evt) { if (zone() === "local") showTimes(evt.target); });
  document.addEventListener("change", function (evt) {
    if (!evt.target || evt.target.id !== "time-zone") return;
    try { window.localStorage.setItem(ZONE_KEY, evt.target.value); } catch (e) { /* private mode: this page only */ }
    showTimes(document);
  });

  // Copy buttons (e.g. a new token value shown once): data-copy-from names the element to copy.
  document.addEventListener("click", function (evt) {
    var button = evt.target && evt.target.closest ? evt.target.closest("[data-copy-from]") : null;
    if (!button) return;
    var source = document.getElementById(button.getAttribute("data-copy-from"));
    if (source && navigator.clipboard) {
      navigator.clipboard.writeText(source.textContent.trim()).then(function () {
        button.textContent = "Copied";
      });
    }
  });
})();
