// SceneFreeBridge.cs: the bridge without touching a scene. At startup it creates a hidden root
// GameObject with a CommandListener configured from code and registers two handlers: "ping" (answered
// at once) and "time" (answered by an async handler, on the main thread after a frame).
//
// Configure with environment variables in the editor and on desktop (nothing is saved in scenes):
//   WSBRIDGE_URL        e.g. wss://bridge.example.com (default ws://localhost:8000)
//   WSBRIDGE_CLIENT_ID  e.g. kiosk-7 (default unity-client)
//   UNITY_CLIENT_TOKEN  the client token
// Android, iOS and WebGL players have no environment variables: there the token comes from the text asset
// Assets/Resources/WsBridgeToken.txt (keep it out of version control; in a WebGL build it is public, so use a
// scoped client token), or set listener.Token from code (e.g. fetched from your backend) and call Connect().
// The listener is new every run, so it uses protocol V2 (the default of a new CommandListener): replies carry the
// command's id, the async handler runs side by side with others, and "ping" and "time" are sent as the command
// manifest. For an appliance without v2, set listener.ProtocolVersion = 1 here.
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
