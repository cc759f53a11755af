// BridgeClientTests.cs: the C# half of tests/integration/test_unity_client.py.
//
// Built with Mono's mcs together with BridgeClient.cs and BridgeProtocol.cs and run with mono, one
// scenario per process, against a real appliance that the Python test starts. The Python side plays the
// controller (and restarts the appliance); this program plays the device, checks what it can see itself
// and exits non-zero with a "FAIL: ..." line on the first failed check.
//
// Output lines the Python test waits for: "EVENT <kind> key=value ...". C# 7.2 at most (mcs).
//
// Usage: mono BridgeClientTests.exe <scenario> [--url U] [--id ID] [--token T] [--deadline S] [...]
//   selftest                        offline checks: backoff, endpoint, codec, dispatcher, states, retry loop
//   device                          echo/size/burst/quit handlers; --expect-connections N, --expect-close C
//   rejected --expect-close C       the server refuses the connection; the client must not retry
//   replaced                        a second client with the same id takes over; the first gets 4010
//   watchdog                        --receive-timeout S: an idle connection is dropped and re-opened
//   blackhole                       offline: a server that accepts TCP and never answers the upgrade
//   sendrace                        offline: Send() racing Stop() never leaves a message for a later Start()
//   flush                           a burst of Send() then Stop(): every accepted message is sent
//   v2                              protocol v2 device (--groups a,b): sync and async handlers' replies carry reply_to
//   frameloop                       WebGL player emulation (WebGLPlayerEmulation.cs): one thread, frames, a starved pool;
//                                   --silent 1 first times out a connect; then a device like "device" until quit

using System;
using System.Collections.Generic;
using System.Linq;
using System.Net;
using System.Net.Sockets;
using System.Security.Cryptography;
using System.Text;
using System.Threading;
using System.Threading.Tasks;
using WebSocketBridge;

internal sealed class CheckFailed : Exception
{
    public CheckFailed(string message) : base(message) { }
}

internal static class Program
{
    private static readonly object OutputLock = new object();
    private static readonly Dictionary<string, string> Options = new Dictionary<string, string>();
    private static readonly List<string> Failures = new List<string>();
    private static TimeSpan deadline = TimeSpan.FromSeconds(40);
    private static Action checkTransport = () => { };

    private static int Main(string[] args)
    {
        if (args.Length == 0)
        {
            Console.Error.WriteLine("usage: BridgeClientTests.exe <scenario> [--key value ...]");
            return Exit(64);
        }
        for (int i = 1; i + 1 < args.Length; i += 2)
        {
            if (!args[i].StartsWith("--", StringComparison.Ordinal)) { Console.Error.WriteLine("bad argument " + args[i]); return 64; }
            Options[args[i].Substring(2)] = args[i + 1];
        }
        deadline = TimeSpan.FromSeconds(double.Parse(Opt("deadline", "40"), System.Globalization.CultureInfo.InvariantCulture));
        try
        {
            switch (args[0])
            {
                case "selftest": SelfTest(); break;
                case "device": Device(); break;
                case "rejected": Rejected(); break;
                case "replaced": Replaced(); break;
                case "watchdog": Watchdog(); break;
                case "blackhole": BlackHole(); break;
                case "sendrace": SendRace(); break;
                case "flush": Flush(); break;
                case "v2": V2Device(); break;
                case "frameloop": FrameLoopDevice(); break;
                default: Console.Error.WriteLine("unknown scenario " + args[0]); return 64;
            }
        }
        catch (CheckFailed e)
        {
            Fail(e.Message);
        }
        catch (Exception e)
        {
            Fail("unexpected exception: " + e);
        }
        int code;
        lock (Failures) code = Failures.Count > 0 ? 1 : 0;
        if (code == 0) Emit("PASS " + args[0]);
        return Exit(code);
    }

    /// <summary>Environment.Exit instead of returning from Main: after Main returns, Mono 6.8 waits for
    /// foreground threads and that wait (mono_thread_manage) sometimes never ends after a socket was aborted,
    /// with no managed code left running (seen about once in ten runs of the watchdog scenario, gdb: main
    /// thread in mono_os_event_wait_multiple). Environment.Exit waits too: for every thread to reach a safe
    /// point, and a harness thread inside Monitor.PulseAll never did once under load (hiddentab, a clean-clone
    /// run). So libc's _exit: the verdict is printed and flushed, nothing is left to wait for.</summary>
    internal static int Exit(int code)
    {
        Console.Out.Flush();
        Console.Error.Flush();
        _exit(code);
        return code;
    }

    [System.Runtime.InteropServices.DllImport("libc")]
    private static extern void _exit(int status);

    // ---- helpers ---------------------------------------------------------------------------------

    private static string Opt(string name, string fallback)
    {
        string value;
        return Options.TryGetValue(name, out value) ? value : fallback;
    }

    private static IEnumerable<int> Codes(string commaSeparated)
    {
        return commaSeparated.Split(new[] { ',' }, StringSplitOptions.RemoveEmptyEntries).Select(int.Parse);
    }

    private static string Opt(string name)
    {
        string value;
        if (!Options.TryGetValue(name, out value)) throw new CheckFailed("missing option --" + name);
        return value;
    }

    private static void Emit(string line)
    {
        lock (OutputLock)
        {
            Console.Out.WriteLine(line);
            Console.Out.Flush();
        }
    }

    private static void Fail(string message)
    {
        lock (Failures) Failures.Add(message);
        Emit("FAIL: " + message);
    }

    private static void Check(bool condition, string message)
    {
        if (!condition) throw new CheckFailed(message);
    }

    private static void Wait(Task task, string what)
    {
        if (!task.Wait(deadline)) throw new CheckFailed("timed out after " + deadline.TotalSeconds + " s waiting for " + what);
    }

    private static void WaitUntil(Func<bool> condition, string what)
    {
        var until = DateTime.UtcNow + deadline;
        while (!condition())
        {
            if (DateTime.UtcNow > until) throw new CheckFailed("timed out after " + deadline.TotalSeconds + " s waiting for " + what);
            Thread.Sleep(10); // polling interval of a deadline-bounded wait, not a wait for the condition
        }
    }

    private static string Sha256Hex(byte[] bytes)
    {
        using (var sha = SHA256.Create())
        {
            return string.Concat(sha.ComputeHash(bytes).Select(b => b.ToString("x2")));
        }
    }

    private static BridgeClientOptions ClientOptions(string id, string token)
    {
        return new BridgeClientOptions
        {
            ServerUrl = Opt("url"),
            ClientId = id,
            Token = token,
            // Short delays keep the restart test quick; the algorithm is the production one.
            InitialReconnectDelay = TimeSpan.FromSeconds(0.1),
            MaxReconnectDelay = TimeSpan.FromSeconds(1),
            StableConnectionTime = TimeSpan.FromSeconds(2),
            ConnectTimeout = TimeSpan.FromSeconds(double.Parse(Opt("connect-timeout", "5"), System.Globalization.CultureInfo.InvariantCulture)),
        };
    }

    /// <summary>Prints every event of a client, tagged, and records its disconnects.</summary>
    private static List<BridgeDisconnect> Trace(BridgeClient client, string tag)
    {
        var disconnects = new List<BridgeDisconnect>();
        client.Connected += () => Emit("EVENT connected client=" + tag + " connections=" + client.Connections);
        client.Disconnected += info =>
        {
            lock (disconnects) disconnects.Add(info);
            Emit("EVENT disconnected client=" + tag + " " + info);
        };
        client.Error += error => Emit("EVENT error client=" + tag + " " + error.GetType().Name + ": " + error.Message);
        return disconnects;
    }

    private static BridgeDisconnect[] Snapshot(List<BridgeDisconnect> disconnects)
    {
        lock (disconnects) return disconnects.ToArray();
    }

    /// <summary>The device's command handlers; replies carry a tag so the controller can tell clients apart.</summary>
    private static CommandDispatcher DeviceHandlers(BridgeClient client, string replyPrefix)
    {
        var dispatcher = new CommandDispatcher();
        dispatcher.Register("echo", c => replyPrefix + c.Arguments);
        // Size and SHA-256 of the UTF-8 arguments: the controller compares them with what it sent.
        dispatcher.Register("size", c =>
        {
            var bytes = Encoding.UTF8.GetBytes(c.Arguments);
            return bytes.Length + " " + Sha256Hex(bytes);
        });
        // Many sends from several threads at once: all go through the one sender loop.
        dispatcher.Register("burst", c =>
        {
            int count = int.Parse(c.Args[0]);
            int refused = 0;
            Parallel.For(0, count, i => { if (!client.Send("burst " + i)) Interlocked.Increment(ref refused); });
            if (refused > 0) Fail(refused + " burst messages were refused by Send()");
            return "burst done " + count;
        });
        // Stop flushes the queue before it closes, so "bye" reaches the controller.
        dispatcher.Register("quit", c =>
        {
            client.Send("bye");
            client.Stop(); // from an event handler: must not block (the loop is running this handler)
            return null;
        });
        return dispatcher;
    }

    private static void ServeCommands(BridgeClient client, CommandDispatcher dispatcher, string tag)
    {
        client.MessageReceived += text =>
        {
            var result = dispatcher.Dispatch(text);
            Emit("EVENT message client=" + tag + " chars=" + text.Length + " handled=" + result.Handled);
            if (!result.Handled) Fail("client " + tag + " received an unexpected message: " + Shorten(text));
            if (result.Reply != null && !client.Send(result.Reply)) Fail("client " + tag + " could not queue its reply");
        };
    }

    private static string Shorten(string text)
    {
        return text.Length <= 80 ? text : text.Substring(0, 80) + "...";
    }

    // ---- scenarios ------------------------------------------------------------------------------

    private static void Device()
    {
        var options = ClientOptions(Opt("id"), Opt("token"));
        if (Opt("transport", "clientwebsocket") == "webgl") UseWebGLTransport(options);
        var client = new BridgeClient(options);
        var disconnects = Trace(client, "device");
        ServeCommands(client, DeviceHandlers(client, ""), "device");
        client.Start();
        Wait(client.Completion, "the controller's quit command");

        string expectClose = Opt("expect-close", "");
        // Refusals (e.g. 4009) come right after the WebSocket opened, so their number is the retries'.
        string expectConnections = Opt("expect-connections", expectClose == "" ? "1" : "");
        if (expectConnections != "")
        {
            Check(client.Connections == int.Parse(expectConnections),
                "expected " + expectConnections + " connection(s), saw " + client.Connections);
        }
        var all = Snapshot(disconnects);
        var last = all.LastOrDefault();
        Check(last != null && last.CloseCode == BridgeCloseCodes.Normal && !last.WillRetry,
            "the last disconnect should be our own 1000 close without retry, was " + last);
        Check(client.State == BridgeState.Stopped, "state after quit should be Stopped, is " + client.State);
        Check(client.QueuedMessages == 0, client.QueuedMessages + " messages left in the send queue");
        checkTransport();

        if (expectClose != "")
        {
            int code = int.Parse(expectClose);
            Check(all.Any(d => d.CloseCode == code && d.WillRetry && d.WasConnected),
                "expected a disconnect with code " + code + " and a retry; saw: " + string.Join("; ", all.Select(d => d.ToString())));
        }
        else
        {
            Check(all.Length == 1, "expected one disconnect (our own close), saw: " + string.Join("; ", all.Select(d => d.ToString())));
        }
    }

    /// <summary>WebGLTransport over a browser-like socket, pumped every 5 ms by a "main thread" like Update would.</summary>
    private static void UseWebGLTransport(BridgeClientOptions options)
    {
#if WSBRIDGE_WEBGL_TESTS
        var browser = new BrowserSocketEmulation();
        options.TransportFactory = () => new WebGLTransport(browser);
        var frames = new Thread(() => { while (true) { BridgeTransports.Pump(); Thread.Sleep(5); } }) { IsBackground = true };
        frames.Start();
        checkTransport = () =>
        {
            foreach (var offered in browser.Offered)
            {
                Emit("EVENT offered " + offered.Replace(Opt("token"), "<token>"));
                if (!offered.Contains("wsbridge.token." + Opt("token"))) Fail("the token was not offered as a subprotocol");
            }
        };
        Emit("EVENT transport webgl");
#else
        throw new CheckFailed("this build has no WebGL transport (compile with -define:WSBRIDGE_WEBGL_TESTS)");
#endif
    }

    /// <summary>The device in an emulated WebGL player: everything on the main thread, frame by frame; the pool runs nothing.</summary>
    private static void FrameLoopDevice()
    {
#if WSBRIDGE_WEBGL_TESTS
        var player = new WebGLPlayer();
        var pool = new StarvedPool();
        pool.Starve();
        try { FrameLoopDevice(player, pool); }
        finally { pool.Release(); }
#else
        throw new CheckFailed("this build has no WebGL transport (compile with -define:WSBRIDGE_WEBGL_TESTS)");
#endif
    }

#if WSBRIDGE_WEBGL_TESTS
    private static void FrameLoopDevice(WebGLPlayer player, StarvedPool pool)
    {
        Emit("EVENT starved workers=" + pool.Workers);
        var browser = new BrowserSocketEmulation { RequireThread = player.MainThread };

        if (Opt("silent", "0") == "1")
        {
            // A connect the server never answers times out by the frame clock (no timer), is retried, and Stop() ends it.
            using (var silent = new SilentServer())
            {
                var options = new BridgeClientOptions
                {
                    ServerUrl = silent.Url, ClientId = "silent", Token = "t",
                    ConnectTimeout = TimeSpan.FromSeconds(0.3),
                    InitialReconnectDelay = TimeSpan.FromMilliseconds(20), MaxReconnectDelay = TimeSpan.FromMilliseconds(50),
                    FrameLoop = BridgeFrameLoop.Main,
                    TransportFactory = () => new WebGLTransport(browser),
                };
                var client = new BridgeClient(options);
                var timeouts = new List<BridgeDisconnect>();
                client.Disconnected += info => { player.OnMainThread("Disconnected"); timeouts.Add(info); };
                client.Start();
                player.FramesUntil(() => timeouts.Count >= 2, "two timed-out connects", deadline);
                Check(timeouts.All(d => d.WillRetry && !d.WasConnected && d.Reason.Contains("within 0.3 s")),
                    "each attempt should time out and be retried: " + string.Join("; ", timeouts.Select(d => d.ToString())));
                Emit("EVENT timed-out attempts=" + timeouts.Count + " accepted=" + silent.Accepted);
                var watch = System.Diagnostics.Stopwatch.StartNew();
                client.Stop(TimeSpan.FromSeconds(10)); // never blocks on the frame loop: the close finishes in later frames
                Check(watch.Elapsed < TimeSpan.FromSeconds(1), "Stop() blocked the only thread for " + watch.ElapsedMilliseconds + " ms");
                player.FramesUntil(() => client.Completion.IsCompleted, "the stop", deadline);
                Check(client.State == BridgeState.Stopped, "stopped, state " + client.State);
            }
        }

        var device = ClientOptions(Opt("id"), Opt("token"));
        device.FrameLoop = BridgeFrameLoop.Main;
        device.TransportFactory = () => new WebGLTransport(browser);
        var bridge = new BridgeClient(device);
        var disconnects = Trace(bridge, "device");
        bridge.Connected += () => player.OnMainThread("Connected");
        bridge.Disconnected += info => player.OnMainThread("Disconnected");
        bridge.MessageReceived += text => player.OnMainThread("MessageReceived");
        ServeCommands(bridge, DeviceHandlers(bridge, ""), "device");
        bridge.Start();
        player.FramesUntil(() => bridge.Completion.IsCompleted, "the controller's quit command", deadline);
        Emit("EVENT frames=" + player.Frames);

        Check(player.OffThread == null, player.OffThread);
        Check(browser.WrongThread == null, browser.WrongThread);
        pool.CheckNothingUsedThePool();
        string expectClose = Opt("expect-close", "");
        Check(bridge.Connections == int.Parse(Opt("expect-connections", "1")), "connections: " + bridge.Connections);
        var all = Snapshot(disconnects);
        var last = all.LastOrDefault();
        Check(last != null && last.CloseCode == BridgeCloseCodes.Normal && !last.WillRetry,
            "the last disconnect should be our own 1000 close without retry, was " + last);
        Check(bridge.State == BridgeState.Stopped, "state after quit should be Stopped, is " + bridge.State);
        if (expectClose != "")
        {
            int code = int.Parse(expectClose);
            Check(all.Any(d => d.CloseCode == code && d.WillRetry && d.WasConnected),
                "expected a disconnect with code " + code + " and a retry; saw: " + string.Join("; ", all.Select(d => d.ToString())));
        }
    }
#endif

    private static void Rejected()
    {
        // "none": no close code, e.g. protocol v2 requested from an appliance that does not select wsbridge.v2.
        int? expected = Opt("expect-close") == "none" ? (int?)null : int.Parse(Opt("expect-close"));
        var options = ClientOptions(Opt("id"), Opt("token"));
        options.ProtocolVersion = int.Parse(Opt("protocol", "1"));
        options.MaxRefusedOpens = int.Parse(Opt("max-refused-opens", "0"));
        if (Opt("transport", "clientwebsocket") == "webgl") UseWebGLTransport(options);
        var client = new BridgeClient(options);
        var disconnects = Trace(client, "rejected");
        client.MessageReceived += text => Fail("a rejected client received a message: " + Shorten(text));
        client.Start();
        // The loop ends by itself: Completion finishing means no retry is pending or possible.
        Wait(client.Completion, "the client to give up after close code " + expected);

        var last = client.LastDisconnect;
        Check(last != null, "no disconnect reported");
        Emit("EVENT rejected code=" + last.CloseCode + " reason=" + last.Reason);
        Check(last.CloseCode == expected, "expected close code " + expected + ", got " + last);
        Check(!last.WillRetry, "a final close code must not be retried: " + last);
        Check(!string.IsNullOrEmpty(last.Reason), "the close reason should be reported");
        Check(client.State == BridgeState.Rejected, "state should be Rejected, is " + client.State);
        int attempts = int.Parse(Opt("expect-attempts", "1"));
        Check(client.ConnectAttempts == attempts, "expected " + attempts + " connection attempt(s), saw " + client.ConnectAttempts);
        var all = Snapshot(disconnects);
        Check(all.Length == attempts && !all.Last().WillRetry && all.Take(attempts - 1).All(d => d.WillRetry),
            "expected " + (attempts - 1) + " retried and one final disconnect, saw: " + string.Join("; ", all.Select(d => d.ToString())));
        Check(!client.Send("late"), "Send() on a rejected client should return false");
    }

    private static void Replaced()
    {
        string id = Opt("id");
        var first = new BridgeClient(ClientOptions(id, Opt("token")));
        var firstDisconnects = Trace(first, "first");
        ServeCommands(first, DeviceHandlers(first, "first:"), "first");
        first.Start();
        WaitUntil(() => first.IsConnected, "the first client to connect");

        var second = new BridgeClient(ClientOptions(id, Opt("token")));
        var secondDisconnects = Trace(second, "second");
        // The newer connection must stay until the controller's quit (our own 1000 close): fail at once otherwise.
        second.Disconnected += info =>
        {
            if (info.CloseCode != BridgeCloseCodes.Normal || info.WillRetry) Fail("the newer connection was closed: " + info);
        };
        ServeCommands(second, DeviceHandlers(second, "second:"), "second");
        second.Start();
        Wait(first.Completion, "the first client to be replaced (4010) and give up");

        var last = first.LastDisconnect;
        Check(last != null && last.CloseCode == BridgeCloseCodes.Replaced && !last.WillRetry,
            "the first client should end with 4010 and no retry, got " + last);
        Check(first.State == BridgeState.Rejected, "the first client's state should be Rejected, is " + first.State);
        Check(first.ConnectAttempts == 1, "the replaced client must not reconnect; attempts: " + first.ConnectAttempts);
        WaitUntil(() => second.IsConnected, "the second client to be connected");
        Emit("EVENT replaced code=" + last.CloseCode + " reason=" + last.Reason);

        // The controller now talks to the second client and ends with quit.
        Wait(second.Completion, "the controller's quit command");
        Check(second.Connections == 1, "the second client should have connected once, saw " + second.Connections);
        Check(Snapshot(secondDisconnects).Length == 1, "the second client should only see its own close");
        Check(Snapshot(firstDisconnects).Length == 1, "the first client should see exactly one (final) disconnect");
    }

    private static void Watchdog()
    {
        var options = ClientOptions(Opt("id"), Opt("token"));
        options.ReceiveTimeout = TimeSpan.FromSeconds(double.Parse(Opt("receive-timeout"), System.Globalization.CultureInfo.InvariantCulture));
        var client = new BridgeClient(options);
        var disconnects = Trace(client, "watchdog");
        client.Start();
        WaitUntil(() => client.Connections >= 2, "a reconnect after the receive watchdog fired");
        var first = Snapshot(disconnects).First();
        Check(first.WillRetry && first.CloseCode == null && first.Reason.StartsWith("receive timeout", StringComparison.Ordinal),
            "the first disconnect should be the watchdog's, with a retry: " + first);
        // Bounded by the harness deadline, not Stop()'s fixed 5 s: on a loaded machine the close may take longer.
        Check(client.Stop(deadline), "the loop did not end within " + deadline.TotalSeconds + " s of Stop(), state " + client.State);
        Check(client.State == BridgeState.Stopped, "state after Stop() should be Stopped, is " + client.State);
    }

    /// <summary>Accepts TCP connections and never answers the WebSocket upgrade; counts what the client closed.</summary>
    private sealed class BlackHoleServer : IDisposable
    {
        private readonly TcpListener listener = new TcpListener(IPAddress.Loopback, 0);
        private readonly List<TcpClient> accepted = new List<TcpClient>();
        private int closedByClient;

        public BlackHoleServer()
        {
            listener.Start();
            Task.Run(async () =>
            {
                while (true)
                {
                    TcpClient peer;
                    try { peer = await listener.AcceptTcpClientAsync(); }
                    catch (Exception) { return; }
                    lock (accepted) accepted.Add(peer);
                    StartDrain(peer);
                }
            });
        }

        public string Url { get { return "ws://127.0.0.1:" + ((IPEndPoint)listener.LocalEndpoint).Port; } }
        public int Accepted { get { lock (accepted) return accepted.Count; } }
        public int ClosedByClient { get { return Volatile.Read(ref closedByClient); } }

        private void StartDrain(TcpClient peer)
        {
            var draining = DrainAsync(peer);
            draining.ContinueWith(t => t.Exception);
        }

        private async Task DrainAsync(TcpClient peer)
        {
            var buffer = new byte[4096];
            try
            {
                var stream = peer.GetStream();
                while (await stream.ReadAsync(buffer, 0, buffer.Length) > 0) { } // read the upgrade request, answer nothing
            }
            catch (Exception) { }
            Interlocked.Increment(ref closedByClient);
        }

        public void Dispose()
        {
            listener.Stop();
            lock (accepted) foreach (var peer in accepted) peer.Close();
        }
    }

    private static void BlackHole()
    {
        using (var hole = new BlackHoleServer())
        {
            var client = new BridgeClient(new BridgeClientOptions
            {
                ServerUrl = hole.Url, ClientId = "blackhole", Token = "t",
                ConnectTimeout = TimeSpan.FromSeconds(0.3),
                InitialReconnectDelay = TimeSpan.FromMilliseconds(20), MaxReconnectDelay = TimeSpan.FromMilliseconds(50),
                // Long, so "at once" and "after the close timeouts" stay far apart on a loaded machine (a stop that
                // waited for them would take 10 s or more; one that does not takes milliseconds).
                CloseTimeout = TimeSpan.FromSeconds(10),
            });
            var disconnects = Trace(client, "blackhole");
            client.Start();
            // A connect that never completes is abandoned after ConnectTimeout and retried as usual.
            WaitUntil(() => Snapshot(disconnects).Length >= 3, "three timed-out attempts against the black hole");
            var seen = Snapshot(disconnects);
            Check(seen.All(d => d.WillRetry && !d.WasConnected && d.Reason.Contains("within 0.3 s")),
                "each attempt should time out and be retried: " + string.Join("; ", seen.Select(d => d.ToString())));
            Check(hole.Accepted >= 3, "the black hole should have seen the TCP connections, saw " + hole.Accepted);
            Check(client.State == BridgeState.Connecting || client.State == BridgeState.WaitingToReconnect,
                "state between attempts: " + client.State);
            // Stop() during a hanging connect ends at once, not after the close timeouts.
            WaitUntil(() => client.State == BridgeState.Connecting, "the next attempt to be under way");
            var watch = System.Diagnostics.Stopwatch.StartNew();
            client.Stop();
            watch.Stop();
            Emit("EVENT stopped-in ms=" + watch.ElapsedMilliseconds);
            Check(watch.Elapsed < TimeSpan.FromSeconds(5), "Stop() during a hanging connect took " + watch.ElapsedMilliseconds + " ms");
            Check(client.State == BridgeState.Stopped && client.Completion.IsCompleted, "stopped, state " + client.State);
            // One socket per attempt, none opened behind the client's back. (Mono offers no way to close the socket of
            // an abandoned upgrade: it stays until the server drops it; the client only stops waiting for it.)
            Check(hole.Accepted <= client.ConnectAttempts, hole.Accepted + " TCP connections for " + client.ConnectAttempts + " attempts");
        }
    }

    private static void SendRace()
    {
        // Nothing listens on port 1: the client is always between attempts, where Send() queues.
        for (int round = 0; round < 200; round++)
        {
            var client = new BridgeClient(new BridgeClientOptions
            {
                ServerUrl = "ws://127.0.0.1:1", ClientId = "race", Token = "t",
                InitialReconnectDelay = TimeSpan.FromMilliseconds(1), MaxReconnectDelay = TimeSpan.FromMilliseconds(2),
            });
            client.Start();
            int accepted = 0;
            bool stopped = false;
            // Dedicated threads, not Task.Run, and each leaves once it has seen the stop refuse a Send (every later
            // Send is refused too; the final check below proves it): three senders spinning on the client's lock until
            // Stop() returned starved the loop that must take that lock (and a pool thread) to finish the stop, so on
            // a loaded machine it could miss Stop()'s fixed wait and the round saw "Stopping" instead of "Stopped".
            var senders = Enumerable.Range(0, 3).Select(i => new Thread(() =>
            {
                while (!Volatile.Read(ref stopped))
                {
                    if (client.Send("m")) Interlocked.Increment(ref accepted);
                    else if (client.State == BridgeState.Stopping || client.State == BridgeState.Stopped) break;
                }
            }) { IsBackground = true }).ToArray();
            foreach (var sender in senders) sender.Start();
            Thread.Sleep(round % 3);
            // Waits for the loop's end (bounded by the harness deadline, not Stop()'s fixed 5 s), then checks what it left.
            bool ended = client.Stop(deadline);
            Volatile.Write(ref stopped, true);
            foreach (var sender in senders) sender.Join();
            Check(ended, "round " + round + ": the loop did not end within " + deadline.TotalSeconds + " s of Stop(), state " + client.State);
            Check(client.State == BridgeState.Stopped, "round " + round + ": state " + client.State);
            // A message accepted while disconnected and not sent before the stop is dropped with the stop; nothing
            // may stay queued for a later Start() to send.
            Check(client.QueuedMessages == 0, "round " + round + ": " + client.QueuedMessages + " message(s) left queued after Stop()");
            Check(!client.Send("late"), "Send() after Stop() must return false");
        }
    }

    private static void Flush()
    {
        var options = ClientOptions(Opt("id"), Opt("token"));
        // The flush is bounded by CloseTimeout by design; on a loaded test machine 2 s can be too short for it.
        options.CloseTimeout = TimeSpan.FromSeconds(10);
        var client = new BridgeClient(options);
        Trace(client, "flush");
        client.Start();
        WaitUntil(() => client.IsConnected, "the connection");
        int accepted = 0;
        bool stop = false;
        var senders = Enumerable.Range(0, 4).Select(t => Task.Run(() =>
        {
            // Numbered by acceptance: a refused Send (queue full, stopped) is retried, not skipped. At most 400 per
            // thread, spread over some milliseconds, so Stop() lands among them and the flush stays within the
            // appliance's rate burst (a flush slowed beyond CloseTimeout is cut off by design).
            int i = 0;
            while (!Volatile.Read(ref stop) && i < 400)
            {
                if (client.Send("seq " + t + " " + i))
                {
                    i++;
                    Interlocked.Increment(ref accepted);
                    if (i % 40 == 0) Thread.Sleep(1);
                }
                else if (client.State == BridgeState.Open) Thread.Sleep(1); // queue full: let the sender catch up
            }
        })).ToArray();
        Thread.Sleep(5);
        client.Stop();
        Volatile.Write(ref stop, true);
        Task.WaitAll(senders);
        Check(client.State == BridgeState.Stopped, "state " + client.State);
        Check(client.LastDisconnect.CloseCode == BridgeCloseCodes.Normal, "closed with 1000: " + client.LastDisconnect);
        Emit("EVENT accepted " + Volatile.Read(ref accepted));
    }

    private static void V2Device()
    {
        var options = ClientOptions(Opt("id"), Opt("token"));
        options.ProtocolVersion = 2;
        string groups = Opt("groups", "");
        if (groups != "") options.Groups = groups.Split(',');
        var client = new BridgeClient(options);
        Trace(client, "v2");
        var dispatcher = new CommandDispatcher(BridgeProtocols.CodecFor(2));
        dispatcher.Register("echo", c => c.Arguments + " from " + c.From);
        dispatcher.RegisterAsync("later", async c => { await Task.Delay(50); return "later " + c.Arguments; });
        dispatcher.Register("quit", c => { client.Send("bye"); client.Stop(); return null; });
        client.MessageReceived += text =>
        {
            var result = dispatcher.Dispatch(text);
            if (!result.Handled) Fail("unexpected v2 message: " + Shorten(text));
            if (result.Reply != null) client.Send(result.Reply);
            if (result.PendingReply != null) result.PendingReply.ContinueWith(t => { if (t.Result != null) client.Send(t.Result); });
        };
        client.Start();
        Wait(client.Completion, "the controller's quit command");
        Check(client.LastDisconnect != null && client.LastDisconnect.CloseCode == BridgeCloseCodes.Normal,
            "v2 client should end with its own close, got " + client.LastDisconnect);
    }

    private static void V2Codec()
    {
        var codec = new JsonCommandCodec();
        BridgeCommand command;
        Check(codec.TryDecode("{\"id\":7,\"from\":\"LLM\",\"message\":\"move 1 2\"}", out command), "decode v2 with integer id");
        CheckEqual(command.Name, "move", "v2 name");
        CheckEqual(command.Arguments, "1 2", "v2 arguments");
        CheckEqual(command.From, "LLM", "v2 from");
        CheckEqual(codec.EncodeReply(command, "moved"), "{\"reply_to\":7,\"message\":\"moved\"}", "v2 reply to integer id");
        Check(codec.TryDecode(" { \"message\" : \"say \\\"hi\\\" \\u00e9\\n\" , \"id\" : \"a-1\", \"from\": \"c\" } ", out command), "decode v2 with string id and escapes");
        CheckEqual(command.Arguments, "\"hi\" \u00e9\n", "v2 escapes");
        CheckEqual(codec.EncodeReply(command, "q\"\\\n\u0001 🎮"), "{\"reply_to\":\"a-1\",\"message\":\"q\\\"\\\\\\n\\u0001 🎮\"}", "v2 reply escaping");
        Check(codec.TryDecode("{\"id\":null,\"from\":\"LLM\",\"message\":\"on\"}", out command) && command.CorrelationId == null, "null id");
        CheckEqual(codec.EncodeReply(command, "lit"), "lit", "reply to a command without id is bare text");
        Check(!codec.TryDecode("on", out command), "bare text is not a v2 command");
        Check(!codec.TryDecode("{\"id\":true,\"message\":\"on\"}", out command), "a boolean id is refused");
        Check(!codec.TryDecode("{\"id\":1,\"message\":{\"x\":1}}", out command), "a non-string message is refused");
        // Unknown nested fields (a newer appliance's) are skipped, not a reason to refuse the command (issue 25 item 10).
        Check(codec.TryDecode("{\"id\":2,\"meta\":{\"tags\":[\"a\",{\"b\":\"}]\"}],\"n\":{}},\"from\":\"L\",\"message\":\"on now\",\"x\":[]}", out command)
            && command.Name == "on" && command.Arguments == "now" && command.CorrelationId == "2", "nested unknown fields are skipped");
        Check(!codec.TryDecode("{\"id\":2,\"meta\":{\"a\":[1,2},\"message\":\"on\"", out command), "an unbalanced nested value is refused");
        // The command manifest (issue 25 item 9): registered handlers with their descriptions and arguments.
        var described = new CommandDispatcher();
        described.Register("intensity", c => "ok");
        described.RegisterAsync("Scan", c => Task.FromResult("ok"));
        described.Describe("intensity", "Sets the light's \"intensity\"", new CommandArgument("value", "number", "0..8"),
            new CommandArgument("fade", "boolean", "") { Required = false });
        CheckEqual(described.ManifestJson(),
            "{\"type\":\"manifest\",\"commands\":[{\"name\":\"intensity\",\"description\":\"Sets the light's \\\"intensity\\\"\",\"arguments\":" +
            "{\"type\":\"object\",\"properties\":{\"value\":{\"type\":\"number\",\"description\":\"0..8\"},\"fade\":{\"type\":\"boolean\",\"description\":\"\"}}," +
            "\"required\":[\"value\"]}},{\"name\":\"Scan\",\"description\":\"\",\"arguments\":{\"type\":\"object\",\"properties\":{},\"required\":[]}}]}",
            "manifest");
        CheckThrows<ArgumentException>(() => new CommandArgument("x", "object", ""), "argument types are JSON Schema scalars");
        // The appliance's answers to a manifest (docs/protocol.md): read as such, never as a command.
        bool manifestAccepted;
        string manifestDetail;
        Check(BridgeProtocols.TryReadManifestAnswer("{\"type\":\"manifest_accepted\",\"commands\":2}", out manifestAccepted, out manifestDetail)
            && manifestAccepted, "manifest_accepted is read");
        Check(BridgeProtocols.TryReadManifestAnswer("{\"type\":\"manifest_error\",\"error\":\"invalid_manifest\",\"detail\":\"commands[0].name: one \\\"word\\\"\",\"path\":\"commands[0].name\"}",
            out manifestAccepted, out manifestDetail) && !manifestAccepted, "manifest_error is read");
        CheckEqual(manifestDetail, "commands[0].name: one \"word\"", "manifest_error detail");
        Check(!BridgeProtocols.TryReadManifestAnswer("{\"id\":1,\"from\":\"L\",\"message\":\"manifest\"}", out manifestAccepted, out manifestDetail), "a command is no manifest answer");
        Check(!codec.TryDecode("{\"type\":\"manifest_accepted\",\"commands\":2}", out command), "a manifest answer is no v2 command");
        CheckEqual(BridgeClient.DescribeCloseCode(4004), "the client id is in use by a controller", "4004 described");
        CheckEqual(BridgeClient.DescribeCloseCode(4013), "too many connections from this address or with this token", "4013 described");
        Check(!BridgeCloseCodes.IsFinal(BridgeCloseCodes.RoleConflict) && !BridgeCloseCodes.IsFinal(BridgeCloseCodes.TooManyConnections), "4004 and 4013 are retried");
        // docs/protocol.md's close-code table, read by the Python side: a code it says not to retry is final,
        // any other is retried; every code is described (a reason for the Status line when the server sends none).
        foreach (var final in Codes(Opt("final-codes")))
            Check(BridgeCloseCodes.IsFinal(final), final + " is final in docs/protocol.md but retried");
        foreach (var retried in Codes(Opt("retried-codes")))
            Check(!BridgeCloseCodes.IsFinal(retried), retried + " is retried in docs/protocol.md but final");
        foreach (var documented in Codes(Opt("final-codes")).Concat(Codes(Opt("retried-codes"))))
            Check(BridgeClient.DescribeCloseCode(documented) != "closed with code " + documented, documented + " is not described");
        Check(!codec.TryDecode("{\"id\":1,\"message\":\"on\"} trailing", out command), "trailing text is refused");

        // Async handlers: the task's result is the reply; a faulted task becomes an error reply.
        var dispatcher = new CommandDispatcher(codec);
        dispatcher.RegisterAsync("slow", c => Task.FromResult("done " + c.Arguments));
        dispatcher.RegisterAsync("fail", c => { var t = new TaskCompletionSource<string>(); t.SetException(new InvalidOperationException("nope")); return t.Task; });
        var slow = dispatcher.Dispatch("{\"id\":\"x\",\"from\":\"L\",\"message\":\"slow 5\"}");
        Check(slow.Handled && slow.Reply == null && slow.PendingReply != null, "async handler gives a pending reply");
        CheckEqual(slow.PendingReply.Result, "{\"reply_to\":\"x\",\"message\":\"done 5\"}", "async reply");
        CheckEqual(dispatcher.Dispatch("{\"id\":2,\"from\":\"L\",\"message\":\"fail\"}").PendingReply.Result,
            "{\"reply_to\":2,\"message\":\"error: fail: nope\"}", "failed async handler");
        CheckEqual(BridgeClient.BuildEndpoint("ws://h", "x", new[] { "red", "blue" }).ToString(), "ws://h/ws/x?groups=red,blue", "groups query");
        CheckThrows<ArgumentException>(() => new BridgeClient(new BridgeClientOptions { ServerUrl = "ws://h", ClientId = "ok", Token = "t", Groups = new[] { "bad group" } }), "bad group name");
        Check(BridgeCloseCodes.IsFinal(BridgeCloseCodes.TokenExpired), "4011 token expired is final");
        Check(BridgeCloseCodes.IsFinal(BridgeCloseCodes.DisconnectedByAdmin), "4012 disconnected by an administrator is final");
        Check(BridgeCloseCodes.IsFinal(BridgeCloseCodes.Banned), "4016 banned is final");
        Check(!BridgeCloseCodes.IsFinal(BridgeCloseCodes.TooManyNewIds), "4015 too many new ids is retried");
    }

    private static void SelfTest()
    {
        V2Codec();
        // The frame loop: delays complete at the first Pump after their deadline, by the clock (no timer).
        long fakeNow = 0;
        var loop = new BridgeFrameLoop(() => fakeNow);
        fakeNow = 100 * System.Diagnostics.Stopwatch.Frequency; // not pumped for 100 s: deadlines still count from now
        var second = loop.Delay(TimeSpan.FromSeconds(1), CancellationToken.None);
        var cancelled = new CancellationTokenSource();
        var never = loop.Delay(TimeSpan.FromSeconds(1), cancelled.Token);
        fakeNow += System.Diagnostics.Stopwatch.Frequency / 2;
        loop.Pump();
        Check(!second.IsCompleted, "a 1 s delay completed after 0.5 s");
        cancelled.Cancel();
        Check(never.IsCanceled, "a cancelled delay is cancelled at once");
        fakeNow += System.Diagnostics.Stopwatch.Frequency / 2;
        loop.Pump();
        Check(second.IsCompleted && loop.Pending == 0, "a 1 s delay completes at the first Pump after 1 s");
        int ran = 0;
        loop.Post(_ => { ran++; loop.Post(__ => ran++, null); }, null);
        loop.Pump();
        Check(ran == 2, "work posted during a Pump runs in the same Pump");

        // Full jitter: within [0, min(max, initial * 2^attempt)], and actually random.
        var random = new Random(1);
        var initial = TimeSpan.FromMilliseconds(100);
        var max = TimeSpan.FromSeconds(2);
        for (int attempt = 0; attempt < 40; attempt++)
        {
            double ceiling = Math.Min(max.TotalMilliseconds, 100 * Math.Pow(2, Math.Min(attempt, 30)));
            var seen = new HashSet<long>();
            for (int i = 0; i < 50; i++)
            {
                var delay = BridgeClient.ComputeBackoff(attempt, initial, max, random);
                Check(delay >= TimeSpan.Zero && delay.TotalMilliseconds <= ceiling + 1e-6,
                    "backoff " + delay + " outside [0, " + ceiling + " ms] at attempt " + attempt);
                seen.Add(delay.Ticks);
            }
            Check(seen.Count > 40, "backoff delays are not jittered at attempt " + attempt);
        }
        var late = Enumerable.Range(0, 200).Select(i => BridgeClient.ComputeBackoff(20, initial, max, random).TotalMilliseconds).ToArray();
        Check(late.Max() > 1500, "capped backoff should still spread up to the cap (max seen " + late.Max() + " ms)");

        // Endpoint from the base URL forms users type.
        CheckEqual(BridgeClient.BuildEndpoint("ws://localhost:8000", "lamp-1").ToString(), "ws://localhost:8000/ws/lamp-1", "endpoint");
        CheckEqual(BridgeClient.BuildEndpoint("https://bridge.example.com/", "a_b").ToString(), "wss://bridge.example.com/ws/a_b", "endpoint");
        CheckEqual(BridgeClient.BuildEndpoint("http://h:81/ws", "x").ToString(), "ws://h:81/ws/x", "endpoint");
        CheckEqual(BridgeClient.BuildEndpoint("wss://h/prefix", "x").ToString(), "wss://h/prefix/ws/x", "endpoint");
        CheckThrows<ArgumentException>(() => BridgeClient.BuildEndpoint("ftp://h", "x"), "ftp URL");
        CheckThrows<ArgumentException>(() => new BridgeClient(new BridgeClientOptions { ServerUrl = "ws://h", ClientId = "bad id", Token = "t" }), "invalid id");
        CheckThrows<ArgumentException>(() => new BridgeClient(new BridgeClientOptions { ServerUrl = "ws://h", ClientId = new string('a', 51), Token = "t" }), "id too long");
        CheckThrows<ArgumentException>(() => new BridgeClient(new BridgeClientOptions { ServerUrl = "ws://h", ClientId = "ok", Token = "" }), "empty token");

        // Protocol v1: first word is the name, the rest is kept as is.
        var codec = new TextCommandCodec();
        BridgeCommand command;
        Check(codec.TryDecode("  move  1 2\t3 ", out command), "decode move");
        CheckEqual(command.Name, "move", "name");
        CheckEqual(command.Arguments, "1 2\t3 ", "arguments");
        CheckEqual(string.Join(",", command.Args), "1,2,3", "args");
        Check(codec.TryDecode("on", out command) && command.Name == "on" && command.Arguments == "" && command.Args.Length == 0, "decode bare name");
        Check(!codec.TryDecode(" \t ", out command), "blank text is not a command");
        CheckEqual(codec.EncodeReply(command, "done"), "done", "v1 reply is bare text");

        // Dispatcher: case-insensitive names, failing handler becomes an error reply, owner-checked unregister.
        var dispatcher = new CommandDispatcher();
        CommandHandler on = c => "lit";
        CommandHandler other = c => "other";
        dispatcher.Register("on", on);
        CheckEqual(dispatcher.Dispatch("ON now").Reply, "lit", "case-insensitive dispatch");
        Check(!dispatcher.Dispatch("off").Handled, "unknown command is not handled");
        dispatcher.Register("boom", c => { throw new InvalidOperationException("fuse"); });
        var boom = dispatcher.Dispatch("boom");
        Check(boom.Handled && boom.Exception != null && boom.Reply == "error: boom: fuse", "throwing handler reply: " + boom.Reply);
        Check(!dispatcher.Unregister("on", other), "unregister with another handler must not remove");
        Check(dispatcher.IsRegistered("on") && dispatcher.Unregister("on", on) && !dispatcher.IsRegistered("on"), "unregister own handler");

        // States: Stop before Start, Start twice.
        var idle = new BridgeClient(new BridgeClientOptions { ServerUrl = "ws://127.0.0.1:1", ClientId = "idle", Token = "t" });
        Check(idle.State == BridgeState.Idle, "new client is Idle");
        idle.Stop();
        Check(idle.State == BridgeState.Stopped, "Stop() before Start() gives Stopped");
        Check(!idle.Send("x"), "Send() on a stopped client returns false");

        // Nothing listens on port 1: attempts fail, are retried with backoff, and Stop() ends the loop.
        var refused = new BridgeClient(new BridgeClientOptions
        {
            ServerUrl = "ws://127.0.0.1:1", ClientId = "nobody", Token = "t",
            InitialReconnectDelay = TimeSpan.FromMilliseconds(20), MaxReconnectDelay = TimeSpan.FromMilliseconds(100),
        });
        var refusals = new List<BridgeDisconnect>();
        refused.Disconnected += info => { lock (refusals) refusals.Add(info); };
        refused.Start();
        CheckThrows<InvalidOperationException>(() => refused.Start(), "Start() twice");
        Check(refused.Send("queued while offline"), "Send() while reconnecting queues");
        WaitUntil(() => refused.ConnectAttempts >= 3, "three connection attempts");
        // Bounded by the harness deadline, not Stop()'s fixed 5 s: on a loaded machine the loop may take longer to wake.
        Check(refused.Stop(deadline), "the loop did not end within " + deadline.TotalSeconds + " s of Stop(), state " + refused.State);
        Check(refused.State == BridgeState.Stopped, "Stop() while retrying gives Stopped, not " + refused.State);
        Check(refused.Completion.IsCompleted, "the loop has ended after Stop()");
        var refusalsSeen = Snapshot(refusals);
        Check(refusalsSeen.Take(refusalsSeen.Length - 1).All(d => d.WillRetry && !d.WasConnected && d.CloseCode == null), "failed attempts are retried");
        Check(!refusalsSeen.Last().WillRetry, "the stop is final");
        Check(refused.QueuedMessages == 0, "stopping drops what can no longer be sent");
    }

    private static void CheckEqual(string actual, string expected, string what)
    {
        Check(actual == expected, what + ": expected \"" + expected + "\", got \"" + actual + "\"");
    }

    private static void CheckThrows<T>(Action action, string what) where T : Exception
    {
        try { action(); }
        catch (T) { return; }
        catch (Exception e) { throw new CheckFailed(what + ": expected " + typeof(T).Name + ", got " + e.GetType().Name); }
        throw new CheckFailed(what + ": expected " + typeof(T).Name + ", nothing was thrown");
    }
}
