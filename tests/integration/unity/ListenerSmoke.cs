// ListenerSmoke.cs: drives CommandListener and the example LightController the way the Unity player does
// (UnityHarness.cs: Awake, OnEnable, Start, Update per frame on one main thread with a frame-pumped
// SynchronizationContext, a controllable clock, fake-null destroyed objects; any logged error fails),
// against the real appliance. Used by test_unity_client.py; C# 7.2 (mcs).
//
// Usage: mono ListenerSmoke.exe <scenario> --url U --id ID --token T [--controller-token C] [--deadline S]
//   listener   the controller (Python) sends light commands; "quit" ends the run; then pause/resume and teardown
//   reloads    the boot scene (a listener and a lamp) loaded three times: one listener stays, duplicates destroy themselves
//   v1order    protocol v1 with an async handler: replies keep the commands' order; its exception is logged
//   devicetoken a new listener (protocol V2 by default) in a WebGL/Android-like player without environment variables: the editor warns while no token asset
//              exists; with Resources/WsBridgeToken the default token source connects
//   hiddentab  (built with WSBRIDGE_WEBGL_TESTS) the WebGL transport on the frame loop: a command that waited in the
//              browser while the tab was hidden is refused with a reply, not run late
//   stale      offline, set to protocol V1 after registering: commands a replaced client delivered after Connect() never count against Max Pending Commands
//   lifecycle  protocol V1 (as saved scenes have it); this program is also the controller (a BridgeClient with the controller token) and checks that
//              commands never run late: disabled, paused, stalled frames, an old connection, the frame budget,
//              a domain reload, a destroyed primary listener, a dead socket on resume and at teardown

using System;
using System.Collections.Concurrent;
using System.Collections.Generic;
using System.Diagnostics;
using System.Linq;
using System.Reflection;
using System.Text.RegularExpressions;
using System.Threading;
using System.Threading.Tasks;
using UnityEngine;
using WebSocketBridge;
using WebSocketBridge.Examples;

internal sealed class CheckFailed : Exception
{
    public CheckFailed(string message) : base(message) { }
}

internal static class ListenerSmoke
{
    private static readonly object OutputLock = new object();
    private static Dictionary<string, string> options;
    private static TimeSpan deadline;

    private static void Emit(string line)
    {
        lock (OutputLock)
        {
            Console.Out.WriteLine(line);
            Console.Out.Flush();
        }
    }

    private static void Check(bool condition, string message)
    {
        if (!condition) throw new CheckFailed(message);
    }

    private static int Main(string[] args)
    {
        options = new Dictionary<string, string>();
        for (int i = 1; i + 1 < args.Length; i += 2) options[args[i].TrimStart('-')] = args[i + 1];
        deadline = TimeSpan.FromSeconds(double.Parse(options["deadline"], System.Globalization.CultureInfo.InvariantCulture));
        var player = new Player();
        int code = 0;
        try
        {
            if (args[0] == "listener") Listener(player);
            else if (args[0] == "lifecycle") Lifecycle(player);
            else if (args[0] == "reloads") Reloads(player);
            else if (args[0] == "stale") StaleClient(player);
            else if (args[0] == "v1order") V1Order(player);
            else if (args[0] == "devicetoken") DeviceToken(player);
            else if (args[0] == "hiddentab") HiddenTab(player);
            else throw new CheckFailed("unknown scenario " + args[0]);
            if (player.Failure != null) throw new CheckFailed(player.Failure);
            Emit("PASS " + args[0]);
        }
        catch (Exception e)
        {
            var failed = e as CheckFailed;
            Emit("FAIL: " + (failed != null ? failed.Message : "unexpected exception: " + e));
            code = 1;
        }
        // Not a return from Main, nor Environment.Exit: see Program.Exit in BridgeClientTests.cs (Mono 6.8
        // shutdown hangs). The verdict is printed; the process ends here without waiting for any thread.
        Console.Out.Flush();
        Console.Error.Flush();
        _exit(code);
        return code;
    }

    [System.Runtime.InteropServices.DllImport("libc")]
    private static extern void _exit(int status);

    private static void SetField(object target, string name, object value)
    {
        target.GetType().GetField(name, BindingFlags.Instance | BindingFlags.NonPublic).SetValue(target, value);
    }

    private static object Field(object target, string name)
    {
        return target.GetType().GetField(name, BindingFlags.Instance | BindingFlags.NonPublic).GetValue(target);
    }

    /// <summary>A listener; the token from code, or (codeToken false) from UNITY_CLIENT_TOKEN, the default source.</summary>
    private static CommandListener NewListener(Player player, GameObject host, string url, bool codeToken = true, Action<CommandListener> configure = null)
    {
        return player.Add<CommandListener>(host, l =>
        {
            l.ServerUrl = url;
            l.ClientId = options["id"];
            if (codeToken) l.Token = options["token"];
            if (configure != null) configure(l);
        });
    }

    // ---- driven by the Python controller -----------------------------------------------------------

    private static void Listener(Player player)
    {
        string protocol;
        int version = options.TryGetValue("protocol", out protocol) ? int.Parse(protocol) : 1;
        var listener = NewListener(player, new GameObject("Bridge"), options["url"], configure: l => l.ProtocolVersion = version);
        var lampObject = new GameObject("Lamp");
        var lamp = lampObject.AddComponent<Light>();
        var device = player.Add<LightController>(lampObject);

        bool quit = false;
        listener.ConnectedEvent.AddListener(() => Emit("EVENT connected"));
        listener.UnhandledCommand.AddListener(text => Emit("EVENT unhandled " + text));
        listener.Register("quit", command =>
        {
            if (Thread.CurrentThread.ManagedThreadId != player.MainThread) player.Fail("a handler ran off the main thread");
            quit = true;
            return null;
        });

        // A second listener with the same id (a reloaded scene) must forward, not open a second connection, and is
        // destroyed at the end of the frame.
        var reloaded = NewListener(player, new GameObject("Bridge (reloaded scene)"), options["url"]);
        Check(reloaded.Client == listener.Client, "a second listener with the same id opened its own connection");
        player.Frame();
        Check(!reloaded, "the duplicate listener should have destroyed itself");

        player.FramesUntil(() => quit || player.Failure != null, "quit from the controller", deadline);
        Check(lamp.enabled, "the lamp should be on after the controller's last \"on\"");
        Check(Math.Abs(lamp.intensity - 2.5f) < 1e-6, "intensity should be 2.5, is " + lamp.intensity);

        // A short pause keeps the connection: compared after the time an (immediate) reconnect would have taken.
        var client = listener.Client;
        int connectionsBefore = client.Connections;
        Player.Message(listener, "OnApplicationPause", true);
        player.Advance(1);
        Player.Message(listener, "OnApplicationPause", false);
        var settle = Stopwatch.StartNew();
        while (settle.Elapsed < TimeSpan.FromSeconds(0.5)) player.Frame();
        Check(client.Connections == connectionsBefore && client.IsConnected,
            "a short pause should not reconnect: connections " + connectionsBefore + " -> " + client.Connections);

        // A long pause (longer than Reconnect After Pause Seconds, 5 s) reconnects at once, without a backoff.
        Player.Message(listener, "OnApplicationPause", true);
        player.Advance(6);
        Player.Message(listener, "OnApplicationPause", false);
        player.FramesUntil(() => client.Connections == connectionsBefore + 1 && client.IsConnected, "a reconnect after a long pause", deadline);
        Emit("EVENT resumed connections=" + client.Connections);

        player.Unload(device, listener);
        Check(CommandListener.Find(options["id"]) == null, "the destroyed listener is still registered");
        Player.WaitUntil(() => client.State == BridgeState.Stopped, "the client to stop after OnDestroy", deadline);
    }

    // ---- this program is the controller too -----------------------------------------------------------

    /// <summary>A controller connection: sends commands to the device and reads the replies it gets.</summary>
    private sealed class Controller
    {
        private static readonly Regex MessageField = new Regex("\"message\":\"((?:[^\"\\\\]|\\\\.)*)\"");
        private readonly BridgeClient client;
        private readonly BlockingCollection<string> replies = new BlockingCollection<string>();
        private readonly string target;

        public Controller(string url, string token, string target)
        {
            this.target = target;
            client = new BridgeClient(new BridgeClientOptions { ServerUrl = url, ClientId = target + "-llm", Token = token });
            client.MessageReceived += frame =>
            {
                var match = MessageField.Match(frame);
                replies.Add(match.Success ? Regex.Unescape(match.Groups[1].Value) : frame);
            };
            client.Start();
            Player.WaitUntil(() => client.IsConnected, "the controller connection", TimeSpan.FromSeconds(10));
        }

        public void Send(string command)
        {
            Check(client.Send("{\"target\":\"" + target + "\",\"message\":\"" + command + "\"}"), "controller send");
        }

        /// <summary>The next reply, pumping frames meanwhile (or not, to simulate a stalled main thread).</summary>
        public string Next(Player player, bool pump = true)
        {
            var until = DateTime.UtcNow + TimeSpan.FromSeconds(10);
            string reply;
            while (!replies.TryTake(out reply, 5))
            {
                if (DateTime.UtcNow > until) throw new CheckFailed("no reply within 10 s");
                if (pump) player.Frame();
            }
            Emit("EVENT reply " + reply);
            return reply;
        }

        public void NoMore(Player player, string what)
        {
            var quiet = Stopwatch.StartNew();
            while (quiet.Elapsed < TimeSpan.FromSeconds(0.3))
            {
                string extra;
                if (replies.TryTake(out extra, 5)) throw new CheckFailed(what + ": unexpected reply " + extra);
                player.Frame();
            }
        }

        public void Stop() { client.Stop(); }
    }

    private static void Lifecycle(Player player)
    {
        string id = options["id"];
        var controller = new Controller(options["url"], options["controller-token"], id);
        using (var proxy = new FreezableProxy(new Uri(options["url"])))
        {
            // The example device appears before any listener (scene order): it must wait, not give up with an error.
            var lampObject = new GameObject("Lamp");
            var lamp = lampObject.AddComponent<Light>();
            var device = player.Add<LightController>(lampObject);
            for (int i = 0; i < 3; i++) player.Frame();

            var host = new GameObject("Bridge");
            Check(Environment.GetEnvironmentVariable("UNITY_CLIENT_TOKEN") == options["token"], "UNITY_CLIENT_TOKEN not set");
            // Close Timeout 3 s: a polite close to a dead socket would take that long (set before Start connects).
            // Protocol V1, as a listener saved in an existing scene has (a new one is V2, see DeviceToken): bare-text
            // commands and refusals, and OnValidate's fix of an out-of-range version (V1) below keeps the wire format.
            var listener = NewListener(player, host, proxy.Url, codeToken: false, configure: l =>
            {
                SetField(l, "closeTimeout", 3f);
                l.ProtocolVersion = 1;
            });
            int connectedEvents = 0;
            var disconnectedEvents = new List<string>();
            listener.ConnectedEvent.AddListener(() => connectedEvents++);
            listener.DisconnectedEvent.AddListener(text => disconnectedEvents.Add(text));
            // One way to subscribe (issue 25 item 10): the C# events are obsolete and forward to the UnityEvents, so code
            // written against them keeps working; a handler removed again is not called.
            int obsoleteConnected = 0;
            var obsoleteDisconnects = new List<BridgeDisconnect>();
            Action removed = () => player.Fail("a removed Connected handler was called");
            Action<BridgeDisconnect> removedToo = info => player.Fail("a removed Disconnected handler was called");
#pragma warning disable 618
            listener.Connected += () => obsoleteConnected++;
            listener.Connected += removed;
            listener.Connected -= removed;
            listener.Disconnected += info => obsoleteDisconnects.Add(info);
            listener.Disconnected += removedToo;
            listener.Disconnected -= removedToo;
#pragma warning restore 618
            Check(listener.LastDisconnect == null, "no disconnect yet");

            // OnValidate: a token typed into the Inspector is not kept unless Token Source = Inspector; bad values are fixed.
            SetField(listener, "token", "typed-into-the-inspector");
            // The Inspector (issue 25 item 10): Status is shown but never editable, Protocol Version is a V1/V2 choice.
            var serialized = BindingFlags.Instance | BindingFlags.NonPublic;
            Check(typeof(CommandListener).GetField("status", serialized).IsDefined(typeof(ReadOnlyFieldAttribute), false),
                "Status is editable in the Inspector");
            Check(typeof(CommandListener).GetField("protocolVersion", serialized).FieldType == typeof(BridgeProtocolVersion),
                "Protocol Version is not the V1/V2 enum");
            SetField(listener, "protocolVersion", (BridgeProtocolVersion)3); // an out-of-range value in a scene file
            SetField(listener, "maxPendingCommands", 0);
            Player.Message(listener, "OnValidate");
            Check((string)Field(listener, "token") == "", "OnValidate should clear an unused Inspector token");
            Check((BridgeProtocolVersion)Field(listener, "protocolVersion") == BridgeProtocolVersion.V1 && (int)Field(listener, "maxPendingCommands") == 1, "OnValidate should fix bad values");
            SetField(listener, "maxPendingCommands", 100);
            int echoes = 0;
            AsyncCommandHandler echo = async command =>
            {
                echoes++;
                if (Thread.CurrentThread.ManagedThreadId != player.MainThread) player.Fail("echo started off the main thread");
                int frame = player.Frames;
                await Task.Yield(); // continues at a later frame, on the main thread (frame-pumped context)
                if (Thread.CurrentThread.ManagedThreadId != player.MainThread) player.Fail("echo resumed off the main thread");
                if (player.Frames == frame) player.Fail("the continuation ran within the same frame");
                return command.Arguments;
            };
            listener.RegisterAsync("echo", echo);
            player.FramesUntil(() => listener.IsConnected, "the listener's connection", deadline);
            player.FramesUntil(() => connectedEvents == 1, "the Connected UnityEvent", deadline);
            Check(disconnectedEvents.Count == 0, "no Disconnected UnityEvent yet: " + string.Join("; ", disconnectedEvents));

            controller.Send("status");
            Check(controller.Next(player) == "light on", "the late device registered with the listener");
            controller.Send("echo hello");
            Check(controller.Next(player) == "hello", "async handler reply");

            // Disabled: refused at once, visibly; enabled again: runs.
            player.Disable(listener);
            controller.Send("echo while-disabled");
            string refused = controller.Next(player, pump: false);
            Check(refused == "error: echo not run: the device is disabled", "disabled: " + refused);
            player.Enable(listener);
            controller.Send("echo enabled");
            Check(controller.Next(player) == "enabled", "enabled again");

            // Application paused: refused at once. A short pause keeps the connection.
            var client = listener.Client;
            int connections = client.Connections;
            Player.Message(listener, "OnApplicationPause", true);
            controller.Send("echo while-paused");
            refused = controller.Next(player, pump: false);
            Check(refused == "error: echo not run: the application is paused", "paused: " + refused);
            player.Advance(1);
            Player.Message(listener, "OnApplicationPause", false);

            // No frames (editor paused, a long frame): the queue is bounded, and what waited too long is refused.
            SetField(listener, "maxPendingCommands", 2);
            int before = echoes;
            controller.Send("echo one");
            controller.Send("echo two");
            controller.Send("echo three");
            refused = controller.Next(player, pump: false);
            Check(refused == "error: echo not run: busy: 2 commands are waiting", "queue bound: " + refused);
            Player.WaitUntil(() => listener.PendingCommands == 2, "two pending commands", deadline);
            player.Advance(11);
            for (int i = 0; i < 2; i++)
            {
                refused = controller.Next(player);
                Check(refused.StartsWith("error: echo not run: it waited 11.0 s for the main thread", StringComparison.Ordinal), "stale: " + refused);
            }
            Check(echoes == before, "stale commands must not run");
            SetField(listener, "maxPendingCommands", 100);

            // A command received on a connection that was replaced before it ran is not run.
            controller.Send("echo old-connection");
            Player.WaitUntil(() => listener.PendingCommands == 1, "one pending command", deadline);
            client.ReconnectNow();
            Player.WaitUntil(() => client.Connections == connections + 1 && client.IsConnected, "the reconnect", deadline);
            refused = controller.Next(player);
            Check(refused == "error: echo not run: it arrived on an earlier connection", "old connection: " + refused);
            Check(disconnectedEvents.Count == 1 && disconnectedEvents[0].Contains("reconnect requested"), "Disconnected UnityEvent: " + string.Join("; ", disconnectedEvents));
            Check(obsoleteConnected == 2 && obsoleteDisconnects.Count == 1 && obsoleteDisconnects[0] == listener.LastDisconnect
                  && listener.LastDisconnect.ToString() == disconnectedEvents[0] && listener.LastDisconnect.WillRetry,
                "the obsolete events forward: connected " + obsoleteConnected + ", disconnects " + obsoleteDisconnects.Count);
            Check(echoes == before, "a command of an old connection must not run");
            connections = client.Connections;

            // Per-frame budget: at most Max Items Per Frame commands run in one frame.
            SetField(listener, "maxItemsPerFrame", 5);
            int counted = 0;
            listener.Register("count", command => { counted++; return null; });
            for (int i = 0; i < 12; i++) controller.Send("count");
            Player.WaitUntil(() => listener.PendingCommands == 12, "twelve pending commands", deadline);
            var perFrame = new List<int>();
            while (counted < 12) { int c = counted; player.Frame(); perFrame.Add(counted - c); }
            Emit("EVENT per-frame " + string.Join(",", perFrame));
            Check(string.Join(",", perFrame) == "5,5,2", "5 per frame expected, saw " + string.Join(",", perFrame));
            SetField(listener, "maxItemsPerFrame", 100);

            // Resume after a long pause on a silently dead socket: reconnect at once, not after the close timeout.
            proxy.Freeze();
            Player.Message(listener, "OnApplicationPause", true);
            player.Advance(10);
            Player.Message(listener, "OnApplicationPause", false);
            var resume = Stopwatch.StartNew();
            player.FramesUntil(() => client.Connections == connections + 1 && client.IsConnected, "the resume reconnect", deadline);
            Emit("EVENT resume-reconnect ms=" + resume.ElapsedMilliseconds);
            Check(resume.Elapsed < TimeSpan.FromSeconds(1.5), "resume reconnect took " + resume.ElapsedMilliseconds + " ms (close timeout 3 s)");
            controller.Send("echo after-resume");
            Check(controller.Next(player) == "after-resume", "commands after the resume");

            // Domain reload (scripts recompiled during play): the old client is closed, the new domain's listener
            // (serialized fields restored, OnEnable only) reconnects instead of showing a stale "connected".
            UnityEditor.AssemblyReloadEvents.RaiseBeforeAssemblyReload();
            Check(client.State == BridgeState.Stopped, "the old client should be stopped before the reload, is " + client.State);
            Player.Message(device, "OnDisable");
            Player.Message(listener, "OnDisable");
            player.Drop(listener);
            player.Drop(device);
            Player.ResetStatics();
            var reloadedHost = new GameObject("Bridge");
            var fresh = reloadedHost.AddComponent<CommandListener>();
            CopySerialized(listener, fresh);
            Player.Message(fresh, "OnEnable");
            player.Track(fresh);
            Check(!fresh.Status.StartsWith("connected", StringComparison.Ordinal), "stale status after reload: " + fresh.Status);
            var freshDevice = lampObject.AddComponent<LightController>();
            CopySerialized(device, freshDevice);
            Player.Message(freshDevice, "Awake");
            Player.Message(freshDevice, "OnEnable");
            player.Track(freshDevice);
            player.FramesUntil(() => fresh.IsConnected, "the reconnect after the domain reload", deadline);
            controller.Send("on");
            Check(controller.Next(player) == "light on", "device handlers after the reload");

            // An additive scene with a listener of the same id: it forwards while it exists and destroys itself at the
            // end of the frame; the first listener keeps the connection and the handlers.
            var additive = NewListener(player, new GameObject("Bridge (additive)"), proxy.Url, codeToken: false);
            Check(additive.Client == fresh.Client, "the additive scene's listener should forward");
            var kept = fresh.Client;
            player.Frame();
            Check(!additive && additive == null, "the duplicate should be destroyed (fake null) after the frame");
            Check(CommandListener.Default == fresh && CommandListener.Find(id) == fresh && fresh.Client == kept, "the first listener stays registered");
            controller.Send("off");
            Check(controller.Next(player) == "light off" && !lamp.enabled, "handlers stay with the first listener");

            // Quitting waits for the clean close at most Quit Wait Seconds (0.5 s), even when the socket is dead;
            // teardown (OnDestroy) never blocks the main thread.
            proxy.Freeze();
            var last = fresh.Client;
            var quitting = Stopwatch.StartNew();
            Player.Message(fresh, "OnApplicationQuit");
            quitting.Stop();
            Emit("EVENT quit ms=" + quitting.ElapsedMilliseconds);
            Check(quitting.Elapsed < TimeSpan.FromSeconds(1.5), "OnApplicationQuit waited " + quitting.ElapsedMilliseconds + " ms (bound 0.5 s)");
            var teardown = Stopwatch.StartNew();
            player.Unload(freshDevice, fresh);
            teardown.Stop();
            Emit("EVENT teardown ms=" + teardown.ElapsedMilliseconds);
            Check(teardown.Elapsed < TimeSpan.FromMilliseconds(100), "OnDestroy blocked the main thread for " + teardown.ElapsedMilliseconds + " ms");
            Player.WaitUntil(() => last.State == BridgeState.Stopped, "the client to stop in the background", deadline);
            controller.Stop();
        }
    }

    /// <summary>Issue 25 item 3: every load of the boot scene brings a listener with the same id. Only the first is
    /// kept (DontDestroyOnLoad); the others destroy themselves with their scene instead of piling up as followers.</summary>
    private static void Reloads(Player player)
    {
        CommandListener first = null;
        Light lamp = null;
        for (int load = 0; load < 3; load++)
        {
            player.LoadScene(() =>
            {
                var listener = NewListener(player, new GameObject("Bridge"), options["url"]);
                if (first == null) first = listener;
                var lampObject = new GameObject("Lamp");
                lamp = lampObject.AddComponent<Light>();
                player.Add<LightController>(lampObject);
            });
            for (int i = 0; i < 3; i++) player.Frame();
            var listeners = player.Live<CommandListener>();
            Check(listeners.Length == 1 && listeners[0] == first,
                "after load " + (load + 1) + ": " + listeners.Length + " listener(s) alive, expected only the first");
        }
        player.FramesUntil(() => first.IsConnected, "the connection", deadline);
        Emit("EVENT connected");
        bool quit = false;
        first.Register("quit", command => { quit = true; return null; });
        player.FramesUntil(() => quit || player.Failure != null, "quit from the controller", deadline);
        Check(!lamp.enabled, "the lamp of the last load should be off");
        Check(first.Client.Connections == 1, "one connection through all the loads, saw " + first.Client.Connections);
        var client = first.Client;
        player.Unload(player.Live<MonoBehaviour>());
        Player.WaitUntil(() => client.State == BridgeState.Stopped, "the client to stop after OnDestroy", deadline);
    }

    /// <summary>Issue 25 item 5: a hidden tab stops the player loop and WebGL players get no OnApplicationPause; the
    /// browser keeps receiving. The time a command waited there counts against Command Max Age.</summary>
    private static void HiddenTab(Player player)
    {
#if WSBRIDGE_WEBGL_TESTS
        var browser = new BrowserSocketEmulation { RequireThread = player.MainThread };
        var listener = NewListener(player, new GameObject("Bridge"), options["url"], configure: l =>
        {
            l.ConfigureClient = o =>
            {
                o.FrameLoop = BridgeFrameLoop.Main;
                o.TransportFactory = () => new WebGLTransport(browser);
            };
            SetField(l, "commandMaxAge", 1f);
        });
        bool quit = false, hide = false;
        int ran = 0;
        listener.Register("echo", command => { ran++; return command.Arguments; });
        listener.Register("hide", command => { hide = true; return "hidden"; });
        listener.Register("quit", command => { quit = true; return null; });
        listener.ConnectedEvent.AddListener(() => Emit("EVENT connected"));
        while (!quit && player.Failure == null)
        {
            player.FramesUntil(() => hide || quit || player.Failure != null, "a command from the controller", deadline);
            if (!hide) break;
            hide = false;
            for (int i = 0; i < 5; i++) player.Frame(); // the "hidden" reply goes out
            int before = ran;
            Emit("EVENT hidden");
            Thread.Sleep(3000); // the tab is hidden: no frame runs while the browser receives
            player.FramesUntil(() => listener.PendingCommands == 0 && browser.Live > 0, "the commands queued while hidden", deadline);
            Check(ran == before, "a command that waited in the hidden tab ran");
        }
        Check(browser.WrongThread == null, browser.WrongThread);
        var client = listener.Client;
        player.Unload(listener);
        // The close frame went out in OnDestroy; the rest of the close needs someone to pump (another listener).
        player.FramesUntil(() => { BridgeTransports.Pump(); return client.State == BridgeState.Stopped; }, "the client to stop after OnDestroy", deadline);
#else
        throw new CheckFailed("built without WSBRIDGE_WEBGL_TESTS");
#endif
    }

    /// <summary>Issue 25 item 2: device players have no environment variables. The editor warns while a build would
    /// have no token; the default source then takes the token from the Resources text asset.</summary>
    private static void DeviceToken(Player player)
    {
        Check(string.IsNullOrEmpty(Environment.GetEnvironmentVariable("UNITY_CLIENT_TOKEN")), "UNITY_CLIENT_TOKEN must not be set here");
        var warnings = new List<string>();
        UnityEngine.Debug.WarningLogged += text => warnings.Add(text);
        UnityEditor.EditorUserBuildSettings.activeBuildTarget = UnityEditor.BuildTarget.WebGL;
        var host = new GameObject("Bridge");
        var listener = host.AddComponent<CommandListener>(); // not yet awake: the Inspector is being edited
        // Issue 25 items 7 and 9: a component added now is V2 (it sends its manifest); saved scenes keep their V1.
        Check((BridgeProtocolVersion)Field(listener, "protocolVersion") == BridgeProtocolVersion.V2 && listener.ProtocolVersion == 2,
            "a new CommandListener should default to protocol V2");
        SetField(listener, "serverUrl", options["url"]);
        SetField(listener, "clientId", options["id"]);
        Player.Message(listener, "OnValidate");
        Check(warnings.Any(w => w.Contains("WebGL build would have no token") && w.Contains("scoped client token")),
            "no editor warning about a WebGL build without a token: " + string.Join(" | ", warnings));
        warnings.Clear();
        UnityEngine.Resources.Assets["WsBridgeToken"] = new TextAsset(options["token"] + "\n");
        Player.Message(listener, "OnValidate");
        Check(!warnings.Any(w => w.Contains("no token")), "warned although the token asset exists: " + string.Join(" | ", warnings));
        bool quit = false;
        listener.Register("ping", command => "pong");
        listener.Register("quit", command => { quit = true; return null; });
        listener.ConnectedEvent.AddListener(() => Emit("EVENT connected"));
        Player.Message(listener, "Awake");
        Player.Message(listener, "OnEnable");
        Player.Message(listener, "Start");
        player.Track(listener);
        player.FramesUntil(() => quit || player.Failure != null, "quit from the controller", deadline);
        var client = listener.Client;
        player.Unload(listener);
        Player.WaitUntil(() => client.State == BridgeState.Stopped, "the client to stop after OnDestroy", deadline);
    }

    /// <summary>Issue 25 items 7 and 6: under v1 a reply is matched to its command by order, so a command that arrives
    /// while an async handler runs waits for it; an async handler's exception is logged, not only replied.</summary>
    private static void V1Order(Player player)
    {
        var listener = NewListener(player, new GameObject("Bridge"), options["url"], configure: l => l.ProtocolVersion = 1);
        bool quit = false, logged = false;
        UnityEngine.Debug.ErrorLogged += text => { if (text.Contains("fuse blown")) logged = true; };
        player.ExpectedErrors = 1;
        listener.RegisterAsync("slow", async command =>
        {
            for (int i = 0; i < 5; i++) await Task.Yield(); // five frames
            return command.Arguments;
        });
        listener.Register("echo", command => command.Arguments);
        listener.RegisterAsync("boom", async command =>
        {
            await Task.Yield();
            throw new InvalidOperationException("fuse blown");
        });
        listener.Register("quit", command => { quit = true; return null; });
        listener.ConnectedEvent.AddListener(() => Emit("EVENT connected"));
        player.FramesUntil(() => quit || player.Failure != null, "quit from the controller", deadline);
        Check(logged && player.ExpectedErrors == 0, "the async handler's exception was not logged");
        var client = listener.Client;
        player.Unload(listener);
        Player.WaitUntil(() => client.State == BridgeState.Stopped, "the client to stop after OnDestroy", deadline);
    }

    /// <summary>Issue 25 item 4: commands that a replaced client delivers after Connect() (its thread was still
    /// receiving) are dropped, and no longer count as pending: before, 100 of them made every later command "busy".</summary>
    private static void StaleClient(Player player)
    {
        // Offline (nothing listens). A listener made from code is V2 until told otherwise; set to V1 after registering
        // (handlers follow the version), the commands below are v1's bare text.
        var listener = NewListener(player, new GameObject("Bridge"), "ws://127.0.0.1:1");
        int ran = 0;
        listener.Register("count", command => { ran++; return null; });
        listener.ProtocolVersion = 1;
        var replaced = listener.Client;
        listener.Connect();
        Check(listener.Client != null && listener.Client != replaced, "Connect() should replace the client");
        var receivedField = typeof(BridgeClient).GetField("MessageReceivedWithAge", BindingFlags.Instance | BindingFlags.NonPublic);
        var fromReplaced = (Action<string, TimeSpan>)receivedField.GetValue(replaced);
        for (int i = 0; i < 100; i++) fromReplaced("count", TimeSpan.Zero); // what the replaced client's receive loop still delivers
        for (int i = 0; i < 3; i++) player.Frame();
        Check(listener.PendingCommands == 0, listener.PendingCommands + " command(s) of the replaced client still counted as pending");
        Check(ran == 0, "a command of the replaced client ran");
        var fromCurrent = (Action<string, TimeSpan>)receivedField.GetValue(listener.Client);
        fromCurrent("count", TimeSpan.Zero);
        player.FramesUntil(() => ran == 1, "the current client's command to run", deadline);
        player.Unload(listener);
    }

    /// <summary>What Unity's serializer keeps across a domain reload: [SerializeField] and public fields.</summary>
    private static void CopySerialized(object from, object to)
    {
        foreach (var field in from.GetType().GetFields(BindingFlags.Instance | BindingFlags.Public | BindingFlags.NonPublic))
        {
            if (field.IsPublic || field.GetCustomAttributes(typeof(SerializeField), false).Length > 0)
                field.SetValue(to, field.GetValue(from));
        }
    }
}
