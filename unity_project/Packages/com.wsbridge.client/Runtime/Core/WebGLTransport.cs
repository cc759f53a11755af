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
// Compiled only in WebGL players; the tests compile it with -define:UNITY_WEBGL. C# 7.2 (mcs).

#if UNITY_WEBGL && !UNITY_EDITOR
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
    public sealed class WebGLTransport : IBridgeTransport
    {
        [DllImport("__Internal")] private static extern int WsBridgeOpen(string url, string protocols);
        [DllImport("__Internal")] private static extern string WsBridgePoll(int socket);
        [DllImport("__Internal")] private static extern int WsBridgeSend(int socket, string text);
        [DllImport("__Internal")] private static extern void WsBridgeClose(int socket, int code, string reason);
        [DllImport("__Internal")] private static extern void WsBridgeFree(int socket);

        private static readonly List<WebGLTransport> Live = new List<WebGLTransport>();
        private static readonly UTF8Encoding Utf8 = new UTF8Encoding(false);

        private readonly Queue<BridgeFrame> frames = new Queue<BridgeFrame>();
        private readonly TaskCompletionSource<bool> opened = new TaskCompletionSource<bool>();
        private TaskCompletionSource<BridgeFrame> waiting;
        private int socket;
        private int maxMessageBytes = int.MaxValue;
        private bool open, closeReceived, aborted;
        private string subProtocol;

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
            var protocols = new List<string>(request.SubProtocols);
            if (protocols.Count == 0) protocols.Add(BridgeProtocols.V1); // the server must have a protocol to select
            protocols.Add(BridgeConnectRequest.TokenSubProtocolPrefix + request.Token);
            socket = WsBridgeOpen(request.Endpoint.ToString(), string.Join(",", protocols.ToArray()));
            lock (Live) Live.Add(this);
            cancel.Register(() => opened.TrySetCanceled());
            return opened.Task;
        }

        private void Pump()
        {
            string ev;
            while (socket != 0 && (ev = WsBridgePoll(socket)) != null)
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
                        Deliver(Utf8.GetByteCount(rest) > maxMessageBytes ? BridgeFrame.TooBig() : BridgeFrame.Message(rest));
                        break;
                    case 'c':
                        int space = rest.IndexOf(' ');
                        int code = int.Parse(space < 0 ? rest : rest.Substring(0, space), CultureInfo.InvariantCulture);
                        string reason = space < 0 ? "" : rest.Substring(space + 1);
                        closeReceived = open;
                        open = false;
                        // A handshake the browser refused (no server, wrong subprotocol answer) ends as a close without open.
                        opened.TrySetException(new IOException("the browser could not open the WebSocket (close code " + code + ")"));
                        Deliver(BridgeFrame.Closed(code, reason));
                        lock (Live) Live.Remove(this);
                        return;
                }
            }
        }

        private void Deliver(BridgeFrame frame)
        {
            var receiver = waiting;
            waiting = null;
            if (receiver != null) receiver.TrySetResult(frame);
            else frames.Enqueue(frame);
        }

        public Task SendAsync(string text, CancellationToken abort)
        {
            var done = new TaskCompletionSource<bool>();
            // The browser buffers the message; send() never blocks.
            if (WsBridgeSend(socket, text) != 0) done.SetException(new IOException("the WebSocket is not open"));
            else done.SetResult(true);
            return done.Task;
        }

        public Task<BridgeFrame> ReceiveAsync(int maxMessageBytes)
        {
            this.maxMessageBytes = maxMessageBytes;
            if (aborted) throw new IOException("aborted");
            if (frames.Count > 0) return Task.FromResult(frames.Dequeue());
            waiting = new TaskCompletionSource<BridgeFrame>();
            return waiting.Task;
        }

        public Task CloseOutputAsync(int code, string reason, CancellationToken cancel)
        {
            // The browser completes the close handshake itself; the close event ends ReceiveAsync.
            if (open) WsBridgeClose(socket, code, reason ?? "");
            open = false;
            return Task.FromResult(true);
        }

        public void Abort()
        {
            aborted = true;
            if (socket != 0) WsBridgeClose(socket, BridgeCloseCodes.Normal, "");
            open = false;
            opened.TrySetException(new IOException("aborted"));
            var receiver = waiting;
            waiting = null;
            if (receiver != null) receiver.TrySetException(new IOException("aborted"));
        }

        public void Dispose()
        {
            lock (Live) Live.Remove(this);
            if (socket != 0) WsBridgeFree(socket);
            socket = 0;
        }
    }
}
#endif
