// WebGLTransport.cs: IBridgeTransport over the browser's WebSocket, for WebGL builds, where
// System.Net.WebSockets.ClientWebSocket cannot open sockets. The JavaScript half is
// Runtime/Plugins/WebGL/WsBridge.jslib (tested in headless Chromium: tests/browser/test_webgl_jslib.py).
//
// Browsers cannot set request headers on a WebSocket, so the token travels as the subprotocol
// "wsbridge.token.<token>", offered together with "wsbridge.v1" or "wsbridge.v2"; the appliance selects
// the version protocol, never the token one. The browser queues events; Pump() (BridgeTransports.Pump(),
// called every frame by CommandListener.Update, or by you when you use BridgeClient directly) moves them
// to the waiting tasks on the main thread. No callbacks from JavaScript into C#, so no function pointers.
//
// Compiled only in WebGL players. The tests compile it with WSBRIDGE_WEBGL_TESTS and run it in Mono against
// a real appliance, with the five plugin functions played by a ClientWebSocket that behaves like a browser
// (token only as a subprotocol): tests/integration/unity/BrowserSocketEmulation.cs. C# 7.2 (mcs).

#if (UNITY_WEBGL && !UNITY_EDITOR) || WSBRIDGE_WEBGL_TESTS
using System;
using System.Collections.Generic;
using System.Globalization;
using System.IO;
using System.Runtime.InteropServices;
using System.Text;
using System.Threading;
using System.Threading.Tasks;

namespace WebSocketBridge
{
    /// <summary>The functions of WsBridge.jslib. Events from Poll: "o&lt;protocol&gt;", "m&lt;age ms&gt; &lt;text&gt;" (how long the
    /// message waited in the page), "c&lt;code&gt; &lt;reason&gt;", or null.</summary>
    public interface IWebGLSocketApi
    {
        int Open(string url, string protocols);
        string Poll(int socket);
        int Send(int socket, string text);
        void Close(int socket, int code, string reason);
        void Free(int socket);
    }

#if UNITY_WEBGL && !UNITY_EDITOR
    /// <summary>The plugin itself (Plugins/WebGL/WsBridge.jslib), linked into the WebGL player.</summary>
    internal sealed class JsLibSocketApi : IWebGLSocketApi
    {
        [DllImport("__Internal")] private static extern int WsBridgeOpen(string url, string protocols);
        [DllImport("__Internal")] private static extern string WsBridgePoll(int socket);
        [DllImport("__Internal")] private static extern int WsBridgeSend(int socket, string text);
        [DllImport("__Internal")] private static extern void WsBridgeClose(int socket, int code, string reason);
        [DllImport("__Internal")] private static extern void WsBridgeFree(int socket);

        public int Open(string url, string protocols) { return WsBridgeOpen(url, protocols); }
        public string Poll(int socket) { return WsBridgePoll(socket); }
        public int Send(int socket, string text) { return WsBridgeSend(socket, text); }
        public void Close(int socket, int code, string reason) { WsBridgeClose(socket, code, reason); }
        public void Free(int socket) { WsBridgeFree(socket); }
    }
#endif

    public sealed class WebGLTransport : IBridgeTransport
    {
        private readonly IWebGLSocketApi js;
        private readonly object sync = new object();

        private static readonly List<WebGLTransport> Live = new List<WebGLTransport>();
        private static readonly UTF8Encoding Utf8 = new UTF8Encoding(false);

        private readonly Queue<BridgeFrame> frames = new Queue<BridgeFrame>();
        private readonly TaskCompletionSource<bool> opened = new TaskCompletionSource<bool>();
        private TaskCompletionSource<BridgeFrame> waiting;
        private int socket;
        private int maxMessageBytes = int.MaxValue;
        private bool open, closeReceived, aborted;
        private string subProtocol;

#if UNITY_WEBGL && !UNITY_EDITOR
        public WebGLTransport() : this(new JsLibSocketApi()) { }
#endif

        /// <param name="js">The plugin's functions (another implementation only in tests).</param>
        public WebGLTransport(IWebGLSocketApi js)
        {
            if (js == null) throw new ArgumentNullException("js");
            this.js = js;
        }

        public string SubProtocol { get { return subProtocol; } }
        public bool CanSendClose { get { return open; } }
        public bool CloseReceived { get { return closeReceived; } }

        /// <summary>Moves the browser's queued events of every WebGL connection to their tasks (main thread, every frame).</summary>
        public static void PumpAll()
        {
            WebGLTransport[] live;
            lock (Live) live = Live.ToArray();
            foreach (var transport in live) transport.Pump();
        }

        public Task ConnectAsync(BridgeConnectRequest request, CancellationToken cancel)
        {
            // new WebSocket() throws on a subprotocol outside RFC 7230's token characters, and the browser would report
            // it as an unexplained 1006 on every attempt: refuse it here, once, with the reason (the token is not shown).
            if (!IsToken(request.Token))
                throw new ArgumentException("the token contains characters a browser cannot send as a WebSocket subprotocol " +
                                            "(allowed: letters, digits and !#$%&'*+-.^_`|~); use a token made of those", "request");
            var protocols = new List<string>(request.SubProtocols);
            if (protocols.Count == 0) protocols.Add(BridgeProtocols.V1); // the server must have a protocol to select
            protocols.Add(BridgeConnectRequest.TokenSubProtocolPrefix + request.Token);
            socket = js.Open(request.Endpoint.ToString(), string.Join(",", protocols.ToArray()));
            lock (Live) Live.Add(this);
            cancel.Register(() => opened.TrySetCanceled());
            return opened.Task;
        }

        /// <summary>RFC 7230 tchar: what a Sec-WebSocket-Protocol value may contain.</summary>
        internal static bool IsToken(string value)
        {
            if (string.IsNullOrEmpty(value)) return false;
            foreach (char c in value)
            {
                bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || "!#$%&'*+-.^_`|~".IndexOf(c) >= 0;
                if (!ok) return false;
            }
            return true;
        }

        private void Pump()
        {
            string ev;
            while (socket != 0 && (ev = js.Poll(socket)) != null)
            {
                string rest = ev.Substring(1);
                switch (ev[0])
                {
                    case 'o':
                        open = true;
                        subProtocol = rest;
                        opened.TrySetResult(true);
                        break;
                    case 'm':
                        int gap = rest.IndexOf(' ');
                        long ageMs = long.Parse(rest.Substring(0, gap), CultureInfo.InvariantCulture);
                        string text = rest.Substring(gap + 1);
                        Deliver(Utf8.GetByteCount(text) > maxMessageBytes ? BridgeFrame.TooBig() : BridgeFrame.Message(text, TimeSpan.FromMilliseconds(ageMs)));
                        break;
                    case 'c':
                        int space = rest.IndexOf(' ');
                        int code = int.Parse(space < 0 ? rest : rest.Substring(0, space), CultureInfo.InvariantCulture);
                        string reason = space < 0 ? "" : rest.Substring(space + 1);
                        closeReceived = open;
                        open = false;
                        // A handshake the browser refused (no server, wrong subprotocol answer) ends as a close without open.
                        opened.TrySetException(new BridgeOpenRefusedException("the browser could not open the WebSocket (close code " + code + ")"));
                        Deliver(BridgeFrame.Closed(code, reason));
                        lock (Live) Live.Remove(this);
                        return;
                }
            }
        }

        private void Deliver(BridgeFrame frame)
        {
            TaskCompletionSource<BridgeFrame> receiver;
            lock (sync)
            {
                receiver = waiting;
                waiting = null;
                if (receiver == null) frames.Enqueue(frame);
            }
            if (receiver != null) receiver.TrySetResult(frame);
        }

        public Task SendAsync(string text, CancellationToken abort)
        {
            var done = new TaskCompletionSource<bool>();
            // The browser buffers the message; send() never blocks.
            if (js.Send(socket, text) != 0) done.SetException(new IOException("the WebSocket is not open"));
            else done.SetResult(true);
            return done.Task;
        }

        public Task<BridgeFrame> ReceiveAsync(int maxMessageBytes)
        {
            this.maxMessageBytes = maxMessageBytes;
            lock (sync)
            {
                if (frames.Count > 0) return Task.FromResult(frames.Dequeue());
                if (aborted) throw new IOException("aborted");
                waiting = new TaskCompletionSource<BridgeFrame>();
                return waiting.Task;
            }
        }

        public Task CloseOutputAsync(int code, string reason, CancellationToken cancel)
        {
            // The browser completes the close handshake itself; the close event ends ReceiveAsync.
            if (open) js.Close(socket, code, reason ?? "");
            open = false;
            return Task.FromResult(true);
        }

        public void Abort()
        {
            if (socket != 0) js.Close(socket, BridgeCloseCodes.Normal, "");
            open = false;
            opened.TrySetException(new IOException("aborted"));
            TaskCompletionSource<BridgeFrame> receiver;
            lock (sync)
            {
                aborted = true;
                receiver = waiting;
                waiting = null;
            }
            if (receiver != null) receiver.TrySetException(new IOException("aborted"));
        }

        public void Dispose()
        {
            lock (Live) Live.Remove(this);
            if (socket != 0) js.Free(socket);
            socket = 0;
        }
    }
}
#endif
