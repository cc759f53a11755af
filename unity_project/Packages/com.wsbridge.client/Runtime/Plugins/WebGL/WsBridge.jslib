// WsBridge.jslib: the browser half of WebGLTransport.cs (WebGL builds of the WebSocket Bridge client).
//
// Each connection is a browser WebSocket whose events are queued here; C# polls them once per frame
// (WsBridgePoll), so JavaScript never calls into C# (no function pointers, no dynCall). Uses only the
// Emscripten helpers UTF8ToString, lengthBytesUTF8, stringToUTF8 and _malloc; a returned string is
// freed by the IL2CPP marshaller. The token is offered as the subprotocol "wsbridge.token.<token>" next
// to "wsbridge.v1"/"wsbridge.v2" (browsers cannot set headers) and is never logged.
//
// A hidden tab stops the player loop (and WebGL players get no OnApplicationPause) while the browser keeps
// receiving: each message is stamped when it arrives, and Poll reports how long it waited, so C# refuses
// stale commands with a reply instead of running them in a burst. The queue is bounded: beyond maxQueued
// messages the plugin closes the socket with 4008 (too many undelivered messages, as the appliance does for
// slow consumers) instead of growing without end; the client reconnects once the page runs again.
// Binary messages are decoded as UTF-8 text, like ClientWebSocket's transport does.
//
// Tested in headless Chromium against a real appliance: tests/browser/test_webgl_jslib.py.

var WsBridgeLibrary = {
  $WsBridge: {
    sockets: {},
    next: 1,
    // Messages one socket keeps for the page; beyond, it is closed with 4008.
    maxQueued: 1000,
    // Event encoding read by WebGLTransport.Pump: "o<protocol>", "m<age ms> <text>", "c<code> <reason>".
    push: function (entry, text) {
      entry.events.push({ at: performance.now(), text: text });
    },
    message: function (entry, text) {
      if (entry.overflowed) return;
      if (entry.messages >= WsBridge.maxQueued) {
        entry.overflowed = true;
        entry.socket.close(4008, "too many undelivered messages: the page did not run");
        return;
      }
      entry.messages++;
      WsBridge.push(entry, "m" + text);
    },
    toHeap: function (text) {
      var size = lengthBytesUTF8(text) + 1;
      var ptr = _malloc(size);
      stringToUTF8(text, ptr, size);
      return ptr;
    },
  },

  WsBridgeOpen__deps: ["$WsBridge"],
  WsBridgeOpen: function (urlPtr, protocolsPtr) {
    var url = UTF8ToString(urlPtr);
    var protocols = UTF8ToString(protocolsPtr);
    var id = WsBridge.next++;
    var entry = { socket: null, events: [], messages: 0, overflowed: false };
    WsBridge.sockets[id] = entry;
    try {
      entry.socket = new WebSocket(url, protocols ? protocols.split(",") : []);
    } catch (error) {
      // A malformed URL or subprotocol throws at once (the message may contain the token: not kept).
      WsBridge.push(entry, "c1006 the browser refused to open the WebSocket");
      return id;
    }
    entry.socket.onopen = function () {
      WsBridge.push(entry, "o" + entry.socket.protocol);
    };
    entry.socket.binaryType = "arraybuffer";
    entry.socket.onmessage = function (event) {
      var data = event.data;
      WsBridge.message(entry, typeof data === "string" ? data : new TextDecoder("utf-8").decode(new Uint8Array(data)));
    };
    entry.socket.onclose = function (event) {
      WsBridge.push(entry, "c" + event.code + " " + (event.reason || ""));
    };
    // onerror is always followed by onclose (code 1006), which carries what C# needs.
    return id;
  },

  WsBridgePoll__deps: ["$WsBridge"],
  WsBridgePoll: function (id) {
    var entry = WsBridge.sockets[id];
    if (!entry || entry.events.length === 0) return 0;
    var event = entry.events.shift();
    var text = event.text;
    if (text.charAt(0) === "m") {
      entry.messages--;
      text = "m" + Math.round(performance.now() - event.at) + " " + text.substring(1);
    }
    return WsBridge.toHeap(text);
  },

  WsBridgeSend__deps: ["$WsBridge"],
  WsBridgeSend: function (id, textPtr) {
    var entry = WsBridge.sockets[id];
    if (!entry || !entry.socket || entry.socket.readyState !== 1) return -1;
    entry.socket.send(UTF8ToString(textPtr));
    return 0;
  },

  WsBridgeClose__deps: ["$WsBridge"],
  WsBridgeClose: function (id, code, reasonPtr) {
    var entry = WsBridge.sockets[id];
    if (!entry || !entry.socket || entry.socket.readyState > 1) return;
    // Browsers only send 1000 or 3000-4999 themselves; anything else becomes 1000.
    if (code !== 1000 && (code < 3000 || code > 4999)) code = 1000;
    entry.socket.close(code, UTF8ToString(reasonPtr));
  },

  WsBridgeFree__deps: ["$WsBridge"],
  WsBridgeFree: function (id) {
    var entry = WsBridge.sockets[id];
    if (!entry) return;
    if (entry.socket && entry.socket.readyState <= 1) entry.socket.close(1000, "");
    delete WsBridge.sockets[id];
  },
};

mergeInto(LibraryManager.library, WsBridgeLibrary);
