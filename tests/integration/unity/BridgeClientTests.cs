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

using System;
using System.Collections.Generic;
using System.Linq;
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
    /// thread in mono_os_event_wait_multiple). Environment.Exit shuts the runtime down without that wait.</summary>
    internal static int Exit(int code)
    {
        Console.Out.Flush();
        Environment.Exit(code);
        return code;
    }

    // ---- helpers ---------------------------------------------------------------------------------

    private static string Opt(string name, string fallback)
    {
        string value;
        return Options.TryGetValue(name, out value) ? value : fallback;
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
            ConnectTimeout = TimeSpan.FromSeconds(5),
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
        var client = new BridgeClient(ClientOptions(Opt("id"), Opt("token")));
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

    private static void Rejected()
    {
        int expected = int.Parse(Opt("expect-close"));
        var client = new BridgeClient(ClientOptions(Opt("id"), Opt("token")));
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
        Check(client.ConnectAttempts == 1, "expected exactly one connection attempt, saw " + client.ConnectAttempts);
        var all = Snapshot(disconnects);
        Check(all.Length == 1 && !all[0].WillRetry, "expected one final disconnect, saw: " + string.Join("; ", all.Select(d => d.ToString())));
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
        client.Stop();
        Check(client.State == BridgeState.Stopped, "state after Stop() should be Stopped, is " + client.State);
    }

    private static void SelfTest()
    {
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
        refused.Stop();
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
