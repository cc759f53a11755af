// UnityHarness.cs: what the mono tests need to run Unity components closer to the real player:
// a frame-pumped SynchronizationContext on the main thread (like UnitySynchronizationContext: await
// continuations run at the next frame), a controllable clock for CommandListener, failing on any logged
// error, Unity's message order for enable/disable/destroy with fake-null objects, and a TCP proxy whose
// connections can be frozen to make a socket silently dead. C# 7.2 (mcs).

using System;
using System.Collections.Generic;
using System.Linq;
using System.Net;
using System.Net.Sockets;
using System.Reflection;
using System.Threading;
using System.Threading.Tasks;
using UnityEngine;
using WebSocketBridge;

/// <summary>Posted continuations run on the main thread at the start of the next frame.</summary>
internal sealed class FrameContext : SynchronizationContext
{
    private readonly Queue<KeyValuePair<SendOrPostCallback, object>> posted = new Queue<KeyValuePair<SendOrPostCallback, object>>();

    public override void Post(SendOrPostCallback callback, object state)
    {
        lock (posted) posted.Enqueue(new KeyValuePair<SendOrPostCallback, object>(callback, state));
    }

    public override void Send(SendOrPostCallback callback, object state)
    {
        throw new NotSupportedException("Send on the main thread context would deadlock in Unity too");
    }

    public void RunPosted()
    {
        // Only what was posted before this frame started, like Unity.
        int count;
        lock (posted) count = posted.Count;
        for (int i = 0; i < count; i++)
        {
            KeyValuePair<SendOrPostCallback, object> item;
            lock (posted) item = posted.Dequeue();
            item.Key(item.Value);
        }
    }
}

/// <summary>A player loop: components get their Unity messages in Unity's order on this (main) thread.</summary>
internal sealed class Player
{
    private readonly List<MonoBehaviour> live = new List<MonoBehaviour>();
    private readonly FrameContext context = new FrameContext();
    private double now = 1000;
    public readonly int MainThread = Thread.CurrentThread.ManagedThreadId;
    public string Failure;
    public int ExpectedErrors;
    public int Frames;

    public Player()
    {
        SynchronizationContext.SetSynchronizationContext(context);
        // The listener's clock is this controllable one.
        typeof(CommandListener).GetField("Clock", BindingFlags.Static | BindingFlags.NonPublic)
            .SetValue(null, new Func<double>(() => Volatile.Read(ref now)));
        UnityEngine.Debug.ErrorLogged += text =>
        {
            if (Interlocked.Decrement(ref ExpectedErrors) < 0) Fail("an error was logged: " + text);
        };
        ResetStatics();
    }

    public static void ResetStatics()
    {
        typeof(CommandListener).GetMethod("ResetStatics", BindingFlags.Static | BindingFlags.NonPublic).Invoke(null, null);
    }

    public void Fail(string message)
    {
        if (Failure == null) Failure = message;
    }

    public void Advance(double seconds)
    {
        Volatile.Write(ref now, Volatile.Read(ref now) + seconds);
    }

    /// <summary>Calls a Unity message (private, like in real scripts) if the component declares it.</summary>
    public static void Message(object component, string name, params object[] args)
    {
        var method = component.GetType().GetMethod(name, BindingFlags.Instance | BindingFlags.Public | BindingFlags.NonPublic);
        if (method != null) method.Invoke(component, args);
    }

    /// <summary>Awake and OnEnable now (Start runs before the first Update, as in Unity).</summary>
    public T Add<T>(GameObject host, Action<T> configure = null) where T : MonoBehaviour, new()
    {
        var component = host.AddComponent<T>();
        if (configure != null) configure(component);
        Message(component, "Awake");
        Message(component, "OnEnable");
        Message(component, "Start");
        live.Add(component);
        return component;
    }

    public void Disable(MonoBehaviour component)
    {
        component.enabled = false;
        Message(component, "OnDisable");
    }

    public void Enable(MonoBehaviour component)
    {
        component.enabled = true;
        Message(component, "OnEnable");
    }

    /// <summary>Scene unload: OnDisable of all, then OnDestroy of all, in the given order; afterwards they are fake null.</summary>
    public void Unload(params MonoBehaviour[] components)
    {
        foreach (var c in components) if (c.enabled) Message(c, "OnDisable");
        foreach (var c in components)
        {
            Message(c, "OnDestroy");
            UnityEngine.Object.DestroyImmediate(c);
            live.Remove(c);
        }
    }

    /// <summary>Forgets a component without Unity messages (its domain is gone).</summary>
    public void Drop(MonoBehaviour component)
    {
        live.Remove(component);
    }

    public void Track(MonoBehaviour component)
    {
        live.Add(component);
    }

    public void Frame()
    {
        Frames++;
        context.RunPosted();
        foreach (var c in live.ToArray()) if (c && c.enabled) Message(c, "Update");
        DestroyScheduled();
        Thread.Sleep(2);
    }

    /// <summary>What Object.Destroy scheduled during the frame: OnDisable and OnDestroy now, fake null afterwards.</summary>
    public void DestroyScheduled()
    {
        UnityEngine.Object[] scheduled;
        lock (UnityEngine.Object.DestroyQueue)
        {
            scheduled = UnityEngine.Object.DestroyQueue.ToArray();
            UnityEngine.Object.DestroyQueue.Clear();
        }
        foreach (var target in scheduled)
        {
            var host = target as GameObject;
            var components = host != null ? host.Components.OfType<MonoBehaviour>().ToArray() : new[] { target as MonoBehaviour };
            Unload(components.Where(c => c != null && c).ToArray());
            if (host != null) UnityEngine.Object.DestroyImmediate(host);
        }
    }

    /// <summary>A single-mode scene load: every object not kept by DontDestroyOnLoad is unloaded, then
    /// <paramref name="load"/> adds the new scene's objects (Awake, OnEnable, Start).</summary>
    public void LoadScene(Action load)
    {
        Unload(live.Where(c => c && !c.gameObject.KeptAcrossLoads).ToArray());
        load();
    }

    /// <summary>The live components of a type (like FindObjectsOfType).</summary>
    public T[] Live<T>() where T : MonoBehaviour
    {
        return live.OfType<T>().Where(c => c).ToArray();
    }

    public void FramesUntil(Func<bool> condition, string what, TimeSpan within)
    {
        var until = DateTime.UtcNow + within;
        while (!condition())
        {
            if (DateTime.UtcNow > until) throw new TimeoutException("no " + what + " within " + within.TotalSeconds + " s");
            Frame();
        }
    }

    public static void WaitUntil(Func<bool> condition, string what, TimeSpan within)
    {
        var until = DateTime.UtcNow + within;
        while (!condition())
        {
            if (DateTime.UtcNow > until) throw new TimeoutException("no " + what + " within " + within.TotalSeconds + " s");
            Thread.Sleep(5); // polling interval of a bounded wait
        }
    }
}

/// <summary>Forwards TCP to the appliance; Freeze() makes the current connections silently dead (nothing passes,
/// nothing is closed), like a socket of a suspended app or a pulled cable. New connections pass.</summary>
internal sealed class FreezableProxy : IDisposable
{
    private readonly TcpListener listener = new TcpListener(IPAddress.Loopback, 0);
    private readonly List<Pipe> pipes = new List<Pipe>();
    private readonly string targetHost;
    private readonly int targetPort;

    private sealed class Pipe
    {
        public TcpClient Near, Far;
        public volatile bool Frozen;
    }

    public FreezableProxy(Uri target)
    {
        targetHost = target.Host;
        targetPort = target.Port;
        listener.Start();
        Task.Run(AcceptLoop);
    }

    public string Url { get { return "ws://127.0.0.1:" + ((IPEndPoint)listener.LocalEndpoint).Port; } }

    private async Task AcceptLoop()
    {
        while (true)
        {
            TcpClient near;
            try { near = await listener.AcceptTcpClientAsync(); }
            catch (Exception) { return; }
            var far = new TcpClient();
            try { await far.ConnectAsync(targetHost, targetPort); }
            catch (Exception) { near.Close(); continue; }
            var pipe = new Pipe { Near = near, Far = far };
            lock (pipes) pipes.Add(pipe);
            Forward(pipe, near, far);
            Forward(pipe, far, near);
        }
    }

    private static void Forward(Pipe pipe, TcpClient from, TcpClient to)
    {
        Task.Run(async () =>
        {
            var buffer = new byte[16384];
            try
            {
                while (true)
                {
                    int n = await from.GetStream().ReadAsync(buffer, 0, buffer.Length);
                    if (n == 0) break;
                    if (pipe.Frozen) await Task.Delay(Timeout.Infinite); // hold everything, close nothing
                    await to.GetStream().WriteAsync(buffer, 0, n);
                }
            }
            catch (Exception) { }
            if (!pipe.Frozen) { from.Close(); to.Close(); }
        });
    }

    public void Freeze()
    {
        lock (pipes) foreach (var pipe in pipes) pipe.Frozen = true;
    }

    public void Dispose()
    {
        listener.Stop();
        lock (pipes) foreach (var pipe in pipes) { pipe.Near.Close(); pipe.Far.Close(); }
    }
}
