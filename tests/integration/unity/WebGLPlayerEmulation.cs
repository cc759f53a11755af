// WebGLPlayerEmulation.cs: BridgeClient as it runs in a Unity WebGL player (compiled with WSBRIDGE_WEBGL_TESTS
// into the WebGL harness of test_unity_client.py). A WebGL player has one thread: no managed thread the game
// could use, a thread pool that runs nothing, timers that never fire. Emulated here:
//   * one thread: this program's main thread runs every frame; the client's events and the plugin calls
//     (BrowserSocketEmulation, RequireThread) must all happen on it;
//   * a frame-pumped SynchronizationContext, like UnitySynchronizationContext: work posted to it runs at the
//     start of the next frame; each frame then calls BridgeTransports.Pump() as CommandListener.Update does;
//   * a starved thread pool: every worker thread of the pool is occupied by a blocker for the whole run, so a
//     work item, a Task.Run, a ConfigureAwait(false) continuation resumed under the context, a timer callback or
//     an async socket completion never runs (Mono's pool cannot be set to zero threads; it can be filled). At
//     the end the pool's queue and Mono's timer list must be empty: nothing was queued and nothing waits for a timer.
// The browser itself is not the player: BrowserSocketEmulation speaks WebSocket on its own threads. C# 7.2 (mcs).

#if WSBRIDGE_WEBGL_TESTS
using System;
using System.Collections;
using System.Collections.Generic;
using System.Linq;
using System.Net;
using System.Net.Sockets;
using System.Reflection;
using System.Threading;
using System.Threading.Tasks;
using WebSocketBridge;

/// <summary>The player's main thread context: posted work runs at the start of the next frame.</summary>
internal sealed class PlayerContext : SynchronizationContext
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

/// <summary>Fills every worker thread of the pool with a blocker, and checks afterwards that nothing else was queued.</summary>
internal sealed class StarvedPool
{
    private readonly ManualResetEventSlim release = new ManualResetEventSlim();
    private int blocked;
    private int timersBefore;

    public int Workers { get; private set; }

    public void Starve()
    {
        int workers = Environment.ProcessorCount;
        if (!ThreadPool.SetMinThreads(1, 1) || !ThreadPool.SetMaxThreads(workers, workers))
            throw new CheckFailed("could not bound the thread pool to " + workers + " threads");
        int max, io;
        ThreadPool.GetMaxThreads(out max, out io);
        Workers = max;
        for (int i = 0; i < max; i++)
        {
            ThreadPool.QueueUserWorkItem(_ =>
            {
                Interlocked.Increment(ref blocked);
                release.Wait();
            });
        }
        var until = DateTime.UtcNow + TimeSpan.FromSeconds(30);
        while (Volatile.Read(ref blocked) < max)
        {
            if (DateTime.UtcNow > until) throw new CheckFailed("only " + blocked + " of " + max + " pool threads could be blocked");
            Thread.Sleep(5); // waiting for the blockers to start, before the emulation begins
        }
        timersBefore = Timers();
        if (Queued().Length != 0) throw new CheckFailed("the pool's queue is not empty at the start: " + string.Join(", ", Queued()));
    }

    /// <summary>The work items waiting in the pool's queues (Mono keeps .NET's managed queue).</summary>
    public static string[] Queued()
    {
        var method = typeof(ThreadPool).GetMethod("GetQueuedWorkItems", BindingFlags.Static | BindingFlags.NonPublic);
        if (method == null) throw new CheckFailed("this Mono has no ThreadPool.GetQueuedWorkItems: the emulation cannot see the pool's queue");
        return ((IEnumerable)method.Invoke(null, null)).Cast<object>().Select(Describe).ToArray();
    }

    private static string Describe(object item)
    {
        var task = item as Task;
        if (task != null) return "Task#" + task.Id + " " + task.Status;
        var callback = item.GetType().GetField("callback", BindingFlags.Instance | BindingFlags.NonPublic);
        var target = callback != null ? callback.GetValue(item) as Delegate : null;
        return item.GetType().Name + (target != null ? " " + target.Method.DeclaringType + "." + target.Method.Name : "");
    }

    /// <summary>Timers registered with Mono's timer scheduler (Task.Delay, CancellationTokenSource(TimeSpan), Timer).</summary>
    public static int Timers()
    {
        var scheduler = typeof(Timer).GetNestedType("Scheduler", BindingFlags.NonPublic);
        var instance = scheduler == null ? null : scheduler.GetField("instance", BindingFlags.Static | BindingFlags.NonPublic);
        var list = scheduler == null ? null : scheduler.GetField("list", BindingFlags.Instance | BindingFlags.NonPublic);
        if (instance == null || list == null) throw new CheckFailed("this Mono's timer scheduler is not the expected one");
        return ((ICollection)list.GetValue(instance.GetValue(null))).Count;
    }

    /// <summary>Lets the blockers go (Mono's shutdown waits for the pool's threads).</summary>
    public void Release()
    {
        release.Set();
    }

    /// <summary>No work item waits in the pool, no timer was added, and every worker is still held by its blocker
    /// (so none ran anything else).</summary>
    public void CheckNothingUsedThePool()
    {
        var queued = Queued();
        if (queued.Length > 0) throw new CheckFailed("the client queued " + queued.Length + " thread-pool work item(s), which never run in WebGL: " + string.Join(", ", queued));
        int timers = Timers();
        if (timers > timersBefore) throw new CheckFailed("the client created " + (timers - timersBefore) + " timer(s), which never fire in WebGL");
        int available, io;
        ThreadPool.GetAvailableThreads(out available, out io);
        if (available != 0 || Volatile.Read(ref blocked) != Workers) throw new CheckFailed("a pool thread was free: " + available + " available");
    }
}

/// <summary>The player: frames on this thread, nothing else.</summary>
internal sealed class WebGLPlayer
{
    public readonly int MainThread = Thread.CurrentThread.ManagedThreadId;
    public readonly PlayerContext Context = new PlayerContext();
    public int Frames;
    public string OffThread;

    public WebGLPlayer()
    {
        SynchronizationContext.SetSynchronizationContext(Context);
    }

    public void OnMainThread(string what)
    {
        if (Thread.CurrentThread.ManagedThreadId != MainThread && OffThread == null)
            OffThread = what + " ran on thread " + Thread.CurrentThread.ManagedThreadId + ", not the main thread";
    }

    /// <summary>One frame: the context's posted work, then what CommandListener.Update does first.</summary>
    public void Frame()
    {
        Frames++;
        Context.RunPosted();
        BridgeTransports.Pump();
        Thread.Sleep(1); // the browser's turn between two frames
    }

    public void FramesUntil(Func<bool> condition, string what, TimeSpan within)
    {
        var until = DateTime.UtcNow + within;
        while (!condition())
        {
            if (DateTime.UtcNow > until) throw new CheckFailed("no " + what + " within " + within.TotalSeconds + " s of frames");
            Frame();
        }
    }
}

/// <summary>A TCP server on its own thread that accepts and never answers the WebSocket upgrade.</summary>
internal sealed class SilentServer : IDisposable
{
    private readonly TcpListener listener = new TcpListener(IPAddress.Loopback, 0);
    private readonly List<TcpClient> accepted = new List<TcpClient>();

    public SilentServer()
    {
        listener.Start();
        new Thread(() =>
        {
            while (true)
            {
                try
                {
                    var peer = listener.AcceptTcpClient();
                    lock (accepted) accepted.Add(peer);
                }
                catch (Exception) { return; }
            }
        }) { IsBackground = true }.Start();
    }

    public string Url { get { return "ws://127.0.0.1:" + ((IPEndPoint)listener.LocalEndpoint).Port; } }
    public int Accepted { get { lock (accepted) return accepted.Count; } }

    public void Dispose()
    {
        listener.Stop();
        lock (accepted) foreach (var peer in accepted) peer.Close();
    }
}
#endif
