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
  function showConnection() {
    if (paused) show("paused", "Paused: the table is not refreshed");
    else if (connected) show("live", "Live");
    else show("lost", "Connection lost: reconnecting…");
  }

  document.addEventListener("htmx:sseOpen", function () { connected = true; showConnection(); });
  document.addEventListener("htmx:sseError", function () { connected = false; showConnection(); });
  document.addEventListener("htmx:sseClose", function () { connected = false; showConnection(); });

  function hasSelection() {
    return document.querySelector("#clients-table input.select:checked") !== null;
  }

  // Paused, or rows selected for an action: table refreshes triggered by the stream are held back (a
  // refresh would clear the selection); the operator's own actions still run. The stream says
  // "changed" once per change, so a held-back refresh is remembered and runs as soon as the table
  // is live and nothing is ticked (after an action's own refresh, or when the last box is unticked).
  var missed = false;
  function isTable(elt) { return elt && elt.id === "clients-table"; }

  function catchUp() {
    var table = document.getElementById("clients-table");
    if (missed && !paused && !hasSelection() && table && window.htmx) {
      missed = false;
      window.htmx.trigger(table, "refresh");
    }
  }

  document.addEventListener("htmx:confirm", function (evt) {
    var trigger = evt.detail && evt.detail.triggeringEvent;
    var fromStream = trigger && typeof trigger.type === "string" && trigger.type.indexOf("sse:") === 0;
    if (fromStream && isTable(evt.detail.elt) && (paused || hasSelection())) {
      missed = true;
      evt.preventDefault();
    }
  });

  document.addEventListener("htmx:afterSettle", function (evt) {
    if (isTable(evt.detail && evt.detail.elt) || isTable(evt.target)) catchUp();
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
    var cells = [new Date().toISOString().slice(0, 19).replace("T", " ") + " UTC", get("kind") === "everyone" ? "*" : (get("target") || ""), get("message") || "", "pending…", "", "", ""];
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
