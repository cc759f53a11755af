// BridgeTransport.cs: the seam between BridgeClient's policy (reconnect, backoff, send queue, close
// codes) and a WebSocket implementation. ClientWebSocketTransport (System.Net.WebSockets) serves the
// editor, desktop, mobile and plain .NET; WebGLTransport (WebGLTransport.cs + WsBridge.jslib) serves
// WebGL builds, where browsers only offer their own WebSocket object.
//
// Plain C# (no UnityEngine), C# 7.2 at most so that Mono's mcs compiles it (tests/integration).

using System;
using System.IO;
using System.Net.WebSockets;
using System.Text;
using System.Threading;
using System.Threading.Tasks;

namespace WebSocketBridge
{
    /// <summary>The peer ended a connection before it opened, without saying why (a browser's close 1006 before open: the
    /// server is down, or it refused the handshake, e.g. an origin not in ALLOWED_ORIGINS, which a page cannot tell apart).</summary>
    public sealed class BridgeOpenRefusedException : IOException
    {
        public BridgeOpenRefusedException(string message) : base(message) { }
    }

    /// <summary>What a transport needs to open a connection.</summary>
    public sealed class BridgeConnectRequest
    {
        /// <summary>ws(s)://host/ws/{id}[?groups=...]</summary>
        public Uri Endpoint;
        /// <summary>The client token. A transport that can set headers sends X-Auth-Token; a browser cannot, so
        /// the WebGL transport offers the subprotocol <c>wsbridge.token.&lt;token&gt;</c> instead. Never logged.</summary>
        public string Token;
        /// <summary>Subprotocols to offer besides the token (wsbridge.v1 / wsbridge.v2), may be empty.</summary>
        public string[] SubProtocols = new string[0];
        /// <summary>Keepalive of transports that have one (ClientWebSocket); zero disables it.</summary>
        public TimeSpan KeepAliveInterval;

        /// <summary>Prefix of the subprotocol that carries the token in browsers.</summary>
        public const string TokenSubProtocolPrefix = "wsbridge.token.";
    }

    /// <summary>The kinds of <see cref="BridgeFrame"/>.</summary>
    public enum BridgeFrameKind
    {
        /// <summary>A whole text message.</summary>
        Text,
        /// <summary>The peer's close frame (or the end of the connection with a code).</summary>
        Close,
        /// <summary>An incoming message exceeded the size cap; the policy closes with 1009.</summary>
        TooBig,
    }

    /// <summary>One whole incoming message or the end of the connection.</summary>
    public struct BridgeFrame
    {
        public BridgeFrameKind Kind;
        public string Text;
        public int CloseCode;
        public string CloseReason;
        /// <summary>How long the message waited before it was read (the browser queues messages while the page does
        /// not run, e.g. in a hidden tab); zero where nothing waits.</summary>
        public TimeSpan Age;

        public static BridgeFrame Message(string text) { return new BridgeFrame { Kind = BridgeFrameKind.Text, Text = text }; }
        public static BridgeFrame Message(string text, TimeSpan age) { return new BridgeFrame { Kind = BridgeFrameKind.Text, Text = text, Age = age }; }
        public static BridgeFrame Closed(int code, string reason) { return new BridgeFrame { Kind = BridgeFrameKind.Close, CloseCode = code, CloseReason = reason }; }
        public static BridgeFrame TooBig() { return new BridgeFrame { Kind = BridgeFrameKind.TooBig }; }
    }

    /// <summary>One WebSocket connection, used once. BridgeClient calls ConnectAsync once, then at most one
    /// SendAsync and one ReceiveAsync at a time, then CloseOutputAsync and/or Abort, then Dispose.
    /// Implementations may ignore cancellation of ConnectAsync (Mono's ClientWebSocket does once TCP is up):
    /// the policy layer races it against its own timeout and abandons the attempt.</summary>
    public interface IBridgeTransport : IDisposable
    {
        Task ConnectAsync(BridgeConnectRequest request, CancellationToken cancel);
        /// <summary>The subprotocol the server selected, or null/empty.</summary>
        string SubProtocol { get; }
        /// <summary>True while a close frame may still be sent (open, or the peer's close was received).</summary>
        bool CanSendClose { get; }
        /// <summary>True after the peer's close frame arrived.</summary>
        bool CloseReceived { get; }
        /// <summary>Sends one text message; cancelling <paramref name="abort"/> may abort the connection.</summary>
        Task SendAsync(string text, CancellationToken abort);
        /// <summary>The next whole message (reassembled, at most <paramref name="maxMessageBytes"/> UTF-8 bytes) or the
        /// close. Throws when the connection broke. Ended by Abort() or by the close handshake, not by a token.</summary>
        Task<BridgeFrame> ReceiveAsync(int maxMessageBytes);
        Task CloseOutputAsync(int code, string reason, CancellationToken cancel);
        /// <summary>Ends the connection at once; pending operations fail.</summary>
        void Abort();
    }

    /// <summary>Chooses the transport by platform: the browser's WebSocket in WebGL players, ClientWebSocket elsewhere.</summary>
    public static class BridgeTransports
    {
        public static IBridgeTransport CreateDefault()
        {
#if UNITY_WEBGL && !UNITY_EDITOR
            return new WebGLTransport();
#else
            return new ClientWebSocketTransport();
#endif
        }

        /// <summary>The frame loop clients run on by default: BridgeFrameLoop.Main in WebGL players (no threads), else
        /// null (thread pool and timers).</summary>
        /// <summary>Consecutive opens refused without a reason after which a client gives up (0: never): 10 in WebGL
        /// players, where a refused origin looks exactly like a server that is down (1006 before open).</summary>
        public static int DefaultMaxRefusedOpens
        {
            get
            {
#if UNITY_WEBGL && !UNITY_EDITOR
                return 10;
#else
                return 0;
#endif
            }
        }

        public static BridgeFrameLoop DefaultFrameLoop
        {
            get
            {
#if UNITY_WEBGL && !UNITY_EDITOR
                return BridgeFrameLoop.Main;
#else
                return null;
#endif
            }
        }

        /// <summary>Call once per frame on the main thread (CommandListener.Update does it): the WebGL transport moves
        /// the browser's events to the connection, then the clients on BridgeFrameLoop.Main run what is due. Cheap
        /// where nothing uses them.</summary>
        public static void Pump()
        {
#if (UNITY_WEBGL && !UNITY_EDITOR) || WSBRIDGE_WEBGL_TESTS
            WebGLTransport.PumpAll();
#endif
            BridgeFrameLoop.Main.Pump();
        }
    }

    /// <summary>System.Net.WebSockets.ClientWebSocket: every platform except WebGL.</summary>
    public sealed class ClientWebSocketTransport : IBridgeTransport
    {
        private static readonly UTF8Encoding Utf8 = new UTF8Encoding(false);
        private readonly ClientWebSocket ws = new ClientWebSocket();
        private readonly int readSize;
        private byte[] buffer;
        private MemoryStream message = new MemoryStream();

        public ClientWebSocketTransport() : this(16 * 1024) { }

        /// <param name="readSize">Bytes per ReceiveAsync read; larger messages are reassembled from several reads.</param>
        public ClientWebSocketTransport(int readSize)
        {
            this.readSize = Math.Max(1024, readSize);
        }

        public string SubProtocol { get { return ws.SubProtocol; } }
        public bool CanSendClose { get { var s = ws.State; return s == WebSocketState.Open || s == WebSocketState.CloseReceived; } }
        public bool CloseReceived { get { return ws.State == WebSocketState.CloseReceived; } }

        public Task ConnectAsync(BridgeConnectRequest request, CancellationToken cancel)
        {
            ws.Options.SetRequestHeader("X-Auth-Token", request.Token);
            foreach (var protocol in request.SubProtocols) ws.Options.AddSubProtocol(protocol);
            if (request.KeepAliveInterval > TimeSpan.Zero) ws.Options.KeepAliveInterval = request.KeepAliveInterval;
            return ws.ConnectAsync(request.Endpoint, cancel);
        }

        public Task SendAsync(string text, CancellationToken abort)
        {
            // One frame per message; cancelling SendAsync aborts the socket, which is what abort means.
            return ws.SendAsync(new ArraySegment<byte>(Utf8.GetBytes(text)), WebSocketMessageType.Text, true, abort);
        }

        public async Task<BridgeFrame> ReceiveAsync(int maxMessageBytes)
        {
            if (buffer == null) buffer = new byte[readSize];
            message.SetLength(0);
            while (true)
            {
                // No cancellation token: cancelling a ReceiveAsync aborts the socket, which would make a clean
                // close impossible. Ending the session closes or aborts the socket instead.
                var result = await ws.ReceiveAsync(new ArraySegment<byte>(buffer), CancellationToken.None).ConfigureAwait(false);
                if (result.MessageType == WebSocketMessageType.Close)
                {
                    int code = result.CloseStatus.HasValue ? (int)result.CloseStatus.Value : BridgeCloseCodes.NoStatus;
                    return BridgeFrame.Closed(code, result.CloseStatusDescription);
                }
                if (message.Length + result.Count > maxMessageBytes) return BridgeFrame.TooBig();
                // Binary messages are decoded as UTF-8 text like text ones (so does the WebGL plugin).
                message.Write(buffer, 0, result.Count);
                if (!result.EndOfMessage) continue;
                // Decode the whole message at once: a multi-byte UTF-8 character may straddle two reads.
                string text = Utf8.GetString(message.GetBuffer(), 0, (int)message.Length);
                if (message.Capacity > 4 * buffer.Length) message = new MemoryStream(); // give a big one back
                return BridgeFrame.Message(text);
            }
        }

        public Task CloseOutputAsync(int code, string reason, CancellationToken cancel)
        {
            return ws.CloseOutputAsync((WebSocketCloseStatus)code, reason, cancel);
        }

        public void Abort()
        {
            try { ws.Abort(); } catch (Exception) { /* already gone */ }
        }

        public void Dispose()
        {
            try { ws.Dispose(); } catch (Exception) { /* already gone */ }
        }
    }
}
