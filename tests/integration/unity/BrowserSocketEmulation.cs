// BrowserSocketEmulation.cs: the five WsBridge.jslib functions played the way a browser behaves, so
// WebGLTransport.cs runs in Mono against a real appliance (compiled with WSBRIDGE_WEBGL_TESTS): no request
// headers (the token only as a subprotocol), the handshake fails (close 1006) when the server selects none of
// the offered subprotocols, events queued for polling and messages stamped on arrival (Poll reports their age, as
// the plugin does), whole messages (binary ones decoded as UTF-8 text), close codes a browser may not send
// replaced by 1000. The plugin's JavaScript itself is tested in Chromium (tests/browser/test_webgl_jslib.py).
//
// The browser is not the game: its network runs outside the player's thread and without the player's thread
// pool. So this emulation speaks WebSocket (RFC 6455, client side) itself over blocking sockets on its own
// threads, never through the thread pool or a timer, and works unchanged while the test starves the pool (the
// WebGL emulation of FrameLoopScenario). With RequireThread set, every plugin call must come from that thread
// (the player's main thread). C# 7.2 (mcs).

using System;
using System.Collections.Concurrent;
using System.Collections.Generic;
using System.Diagnostics;
using System.IO;
using System.Net.Sockets;
using System.Security.Cryptography;
using System.Text;
using System.Threading;
using WebSocketBridge;

internal sealed class BrowserSocketEmulation : IWebGLSocketApi
{
    private sealed class Entry
    {
        public TcpClient Tcp;
        public Stream Stream;
        // Each event with the Stopwatch time it arrived.
        public readonly ConcurrentQueue<KeyValuePair<long, string>> Events = new ConcurrentQueue<KeyValuePair<long, string>>();

        public void Add(string ev)
        {
            Events.Enqueue(new KeyValuePair<long, string>(Stopwatch.GetTimestamp(), ev));
        }
        public readonly BlockingCollection<byte[]> Outgoing = new BlockingCollection<byte[]>();
        public volatile bool Open;
        public volatile bool Closing;
        public volatile bool Freed;
    }

    private readonly ConcurrentDictionary<int, Entry> sockets = new ConcurrentDictionary<int, Entry>();
    private int next;

    /// <summary>Every subprotocol list offered, for the test to check that the token never went as a header.</summary>
    public readonly ConcurrentQueue<string> Offered = new ConcurrentQueue<string>();

    /// <summary>When set, a plugin call from another thread is recorded in WrongThread (WebGL has one thread).</summary>
    public int RequireThread = -1;
    public volatile string WrongThread;

    private void OnCaller(string function)
    {
        if (RequireThread >= 0 && Thread.CurrentThread.ManagedThreadId != RequireThread && WrongThread == null)
            WrongThread = function + " called on thread " + Thread.CurrentThread.ManagedThreadId + ", not the main thread " + RequireThread;
    }

    public int Open(string url, string protocols)
    {
        OnCaller("WsBridgeOpen");
        int id = Interlocked.Increment(ref next);
        var entry = new Entry();
        sockets[id] = entry;
        Offered.Enqueue(protocols);
        var uri = new Uri(url);
        new Thread(() => Run(entry, uri, protocols)) { IsBackground = true, Name = "browser socket " + id }.Start();
        return id;
    }

    private static void Run(Entry entry, Uri url, string protocols)
    {
        try
        {
            entry.Tcp = new TcpClient(url.Host, url.Port) { NoDelay = true };
            entry.Stream = entry.Tcp.GetStream();
            string selected = Handshake(entry.Stream, url, protocols);
            if (entry.Freed)
            {
                entry.Tcp.Close(); // the page gave up on this socket while it was connecting
                return;
            }
            if (protocols.Length > 0 && string.IsNullOrEmpty(selected))
            {
                // RFC 6455 §4.1: a browser fails the connection when none of its subprotocols was selected.
                entry.Tcp.Close();
                entry.Add("c1006 ");
                return;
            }
            entry.Open = true;
            new Thread(() => Write(entry)) { IsBackground = true, Name = "browser socket writer" }.Start();
            entry.Add("o" + selected);
            Read(entry);
        }
        catch (Exception)
        {
            entry.Open = false;
            entry.Add("c1006 ");
        }
        finally
        {
            entry.Outgoing.CompleteAdding();
        }
    }

    /// <summary>The opening handshake: a GET with Upgrade and the offered subprotocols, no other header a browser
    /// would not send. Returns the selected subprotocol; throws when the server did not switch protocols.</summary>
    private static string Handshake(Stream stream, Uri url, string protocols)
    {
        var key = Convert.ToBase64String(Guid.NewGuid().ToByteArray());
        var request = new StringBuilder();
        request.Append("GET ").Append(url.PathAndQuery).Append(" HTTP/1.1\r\n");
        request.Append("Host: ").Append(url.Authority).Append("\r\n");
        request.Append("Upgrade: websocket\r\nConnection: Upgrade\r\n");
        request.Append("Sec-WebSocket-Key: ").Append(key).Append("\r\nSec-WebSocket-Version: 13\r\n");
        if (protocols.Length > 0) request.Append("Sec-WebSocket-Protocol: ").Append(protocols.Replace(",", ", ")).Append("\r\n");
        request.Append("\r\n");
        var bytes = Encoding.ASCII.GetBytes(request.ToString());
        stream.Write(bytes, 0, bytes.Length);

        var head = new StringBuilder();
        while (!head.ToString().EndsWith("\r\n\r\n", StringComparison.Ordinal))
        {
            int b = stream.ReadByte();
            if (b < 0) throw new IOException("connection closed during the handshake");
            head.Append((char)b);
        }
        var lines = head.ToString().Split(new[] { "\r\n" }, StringSplitOptions.RemoveEmptyEntries);
        if (lines.Length == 0 || !lines[0].Contains(" 101 ")) throw new IOException("handshake refused: " + (lines.Length > 0 ? lines[0] : ""));
        string accept = null, selected = "";
        foreach (var line in lines)
        {
            int colon = line.IndexOf(':');
            if (colon < 0) continue;
            string name = line.Substring(0, colon).Trim().ToLowerInvariant();
            string value = line.Substring(colon + 1).Trim();
            if (name == "sec-websocket-accept") accept = value;
            if (name == "sec-websocket-protocol") selected = value;
        }
        using (var sha = SHA1.Create())
        {
            var expected = Convert.ToBase64String(sha.ComputeHash(Encoding.ASCII.GetBytes(key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11")));
            if (accept != expected) throw new IOException("bad Sec-WebSocket-Accept");
        }
        return selected;
    }

    private static void Read(Entry entry)
    {
        var message = new MemoryStream();
        while (true)
        {
            int opcode;
            bool fin;
            byte[] payload = ReadFrame(entry.Stream, out opcode, out fin);
            if (payload == null)
            {
                entry.Open = false;
                entry.Add("c1006 ");
                return;
            }
            switch (opcode)
            {
                case 0x8:
                    {
                        int code = payload.Length >= 2 ? (payload[0] << 8) | payload[1] : 1005;
                        string reason = payload.Length > 2 ? Encoding.UTF8.GetString(payload, 2, payload.Length - 2) : "";
                        // The browser answers the peer's close itself (if it did not start the close).
                        if (!entry.Closing)
                        {
                            entry.Closing = true;
                            entry.Outgoing.TryAdd(Frame(0x8, payload.Length >= 2 ? new[] { payload[0], payload[1] } : new byte[0]));
                        }
                        entry.Open = false;
                        entry.Add("c" + code + " " + reason);
                        try { entry.Tcp.Client.Shutdown(SocketShutdown.Send); } catch (Exception) { }
                        return;
                    }
                case 0x9:
                    entry.Outgoing.TryAdd(Frame(0xA, payload));
                    break;
                case 0xA:
                    break;
                case 0x1:
                case 0x2:
                case 0x0:
                    message.Write(payload, 0, payload.Length);
                    if (opcode != 0) message.Position = 0;
                    if (!fin) break;
                    // Whole messages only; binary ones decoded as UTF-8 text like the plugin does.
                    entry.Add("m" + Encoding.UTF8.GetString(message.GetBuffer(), 0, (int)message.Length));
                    message.SetLength(0);
                    break;
            }
        }
    }

    private static byte[] ReadFrame(Stream stream, out int opcode, out bool fin)
    {
        opcode = 0;
        fin = false;
        var header = ReadExactly(stream, 2);
        if (header == null) return null;
        fin = (header[0] & 0x80) != 0;
        opcode = header[0] & 0x0F;
        long length = header[1] & 0x7F;
        if (length == 126)
        {
            var ext = ReadExactly(stream, 2);
            if (ext == null) return null;
            length = (ext[0] << 8) | ext[1];
        }
        else if (length == 127)
        {
            var ext = ReadExactly(stream, 8);
            if (ext == null) return null;
            length = 0;
            for (int i = 0; i < 8; i++) length = (length << 8) | ext[i];
        }
        return ReadExactly(stream, (int)length);
    }

    private static byte[] ReadExactly(Stream stream, int count)
    {
        var buffer = new byte[count];
        int read = 0;
        try
        {
            while (read < count)
            {
                int n = stream.Read(buffer, read, count - read);
                if (n <= 0) return null;
                read += n;
            }
        }
        catch (Exception)
        {
            return null;
        }
        return buffer;
    }

    /// <summary>A masked client frame (RFC 6455 §5.3).</summary>
    private static byte[] Frame(int opcode, byte[] payload)
    {
        var frame = new MemoryStream();
        frame.WriteByte((byte)(0x80 | opcode));
        if (payload.Length < 126) frame.WriteByte((byte)(0x80 | payload.Length));
        else if (payload.Length <= 0xFFFF)
        {
            frame.WriteByte(0x80 | 126);
            frame.WriteByte((byte)(payload.Length >> 8));
            frame.WriteByte((byte)payload.Length);
        }
        else
        {
            frame.WriteByte(0x80 | 127);
            for (int i = 7; i >= 0; i--) frame.WriteByte((byte)((long)payload.Length >> (8 * i)));
        }
        var mask = Guid.NewGuid().ToByteArray();
        frame.Write(mask, 0, 4);
        for (int i = 0; i < payload.Length; i++) frame.WriteByte((byte)(payload[i] ^ mask[i % 4]));
        return frame.ToArray();
    }

    /// <summary>The browser's send buffer: written in order by the socket's own thread.</summary>
    private static void Write(Entry entry)
    {
        try
        {
            foreach (var frame in entry.Outgoing.GetConsumingEnumerable()) entry.Stream.Write(frame, 0, frame.Length);
        }
        catch (Exception) { /* the connection is gone; the reader reports the close */ }
    }

    public string Poll(int socket)
    {
        OnCaller("WsBridgePoll");
        Entry entry;
        KeyValuePair<long, string> ev;
        if (!sockets.TryGetValue(socket, out entry) || !entry.Events.TryDequeue(out ev)) return null;
        if (ev.Value[0] != 'm') return ev.Value;
        long waitedMs = (Stopwatch.GetTimestamp() - ev.Key) * 1000 / Stopwatch.Frequency;
        return "m" + waitedMs + " " + ev.Value.Substring(1);
    }

    public int Send(int socket, string text)
    {
        OnCaller("WsBridgeSend");
        Entry entry;
        if (!sockets.TryGetValue(socket, out entry) || !entry.Open || entry.Closing) return -1;
        entry.Outgoing.TryAdd(Frame(0x1, Encoding.UTF8.GetBytes(text)));
        return 0;
    }

    public void Close(int socket, int code, string reason)
    {
        OnCaller("WsBridgeClose");
        Entry entry;
        if (!sockets.TryGetValue(socket, out entry) || !entry.Open || entry.Closing) return;
        if (code != 1000 && (code < 3000 || code > 4999)) code = 1000;
        entry.Closing = true;
        var reasonBytes = Encoding.UTF8.GetBytes(reason ?? "");
        var payload = new byte[2 + reasonBytes.Length];
        payload[0] = (byte)(code >> 8);
        payload[1] = (byte)code;
        Array.Copy(reasonBytes, 0, payload, 2, reasonBytes.Length);
        entry.Outgoing.TryAdd(Frame(0x8, payload));
    }

    public void Free(int socket)
    {
        OnCaller("WsBridgeFree");
        Entry entry;
        if (!sockets.TryRemove(socket, out entry)) return;
        entry.Freed = true;
        if (entry.Open && !entry.Closing) Close(socket, 1000, "");
        // Give the close frame a moment to go out on the writer thread, then drop the connection.
        var tcp = entry.Tcp;
        if (tcp != null && !entry.Open)
        {
            try { tcp.Close(); } catch (Exception) { }
        }
        else if (tcp != null)
        {
            new Thread(() =>
            {
                Thread.Sleep(1000); // the browser's close grace, on the browser's own thread
                try { tcp.Close(); } catch (Exception) { }
            }) { IsBackground = true }.Start();
        }
    }

    /// <summary>Connections the page still holds (for leak checks).</summary>
    public int Live { get { return sockets.Count; } }
}
