// BrowserSocketEmulation.cs: the five WsBridge.jslib functions played by ClientWebSocket the way a browser
// behaves, so WebGLTransport.cs runs in Mono against a real appliance (compiled with WSBRIDGE_WEBGL_TESTS):
// no request headers (the token only as a subprotocol), the handshake fails (close 1006) when the server
// selects none of the offered subprotocols, events queued for polling, whole text messages, close codes a
// browser may not send replaced by 1000. The plugin's JavaScript itself is tested in Chromium
// (tests/browser/test_webgl_jslib.py). C# 7.2 (mcs).

using System;
using System.Collections.Concurrent;
using System.IO;
using System.Net.WebSockets;
using System.Text;
using System.Threading;
using System.Threading.Tasks;
using WebSocketBridge;

internal sealed class BrowserSocketEmulation : IWebGLSocketApi
{
    private sealed class Entry
    {
        public readonly ClientWebSocket Socket = new ClientWebSocket();
        public readonly ConcurrentQueue<string> Events = new ConcurrentQueue<string>();
        public readonly SemaphoreSlim Sending = new SemaphoreSlim(1);
        public volatile bool Open;
    }

    private readonly ConcurrentDictionary<int, Entry> sockets = new ConcurrentDictionary<int, Entry>();
    private int next;

    /// <summary>Every subprotocol list offered, for the test to check that the token never went as a header.</summary>
    public readonly ConcurrentQueue<string> Offered = new ConcurrentQueue<string>();

    public int Open(string url, string protocols)
    {
        int id = Interlocked.Increment(ref next);
        var entry = new Entry();
        sockets[id] = entry;
        Offered.Enqueue(protocols);
        foreach (var protocol in protocols.Split(',')) entry.Socket.Options.AddSubProtocol(protocol);
        Task.Run(() => RunAsync(entry, new Uri(url), protocols.Length > 0));
        return id;
    }

    private static async Task RunAsync(Entry entry, Uri url, bool offered)
    {
        try
        {
            await entry.Socket.ConnectAsync(url, CancellationToken.None);
            if (offered && string.IsNullOrEmpty(entry.Socket.SubProtocol))
            {
                // RFC 6455 §4.1: a browser fails the connection when none of its subprotocols was selected.
                entry.Socket.Abort();
                entry.Events.Enqueue("c1006 ");
                return;
            }
            entry.Open = true;
            entry.Events.Enqueue("o" + entry.Socket.SubProtocol);
            var buffer = new byte[16384];
            var message = new MemoryStream();
            while (true)
            {
                var result = await entry.Socket.ReceiveAsync(new ArraySegment<byte>(buffer), CancellationToken.None);
                if (result.MessageType == WebSocketMessageType.Close)
                {
                    entry.Open = false;
                    // The browser answers the close itself.
                    try { await entry.Socket.CloseOutputAsync(WebSocketCloseStatus.NormalClosure, "", CancellationToken.None); }
                    catch (Exception) { }
                    entry.Events.Enqueue("c" + (int)(result.CloseStatus ?? (WebSocketCloseStatus)1005) + " " + result.CloseStatusDescription);
                    return;
                }
                message.Write(buffer, 0, result.Count);
                if (!result.EndOfMessage) continue;
                entry.Events.Enqueue("m" + Encoding.UTF8.GetString(message.GetBuffer(), 0, (int)message.Length));
                message.SetLength(0);
            }
        }
        catch (Exception)
        {
            entry.Open = false;
            entry.Events.Enqueue("c1006 ");
        }
    }

    public string Poll(int socket)
    {
        Entry entry;
        string ev;
        return sockets.TryGetValue(socket, out entry) && entry.Events.TryDequeue(out ev) ? ev : null;
    }

    public int Send(int socket, string text)
    {
        Entry entry;
        if (!sockets.TryGetValue(socket, out entry) || !entry.Open) return -1;
        var bytes = Encoding.UTF8.GetBytes(text);
        // The browser queues sends in order; so does this.
        Task.Run(async () =>
        {
            await entry.Sending.WaitAsync();
            try { await entry.Socket.SendAsync(new ArraySegment<byte>(bytes), WebSocketMessageType.Text, true, CancellationToken.None); }
            catch (Exception) { }
            finally { entry.Sending.Release(); }
        });
        return 0;
    }

    public void Close(int socket, int code, string reason)
    {
        Entry entry;
        if (!sockets.TryGetValue(socket, out entry) || !entry.Open) return;
        if (code != 1000 && (code < 3000 || code > 4999)) code = 1000;
        entry.Open = false;
        Task.Run(async () =>
        {
            await entry.Sending.WaitAsync();
            try { await entry.Socket.CloseOutputAsync((WebSocketCloseStatus)code, reason, CancellationToken.None); }
            catch (Exception) { }
            finally { entry.Sending.Release(); }
        });
    }

    public void Free(int socket)
    {
        Entry entry;
        if (!sockets.TryRemove(socket, out entry)) return;
        if (entry.Open) Close(socket, 1000, "");
    }
}
