// ListenerSmoke.cs: drives CommandListener and the example LightController the way the Unity player does
// (Awake, OnEnable, Start, then Update once per frame on one "main" thread), against the real appliance,
// with the UnityEngine stand-in (UnityEngineStub.cs). Used by test_unity_client.py; C# 7.2 (mcs).
//
// Usage: mono ListenerSmoke.exe listener --url U --id ID --token T [--deadline S]
// The controller (Python) sends commands; "quit" ends the run. Exits non-zero with "FAIL: ..." on a failed check.

using System;
using System.Collections.Generic;
using System.Reflection;
using System.Threading;
using UnityEngine;
using WebSocketBridge;
using WebSocketBridge.Examples;

internal static class ListenerSmoke
{
    private static readonly object OutputLock = new object();

    private static void Emit(string line)
    {
        lock (OutputLock)
        {
            Console.Out.WriteLine(line);
            Console.Out.Flush();
        }
    }

    /// <summary>Calls a Unity message (private, like in real scripts) if the component declares it.</summary>
    private static void Message(object component, string name, params object[] args)
    {
        var method = component.GetType().GetMethod(name, BindingFlags.Instance | BindingFlags.Static | BindingFlags.Public | BindingFlags.NonPublic);
        if (method != null) method.Invoke(method.IsStatic ? null : component, args);
    }

    private static int Main(string[] args)
    {
        var options = new Dictionary<string, string>();
        for (int i = 1; i + 1 < args.Length; i += 2) options[args[i].TrimStart('-')] = args[i + 1];
        var deadline = DateTime.UtcNow + TimeSpan.FromSeconds(double.Parse(options["deadline"], System.Globalization.CultureInfo.InvariantCulture));
        int code;
        try
        {
            code = Run(options, deadline);
        }
        catch (Exception e)
        {
            Emit("FAIL: unexpected exception: " + e);
            code = 1;
        }
        // Not a return from Main: see Program.Exit in BridgeClientTests.cs (a Mono 6.8 shutdown hang).
        Console.Out.Flush();
        Environment.Exit(code);
        return code;
    }

    private static int Run(Dictionary<string, string> options, DateTime deadline)
    {
        int mainThread = Thread.CurrentThread.ManagedThreadId;
        typeof(CommandListener).GetMethod("ResetStatics", BindingFlags.Static | BindingFlags.NonPublic).Invoke(null, null);

        var root = new GameObject("Bridge");
        var listener = root.AddComponent<CommandListener>();
        listener.ServerUrl = options["url"];
        listener.ClientId = options["id"];
        listener.Token = options["token"];
        var lampObject = new GameObject("Lamp");
        var lamp = lampObject.AddComponent<Light>();
        var device = lampObject.AddComponent<LightController>();

        bool quit = false;
        string failure = null;
        listener.Connected += () => Emit("EVENT connected");
        listener.UnhandledCommand.AddListener(text => Emit("EVENT unhandled " + text));
        listener.Register("quit", command =>
        {
            if (Thread.CurrentThread.ManagedThreadId != mainThread) failure = "a handler ran off the main thread";
            quit = true;
            return null;
        });

        // Unity's order: CommandListener has DefaultExecutionOrder(-1000), so its Awake/OnEnable come first.
        Message(listener, "Awake");
        Message(listener, "OnEnable");
        Message(device, "Awake");
        Message(device, "OnEnable");
        Message(listener, "Start");
        Message(device, "Start");

        // A second listener with the same id (a reloaded scene) must forward, not open a second connection.
        var reloaded = new GameObject("Bridge (reloaded scene)").AddComponent<CommandListener>();
        reloaded.ClientId = options["id"];
        reloaded.ServerUrl = options["url"];
        reloaded.Token = options["token"];
        Message(reloaded, "Awake");
        Message(reloaded, "Start");
        if (reloaded.Client != listener.Client) failure = "a second listener with the same id opened its own connection";

        while (!quit && failure == null)
        {
            if (DateTime.UtcNow > deadline) { failure = "timed out waiting for the controller's quit"; break; }
            Message(listener, "Update");
            Message(reloaded, "Update");
            Thread.Sleep(5); // one frame
        }

        if (failure == null && !lamp.enabled) failure = "the lamp should be on after the controller's last \"on\"";
        if (failure == null && Math.Abs(lamp.intensity - 2.5f) > 1e-6) failure = "intensity should be 2.5, is " + lamp.intensity;

        // Pause and resume: a short pause keeps the connection.
        var client = listener.Client;
        int connectionsBefore = client.Connections;
        Message(listener, "OnApplicationPause", true);
        Message(listener, "OnApplicationPause", false);
        if (failure == null && client.Connections != connectionsBefore) failure = "a short pause should not reconnect";

        // A long pause (here: any pause, reconnectAfterPauseSeconds = 0) reconnects at once, without a backoff.
        typeof(CommandListener).GetField("reconnectAfterPauseSeconds", BindingFlags.Instance | BindingFlags.NonPublic).SetValue(listener, 0f);
        Message(listener, "OnApplicationPause", true);
        Message(listener, "OnApplicationPause", false);
        while (failure == null && !(client.Connections == connectionsBefore + 1 && client.IsConnected))
        {
            if (DateTime.UtcNow > deadline) failure = "no reconnect after resuming from a long pause";
            Message(listener, "Update");
            Thread.Sleep(5);
        }
        if (failure == null && client.State != BridgeState.Open) failure = "after the resume reconnect the state should be Open, is " + client.State;

        Message(device, "OnDisable");
        Message(device, "OnDestroy");
        Message(listener, "OnDestroy"); // disposes the client: closes with 1000
        if (failure == null && client.State != BridgeState.Stopped) failure = "OnDestroy should stop the client, state " + client.State;
        if (failure == null && CommandListener.Find(options["id"]) != null) failure = "the destroyed listener is still registered";

        if (failure != null)
        {
            Emit("FAIL: " + failure);
            return 1;
        }
        Emit("PASS listener");
        return 0;
    }
}
