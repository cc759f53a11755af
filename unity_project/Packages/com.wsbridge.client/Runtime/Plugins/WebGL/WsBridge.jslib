// WsBridge.jslib: the browser half of WebGLTransport.cs (WebGL builds of the WebSocket Bridge client).
//
// Each connection is a browser WebSocket whose events are queued here; C# polls them once per frame
// (WsBridgePoll), so JavaScript never calls into C# (no function pointers, no dynCall). Uses only the
// Emscripten helpers UTF8ToString, lengthBytesUTF8, stringToUTF8 and _malloc; a returned string is
// freed by the IL2CPP marshaller. The token is offered as the subprotocol "wsbridge.token.<token>" next
// to "wsbridge.v1"/"wsbridge.v2" (browsers cannot set headers) and is never logged.
//
// Tested in headless Chromium against a real appliance: tests/browser/test_webgl_jslib.py.

var WsBridgeLibrary = {
  $WsBridge: {
    sockets: {},
    next: 1,
    // Event encoding read by WebGLTransport.Pump: "o<protocol>", "m<text>", "c<code> <reason>".
    push: function (entry, text) {
      entry.events.push(text);
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
    var entry = { socket: null, events: [] };
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
    entry.socket.onmessage = function (event) {
      if (typeof event.data === "string") WsBridge.push(entry, "m" + event.data);
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
    return WsBridge.toHeap(entry.events.shift());
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
