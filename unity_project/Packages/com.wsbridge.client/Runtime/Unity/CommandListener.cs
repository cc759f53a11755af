// CommandListener.cs: the Unity side of the WebSocket Bridge. Owns one BridgeClient, runs received
// commands on Unity's main thread through registered handlers, and sends their results back.
//
// C# 7.2 at most: the tests compile this file with Mono's mcs against a stand-in for the UnityEngine
// types it uses (tests/integration/unity/UnityEngineStub.cs), so keep to the Unity API used here or
// extend the stand-in with the same signatures as Unity's.
//
// Usage (see unity_project/README.md): put it on a root GameObject of the first scene, fill in the
// server URL and client id, provide the token (environment variable UNITY_CLIENT_TOKEN by default, or
// listener.Token from code), and register handlers from device scripts:
//
//     listener.Register("on", command => { light.enabled = true; return "light on"; });
//     listener.RegisterAsync("scan", async command => { await Scan(); return "scanned"; });
//
// Threading: BridgeClient raises its events on thread-pool threads (in WebGL players: on the main thread, in
// the frame loop that Update pumps through BridgeTransports.Pump()); this component only queues them and
// handles them in Update(), so handlers, the Connected/Disconnected UnityEvents and the fallback all run on the
// main thread and may use any Unity API.
//
// Commands never run late in a burst (the time a command waited in the browser of a hidden WebGL tab counts too,
// where OnApplicationPause never comes): while the listener is disabled or the app is paused a command is
// refused at once with an "error: ..." reply; one that waited longer than Command Max Age (editor paused,
// a long frame) or that arrived on a connection since replaced is refused instead of run; the queue is
// bounded (Max Pending Commands) and a command beyond it is refused with "error: busy".

using System;
using System.Collections.Concurrent;
using System.Collections.Generic;
using System.Diagnostics;
using System.Threading;
using System.Threading.Tasks;
using UnityEngine;
using UnityEngine.Events;
using Debug = UnityEngine.Debug;

namespace WebSocketBridge
{
    /// <summary>A UnityEvent with the raw text of a command no handler claimed. A concrete subclass so that
    /// it serializes in every Unity version (generic UnityEvent&lt;T&gt; fields need Unity 2020.1+).</summary>
    [Serializable]
    public class UnhandledCommandEvent : UnityEvent<string> { }

    /// <summary>A UnityEvent with a one-line description of a disconnect (code, reason, retry).</summary>
    [Serializable]
    public class BridgeDisconnectedEvent : UnityEvent<string> { }

    /// <summary>Where the listener takes the client token from.</summary>
    public enum TokenSource
    {
        /// <summary>An environment variable (UNITY_CLIENT_TOKEN by default): nothing is saved in scenes. Where the variable
        /// is not set (Android, iOS and WebGL players have none) the Resources text asset (Token Resource) is used.</summary>
        EnvironmentVariable,
        /// <summary>Only what code sets through <see cref="CommandListener.Token"/> (your own configuration, or a token
        /// fetched at runtime from your game's backend), then Connect().</summary>
        Code,
        /// <summary>The Inspector field: saved into the scene in plain text. Development only.</summary>
        Inspector,
        /// <summary>A text asset in a Resources folder (Token Resource, default Assets/Resources/WsBridgeToken.txt), kept
        /// out of version control: the token source of device builds. In a WebGL build it is public (use a scoped token).</summary>
        Resource,
    }

    /// <summary>Shows a serialized field in the Inspector without letting it be edited (Editor/ReadOnlyFieldDrawer.cs).</summary>
    [AttributeUsage(AttributeTargets.Field)]
    public sealed class ReadOnlyFieldAttribute : PropertyAttribute { }

    /// <summary>The wire protocol version, as the Inspector shows it (serialized as 1 or 2, like the int it replaced).</summary>
    public enum BridgeProtocolVersion
    {
        /// <summary>Bare text commands and replies, matched by order (every appliance).</summary>
        V1 = 1,
        /// <summary>Command ids; replies with reply_to reach only the sending controller.</summary>
        V2 = 2,
    }

    [DisallowMultipleComponent]
    [AddComponentMenu("WebSocket Bridge/Command Listener")]
    // Awake/OnEnable before ordinary scripts, so devices can register handlers in their own OnEnable.
    [DefaultExecutionOrder(-1000)]
    public sealed class CommandListener : MonoBehaviour
    {
        [Header("Connection")]
        [Tooltip("Base URL of the appliance: wss://bridge.example.com (or ws://localhost:8000 for development).")]
        [SerializeField] private string serverUrl = "ws://localhost:8000";

        [Tooltip("This client's id (letters, digits, _ and -, at most 50). Controllers send commands to it.")]
        [SerializeField] private string clientId = "unity-client";

        [Tooltip("Where the client token comes from. The default keeps it out of scenes and version control.")]
        [SerializeField] private TokenSource tokenSource = TokenSource.EnvironmentVariable;

        [Tooltip("The environment variable holding the token (Token Source = Environment Variable).")]
        [SerializeField] private string tokenVariable = "UNITY_CLIENT_TOKEN";

        [Tooltip("The text asset holding the token, as a Resources path (Token Source = Resource, and where the environment " +
                 "variable is not set): Assets/Resources/WsBridgeToken.txt by default. Keep it out of version control.")]
        [SerializeField] private string tokenResource = "WsBridgeToken";

        [Tooltip("Token Source = Inspector only: saved in the scene file in plain text. Development only.")]
        [SerializeField] private string token = "";

        // V2 for new components (it sends the command manifest, and async handlers run side by side). Unity keeps the
        // value saved with an existing component, so listeners in existing scenes and prefabs keep V1.
        [Tooltip("Wire protocol: V2 (the default for a new component: command ids, replies reach only the sending controller, " +
                 "the command manifest) or V1 (bare text matched by order, every appliance; what existing scenes saved).")]
        [SerializeField] private BridgeProtocolVersion protocolVersion = BridgeProtocolVersion.V2;

        [Tooltip("Groups to join at connect; controllers can address them as group:<name>.")]
        [SerializeField] private string[] groups = new string[0];

        [Tooltip("Connect in Start(). Otherwise call Connect() yourself.")]
        [SerializeField] private bool connectOnStart = true;

        [Header("Timeouts and limits")]
        [Tooltip("Limit for opening a connection, in seconds.")]
        [SerializeField] private float connectTimeout = 10f;

        [Tooltip("How long a stop waits to flush queued messages and for the server's close, in seconds.")]
        [SerializeField] private float closeTimeout = 2f;

        [Tooltip("On application quit, wait at most this long for the clean close, in seconds (0: do not wait).")]
        [SerializeField] private float quitWaitSeconds = 0.5f;

        [Tooltip("Outgoing messages kept while disconnected; Send() returns false beyond this.")]
        [SerializeField] private int maxQueuedMessages = 1000;

        [Tooltip("Commands waiting for the main thread; beyond this a command is refused with \"error: busy\".")]
        [SerializeField] private int maxPendingCommands = 100;

        [Tooltip("A command that waited longer than this for the main thread (editor paused, long frame) is refused, in seconds.")]
        [SerializeField] private float commandMaxAge = 10f;

        [Tooltip("Most commands and events handled per frame.")]
        [SerializeField] private int maxItemsPerFrame = 100;

        [Header("Reconnect")]
        [Tooltip("Largest delay between reconnect attempts, in seconds.")]
        [SerializeField] private float maxReconnectDelay = 30f;

        [Tooltip("After the app was paused (backgrounded) for longer than this, in seconds, reconnect at once: " +
                 "mobile systems often kill the socket of a suspended app without telling it.")]
        [SerializeField] private float reconnectAfterPauseSeconds = 5f;

        [Header("Commands")]
        [Tooltip("Reply \"error: unknown command <name>\" to commands no handler is registered for.")]
        [SerializeField] private bool replyToUnknownCommands = true;

        [Tooltip("Protocol v2: send the command manifest (registered commands, descriptions, arguments) after each connect " +
                 "and again when handlers change, so an LLM can list what this client accepts. v1 has no manifest.")]
        [SerializeField] private bool sendManifest = true;

        [Tooltip("Log every command and reply (never the token).")]
        [SerializeField] private bool logTraffic = false;

        [Header("Events")]
        [Tooltip("Called with the raw text of commands no handler is registered for.")]
        [SerializeField] private UnhandledCommandEvent unhandledCommand = new UnhandledCommandEvent();

        [Tooltip("Called on the main thread when the connection is up.")]
        [SerializeField] private UnityEvent connected = new UnityEvent();

        [Tooltip("Called on the main thread when the connection ended or an attempt failed, with a description.")]
        [SerializeField] private BridgeDisconnectedEvent disconnected = new BridgeDisconnectedEvent();

        [Header("Status")]
        [SerializeField, ReadOnlyField] private string status = "not connected";

        // Survives a domain reload (script recompile during play): the listener was connected, so it reconnects.
        [SerializeField, HideInInspector] private bool running;

        // One listener per client id: a second one with the same id (the boot scene loaded again, an additive scene)
        // destroys itself, because a second connection with the same id would replace the first (4010) and a kept
        // duplicate would pile up with every reload. Until it is gone (end of frame) it forwards to the first.
        private static readonly Dictionary<string, CommandListener> Primaries = new Dictionary<string, CommandListener>();
        private static readonly Stopwatch Uptime = Stopwatch.StartNew();

        /// <summary>Seconds on a monotonic clock; replaceable so tests can move time (not Time.*: read off the main thread).</summary>
        internal static Func<double> Clock = () => Uptime.Elapsed.TotalSeconds;

        private readonly ConcurrentQueue<WorkItem> mainThreadQueue = new ConcurrentQueue<WorkItem>();
        // Protocol v1 matches replies to commands by order: while an async handler's reply is pending, later commands
        // wait here (main thread only) and run after it, so a late reply is never taken as the answer to the next one.
        private readonly Queue<WorkItem> heldCommands = new Queue<WorkItem>();
        private Task<string> replyInFlight;
        private CommandDispatcher dispatcher;
        private CommandListener primary;
        private string registeredId;
        private string codeToken;
        private BridgeClient client;
        private int pendingCommands;
        private volatile bool acceptingCommands;
        private volatile bool paused;
        private double pausedAt = -1;
        // The manifest is sent again at the next frame: handlers changed, or a connection opened (main thread only).
        private bool manifestDue;

        // Code that still subscribes through the obsolete C# event Disconnected: its handler and the listener it became.
        private readonly List<KeyValuePair<Action<BridgeDisconnect>, UnityAction<string>>> disconnectForwards =
            new List<KeyValuePair<Action<BridgeDisconnect>, UnityAction<string>>>();
        private BridgeDisconnect lastDisconnect;

        /// <summary>Obsolete: the second way to subscribe. Use ConnectedEvent (the Inspector's Connected, also
        /// <c>ConnectedEvent.AddListener(...)</c> from code); this forwards to it.</summary>
        [Obsolete("Use ConnectedEvent.AddListener(...): the one way to subscribe, the same event the Inspector wires. " +
                  "This C# event forwards to it and will be removed.")]
        public event Action Connected
        {
            add { if (value != null) Owner.connected.AddListener(new UnityAction(value)); }
            remove { if (value != null) Owner.connected.RemoveListener(new UnityAction(value)); }
        }

        /// <summary>Obsolete: the second way to subscribe. Use DisconnectedEvent (the Inspector's Disconnected, also
        /// <c>DisconnectedEvent.AddListener(...)</c> from code) and read LastDisconnect; this forwards to it.</summary>
        [Obsolete("Use DisconnectedEvent.AddListener(...) and LastDisconnect: the one way to subscribe, the same event " +
                  "the Inspector wires. This C# event forwards to it and will be removed.")]
        public event Action<BridgeDisconnect> Disconnected
        {
            add
            {
                if (value == null) return;
                var owner = Owner;
                UnityAction<string> call = text => value(owner.lastDisconnect);
                owner.disconnectForwards.Add(new KeyValuePair<Action<BridgeDisconnect>, UnityAction<string>>(value, call));
                owner.disconnected.AddListener(call);
            }
            remove
            {
                var forwards = Owner.disconnectForwards;
                int at = forwards.FindLastIndex(pair => pair.Key == value);
                if (at < 0) return;
                Owner.disconnected.RemoveListener(forwards[at].Value);
                forwards.RemoveAt(at);
            }
        }

        /// <summary>The listener that owns the connection of the first client id; devices use it when they are not
        /// given one. May be null early (devices should retry, see the LightController sample).</summary>
        public static CommandListener Default { get; private set; }

        /// <summary>The listener that owns the connection of a client id, or null.</summary>
        public static CommandListener Find(string id)
        {
            CommandListener found;
            return id != null && Primaries.TryGetValue(id, out found) && found != null ? found : null;
        }

        public string ServerUrl { get { return serverUrl; } set { serverUrl = value; } }
        public string ClientId { get { return clientId; } set { clientId = value; } }
        /// <summary>Sets the token from code (your own configuration) and selects TokenSource.Code. Write-only on
        /// purpose: the token is never read back for display or logs, and never serialized from here.</summary>
        public string Token { set { codeToken = value; tokenSource = TokenSource.Code; } }
        /// <summary>1 or 2; takes effect at the next Connect(). The handlers registered so far follow it (their built-in
        /// codec is swapped; a codec set with UseCodec is kept).</summary>
        public int ProtocolVersion
        {
            get { return (int)protocolVersion; }
            set { protocolVersion = (BridgeProtocolVersion)value; FollowVersion(dispatcher, value); }
        }
        public string[] Groups { get { return groups; } set { groups = value ?? new string[0]; } }
        public BridgeClient Client { get { return Owner.client; } }
        public bool IsConnected { get { var c = Owner.client; return c != null && c.IsConnected; } }
        public UnhandledCommandEvent UnhandledCommand { get { return Owner.unhandledCommand; } }
        /// <summary>The one way to hear that the connection is up (main thread): the Inspector's Connected, or
        /// <c>ConnectedEvent.AddListener(...)</c> from code.</summary>
        public UnityEvent ConnectedEvent { get { return Owner.connected; } }
        /// <summary>The one way to hear that the connection ended or an attempt failed (main thread), with a one-line
        /// description: the Inspector's Disconnected, or <c>DisconnectedEvent.AddListener(...)</c> from code; the
        /// details (close code, reason, retry) are in LastDisconnect.</summary>
        public BridgeDisconnectedEvent DisconnectedEvent { get { return Owner.disconnected; } }
        /// <summary>The last disconnect (code, reason, whether and when it retries); set before DisconnectedEvent runs.
        /// Null until the first one.</summary>
        public BridgeDisconnect LastDisconnect { get { return Owner.lastDisconnect; } }
        /// <summary>One line for a status display: connected, reconnecting (and why), or rejected (and why).</summary>
        public string Status { get { return Owner.status; } }
        /// <summary>Adjusts the client's options before each Connect() (a custom transport, backoff, a frame loop).</summary>
        public Action<BridgeClientOptions> ConfigureClient { get; set; }
        /// <summary>Commands received and waiting for the main thread.</summary>
        public int PendingCommands { get { return Volatile.Read(ref Owner.pendingCommands); } }

        // Handlers registered before the version was set (a listener made from code is V2 until told otherwise) must read
        // the version the client speaks: swap a built-in codec of the other version; a custom one is the caller's choice.
        private static void FollowVersion(CommandDispatcher handlers, int version)
        {
            if (handlers == null || (version != 1 && version != 2)) return;
            var type = handlers.Codec.GetType();
            if ((type == typeof(TextCommandCodec) && version == 2) || (type == typeof(JsonCommandCodec) && version == 1))
                handlers.Codec = BridgeProtocols.CodecFor(version);
        }

        /// <summary>Replaces the protocol's codec (v1 text or v2 JSON by default). Set it before registering.</summary>
        public void UseCodec(ICommandCodec codec)
        {
            Owner.dispatcher = new CommandDispatcher(codec);
        }

        // The listener that really owns the connection and the handlers (itself, or the first one with this id).
        private CommandListener Owner { get { return primary != null ? primary : this; } }

        private CommandDispatcher Dispatcher
        {
            get
            {
                if (dispatcher == null) dispatcher = new CommandDispatcher(BridgeProtocols.CodecFor(protocolVersion == BridgeProtocolVersion.V2 ? 2 : 1));
                return dispatcher;
            }
        }

        /// <summary>Registers the handler of a command name (main thread). The handler's return value is sent back
        /// as the reply; return null to send nothing. Replaces an existing handler of that name, with a warning.</summary>
        public void Register(string commandName, CommandHandler handler)
        {
            if (Owner.Dispatcher.Register(commandName, handler))
                Debug.LogWarning("[CommandListener] handler for '" + commandName + "' replaced");
            Owner.manifestDue = true;
        }

        /// <summary>Registers a handler and says what it does and which arguments it takes (the command manifest).</summary>
        public void Register(string commandName, CommandHandler handler, string description, params CommandArgument[] arguments)
        {
            Register(commandName, handler);
            Owner.Dispatcher.Describe(commandName, description, arguments);
            Owner.manifestDue = true;
        }

        /// <summary>RegisterAsync with a description and arguments (the command manifest).</summary>
        public void RegisterAsync(string commandName, AsyncCommandHandler handler, string description, params CommandArgument[] arguments)
        {
            RegisterAsync(commandName, handler);
            Owner.Dispatcher.Describe(commandName, description, arguments);
            Owner.manifestDue = true;
        }

        /// <summary>The registered commands with their descriptions and arguments, as the manifest's JSON.</summary>
        public string Manifest { get { return Owner.Dispatcher.ManifestJson(); } }

        /// <summary>Registers a handler that answers later: the task's result is the reply (v2: with reply_to).</summary>
        public void RegisterAsync(string commandName, AsyncCommandHandler handler)
        {
            if (Owner.Dispatcher.RegisterAsync(commandName, handler))
                Debug.LogWarning("[CommandListener] handler for '" + commandName + "' replaced");
            Owner.manifestDue = true;
        }

        /// <summary>Removes a handler if it is still the one registered for the name (main thread).</summary>
        public void Unregister(string commandName, CommandHandler handler)
        {
            if (Owner.Dispatcher.Unregister(commandName, handler)) Owner.manifestDue = true;
        }

        public void Unregister(string commandName, AsyncCommandHandler handler)
        {
            if (Owner.Dispatcher.Unregister(commandName, handler)) Owner.manifestDue = true;
        }

        /// <summary>Sends a text message to the controllers (any thread). False if it could not be queued.</summary>
        public bool Send(string text)
        {
            var c = Owner.client;
            return c != null && c.Send(text);
        }

        /// <summary>(Re)connects with the current Inspector settings.</summary>
        public void Connect()
        {
            if (primary != null) { primary.Connect(); return; }
            var previous = DisposeClient();
            Rekey();
            running = true;
            try
            {
                if (string.IsNullOrEmpty(EffectiveToken())) throw new ArgumentException(MissingTokenHelp());
                var options = new BridgeClientOptions
                {
                    ServerUrl = serverUrl,
                    ClientId = clientId,
                    Token = EffectiveToken(),
                    ProtocolVersion = protocolVersion == BridgeProtocolVersion.V2 ? 2 : 1,
                    Groups = groups ?? new string[0],
                    MaxReconnectDelay = TimeSpan.FromSeconds(Math.Max(1f, maxReconnectDelay)),
                    ConnectTimeout = TimeSpan.FromSeconds(Math.Max(0.1f, connectTimeout)),
                    CloseTimeout = TimeSpan.FromSeconds(Math.Max(0.1f, closeTimeout)),
                    MaxQueuedMessages = Math.Max(1, maxQueuedMessages),
                };
                if (ConfigureClient != null) ConfigureClient(options);
                FollowVersion(dispatcher, options.ProtocolVersion);
                if (dispatcher != null && dispatcher.Codec is JsonCommandCodec != (options.ProtocolVersion == 2))
                    Debug.LogWarning("[CommandListener] the codec does not match protocol version " + options.ProtocolVersion, this);
                var created = new BridgeClient(options);
                created.Connected += () => Post(created, OnClientConnected);
                created.Disconnected += info => Post(created, () => OnClientDisconnected(info));
                created.MessageReceivedWithAge += (text, age) => Receive(created, text, age);
                created.Error += error => Post(created, () => Debug.LogWarning("[CommandListener] " + clientId + ": " + error.Message));
                client = created;
                status = "connecting to " + created.Endpoint;
                // After the previous connection's close (in the background): the server then releases the id before
                // this one claims it, so the two never replace each other (4010).
                if (previous == null || previous.IsCompleted) created.Start();
                // ExecuteSynchronously: where the previous client ends, not on a pool thread (WebGL has none that runs).
                else previous.ContinueWith(t => { if (Volatile.Read(ref client) == created) created.Start(); }, TaskContinuationOptions.ExecuteSynchronously);
            }
            catch (ArgumentException e)
            {
                // Bad Inspector settings: say which, do not throw from a Unity message.
                running = false;
                status = "not connected: " + e.Message;
                Debug.LogError("[CommandListener] cannot connect: " + e.Message, this);
            }
        }

        /// <summary>Closes the connection (1000) and stops reconnecting. Does not block: the close completes in the
        /// background (Client.Completion).</summary>
        public void Disconnect()
        {
            if (primary != null) { primary.Disconnect(); return; }
            running = false;
            DisposeClient();
            status = "not connected";
        }

        // ---- Unity messages -------------------------------------------------------------------

        [RuntimeInitializeOnLoadMethod(RuntimeInitializeLoadType.SubsystemRegistration)]
        private static void ResetStatics()
        {
            // Entering play mode without a domain reload keeps statics; start clean.
            Primaries.Clear();
            Default = null;
        }

        private void Awake()
        {
            // A duplicate is not kept across loads: it goes with its scene (and destroys itself in OnEnable).
            if (IsDuplicate()) return;
            // Survive scene changes: the connection and the handlers stay. Needs a root GameObject.
            DontDestroyOnLoad(gameObject);
        }

        /// <summary>Another live listener already owns this client id.</summary>
        private bool IsDuplicate()
        {
            CommandListener existing;
            return Primaries.TryGetValue(clientId ?? "", out existing) && existing != null && existing && existing != this;
        }

        private void OnEnable()
        {
            // Registration happens here, not in Awake: after a domain reload (scripts recompiled during play) Unity
            // calls OnEnable but not Awake, and the statics are empty again.
            Enlist();
            acceptingCommands = true;
#if UNITY_EDITOR
            UnityEditor.AssemblyReloadEvents.beforeAssemblyReload += OnBeforeAssemblyReload;
#endif
            if (primary == null && running && client == null)
            {
                // The domain was reloaded while connected: the old client is gone; connect again rather than show a
                // stale "connected" status.
                status = "reconnecting after a script reload";
                Connect();
            }
        }

        private void OnDisable()
        {
            acceptingCommands = false;
#if UNITY_EDITOR
            UnityEditor.AssemblyReloadEvents.beforeAssemblyReload -= OnBeforeAssemblyReload;
#endif
            // Commands waiting for a main thread this component no longer runs on are refused, not run later.
            RefuseQueued("the device is disabled");
        }

        private void Start()
        {
            if (primary == null && connectOnStart && client == null) Connect();
        }

        private void OnValidate()
        {
            if (protocolVersion != BridgeProtocolVersion.V1 && protocolVersion != BridgeProtocolVersion.V2) protocolVersion = BridgeProtocolVersion.V1;
            connectTimeout = Mathf.Max(0.1f, connectTimeout);
            closeTimeout = Mathf.Max(0.1f, closeTimeout);
            quitWaitSeconds = Mathf.Clamp(quitWaitSeconds, 0f, 5f);
            maxQueuedMessages = Math.Max(1, maxQueuedMessages);
            maxPendingCommands = Math.Max(1, maxPendingCommands);
            maxItemsPerFrame = Math.Max(1, maxItemsPerFrame);
            commandMaxAge = Mathf.Max(0.1f, commandMaxAge);
            maxReconnectDelay = Mathf.Max(1f, maxReconnectDelay);
            if (!string.IsNullOrEmpty(clientId) && !BridgeClient.ClientIdPattern.IsMatch(clientId))
                Debug.LogWarning("[CommandListener] client id '" + clientId + "' must match ^[a-zA-Z0-9_-]{1,50}$", this);
            if (tokenSource != TokenSource.Inspector && !string.IsNullOrEmpty(token))
            {
                // Do not keep a token in the scene that is not even used.
                token = "";
                Debug.LogWarning("[CommandListener] the Inspector token is only kept with Token Source = Inspector; cleared", this);
            }
#if UNITY_EDITOR
            WarnIfBuildsHaveNoToken();
#endif
        }

        private void Update()
        {
            BridgeTransports.Pump(); // WebGL: the browser's socket events (no-op elsewhere)
            // A duplicate (destroyed at the end of this frame) has nothing to run.
            if (primary != null) return;
            for (int i = 0; i < maxItemsPerFrame; i++)
            {
                WorkItem item;
                if (replyInFlight == null && heldCommands.Count > 0) item = heldCommands.Dequeue();
                else if (!mainThreadQueue.TryDequeue(out item)) break;
                if (item.Text != null && replyInFlight != null)
                {
                    heldCommands.Enqueue(item);
                    continue;
                }
                try { item.Run(this); }
                catch (Exception e) { Debug.LogException(e, this); }
            }
            if (manifestDue) SendManifest();
        }

        /// <summary>Protocol v2: the registered handlers as the client's manifest (once per frame at most: a device
        /// registering five handlers sends one manifest). Kept due while not connected: sent after the next connect.</summary>
        private void SendManifest()
        {
            if (!sendManifest || protocolVersion != BridgeProtocolVersion.V2 || client == null || !client.IsConnected) return;
            manifestDue = false;
            if (logTraffic) Debug.Log("[CommandListener] " + clientId + " -> manifest");
            if (!client.Send(Dispatcher.ManifestJson())) Debug.LogWarning("[CommandListener] manifest not sent: the send queue is full");
        }

        /// <summary>The appliance's answer to the manifest: logged, never handled as a command.</summary>
        private void OnManifestAnswer(bool accepted, string detail, string text)
        {
            if (!accepted) Debug.LogWarning("[CommandListener] the appliance refused the manifest: " + detail, this);
            else if (logTraffic) Debug.Log("[CommandListener] " + clientId + " <- " + text);
        }

        private void OnApplicationPause(bool pause)
        {
            if (primary != null || client == null) return;
            if (pause)
            {
                paused = true;
                pausedAt = Clock();
                return;
            }
            paused = false;
            double pausedFor = pausedAt < 0 ? 0 : Clock() - pausedAt;
            pausedAt = -1;
            // A rejected client (bad token, replaced) stays stopped; anything else reconnects now rather than
            // after a backoff delay or a keepalive failure, without waiting for a close on the probably dead socket.
            if (client.State == BridgeState.Rejected || client.State == BridgeState.Stopped) return;
            if (!client.IsConnected || pausedFor >= reconnectAfterPauseSeconds) client.ReconnectImmediately();
        }

        private void OnApplicationQuit()
        {
            // The only place that waits, briefly: a clean 1000 close lets the appliance release the id at once.
            if (primary != null || client == null) return;
            running = false;
            var old = client;
            client = null;
            old.Stop(TimeSpan.FromSeconds(quitWaitSeconds));
        }

        private void OnDestroy()
        {
            CommandListener registered;
            if (registeredId != null && Primaries.TryGetValue(registeredId, out registered) && registered == this)
                Primaries.Remove(registeredId);
            if (primary != null) return;
            // Never blocks the main thread: the client closes in the background.
            var closing = DisposeClient();
            // WebGL: the frame loop is pumped by listeners' Update; run the flush and the close frame now, in case
            // this was the last listener (the browser completes the close handshake by itself).
            if (closing != null && !closing.IsCompleted) BridgeTransports.Pump();
            if (Default == this) Default = null;
        }

#if UNITY_EDITOR
        private void OnBeforeAssemblyReload()
        {
            // The domain is about to be unloaded with every thread of the old client: close it now (bounded) instead
            // of leaving an abandoned socket; OnEnable after the reload reconnects because running stays true.
            if (primary != null || client == null) return;
            var old = client;
            client = null;
            old.Stop(TimeSpan.FromSeconds(quitWaitSeconds));
            status = "stopped for a script reload";
        }
#endif

        // ---- registration ---------------------------------------------------------------------

        private void Enlist()
        {
            string id = clientId ?? "";
            CommandListener existing;
            if (Primaries.TryGetValue(id, out existing) && existing != null && existing && existing != this)
            {
                if (primary != existing)
                {
                    // Handlers registered with this one meanwhile (devices of the same scene, in their OnEnable) go to
                    // the listener that owns the connection; this one is gone at the end of the frame.
                    primary = existing;
                    Debug.Log("[CommandListener] '" + id + "' already has a listener (kept across scene loads); this duplicate destroys itself", this);
                    Destroy(this);
                }
                return;
            }
            primary = null;
            registeredId = id;
            Primaries[id] = this;
            if (Default == null || !Default) Default = this;
        }

        /// <summary>The client id was changed from code after OnEnable: file this listener under the new id.</summary>
        private void Rekey()
        {
            string id = clientId ?? "";
            if (registeredId == id) return;
            CommandListener registered;
            if (registeredId != null && Primaries.TryGetValue(registeredId, out registered) && registered == this)
                Primaries.Remove(registeredId);
            if (Primaries.TryGetValue(id, out registered) && registered != null && registered && registered != this)
                Debug.LogWarning("[CommandListener] two listeners now use the client id '" + id + "'; they will replace each other (4010)", this);
            else
                Primaries[id] = this;
            registeredId = id;
        }

        private string EffectiveToken()
        {
            switch (tokenSource)
            {
                case TokenSource.Inspector: return token;
                case TokenSource.Code: return codeToken;
                case TokenSource.Resource: return ResourceToken();
                default:
                    var value = Environment.GetEnvironmentVariable(TokenVariable);
                    return string.IsNullOrEmpty(value) ? ResourceToken() : value;
            }
        }

        private string TokenVariable { get { return string.IsNullOrEmpty(tokenVariable) ? "UNITY_CLIENT_TOKEN" : tokenVariable; } }
        private string TokenResource { get { return string.IsNullOrEmpty(tokenResource) ? "WsBridgeToken" : tokenResource; } }

        /// <summary>The token in the Resources text asset (whitespace around it ignored), or null.</summary>
        private string ResourceToken()
        {
            var asset = Resources.Load<TextAsset>(TokenResource);
            if (asset == null) return null;
            var text = asset.text.Trim();
            return text.Length > 0 ? text : null;
        }

        private string MissingTokenHelp()
        {
            switch (tokenSource)
            {
                case TokenSource.Code: return "no token: set listener.Token from code (your configuration, or fetched from your backend) before Connect()";
                case TokenSource.Inspector: return "no token in the Inspector field";
                case TokenSource.Resource: return "no token: add the text asset Resources/" + TokenResource + " (keep it out of version control)";
                default:
                    return "no token: neither the environment variable " + TokenVariable + " (editor, desktop) nor the text asset Resources/" +
                           TokenResource + " (device builds have no environment variables) is set";
            }
        }

#if UNITY_EDITOR
        /// <summary>Warns in the editor when a build for the active target would have no token (device players have no
        /// environment variables).</summary>
        private void WarnIfBuildsHaveNoToken()
        {
            var target = UnityEditor.EditorUserBuildSettings.activeBuildTarget;
            bool noEnvironment = target == UnityEditor.BuildTarget.Android || target == UnityEditor.BuildTarget.iOS ||
                                 target == UnityEditor.BuildTarget.WebGL;
            if (!noEnvironment) return;
            if (tokenSource == TokenSource.Code || (tokenSource == TokenSource.Inspector && !string.IsNullOrEmpty(token))) return;
            if (ResourceToken() != null) return;
            Debug.LogWarning("[CommandListener] a " + target + " build would have no token: players on " + target +
                             " have no environment variables. Add Assets/Resources/" + TokenResource + ".txt (out of version control), " +
                             "or set listener.Token from code." + (target == UnityEditor.BuildTarget.WebGL
                                 ? " A token in a WebGL build is public: use a scoped client token." : ""), this);
        }
#endif

        // ---- handling ------------------------------------------------------------------------

        /// <summary>One thing for the main thread: an event of a client, or a received command.</summary>
        private struct WorkItem
        {
            public BridgeClient Source;
            public Action Event;
            public string Text;
            public double ReceivedAt;
            public int Connection;

            public void Run(CommandListener listener)
            {
                // Events and commands of a client replaced by Connect() are stale; a stale command still leaves the count.
                if (Source != listener.client)
                {
                    if (Text != null) Interlocked.Decrement(ref listener.pendingCommands);
                    return;
                }
                if (Event != null) Event();
                else listener.HandleCommand(this);
            }
        }

        private void Post(BridgeClient source, Action action)
        {
            mainThreadQueue.Enqueue(new WorkItem { Source = source, Event = action });
        }

        /// <summary>On the client's thread: queue the command, or refuse it at once when it could only run late.</summary>
        private void Receive(BridgeClient source, string text, TimeSpan waited)
        {
            bool accepted;
            string detail;
            if (source.ProtocolVersion == 2 && BridgeProtocols.TryReadManifestAnswer(text, out accepted, out detail))
            {
                Post(source, () => OnManifestAnswer(accepted, detail, text));
                return;
            }
            string refusal = null;
            if (!acceptingCommands) refusal = "the device is disabled";
            else if (paused) refusal = "the application is paused";
            else if (Interlocked.Increment(ref pendingCommands) > maxPendingCommands)
            {
                Interlocked.Decrement(ref pendingCommands);
                refusal = "busy: " + maxPendingCommands + " commands are waiting";
            }
            if (refusal != null)
            {
                Refuse(source, text, refusal);
                return;
            }
            // The time it waited before the client could read it counts (WebGL: in the browser while the tab was hidden).
            mainThreadQueue.Enqueue(new WorkItem { Source = source, Text = text, ReceivedAt = Clock() - waited.TotalSeconds, Connection = source.ConnectionNumber });
        }

        /// <summary>Replies "error: ..." to a command that is not run (any thread: only the codec is used).</summary>
        private void Refuse(BridgeClient source, string text, string why)
        {
            // The dispatcher is main-thread only; its codec is stateless and safe here.
            var current = dispatcher;
            var codec = current != null ? current.Codec : BridgeProtocols.CodecFor(source.ProtocolVersion);
            BridgeCommand command;
            if (!codec.TryDecode(text, out command)) return;
            if (!source.Send(codec.EncodeReply(command, "error: " + command.Name + " not run: " + why)))
                Debug.LogWarning("[CommandListener] refusal dropped: the send queue is full or the client stopped");
        }

        private void RefuseQueued(string why)
        {
            var keep = new List<WorkItem>();
            WorkItem item;
            while (heldCommands.Count > 0)
            {
                item = heldCommands.Dequeue();
                Interlocked.Decrement(ref pendingCommands);
                if (item.Source == client) Refuse(item.Source, item.Text, why);
            }
            while (mainThreadQueue.TryDequeue(out item))
            {
                if (item.Text == null) { keep.Add(item); continue; }
                Interlocked.Decrement(ref pendingCommands);
                if (item.Source == client) Refuse(item.Source, item.Text, why);
            }
            foreach (var kept in keep) mainThreadQueue.Enqueue(kept);
        }

        private void HandleCommand(WorkItem item)
        {
            Interlocked.Decrement(ref pendingCommands);
            var source = item.Source;
            string text = item.Text;
            if (item.Connection != source.ConnectionNumber)
            {
                // Arrived on a connection that has since been replaced (ReconnectNow, resume): not run.
                Refuse(source, text, "it arrived on an earlier connection");
                return;
            }
            double age = Clock() - item.ReceivedAt;
            if (age > commandMaxAge)
            {
                Refuse(source, text, "it waited " + age.ToString("0.0", System.Globalization.CultureInfo.InvariantCulture) +
                                     " s for the main thread (limit " + commandMaxAge + " s)");
                return;
            }
            if (logTraffic) Debug.Log("[CommandListener] " + clientId + " <- " + text);
            var result = Dispatcher.Dispatch(text);
            if (result.Exception != null) Debug.LogException(result.Exception, this);
            string reply = result.Reply;
            if (!result.Handled)
            {
                unhandledCommand.Invoke(text);
                if (replyToUnknownCommands && result.Command != null)
                    reply = Dispatcher.EncodeError(result.Command, "unknown command " + result.Command.Name);
            }
            if (result.PendingReply != null)
            {
                if (!(Dispatcher.Codec is JsonCommandCodec)) replyInFlight = result.PendingReply; // v1: one at a time
                SendLater(source, result.PendingReply, result.HandlerTask);
                return;
            }
            SendReply(source, reply);
        }

        private async void SendLater(BridgeClient source, Task<string> pending, Task handler)
        {
            // Awaited on the main thread's SynchronizationContext: the continuation runs in a later frame there.
            string reply = await pending;
            // The reply says "error: ..."; the exception itself is logged like a synchronous handler's.
            if (handler != null && handler.IsFaulted) Debug.LogException(handler.Exception.GetBaseException(), this);
            if (replyInFlight == pending) replyInFlight = null;
            SendReply(source, reply);
        }

        private void SendReply(BridgeClient source, string reply)
        {
            if (reply == null) return;
            if (logTraffic) Debug.Log("[CommandListener] " + clientId + " -> " + reply);
            if (!source.Send(reply)) Debug.LogWarning("[CommandListener] reply dropped: the send queue is full or the client stopped");
        }

        private void OnClientConnected()
        {
            status = "connected to " + client.Endpoint;
            Debug.Log("[CommandListener] " + clientId + " connected to " + client.Endpoint);
            manifestDue = true;
            SendManifest();
            connected.Invoke();
        }

        private void OnClientDisconnected(BridgeDisconnect info)
        {
            if (info.WillRetry)
            {
                status = "reconnecting in " + info.RetryDelay.TotalSeconds.ToString("0.0") + " s (" + info.Reason + ")";
                if (info.WasConnected) Debug.LogWarning("[CommandListener] " + clientId + " disconnected: " + info);
            }
            else if (info.CloseCode == BridgeCloseCodes.Normal || (info.CloseCode == null && client.State != BridgeState.Rejected))
            {
                status = "not connected";
            }
            else
            {
                // Final: 4001 bad token, 4002 bad id, 4003 id reserved, 4010 replaced, 4011 token expired or revoked,
                // or no close code: the appliance does not speak the requested protocol version.
                running = false;
                status = "rejected: " + (info.CloseCode.HasValue ? info.CloseCode + " " : "") + info.Reason;
                Debug.LogError("[CommandListener] " + clientId + " gave up: " + status, this);
            }
            lastDisconnect = info;
            disconnected.Invoke(info.ToString());
        }

        /// <summary>Stops the client without waiting; returns the task that completes when it has closed, or null.</summary>
        private Task DisposeClient()
        {
            var old = client;
            Volatile.Write(ref client, null);
            WorkItem item;
            while (mainThreadQueue.TryDequeue(out item)) if (item.Text != null) Interlocked.Decrement(ref pendingCommands);
            while (heldCommands.Count > 0) { heldCommands.Dequeue(); Interlocked.Decrement(ref pendingCommands); }
            replyInFlight = null;
            return old != null ? old.StopAsync() : null; // non-blocking: teardown never waits for the network
        }
    }
}
