// BridgeClient.cs: the transport of the WebSocket Bridge client for Unity (and any .NET program).
//
// Plain C# with no UnityEngine dependency, so it is compiled and tested outside the editor
// (tests/integration/test_unity_client.py builds it with Mono's mcs and runs it against the real
// appliance). The socket itself is behind IBridgeTransport (BridgeTransport.cs): ClientWebSocket on
// desktop, mobile and in the editor, the browser's WebSocket in WebGL builds. Language level: C# 7.2 at most, the newest that Mono's mcs compiles (the tests pass
// -langversion:7.2); Unity compiles newer C#, but do not use newer features here.
//
// What it does:
//   * connects to ws(s)://host/ws/{clientId}[?groups=a,b] with the token (header, or subprotocol in browsers),
//     offering wsbridge.v2 when protocol v2 is chosen; the connect is raced against ConnectTimeout, because
//     Mono's ClientWebSocket ignores cancellation once TCP is up and the upgrade answer never comes;
//   * the transport reassembles fragmented and large messages up to a size cap;
//   * has one send queue drained by one sender loop: ClientWebSocket allows a single outstanding
//     SendAsync, so no caller ever touches the socket directly;
//   * reconnects on its own with exponential backoff and full jitter, capped, and resets the
//     backoff after a connection stayed up for StableConnectionTime;
//   * does not retry close codes that a retry cannot fix (4001 bad token, 4002 invalid id, 4003 id
//     reserved for controllers, 4010 replaced by a newer connection with the same id, 4011 token expired or
//     revoked, 4012 disconnected by an administrator) and reports them;
//   * keepalive: ClientWebSocket.Options.KeepAliveInterval plus an optional receive watchdog;
//   * Stop()/Dispose() flush the send queue and close with 1000, bounded by CloseTimeout; StopAsync() never blocks.
//
// It only moves text messages. The meaning of a message (a command, a reply, a future protocol
// with command ids and correlated replies) belongs to a codec on top (BridgeProtocol.cs), so a new
// protocol version never touches this file.
//
// Threading: events are raised on thread-pool threads, one at a time, in order. Handlers must be
// quick and must not block; CommandListener (Unity) only enqueues and handles them in Update().
// WebGL has no threads: there the client runs on a frame loop (BridgeFrameLoop.cs, Options.FrameLoop), on the
// main thread inside BridgeTransports.Pump(), with no thread pool, no timer and no blocking wait.

using System;
using System.Collections.Concurrent;
using System.Collections.Generic;
using System.Text;
using System.Text.RegularExpressions;
using System.Threading;
using System.Threading.Tasks;

namespace WebSocketBridge
{
    /// <summary>Lifecycle of a <see cref="BridgeClient"/>.</summary>
    public enum BridgeState
    {
        /// <summary>Created, Start() not called yet.</summary>
        Idle,
        /// <summary>Opening a connection.</summary>
        Connecting,
        /// <summary>Connected; messages flow.</summary>
        Open,
        /// <summary>Lost the connection; waiting for the backoff delay before the next attempt.</summary>
        WaitingToReconnect,
        /// <summary>Stop() was called; StopAsync() completes when the close handshake is done.</summary>
        Stopping,
        /// <summary>Stopped by Stop()/Dispose(). Start() may be called again.</summary>
        Stopped,
        /// <summary>The server closed with a code that a retry cannot fix (see LastDisconnect). Start() may be called again.</summary>
        Rejected,
    }

    /// <summary>Close codes of the wire protocol (docs/protocol.md).</summary>
    public static class BridgeCloseCodes
    {
        public const int Normal = 1000;           // RFC 6455 §7.4.1: normal closure (our Stop()).
        public const int GoingAway = 1001;        // server shutting down: reconnect, possibly elsewhere.
        public const int NoStatus = 1005;         // RFC 6455: a close frame without a code (never sent).
        public const int MessageTooBig = 1009;    // RFC 6455 §7.4.1: a message larger than the peer accepts.
        public const int InternalError = 1011;    // server error: retry.
        // Also retried (not final): 1007 non-UTF-8 data, 1013 broker unavailable, 4008 slow consumer.
        public const int Unauthorized = 4001;     // missing or wrong token: do not retry.
        public const int InvalidClientId = 4002;  // id does not match ^[a-zA-Z0-9_-]{1,50}$: do not retry.
        public const int ReservedClientId = 4003; // client token used with the controller id LLM: do not retry.
        public const int RoleConflict = 4004;     // the id is held by a connection of the other role (a controller): retry later.
        public const int DuplicateRejected = 4009;// id already connected and DUPLICATE_POLICY=reject: retry later.
        public const int Replaced = 4010;         // a newer connection with the same id took over: do not retry.
        public const int TokenExpired = 4011;     // token expired or revoked: do not retry; reconnect with the current token.
        public const int DisconnectedByAdmin = 4012; // an administrator disconnected this client: do not retry (a person decided).
        public const int TooManyConnections = 4013;  // this address or token holds too many connections: retry later.
        public const int GroupNotAllowed = 4014;  // a scoped token asked for a group its groups list does not name: do not retry.
        public const int TooManyNewIds = 4015;    // too many new client ids from this address or token: retry later.
        public const int Banned = 4016;           // the id or address is on the ban list: do not retry (a person decided).

        /// <summary>True for close codes after which reconnecting cannot help (the client gives up).</summary>
        public static bool IsFinal(int code)
        {
            return code == Unauthorized || code == InvalidClientId || code == ReservedClientId || code == Replaced
                || code == TokenExpired || code == DisconnectedByAdmin || code == GroupNotAllowed || code == Banned;
        }
    }

    /// <summary>Why a connection (or a connection attempt) ended, and what happens next.</summary>
    public sealed class BridgeDisconnect
    {
        public BridgeDisconnect(string reason, int? closeCode, bool willRetry, TimeSpan retryDelay, bool wasConnected, Exception exception)
        {
            Reason = reason ?? "";
            CloseCode = closeCode;
            WillRetry = willRetry;
            RetryDelay = retryDelay;
            WasConnected = wasConnected;
            Exception = exception;
        }

        /// <summary>Close reason sent by the server, or a description of the local cause.</summary>
        public string Reason { get; private set; }
        /// <summary>WebSocket close code, or null when the connection broke without a close frame.</summary>
        public int? CloseCode { get; private set; }
        /// <summary>True when the client will reconnect by itself after <see cref="RetryDelay"/>.</summary>
        public bool WillRetry { get; private set; }
        public TimeSpan RetryDelay { get; private set; }
        /// <summary>False when the connection attempt itself failed (the client was never connected). The
        /// appliance refuses a connection (4001, 4009, ...) right after the WebSocket opened, so a refusal has
        /// WasConnected = true and follows a Connected event.</summary>
        public bool WasConnected { get; private set; }
        /// <summary>The exception behind a broken connection, if any.</summary>
        public Exception Exception { get; private set; }

        public override string ToString()
        {
            return string.Format("code={0} reason=\"{1}\" willRetry={2} retryDelay={3:0.###}s wasConnected={4}",
                CloseCode.HasValue ? CloseCode.Value.ToString() : "none", Reason, WillRetry,
                RetryDelay.TotalSeconds, WasConnected);
        }
    }

    /// <summary>Settings of a <see cref="BridgeClient"/>. The defaults suit a game on a normal network.</summary>
    public sealed class BridgeClientOptions
    {
        /// <summary>ws://, wss://, http:// or https:// base URL of the appliance, e.g. wss://bridge.example.com.</summary>
        public string ServerUrl;
        /// <summary>This client's id, ^[a-zA-Z0-9_-]{1,50}$. Controllers address it by this id.</summary>
        public string ClientId;
        /// <summary>The client token (UNITY_CLIENT_TOKEN of the appliance). Never logged.</summary>
        public string Token;
        /// <summary>Wire protocol: 1 (default, bare text commands) or 2 (JSON commands with ids and replies with
        /// reply_to, negotiated with the subprotocol wsbridge.v2). See BridgeProtocol.cs.</summary>
        public int ProtocolVersion = 1;
        /// <summary>Groups to join at connect (sent as ?groups=a,b); controllers can address a group at once.</summary>
        public string[] Groups = new string[0];
        /// <summary>Creates the socket of each connection attempt; null chooses by platform (BridgeTransports).</summary>
        public Func<IBridgeTransport> TransportFactory;

        /// <summary>Backoff ceiling of the first retry; doubles per failed attempt.</summary>
        public TimeSpan InitialReconnectDelay = TimeSpan.FromSeconds(0.5);
        /// <summary>Largest backoff ceiling. Full jitter picks the delay uniformly in [0, ceiling].</summary>
        public TimeSpan MaxReconnectDelay = TimeSpan.FromSeconds(30);
        /// <summary>A connection that lasted this long resets the backoff. Resetting on connect alone
        /// would let a server that accepts and immediately closes (4009, 1011) be hammered.</summary>
        public TimeSpan StableConnectionTime = TimeSpan.FromSeconds(10);
        /// <summary>Limit for the TCP + TLS + WebSocket handshake. Enforced even when the transport ignores
        /// cancellation: the attempt is abandoned, its socket disposed, and the usual backoff applies.</summary>
        public TimeSpan ConnectTimeout = TimeSpan.FromSeconds(10);
        /// <summary>ClientWebSocket keepalive: unsolicited pongs that keep NATs and proxies from dropping an idle
        /// connection and make a dead network fail the next write. The appliance also pings every PING_INTERVAL
        /// and ClientWebSocket answers those by itself.</summary>
        public TimeSpan KeepAliveInterval = TimeSpan.FromSeconds(15);
        /// <summary>Receive watchdog: reconnect when no message arrived for this long. Zero (the default)
        /// disables it. ClientWebSocket answers server pings internally and does not report them, so only
        /// enable this when the controller sends something regularly (e.g. a periodic status command).</summary>
        public TimeSpan ReceiveTimeout = TimeSpan.Zero;
        /// <summary>How long Stop() waits to flush the send queue and for the server's close frame (Stop() blocks at
        /// most twice this plus one second; StopAsync() never blocks).</summary>
        public TimeSpan CloseTimeout = TimeSpan.FromSeconds(2);
        /// <summary>Size of each ReceiveAsync read; messages of any size up to MaxIncomingMessageBytes are reassembled.</summary>
        public int ReceiveBufferSize = 16 * 1024;
        /// <summary>A larger incoming message closes the connection with 1009 (and reconnects).</summary>
        public int MaxIncomingMessageBytes = 16 * 1024 * 1024;
        /// <summary>Messages queued while disconnected or sending; Send() returns false beyond this.</summary>
        public int MaxQueuedMessages = 1000;
        /// <summary>Where the client runs. Null: on thread-pool threads with timers (every platform but WebGL). A frame
        /// loop: on the thread that pumps it, with no thread pool and no timer (the default in WebGL players, where
        /// there are neither): call BridgeTransports.Pump() once per frame (CommandListener.Update does).</summary>
        public BridgeFrameLoop FrameLoop = BridgeTransports.DefaultFrameLoop;
        /// <summary>Give up (Rejected, with the reason) after this many opens in a row that ended before the connection
        /// opened without a reason (a browser's 1006: a server that is down, an origin not in ALLOWED_ORIGINS). 0 retries
        /// forever (the default except in WebGL players, where it is 10: about five minutes of backoff).</summary>
        public int MaxRefusedOpens = BridgeTransports.DefaultMaxRefusedOpens;

        internal BridgeClientOptions Copy()
        {
            return (BridgeClientOptions)MemberwiseClone();
        }
    }

    /// <summary>A self-healing WebSocket connection to the bridge for one client id.</summary>
    public sealed class BridgeClient : IDisposable
    {
        /// <summary>The appliance's client id rule.</summary>
        public static readonly Regex ClientIdPattern = new Regex("^[a-zA-Z0-9_-]{1,50}$");

        // Events are raised on a thread-pool thread. A throwing handler is reported through Error
        // and never breaks the connection loop.
        public event Action Connected;
        public event Action<BridgeDisconnect> Disconnected;
        public event Action<string> MessageReceived;
        /// <summary>Like MessageReceived, with how long the message waited before the client could read it (WebGL: in the
        /// browser while the page did not run, e.g. a hidden tab); zero on other transports.</summary>
        public event Action<string, TimeSpan> MessageReceivedWithAge;
        public event Action<Exception> Error;

        private readonly BridgeClientOptions options;
        private readonly Random jitter;
        private readonly object sync = new object();
        private readonly ConcurrentQueue<string> sendQueue = new ConcurrentQueue<string>();
        private readonly BridgeConnectRequest request;
        private readonly Signal sendSignal;
        private readonly BridgeFrameLoop loop;
        // ConfigureAwait(onLoop): on the frame loop every await resumes on the loop's context (a continuation of
        // ConfigureAwait(false) under Unity's context goes to the thread pool); elsewhere on any pool thread.
        private readonly bool onLoop;
        private int queuedCount;
        private int state = (int)BridgeState.Idle;
        private int connectAttempts;
        private int connections;
        private long lastReceiveTicks;
        private CancellationTokenSource stopCts;
        private CancellationTokenSource kickCts = new CancellationTokenSource();
        private volatile bool kickAbandons;
        private Task runTask = CompletedTask();
        private BridgeDisconnect lastDisconnect;

        [ThreadStatic] private static BridgeClient raisingEventsOf;

        public BridgeClient(BridgeClientOptions options)
        {
            if (options == null) throw new ArgumentNullException("options");
            this.options = options.Copy();
            if (string.IsNullOrEmpty(this.options.ClientId) || !ClientIdPattern.IsMatch(this.options.ClientId))
                throw new ArgumentException("ClientId must match ^[a-zA-Z0-9_-]{1,50}$", "options");
            if (string.IsNullOrEmpty(this.options.Token))
                throw new ArgumentException("Token is empty; set the client token (UNITY_CLIENT_TOKEN)", "options");
            if (this.options.MaxReconnectDelay < this.options.InitialReconnectDelay)
                throw new ArgumentException("MaxReconnectDelay is smaller than InitialReconnectDelay", "options");
            if (this.options.ProtocolVersion != 1 && this.options.ProtocolVersion != 2)
                throw new ArgumentException("ProtocolVersion must be 1 or 2", "options");
            foreach (var group in this.options.Groups ?? new string[0])
            {
                if (group == null || !ClientIdPattern.IsMatch(group))
                    throw new ArgumentException("a group name must match ^[a-zA-Z0-9_-]{1,50}$", "options");
            }
            Endpoint = BuildEndpoint(this.options.ServerUrl, this.options.ClientId, this.options.Groups);
            request = new BridgeConnectRequest
            {
                Endpoint = Endpoint,
                Token = this.options.Token,
                // v1 offers no subprotocol, exactly like the seed client, so old appliances accept it.
                SubProtocols = this.options.ProtocolVersion == 2 ? new[] { BridgeProtocols.V2 } : new string[0],
                KeepAliveInterval = this.options.KeepAliveInterval,
            };
            // Seeded per instance: Random() seeds from the clock on .NET Framework/Mono, so clients started
            // in the same tick would pick the same "random" delays and reconnect in lock step.
            jitter = new Random(Guid.NewGuid().GetHashCode());
            loop = this.options.FrameLoop;
            onLoop = loop != null;
            sendSignal = new Signal(!onLoop);
        }

        /// <summary>The frame loop this client runs on, or null when it runs on the thread pool.</summary>
        public BridgeFrameLoop FrameLoop { get { return loop; } }

        /// <summary>The WebSocket URL this client connects to.</summary>
        public Uri Endpoint { get; private set; }
        public string ClientId { get { return options.ClientId; } }
        public BridgeState State { get { return (BridgeState)Volatile.Read(ref state); } }
        public bool IsConnected { get { return State == BridgeState.Open; } }
        /// <summary>Connection attempts since construction (including the failed ones).</summary>
        public int ConnectAttempts { get { return Volatile.Read(ref connectAttempts); } }
        /// <summary>Successful connections since construction.</summary>
        public int Connections { get { return Volatile.Read(ref connections); } }
        /// <summary>The most recent disconnect, or null.</summary>
        public BridgeDisconnect LastDisconnect { get { lock (sync) return lastDisconnect; } }
        /// <summary>Completes when the connection loop has ended: after Stop() or a final close code.</summary>
        public Task Completion { get { lock (sync) return runTask; } }
        /// <summary>The protocol version of this client (1 or 2).</summary>
        public int ProtocolVersion { get { return options.ProtocolVersion; } }
        /// <summary>Messages waiting to be sent.</summary>
        public int QueuedMessages { get { return Volatile.Read(ref queuedCount); } }

        /// <summary>ws(s)://host[:port][/prefix]/ws/{clientId} from a ws, wss, http or https base URL.</summary>
        public static Uri BuildEndpoint(string serverUrl, string clientId)
        {
            return BuildEndpoint(serverUrl, clientId, null);
        }

        /// <summary>As above, with ?groups=a,b when groups are given.</summary>
        public static Uri BuildEndpoint(string serverUrl, string clientId, string[] groups)
        {
            if (string.IsNullOrEmpty(serverUrl)) throw new ArgumentException("ServerUrl is empty", "serverUrl");
            Uri baseUri;
            if (!Uri.TryCreate(serverUrl.Trim(), UriKind.Absolute, out baseUri))
                throw new ArgumentException("ServerUrl is not an absolute URL: " + serverUrl, "serverUrl");
            string scheme;
            switch (baseUri.Scheme)
            {
                case "ws": case "http": scheme = "ws"; break;
                case "wss": case "https": scheme = "wss"; break;
                default: throw new ArgumentException("ServerUrl must start with ws://, wss://, http:// or https://", "serverUrl");
            }
            var builder = new UriBuilder(baseUri) { Scheme = scheme, Query = "", Fragment = "" };
            if (baseUri.IsDefaultPort) builder.Port = -1;
            string path = builder.Path.TrimEnd('/');
            // Accept a URL that already ends in /ws (the endpoint prefix) as well as the bare host.
            if (path.EndsWith("/ws", StringComparison.Ordinal)) path = path.Substring(0, path.Length - 3);
            builder.Path = path + "/ws/" + Uri.EscapeDataString(clientId);
            if (groups != null && groups.Length > 0) builder.Query = "groups=" + string.Join(",", groups);
            return builder.Uri;
        }

        /// <summary>Full-jitter exponential backoff: uniform in [0, min(max, initial * 2^attempt)].</summary>
        public static TimeSpan ComputeBackoff(int attempt, TimeSpan initial, TimeSpan max, Random random)
        {
            double ceiling = initial.Ticks * Math.Pow(2, Math.Min(Math.Max(attempt, 0), 30));
            ceiling = Math.Min(ceiling, max.Ticks);
            // FromTicks, not FromMilliseconds: the latter rounds to whole milliseconds on .NET Framework/Mono.
            return TimeSpan.FromTicks((long)(random.NextDouble() * ceiling));
        }

        /// <summary>Starts the connection loop in the background. Allowed when Idle, Stopped or Rejected.</summary>
        public void Start()
        {
            lock (sync)
            {
                var current = (BridgeState)state;
                if (current != BridgeState.Idle && current != BridgeState.Stopped && current != BridgeState.Rejected)
                    throw new InvalidOperationException("BridgeClient.Start() called while " + current + "; call Stop() first");
                stopCts = new CancellationTokenSource();
                kickCts = new CancellationTokenSource();
                SetState(BridgeState.Connecting);
                var token = stopCts.Token;
                if (onLoop)
                {
                    // No threads (WebGL): the loop runs on the frame loop's context between awaits, driven by Pump().
                    runTask = loop.Enter(() => RunAsync(token));
                }
                else
                {
                    // Task.Run: the loop never runs on (and never waits for) Unity's main-thread SynchronizationContext.
                    runTask = Task.Run(() => RunAsync(token));
                }
            }
        }

        /// <summary>Queues a text message. Thread-safe. Returns false when the queue is full or the client
        /// is stopped or rejected. Messages queued while disconnected are sent after the next connect.
        /// A message accepted while connected is sent before a Stop() closes the connection; one accepted while
        /// disconnected is dropped if the client stops before it reconnects. Never sent after a later Start().
        /// Delivery is at most once: a message being written when the connection breaks is lost.</summary>
        public bool Send(string text)
        {
            if (text == null) throw new ArgumentNullException("text");
            // Under the lock that Stop()/Finish() take: a Send racing a stop either lands in the queue before the
            // stop's flush (and is sent) or sees the stop and returns false; it never lands after the final drain.
            lock (sync)
            {
                var current = (BridgeState)state;
                if (current == BridgeState.Stopping || current == BridgeState.Stopped || current == BridgeState.Rejected)
                    return false;
                if (queuedCount >= options.MaxQueuedMessages) return false;
                Interlocked.Increment(ref queuedCount);
                sendQueue.Enqueue(text);
            }
            sendSignal.Set();
            return true;
        }

        /// <summary>Reconnect now: skips a pending backoff delay, or replaces the current connection (which may be
        /// silently dead, e.g. after the app was suspended) with a new one. The old one is closed with 1000 (waiting
        /// up to CloseTimeout for the server, then aborted); queued messages go out on the new one. No effect when
        /// not running. Messages received on the old connection after this call are stale (see ConnectionNumber).</summary>
        public void ReconnectNow()
        {
            Kick(false);
        }

        /// <summary>Reconnect now without waiting for the old connection: it gets a close frame if it can take one
        /// at once and is then aborted. For a socket that is probably dead (the app was suspended): no close timeout.</summary>
        public void ReconnectImmediately()
        {
            Kick(true);
        }

        private void Kick(bool abandon)
        {
            CancellationTokenSource kick;
            lock (sync)
            {
                kick = kickCts;
                kickCts = new CancellationTokenSource();
                kickAbandons = abandon;
            }
            try { kick.Cancel(); } catch (ObjectDisposedException) { }
        }

        /// <summary>Starts stopping and returns at once: flushes the send queue (up to CloseTimeout), closes with
        /// 1000 and ends the loop. The task completes when that is done. Never blocks the caller.</summary>
        public Task StopAsync()
        {
            lock (sync)
            {
                var current = (BridgeState)state;
                if (current == BridgeState.Idle)
                {
                    SetState(BridgeState.Stopped);
                    return runTask;
                }
                if (current == BridgeState.Stopped || current == BridgeState.Rejected) return runTask;
                SetState(BridgeState.Stopping);
                stopCts.Cancel();
                return runTask;
            }
        }

        /// <summary>Stops and waits for the close handshake, at most twice CloseTimeout plus one second. Called from
        /// one of this client's own event handlers it does not wait (the loop is busy running that handler); on a frame
        /// loop (WebGL) it never waits: the close goes out now and completes in the next frames.</summary>
        public void Stop()
        {
            Stop(options.CloseTimeout + options.CloseTimeout + TimeSpan.FromSeconds(1));
        }

        /// <summary>Stops and waits at most <paramref name="wait"/>. Returns true when the loop has ended.</summary>
        public bool Stop(TimeSpan wait)
        {
            var task = StopAsync();
            if (onLoop)
            {
                // Waiting would freeze the only thread, and the browser delivers nothing to a frozen one: run what is
                // ready now (the flush and the close frame are written at once) and let the frames finish the rest.
                loop.Pump();
                return task.IsCompleted;
            }
            if (raisingEventsOf == this) return task.IsCompleted;
            try { return task.Wait(wait); }
            catch (AggregateException) { return true; }
        }

        public void Dispose()
        {
            Stop();
        }

        /// <summary>Number of the current connection (equals Connections once it is open); a message whose
        /// connection number differs from this one arrived on an earlier connection.</summary>
        public int ConnectionNumber { get { return Volatile.Read(ref connections); } }

        // ---- connection loop -------------------------------------------------------------------

        private async Task RunAsync(CancellationToken stop)
        {
            int attempt = 0;
            int refusedOpens = 0;
            try
            {
                while (!stop.IsCancellationRequested)
                {
                    CancellationToken kick;
                    lock (sync) kick = kickCts.Token;
                    SetStateUnlessStopping(BridgeState.Connecting);
                    Interlocked.Increment(ref connectAttempts);
                    SessionEnd end;
                    DateTime openedAt = DateTime.UtcNow;
                    bool wasConnected = false;
                    var transport = options.TransportFactory != null ? options.TransportFactory() : BridgeTransports.CreateDefault();
                    try
                    {
                        Exception connectError = await ConnectAsync(transport, stop).ConfigureAwait(onLoop);
                        if (connectError is ArgumentException)
                        {
                            // The transport refused the request itself (e.g. a token a browser cannot send): no retry helps.
                            end = SessionEnd.Unsupported("cannot connect: " + connectError.Message);
                        }
                        else if (connectError is BridgeOpenRefusedException && !stop.IsCancellationRequested &&
                                 options.MaxRefusedOpens > 0 && ++refusedOpens >= options.MaxRefusedOpens)
                        {
                            end = SessionEnd.Unsupported("gave up after " + refusedOpens + " attempts that ended before the connection " +
                                                         "opened (" + connectError.Message + "): is the server up at " + Endpoint.GetLeftPart(UriPartial.Authority) +
                                                         ", and is this page's origin in the appliance's ALLOWED_ORIGINS?");
                        }
                        else if (connectError != null)
                        {
                            end = stop.IsCancellationRequested
                                ? SessionEnd.Stopped()
                                : SessionEnd.Broken("connect failed: " + connectError.Message, connectError);
                        }
                        else if (options.ProtocolVersion == 2 && transport.SubProtocol != BridgeProtocols.V2)
                        {
                            // An appliance without v2 would deliver bare text that a v2 codec cannot read: say so, do not retry.
                            wasConnected = true;
                            await CloseOutputAsync(transport, BridgeCloseCodes.Normal, "protocol v2 not supported").ConfigureAwait(onLoop);
                            end = SessionEnd.Unsupported("the server did not accept protocol v2 (subprotocol " + BridgeProtocols.V2 + ")");
                        }
                        else
                        {
                            wasConnected = true;
                            refusedOpens = 0;
                            openedAt = DateTime.UtcNow;
                            Interlocked.Increment(ref connections);
                            SetStateUnlessStopping(BridgeState.Open);
                            Raise(Connected);
                            // A ReconnectNow() during the connect is satisfied by this fresh connection.
                            lock (sync) kick = kickCts.Token;
                            end = await RunSessionAsync(transport, stop, kick).ConfigureAwait(onLoop);
                        }
                    }
                    finally
                    {
                        transport.Dispose();
                    }
                    if (end.Error != null && !end.IsStopped) RaiseError(end.Error);

                    if (end.IsStopped || stop.IsCancellationRequested)
                    {
                        Finish(BridgeState.Stopped, new BridgeDisconnect(
                            "stopped by the client", wasConnected ? (int?)BridgeCloseCodes.Normal : null,
                            false, TimeSpan.Zero, wasConnected, null));
                        return;
                    }
                    if (end.CloseCode == BridgeCloseCodes.Replaced && AbandonedAttempts.MayHaveReplaced(Endpoint))
                    {
                        // Not another game instance: an attempt this process abandoned (connect timeout, stop) finished
                        // its handshake late and took the id. Retry instead of giving up.
                        end.Reason = "replaced by an abandoned connection attempt of this process; reconnecting";
                    }
                    else if (end.IsFinal || (end.CloseCode.HasValue && BridgeCloseCodes.IsFinal(end.CloseCode.Value)))
                    {
                        Finish(BridgeState.Rejected, new BridgeDisconnect(
                            end.Reason, end.CloseCode, false, TimeSpan.Zero, wasConnected, end.Error));
                        return;
                    }

                    if (wasConnected && DateTime.UtcNow - openedAt >= options.StableConnectionTime) attempt = 0;
                    TimeSpan delay;
                    if (end.IsKicked)
                    {
                        attempt = 0;
                        delay = TimeSpan.Zero;
                    }
                    else
                    {
                        delay = ComputeBackoff(attempt, options.InitialReconnectDelay, options.MaxReconnectDelay, jitter);
                        attempt++;
                    }
                    lock (sync) kick = kickCts.Token;
                    SetStateUnlessStopping(BridgeState.WaitingToReconnect);
                    var info = new BridgeDisconnect(end.Reason, end.CloseCode, true, delay, wasConnected, end.Error);
                    lock (sync) lastDisconnect = info;
                    RaiseDisconnected(info);
                    await DelayAsync(delay, stop, kick).ConfigureAwait(onLoop);
                }
                Finish(BridgeState.Stopped, new BridgeDisconnect("stopped by the client", null, false, TimeSpan.Zero, false, null));
            }
            catch (Exception e)
            {
                // A bug in this loop must not vanish silently in a faulted Task nobody observes.
                RaiseError(e);
                Finish(BridgeState.Stopped, new BridgeDisconnect("internal error: " + e.Message, null, false, TimeSpan.Zero, false, e));
            }
        }

        private void Finish(BridgeState final, BridgeDisconnect info)
        {
            // Nothing queued will ever be sent now; drop it so a later Start() begins clean. Under the lock Send()
            // takes, together with the state change: no Send() can slip a message in after this drain.
            lock (sync)
            {
                string ignored;
                while (sendQueue.TryDequeue(out ignored)) Interlocked.Decrement(ref queuedCount);
                lastDisconnect = info;
                SetState(final);
            }
            RaiseDisconnected(info);
        }

        /// <summary>Connects, bounded by ConnectTimeout and Stop() even when the transport ignores cancellation
        /// (Mono's ClientWebSocket does once TCP is up): the attempt is abandoned and its socket aborted.</summary>
        private async Task<Exception> ConnectAsync(IBridgeTransport transport, CancellationToken stop)
        {
            using (var attempt = CancellationTokenSource.CreateLinkedTokenSource(stop))
            {
                Task connect;
                try { connect = transport.ConnectAsync(request, attempt.Token); }
                catch (Exception e) { return e; }
                var limit = Delay(options.ConnectTimeout, attempt.Token);
                var first = await Task.WhenAny(connect, limit).ConfigureAwait(onLoop);
                attempt.Cancel();
                if (first == connect)
                {
                    try
                    {
                        await connect.ConfigureAwait(onLoop);
                        return null;
                    }
                    catch (Exception e)
                    {
                        return e;
                    }
                }
                // Timed out or stopped: abandon the attempt. The caller disposes the transport; the orphaned task is
                // observed so its eventual exception is not reported as unobserved.
                transport.Abort();
                Abandon(connect, transport);
                if (stop.IsCancellationRequested) return new OperationCanceledException("stopped while connecting");
                return new TimeoutException("no connection to " + Endpoint + " within " + options.ConnectTimeout.TotalSeconds + " s");
            }
        }

        private async Task<SessionEnd> RunSessionAsync(IBridgeTransport ws, CancellationToken stop, CancellationToken kick)
        {
            Volatile.Write(ref lastReceiveTicks, DateTime.UtcNow.Ticks);
            var draining = new CancellationTokenSource();  // stop: send what is queued, then leave
            var leaving = new CancellationTokenSource();   // reconnect: finish the message being sent, keep the rest
            var abort = new CancellationTokenSource();     // connection over: leave now
            var sendTask = SendLoopAsync(ws, draining.Token, leaving.Token, abort.Token);
            var receiveTask = ReceiveLoopAsync(ws);
            // Stop() or ReconnectNow() called from an event handler must not run this session's teardown inline, inside
            // that handler: RunContinuationsAsynchronously on the pool; on the frame loop handlers run outside its context,
            // so the teardown is posted to it.
            var stopped = NewSource();
            var kicked = NewSource();
            var watchdog = NewSource();
            using (stop.Register(() => stopped.TrySetResult(true)))
            using (kick.Register(() => kicked.TrySetResult(true)))
            using (var watchdogCts = new CancellationTokenSource())
            {
                var watchdogTask = options.ReceiveTimeout > TimeSpan.Zero
                    ? WatchdogAsync(watchdog, watchdogCts.Token)
                    : CompletedTask();
                var first = await Task.WhenAny(receiveTask, sendTask, stopped.Task, kicked.Task, watchdog.Task).ConfigureAwait(onLoop);
                watchdogCts.Cancel();
                await watchdogTask.ConfigureAwait(onLoop);

                if (first == kicked.Task && kickAbandons && !stop.IsCancellationRequested)
                {
                    // The socket is probably dead (app suspended): a close frame if it goes out at once, no waiting.
                    leaving.Cancel();
                    if (await Task.WhenAny(sendTask, Delay(100)).ConfigureAwait(onLoop) != sendTask) abort.Cancel();
                    await sendTask.ConfigureAwait(onLoop);
                    abort.Cancel();
                    using (var quick = TimeoutSource(TimeSpan.FromMilliseconds(250)))
                    {
                        try
                        {
                            var close = ws.CloseOutputAsync(BridgeCloseCodes.Normal, "client reconnecting", quick.Token);
                            await Task.WhenAny(close, Delay(250)).ConfigureAwait(onLoop);
                            Observe(close);
                        }
                        catch (Exception) { /* dead already */ }
                    }
                    ws.Abort();
                    await receiveTask.ConfigureAwait(onLoop);
                    return SessionEnd.Reconnect();
                }

                if (first == stopped.Task || first == kicked.Task)
                {
                    // Stop() and ReconnectNow() close politely: the server then releases the id before the next
                    // connection claims it (no replace race). A dead connection costs CloseTimeout, then an abort.
                    bool stopping = first == stopped.Task || stop.IsCancellationRequested;
                    (stopping ? draining : leaving).Cancel();
                    if (await Task.WhenAny(sendTask, Delay(options.CloseTimeout)).ConfigureAwait(onLoop) != sendTask)
                        abort.Cancel();
                    await sendTask.ConfigureAwait(onLoop);
                    await CloseOutputAsync(ws, BridgeCloseCodes.Normal, stopping ? "client stopping" : "client reconnecting").ConfigureAwait(onLoop);
                    // Wait for the server's close frame so the server sees a clean 1000 close.
                    if (await Task.WhenAny(receiveTask, Delay(options.CloseTimeout)).ConfigureAwait(onLoop) != receiveTask)
                        ws.Abort();
                    await receiveTask.ConfigureAwait(onLoop);
                    return stopping ? SessionEnd.Stopped() : SessionEnd.Reconnect();
                }

                abort.Cancel();
                if (first == receiveTask)
                {
                    var end = await receiveTask.ConfigureAwait(onLoop);
                    await sendTask.ConfigureAwait(onLoop);
                    if (ws.CloseReceived)
                    {
                        // Complete the close handshake the server started (RFC 6455 §5.5.1).
                        await CloseOutputAsync(ws, BridgeCloseCodes.Normal, "").ConfigureAwait(onLoop);
                    }
                    else if (end.LocalCloseCode.HasValue)
                    {
                        await CloseOutputAsync(ws, end.LocalCloseCode.Value, end.Reason).ConfigureAwait(onLoop);
                    }
                    return end;
                }

                // A send failed or the watchdog fired: the socket is unusable.
                ws.Abort();
                var sendError = await sendTask.ConfigureAwait(onLoop);
                await receiveTask.ConfigureAwait(onLoop);
                if (first == watchdog.Task)
                    return SessionEnd.Broken("receive timeout: nothing received for " + options.ReceiveTimeout.TotalSeconds + " s", null);
                return SessionEnd.Broken("send failed: " + (sendError != null ? sendError.Message : "unknown"), sendError);
            }
        }

        private async Task WatchdogAsync(TaskCompletionSource<bool> fired, CancellationToken cancel)
        {
            var period = TimeSpan.FromMilliseconds(Math.Max(50, options.ReceiveTimeout.TotalMilliseconds / 4));
            try
            {
                while (true)
                {
                    await Delay(period, cancel).ConfigureAwait(onLoop);
                    var idle = DateTime.UtcNow - new DateTime(Volatile.Read(ref lastReceiveTicks), DateTimeKind.Utc);
                    if (idle >= options.ReceiveTimeout)
                    {
                        fired.TrySetResult(true);
                        return;
                    }
                }
            }
            catch (OperationCanceledException) { }
        }

        /// <summary>The only writer of the socket. Returns the send exception, or null when it left normally.</summary>
        private async Task<Exception> SendLoopAsync(IBridgeTransport ws, CancellationToken draining, CancellationToken leaving, CancellationToken abort)
        {
            try
            {
                while (!abort.IsCancellationRequested && !leaving.IsCancellationRequested)
                {
                    string text;
                    if (!sendQueue.TryDequeue(out text))
                    {
                        if (draining.IsCancellationRequested) return null;
                        using (var either = CancellationTokenSource.CreateLinkedTokenSource(draining, leaving, abort))
                        {
                            await sendSignal.WaitAsync(either.Token, onLoop).ConfigureAwait(onLoop);
                        }
                        continue;
                    }
                    Interlocked.Decrement(ref queuedCount);
                    await ws.SendAsync(text, abort).ConfigureAwait(onLoop);
                }
                return null;
            }
            catch (Exception e)
            {
                return abort.IsCancellationRequested ? null : e;
            }
        }

        private async Task<SessionEnd> ReceiveLoopAsync(IBridgeTransport ws)
        {
            try
            {
                while (true)
                {
                    var frame = await ws.ReceiveAsync(Math.Max(1024, options.MaxIncomingMessageBytes)).ConfigureAwait(onLoop);
                    Volatile.Write(ref lastReceiveTicks, DateTime.UtcNow.Ticks);
                    switch (frame.Kind)
                    {
                        case BridgeFrameKind.Close:
                            string reason = frame.CloseReason;
                            if (string.IsNullOrEmpty(reason)) reason = DescribeCloseCode(frame.CloseCode);
                            return SessionEnd.Closed(frame.CloseCode, reason);
                        case BridgeFrameKind.TooBig:
                            return SessionEnd.LocalClose(BridgeCloseCodes.MessageTooBig,
                                "incoming message larger than " + options.MaxIncomingMessageBytes + " bytes");
                        default:
                            RaiseMessage(frame.Text, frame.Age);
                            break;
                    }
                }
            }
            catch (Exception e)
            {
                return SessionEnd.Broken("connection lost: " + e.Message, e);
            }
        }

        private async Task CloseOutputAsync(IBridgeTransport ws, int code, string reason)
        {
            if (!ws.CanSendClose) return;
            using (var timeout = TimeoutSource(options.CloseTimeout))
            {
                try
                {
                    var close = ws.CloseOutputAsync(code, reason, timeout.Token);
                    // Bounded even if the transport ignores the token.
                    if (await Task.WhenAny(close, Delay(options.CloseTimeout)).ConfigureAwait(onLoop) != close)
                    {
                        Observe(close);
                        ws.Abort();
                        return;
                    }
                    await close.ConfigureAwait(onLoop);
                }
                catch (Exception) { /* the peer is gone already; nothing left to close */ }
            }
        }

        private async Task DelayAsync(TimeSpan delay, CancellationToken stop, CancellationToken kick)
        {
            if (delay <= TimeSpan.Zero) return;
            using (var either = CancellationTokenSource.CreateLinkedTokenSource(stop, kick))
            {
                try { await Delay(delay, either.Token).ConfigureAwait(onLoop); }
                catch (OperationCanceledException) { }
            }
        }

        // ---- time without timers on the frame loop ------------------------------------------------

        private Task Delay(TimeSpan delay, CancellationToken cancel)
        {
            return onLoop ? loop.Delay(delay, cancel) : Task.Delay(delay, cancel);
        }

        private Task Delay(TimeSpan delay)
        {
            return Delay(delay, CancellationToken.None);
        }

        private Task Delay(int milliseconds)
        {
            return Delay(TimeSpan.FromMilliseconds(milliseconds), CancellationToken.None);
        }

        /// <summary>A token source cancelled after <paramref name="delay"/>: by a timer, or on the frame loop by a frame.</summary>
        private CancellationTokenSource TimeoutSource(TimeSpan delay)
        {
            if (!onLoop) return new CancellationTokenSource(delay);
            var source = new CancellationTokenSource();
            loop.Delay(delay, CancellationToken.None).ContinueWith(t =>
            {
                try { source.Cancel(); } catch (ObjectDisposedException) { /* already done with */ }
            }, TaskContinuationOptions.ExecuteSynchronously);
            return source;
        }

        private TaskCompletionSource<bool> NewSource()
        {
            return onLoop ? new TaskCompletionSource<bool>() : new TaskCompletionSource<bool>(TaskCreationOptions.RunContinuationsAsynchronously);
        }

        /// <summary>Wakes the sender loop. Not SemaphoreSlim: its WaitAsync completes waiters through the thread pool,
        /// which runs nothing in WebGL. Auto-reset: one Set wakes one wait (the sender then drains the whole queue).</summary>
        private sealed class Signal
        {
            private readonly object gate = new object();
            private readonly bool asynchronous;
            private TaskCompletionSource<bool> waiter;
            private bool set;

            /// <param name="asynchronous">Resume the waiter on the pool, never inline inside Set() (threaded mode).</param>
            public Signal(bool asynchronous)
            {
                this.asynchronous = asynchronous;
            }

            public void Set()
            {
                TaskCompletionSource<bool> woken;
                lock (gate)
                {
                    woken = waiter;
                    waiter = null;
                    if (woken == null) set = true;
                }
                if (woken != null) woken.TrySetResult(true);
            }

            /// <summary>Completes when Set() was called (since the last wait), or when <paramref name="cancel"/> is cancelled.</summary>
            public async Task WaitAsync(CancellationToken cancel, bool onLoop)
            {
                TaskCompletionSource<bool> mine;
                lock (gate)
                {
                    if (set)
                    {
                        set = false;
                        return;
                    }
                    mine = asynchronous ? new TaskCompletionSource<bool>(TaskCreationOptions.RunContinuationsAsynchronously) : new TaskCompletionSource<bool>();
                    waiter = mine;
                }
                using (cancel.Register(() =>
                {
                    lock (gate) { if (waiter == mine) waiter = null; }
                    mine.TrySetResult(false);
                }))
                {
                    await mine.Task.ConfigureAwait(onLoop);
                }
            }
        }

        internal static string DescribeCloseCode(int code)
        {
            switch (code)
            {
                case BridgeCloseCodes.Normal: return "closed by the server";
                case BridgeCloseCodes.GoingAway: return "server going away";
                case BridgeCloseCodes.NoStatus: return "closed without a status code";
                case 1007: return "invalid data (text must be UTF-8)";
                case BridgeCloseCodes.MessageTooBig: return "message too big";
                case BridgeCloseCodes.InternalError: return "server internal error";
                case 1013: return "try again later";
                case BridgeCloseCodes.Unauthorized: return "unauthorized";
                case BridgeCloseCodes.InvalidClientId: return "invalid client id";
                case BridgeCloseCodes.ReservedClientId: return "client id reserved for controllers";
                case BridgeCloseCodes.RoleConflict: return "the client id is in use by a controller";
                case 4008: return "too many undelivered messages";
                case BridgeCloseCodes.DuplicateRejected: return "client id already connected";
                case BridgeCloseCodes.Replaced: return "replaced by a newer connection";
                case BridgeCloseCodes.TokenExpired: return "token expired or revoked; reconnect with the current token";
                case BridgeCloseCodes.DisconnectedByAdmin: return "disconnected by an administrator";
                case BridgeCloseCodes.TooManyConnections: return "too many connections from this address or with this token";
                case BridgeCloseCodes.GroupNotAllowed: return "group not allowed: this token may not join a group asked for (Groups)";
                case BridgeCloseCodes.TooManyNewIds: return "too many new client ids from this address or with this token";
                case BridgeCloseCodes.Banned: return "this client id or address is banned";
                default: return "closed with code " + code;
            }
        }

        // ---- state and events ------------------------------------------------------------------

        private void SetState(BridgeState next)
        {
            Volatile.Write(ref state, (int)next);
        }

        private void SetStateUnlessStopping(BridgeState next)
        {
            lock (sync)
            {
                if ((BridgeState)state != BridgeState.Stopping) SetState(next);
            }
        }

        private void Raise(Action handler)
        {
            if (handler == null) return;
            Invoke(() => handler());
        }

        private void RaiseMessage(string text, TimeSpan age)
        {
            var handler = MessageReceived;
            if (handler != null) Invoke(() => handler(text));
            var aged = MessageReceivedWithAge;
            if (aged != null) Invoke(() => aged(text, age));
        }

        private void RaiseDisconnected(BridgeDisconnect info)
        {
            var handler = Disconnected;
            if (handler != null) Invoke(() => handler(info));
        }

        private void Invoke(Action call)
        {
            var previous = raisingEventsOf;
            raisingEventsOf = this;
            try
            {
                if (onLoop) loop.RunOutside(call);
                else call();
            }
            catch (Exception e) { RaiseError(e); }
            finally { raisingEventsOf = previous; }
        }

        private void RaiseError(Exception error)
        {
            var handler = Error;
            if (handler == null) return;
            var previous = raisingEventsOf;
            raisingEventsOf = this;
            try
            {
                if (onLoop) loop.RunOutside(() => handler(error));
                else handler(error);
            }
            catch (Exception) { /* an Error handler that throws has nowhere left to report to */ }
            finally { raisingEventsOf = previous; }
        }

        /// <summary>An abandoned task's exception is read, so it is never reported as unobserved.</summary>
        private static void Observe(Task task)
        {
            task.ContinueWith(t => { var ignored = t.Exception; }, TaskContinuationOptions.ExecuteSynchronously);
        }

        private static Task CompletedTask()
        {
            var done = new TaskCompletionSource<bool>();
            done.SetResult(true);
            return done.Task;
        }

        /// <summary>Mono may still finish an abandoned handshake later: then the server holds (and may have replaced this
        /// client's live connection with) a connection nobody reads. It is aborted, and a 4010 soon after is not final.</summary>
        private void Abandon(Task connect, IBridgeTransport transport)
        {
            var endpoint = Endpoint;
            AbandonedAttempts.Begin(endpoint);
            connect.ContinueWith(t =>
            {
                var ignored = t.Exception;
                if (t.Status == TaskStatus.RanToCompletion) transport.Abort();
                AbandonedAttempts.End(endpoint);
            }, TaskContinuationOptions.ExecuteSynchronously);
        }

        /// <summary>Connection attempts abandoned while their handshake was still running, per endpoint (process-wide:
        /// the listener replaces its client on Connect()). Mono cannot cancel such a handshake, and the server may
        /// complete it even when the client reports a failure; it then registers the id again and closes the live
        /// connection with 4010, which must not be final. Remembered for 30 s after the attempt was abandoned or ended.</summary>
        private static class AbandonedAttempts
        {
            private static readonly Dictionary<string, DateTime> LastSeen = new Dictionary<string, DateTime>();
            private static readonly TimeSpan Window = TimeSpan.FromSeconds(30);

            public static void Begin(Uri endpoint) { Touch(endpoint); }
            public static void End(Uri endpoint) { Touch(endpoint); }

            private static void Touch(Uri endpoint)
            {
                lock (LastSeen) LastSeen[endpoint.AbsoluteUri] = DateTime.UtcNow;
            }

            public static bool MayHaveReplaced(Uri endpoint)
            {
                lock (LastSeen)
                {
                    DateTime seen;
                    return LastSeen.TryGetValue(endpoint.AbsoluteUri, out seen) && DateTime.UtcNow - seen < Window;
                }
            }
        }

        /// <summary>How one connection (or attempt) ended.</summary>
        private struct SessionEnd
        {
            public string Reason;
            public int? CloseCode;       // close code received from the server
            public int? LocalCloseCode;  // close code we send because of the peer's behaviour
            public Exception Error;
            public bool IsStopped;
            public bool IsKicked;
            public bool IsFinal;         // a local reason not to retry

            public static SessionEnd Closed(int code, string reason)
            {
                return new SessionEnd { CloseCode = code, Reason = reason };
            }

            public static SessionEnd LocalClose(int code, string reason)
            {
                return new SessionEnd { LocalCloseCode = code, Reason = reason };
            }

            public static SessionEnd Broken(string reason, Exception error)
            {
                return new SessionEnd { Reason = reason, Error = error };
            }

            public static SessionEnd Unsupported(string reason)
            {
                return new SessionEnd { Reason = reason, IsFinal = true };
            }

            public static SessionEnd Stopped()
            {
                return new SessionEnd { IsStopped = true, Reason = "stopped by the client" };
            }

            public static SessionEnd Reconnect()
            {
                return new SessionEnd { IsKicked = true, Reason = "reconnect requested" };
            }
        }
    }
}
