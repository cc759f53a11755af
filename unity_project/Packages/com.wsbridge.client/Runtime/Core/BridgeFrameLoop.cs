// BridgeFrameLoop.cs: where BridgeClient runs when the platform has no threads (WebGL).
//
// A Unity WebGL player has one thread and no thread pool that runs anything: System.Threading.Timer never
// fires, Task.Run and ConfigureAwait(false) continuations queued to the pool never run, SemaphoreSlim.WaitAsync
// completes its waiters through the pool. A client on the frame loop uses none of these: its awaits resume on
// this SynchronizationContext, its delays are deadlines compared with a clock read once per frame, and both run
// in Pump(), called once per frame on the main thread (BridgeTransports.Pump(), which CommandListener.Update
// calls). Nothing here starts a thread, queues a pool work item or creates a timer.
//
// Plain C# (no UnityEngine), C# 7.2 at most (tests/integration compiles it with mcs).

using System;
using System.Collections.Generic;
using System.Diagnostics;
using System.Threading;
using System.Threading.Tasks;

namespace WebSocketBridge
{
    /// <summary>A single-threaded run loop pumped once per frame: posted continuations and due delays run in Pump().</summary>
    public sealed class BridgeFrameLoop : SynchronizationContext
    {
        /// <summary>The loop of the player's main thread, pumped by BridgeTransports.Pump().</summary>
        public static readonly BridgeFrameLoop Main = new BridgeFrameLoop();

        /// <summary>Most callbacks run by one Pump (a bound, not a budget: the loop's own work is a handful per frame).</summary>
        private const int MaxCallbacksPerPump = 10000;

        private readonly object gate = new object();
        private readonly Queue<KeyValuePair<SendOrPostCallback, object>> posted = new Queue<KeyValuePair<SendOrPostCallback, object>>();
        private readonly List<Deadline> deadlines = new List<Deadline>();
        private readonly Func<long> clock;
        private SynchronizationContext outer;
        private bool pumping;

        private sealed class Deadline
        {
            public long Due;
            public TaskCompletionSource<bool> Done;
        }

        /// <summary>A loop on the Stopwatch clock.</summary>
        public BridgeFrameLoop() : this(Stopwatch.GetTimestamp) { }

        /// <param name="clock">Monotonic time in Stopwatch ticks, read once per Pump.</param>
        public BridgeFrameLoop(Func<long> clock)
        {
            if (clock == null) throw new ArgumentNullException("clock");
            this.clock = clock;
        }

        /// <summary>The context that was current when Pump() was called (Unity's): events are raised under it.</summary>
        internal SynchronizationContext Outer { get { return outer; } }

        /// <summary>Callbacks and delays waiting for a Pump.</summary>
        public int Pending
        {
            get { lock (gate) return posted.Count + deadlines.Count; }
        }

        public override void Post(SendOrPostCallback callback, object state)
        {
            if (callback == null) throw new ArgumentNullException("callback");
            lock (gate) posted.Enqueue(new KeyValuePair<SendOrPostCallback, object>(callback, state));
        }

        public override void Send(SendOrPostCallback callback, object state)
        {
            throw new NotSupportedException("BridgeFrameLoop runs posted work in Pump(); Send would wait for a frame that never comes");
        }

        public override SynchronizationContext CreateCopy()
        {
            return this;
        }

        /// <summary>A task that completes at the first Pump at least <paramref name="delay"/> from now, or is cancelled with
        /// <paramref name="cancel"/>. No timer: each Pump compares the deadlines with the clock it read.</summary>
        public Task Delay(TimeSpan delay, CancellationToken cancel)
        {
            var done = new TaskCompletionSource<bool>();
            if (cancel.IsCancellationRequested)
            {
                done.SetCanceled();
                return done.Task;
            }
            var deadline = new Deadline
            {
                // From the clock, not the last frame's reading: the loop may not have been pumped for a while.
                Due = clock() + (long)(delay.TotalSeconds * Stopwatch.Frequency),
                Done = done,
            };
            lock (gate) deadlines.Add(deadline);
            if (cancel.CanBeCanceled)
            {
                var registration = cancel.Register(() =>
                {
                    lock (gate) deadlines.Remove(deadline);
                    done.TrySetCanceled();
                });
                done.Task.ContinueWith(t => registration.Dispose(), CancellationToken.None,
                    TaskContinuationOptions.ExecuteSynchronously, TaskScheduler.Default);
            }
            return done.Task;
        }

        /// <summary>Runs what is due: reads the clock once, completes the delays that have passed, then runs posted
        /// callbacks (also those they post) until none is left. Main thread, once per frame. A nested call (from a
        /// callback) returns at once.</summary>
        public void Pump()
        {
            if (pumping) return;
            pumping = true;
            var previous = SynchronizationContext.Current;
            outer = previous == this ? outer : previous;
            SynchronizationContext.SetSynchronizationContext(this);
            try
            {
                long current = clock();
                List<Deadline> due = null;
                lock (gate)
                {
                    for (int i = deadlines.Count - 1; i >= 0; i--)
                    {
                        if (deadlines[i].Due > current) continue;
                        if (due == null) due = new List<Deadline>();
                        due.Add(deadlines[i]);
                        deadlines.RemoveAt(i);
                    }
                }
                if (due != null)
                {
                    for (int i = due.Count - 1; i >= 0; i--) due[i].Done.TrySetResult(true);
                }
                for (int i = 0; i < MaxCallbacksPerPump; i++)
                {
                    KeyValuePair<SendOrPostCallback, object> item;
                    lock (gate)
                    {
                        if (posted.Count == 0) break;
                        item = posted.Dequeue();
                    }
                    item.Key(item.Value);
                }
            }
            finally
            {
                SynchronizationContext.SetSynchronizationContext(previous);
                pumping = false;
            }
        }

        /// <summary>Runs <paramref name="action"/> with this loop as the current context, so the awaits in it resume here.</summary>
        internal T Enter<T>(Func<T> action)
        {
            var previous = SynchronizationContext.Current;
            SynchronizationContext.SetSynchronizationContext(this);
            try { return action(); }
            finally { SynchronizationContext.SetSynchronizationContext(previous); }
        }

        /// <summary>Runs an event handler under the context of the frame (Unity's), not this loop's: a Stop() or a task
        /// completed by the handler then resumes the client in a later Pump, never inline inside the handler.</summary>
        internal void RunOutside(Action handler)
        {
            var previous = SynchronizationContext.Current;
            SynchronizationContext.SetSynchronizationContext(outer);
            try { handler(); }
            finally { SynchronizationContext.SetSynchronizationContext(previous); }
        }
    }
}
