// CommandListener.cs: the Unity side of the WebSocket Bridge. Owns one BridgeClient, runs received
// commands on Unity's main thread through registered handlers, and sends their results back.
//
// C# 7.2 at most: the tests compile this file with Mono's mcs against a stand-in for the UnityEngine
// types it uses (tests/integration/unity/UnityEngineStub.cs), so keep to the Unity API used here or
// extend the stand-in with the same signatures as Unity's.
//
// Usage (see unity_project/README.md): put it on a root GameObject of the first scene, fill in the
// server URL, client id and token, and register handlers from device scripts:
//
//     listener.Register("on", command => { light.enabled = true; return "light on"; });
//
// Threading: BridgeClient raises its events on thread-pool threads; this component only queues them
// and handles them in Update(), so handlers, the Connected/Disconnected events and the fallback all run
// on the main thread and may use any Unity API.

using System;
using System.Collections.Concurrent;
using System.Collections.Generic;
using UnityEngine;
using UnityEngine.Events;

namespace WebSocketBridge
{
    /// <summary>A UnityEvent with the raw text of a command no handler claimed. A concrete subclass so that
    /// it serializes in every Unity version (generic UnityEvent&lt;T&gt; fields need Unity 2020.1+).</summary>
    [Serializable]
    public class UnhandledCommandEvent : UnityEvent<string> { }

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

        [Tooltip("The client token (UNITY_CLIENT_TOKEN). Left empty, the UNITY_CLIENT_TOKEN environment variable is used, " +
                 "which keeps the token out of scenes and version control.")]
        [SerializeField] private string token = "";

        [Tooltip("Connect in Start(). Otherwise call Connect() yourself.")]
        [SerializeField] private bool connectOnStart = true;

        [Header("Reconnect")]
        [Tooltip("Largest delay between reconnect attempts, in seconds.")]
        [SerializeField] private float maxReconnectDelay = 30f;

        [Tooltip("After the app was paused (backgrounded) for longer than this, in seconds, reconnect at once: " +
                 "mobile systems often kill the socket of a suspended app without telling it.")]
        [SerializeField] private float reconnectAfterPauseSeconds = 5f;

        [Header("Commands")]
        [Tooltip("Reply \"error: unknown command <name>\" to commands no handler is registered for.")]
        [SerializeField] private bool replyToUnknownCommands = true;

        [Tooltip("Log every command and reply (never the token).")]
        [SerializeField] private bool logTraffic = false;

        [Tooltip("Called with the raw text of commands no handler is registered for.")]
        [SerializeField] private UnhandledCommandEvent unhandledCommand = new UnhandledCommandEvent();

        [Header("Status (read only)")]
        [SerializeField] private string status = "not connected";

        // Most work items per frame, so a burst of commands cannot stall one frame.
        private const int MaxItemsPerFrame = 100;

        // One listener per client id: a second one with the same id (a reloaded scene) forwards to the first
        // instead of connecting, because a second connection with the same id would replace the first (4010).
        private static readonly Dictionary<string, CommandListener> Primaries = new Dictionary<string, CommandListener>();

        private readonly ConcurrentQueue<Action> mainThreadQueue = new ConcurrentQueue<Action>();
        private readonly CommandDispatcher dispatcher = new CommandDispatcher();
        private CommandListener primary;
        private string registeredId;
        private BridgeClient client;
        private float pausedAt = -1f;

        /// <summary>Raised on the main thread when the connection is up.</summary>
        public event Action Connected;
        /// <summary>Raised on the main thread when the connection ended or an attempt failed.</summary>
        public event Action<BridgeDisconnect> Disconnected;

        /// <summary>The first listener created, for device scripts that are not given one in the Inspector.</summary>
        public static CommandListener Default { get; private set; }

        /// <summary>The listener that owns the connection of a client id, or null.</summary>
        public static CommandListener Find(string id)
        {
            CommandListener found;
            return id != null && Primaries.TryGetValue(id, out found) ? found : null;
        }

        public string ServerUrl { get { return serverUrl; } set { serverUrl = value; } }
        public string ClientId { get { return clientId; } set { clientId = value; } }
        /// <summary>Write-only on purpose: the token is never read back for display or logs.</summary>
        public string Token { set { token = value; } }
        public BridgeClient Client { get { return Owner.client; } }
        public bool IsConnected { get { var c = Owner.client; return c != null && c.IsConnected; } }
        public UnhandledCommandEvent UnhandledCommand { get { return Owner.unhandledCommand; } }
        /// <summary>One line for a status display: connected, reconnecting (and why), or rejected (and why).</summary>
        public string Status { get { return Owner.status; } }

        /// <summary>Replaces protocol v1 (bare text) with another codec, e.g. a later version with command ids.
        /// Handlers registered so far are kept only if you register them again; set it before registering.</summary>
        public void UseCodec(ICommandCodec codec)
        {
            var owner = Owner;
            if (owner != this) { owner.UseCodec(codec); return; }
            dispatcherOverride = new CommandDispatcher(codec);
        }
        private CommandDispatcher dispatcherOverride;
        private CommandDispatcher Dispatcher { get { return dispatcherOverride ?? dispatcher; } }

        // The listener that really owns the connection and the handlers (itself, or the first one with this id).
        private CommandListener Owner { get { return primary != null ? primary : this; } }

        /// <summary>Registers the handler of a command name (main thread). The handler's return value is sent back
        /// as the reply; return null to send nothing. Replaces an existing handler of that name, with a warning.</summary>
        public void Register(string commandName, CommandHandler handler)
        {
            if (Owner.Dispatcher.Register(commandName, handler))
                Debug.LogWarning("[CommandListener] handler for '" + commandName + "' replaced");
        }

        /// <summary>Removes a handler if it is still the one registered for the name (main thread).</summary>
        public void Unregister(string commandName, CommandHandler handler)
        {
            Owner.Dispatcher.Unregister(commandName, handler);
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
            DisposeClient();
            Rekey();
            string effectiveToken = string.IsNullOrEmpty(token) ? Environment.GetEnvironmentVariable("UNITY_CLIENT_TOKEN") : token;
            try
            {
                var options = new BridgeClientOptions
                {
                    ServerUrl = serverUrl,
                    ClientId = clientId,
                    Token = effectiveToken,
                    MaxReconnectDelay = TimeSpan.FromSeconds(Math.Max(1f, maxReconnectDelay)),
                };
                var created = new BridgeClient(options);
                created.Connected += () => Post(created, OnClientConnected);
                created.Disconnected += info => Post(created, () => OnClientDisconnected(info));
                created.MessageReceived += text => Post(created, () => HandleCommand(created, text));
                created.Error += error => Post(created, () => Debug.LogWarning("[CommandListener] " + clientId + ": " + error.Message));
                client = created;
                status = "connecting to " + created.Endpoint;
                created.Start();
            }
            catch (ArgumentException e)
            {
                // Bad Inspector settings: say which, do not throw from a Unity message.
                status = "not connected: " + e.Message;
                Debug.LogError("[CommandListener] cannot connect: " + e.Message, this);
            }
        }

        /// <summary>Closes the connection (1000) and stops reconnecting.</summary>
        public void Disconnect()
        {
            if (primary != null) { primary.Disconnect(); return; }
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
            CommandListener existing;
            if (Primaries.TryGetValue(clientId ?? "", out existing) && existing != null && existing != this)
            {
                primary = existing;
                Debug.Log("[CommandListener] '" + clientId + "' is already connected by a listener that survived a scene " +
                          "change; this one forwards to it", this);
                return;
            }
            registeredId = clientId ?? "";
            Primaries[registeredId] = this;
            if (Default == null) Default = this;
            // Survive scene changes: the connection and the handlers stay. Needs a root GameObject.
            DontDestroyOnLoad(gameObject);
        }

        private void Start()
        {
            if (primary == null && connectOnStart && client == null) Connect();
        }

        private void Update()
        {
            if (primary != null) return;
            Action item;
            for (int i = 0; i < MaxItemsPerFrame && mainThreadQueue.TryDequeue(out item); i++)
            {
                try { item(); }
                catch (Exception e) { Debug.LogException(e, this); }
            }
        }

        private void OnApplicationPause(bool paused)
        {
            if (primary != null || client == null) return;
            if (paused)
            {
                pausedAt = Time.realtimeSinceStartup;
                return;
            }
            float pausedFor = pausedAt < 0 ? 0 : Time.realtimeSinceStartup - pausedAt;
            pausedAt = -1f;
            // A rejected client (bad token, replaced) stays stopped; anything else reconnects now rather than
            // after a backoff delay or a keepalive failure.
            if (client.State == BridgeState.Rejected || client.State == BridgeState.Stopped) return;
            if (!client.IsConnected || pausedFor >= reconnectAfterPauseSeconds) client.ReconnectNow();
        }

        private void OnDestroy()
        {
            if (primary != null) return;
            CommandListener registered;
            if (registeredId != null && Primaries.TryGetValue(registeredId, out registered) && registered == this)
                Primaries.Remove(registeredId);
            if (Default == this) Default = null;
            DisposeClient();
        }

        // ---- handling ------------------------------------------------------------------------

        /// <summary>The client id was changed from code after Awake: file this listener under the new id.</summary>
        private void Rekey()
        {
            string id = clientId ?? "";
            if (registeredId == id) return;
            CommandListener registered;
            if (registeredId != null && Primaries.TryGetValue(registeredId, out registered) && registered == this)
                Primaries.Remove(registeredId);
            if (Primaries.TryGetValue(id, out registered) && registered != null && registered != this)
                Debug.LogWarning("[CommandListener] two listeners now use the client id '" + id + "'; they will replace each other (4010)", this);
            else
                Primaries[id] = this;
            registeredId = id;
        }

        private void Post(BridgeClient source, Action action)
        {
            mainThreadQueue.Enqueue(() =>
            {
                // Events of a client replaced by Connect() are stale.
                if (source == client) action();
            });
        }

        private void HandleCommand(BridgeClient source, string text)
        {
            if (logTraffic) Debug.Log("[CommandListener] " + clientId + " <- " + text);
            var result = Dispatcher.Dispatch(text);
            if (result.Exception != null) Debug.LogException(result.Exception, this);
            string reply = result.Reply;
            if (!result.Handled)
            {
                unhandledCommand.Invoke(text);
                if (replyToUnknownCommands && result.Command != null)
                    reply = "error: unknown command " + result.Command.Name;
            }
            if (reply == null) return;
            if (logTraffic) Debug.Log("[CommandListener] " + clientId + " -> " + reply);
            if (!source.Send(reply)) Debug.LogWarning("[CommandListener] reply dropped: the send queue is full or the client stopped");
        }

        private void OnClientConnected()
        {
            status = "connected to " + client.Endpoint;
            Debug.Log("[CommandListener] " + clientId + " connected to " + client.Endpoint);
            var handler = Connected;
            if (handler != null) handler();
        }

        private void OnClientDisconnected(BridgeDisconnect info)
        {
            if (info.WillRetry)
            {
                status = "reconnecting in " + info.RetryDelay.TotalSeconds.ToString("0.0") + " s (" + info.Reason + ")";
                if (info.WasConnected) Debug.LogWarning("[CommandListener] " + clientId + " disconnected: " + info);
            }
            else if (info.CloseCode == BridgeCloseCodes.Normal || info.CloseCode == null)
            {
                status = "not connected";
            }
            else
            {
                // Final: 4001 bad token, 4002 bad id, 4003 id reserved, 4010 replaced by a newer connection.
                status = "rejected: " + info.CloseCode + " " + info.Reason;
                Debug.LogError("[CommandListener] " + clientId + " gave up: " + info.CloseCode + " " + info.Reason, this);
            }
            var handler = Disconnected;
            if (handler != null) handler(info);
        }

        private void DisposeClient()
        {
            var old = client;
            client = null;
            if (old != null) old.Dispose();
            Action ignored;
            while (mainThreadQueue.TryDequeue(out ignored)) { }
        }
    }
}
