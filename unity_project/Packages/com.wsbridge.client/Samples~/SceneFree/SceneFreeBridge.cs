// SceneFreeBridge.cs: the bridge without touching a scene. At startup it creates a hidden root
// GameObject with a CommandListener configured from code and registers two handlers: "ping" (answered
// at once) and "time" (answered by an async handler, on the main thread after a frame).
//
// Configure with environment variables (nothing is saved in scenes or assets):
//   WSBRIDGE_URL        e.g. wss://bridge.example.com (default ws://localhost:8000)
//   WSBRIDGE_CLIENT_ID  e.g. kiosk-7 (default unity-client)
//   UNITY_CLIENT_TOKEN  the client token
// C# 7.2 (compiled with Mono's mcs in the project's tests).

using System;
using System.Globalization;
using System.Threading.Tasks;
using UnityEngine;

namespace WebSocketBridge.Examples
{
    public static class SceneFreeBridge
    {
        /// <summary>The listener created at startup (null before the first scene loaded).</summary>
        public static CommandListener Listener { get; private set; }

        [RuntimeInitializeOnLoadMethod(RuntimeInitializeLoadType.AfterSceneLoad)]
        private static void Boot()
        {
            if (Listener != null) return;
            var host = new GameObject("WebSocket Bridge");
            // Awake and OnEnable run inside AddComponent; Start (which connects) runs before the next frame, so the
            // settings below are in place when it does.
            var listener = host.AddComponent<CommandListener>();
            listener.ServerUrl = Environment.GetEnvironmentVariable("WSBRIDGE_URL") ?? "ws://localhost:8000";
            listener.ClientId = Environment.GetEnvironmentVariable("WSBRIDGE_CLIENT_ID") ?? "unity-client";
            listener.Register("ping", command => "pong");
            listener.RegisterAsync("time", async command =>
            {
                await Task.Yield(); // continues on the main thread at the next frame
                return Time.realtimeSinceStartup.ToString("0.000", CultureInfo.InvariantCulture);
            });
            Listener = listener;
        }
    }
}
