// BridgeProtocol.cs: what the text messages moved by BridgeClient mean.
//
// Plain C# (no UnityEngine), C# 7.2 at most so that Mono's mcs compiles it (see BridgeClient.cs).
//
// Wire protocol v1 (docs/protocol.md; BridgeClient's default, and what listeners in existing scenes saved):
// a controller's command reaches the client as bare text, "<name> <arguments...>"; the client's reply is
// bare text, which every controller receives as {"sender": "<client id>", "message": "<reply>"}.
//
// Wire protocol v2 (a new CommandListener's default; BridgeClientOptions.ProtocolVersion = 2; subprotocol
// wsbridge.v2): a command arrives as {"id": 7, "from": "<controller>", "message": "<name> <arguments...>"}
// ("id": null for a command sent without id); the reply to a command with an id is
// {"reply_to": 7, "message": "<reply>"}
// and reaches only the controller that sent the command (with the round-trip time). A reply to a
// command without id is bare text, as in v1. BridgeClient (the transport) and the handlers are the same
// for both versions: only the codec differs.

using System;
using System.Collections.Generic;
using System.Globalization;
using System.Text;
using System.Threading.Tasks;

namespace WebSocketBridge
{
    /// <summary>One command received from a controller.</summary>
    public sealed class BridgeCommand
    {
        private static readonly char[] Whitespace = { ' ', '\t', '\r', '\n' };
        private string[] args;

        public BridgeCommand(string name, string arguments, string raw, string correlationId)
            : this(name, arguments, raw, correlationId, null)
        {
        }

        public BridgeCommand(string name, string arguments, string raw, string correlationId, string from)
        {
            Name = name ?? "";
            Arguments = arguments ?? "";
            Raw = raw ?? "";
            CorrelationId = correlationId;
            From = from;
        }

        /// <summary>The command name: the first word of the message.</summary>
        public string Name { get; private set; }
        /// <summary>Everything after the name and the whitespace that follows it, unchanged.</summary>
        public string Arguments { get; private set; }
        /// <summary>The command text as the controller sent it (v2: the "message" field).</summary>
        public string Raw { get; private set; }
        /// <summary>The command's id as JSON text (7 or "abc", quotes included), echoed as reply_to; null in protocol
        /// v1 and for a v2 command sent without id.</summary>
        public string CorrelationId { get; private set; }
        /// <summary>The id of the controller that sent the command (protocol v2), or null.</summary>
        public string From { get; private set; }

        /// <summary>The arguments split on whitespace ("set 1 2" gives ["1", "2"]).</summary>
        public string[] Args
        {
            get
            {
                if (args == null) args = Arguments.Split(Whitespace, StringSplitOptions.RemoveEmptyEntries);
                return args;
            }
        }

        public override string ToString()
        {
            return Raw;
        }
    }

    /// <summary>Turns received text into commands and replies into text.</summary>
    public interface ICommandCodec
    {
        /// <summary>False for a message that is not a command (it then goes to the fallback).</summary>
        bool TryDecode(string message, out BridgeCommand command);
        /// <summary>The text to send back for a handler's result.</summary>
        string EncodeReply(BridgeCommand command, string result);
    }

    /// <summary>Subprotocol names of the wire protocol versions.</summary>
    public static class BridgeProtocols
    {
        public const string V1 = "wsbridge.v1";
        public const string V2 = "wsbridge.v2";

        /// <summary>The codec of a protocol version (1 or 2).</summary>
        public static ICommandCodec CodecFor(int version)
        {
            if (version == 2) return new JsonCommandCodec();
            if (version == 1) return new TextCommandCodec();
            throw new ArgumentException("protocol version must be 1 or 2", "version");
        }

        /// <summary>Reads the appliance's answer to a v2 client's manifest: {"type":"manifest_accepted","commands":N} or
        /// {"type":"manifest_error","error","detail","path"}. False for anything else (a command, plain text).</summary>
        public static bool TryReadManifestAnswer(string text, out bool accepted, out string detail)
        {
            accepted = false;
            detail = null;
            Dictionary<string, string> fields;
            string type;
            if (text == null || !text.StartsWith("{\"type\":\"manifest_", StringComparison.Ordinal)) return false;
            if (!MiniJson.TryReadObject(text, out fields) || !fields.TryGetValue("type", out type)) return false;
            if (type == "\"manifest_accepted\"")
            {
                accepted = true;
                return true;
            }
            if (type != "\"manifest_error\"") return false;
            if (!fields.TryGetValue("detail", out detail) || !MiniJson.TryReadString(detail, out detail)) detail = text;
            return true;
        }
    }

    /// <summary>Protocol v1: bare text commands, bare text replies.</summary>
    public sealed class TextCommandCodec : ICommandCodec
    {
        private static readonly char[] Whitespace = { ' ', '\t', '\r', '\n' };

        public bool TryDecode(string message, out BridgeCommand command)
        {
            return TryParse(message, null, null, out command);
        }

        /// <summary>Splits command text into name and arguments (shared by v1 and v2).</summary>
        internal static bool TryParse(string message, string correlationId, string from, out BridgeCommand command)
        {
            command = null;
            if (message == null) return false;
            string trimmed = message.TrimStart(Whitespace);
            if (trimmed.Length == 0) return false;
            int end = trimmed.IndexOfAny(Whitespace);
            if (end < 0)
            {
                command = new BridgeCommand(trimmed, "", message, correlationId, from);
                return true;
            }
            string name = trimmed.Substring(0, end);
            string arguments = trimmed.Substring(end).TrimStart(Whitespace);
            command = new BridgeCommand(name, arguments, message, correlationId, from);
            return true;
        }

        public string EncodeReply(BridgeCommand command, string result)
        {
            return result;
        }
    }

    /// <summary>Protocol v2: {"id","from","message"} commands; {"reply_to","message"} replies to commands with an id.</summary>
    public sealed class JsonCommandCodec : ICommandCodec
    {
        public bool TryDecode(string message, out BridgeCommand command)
        {
            command = null;
            Dictionary<string, string> fields;
            if (!MiniJson.TryReadObject(message, out fields)) return false;
            string id, from, text;
            if (!fields.TryGetValue("message", out text) || !MiniJson.TryReadString(text, out text)) return false;
            fields.TryGetValue("id", out id);
            if (id == "null") id = null;
            if (id != null && !MiniJson.IsStringOrInteger(id)) return false;
            if (fields.TryGetValue("from", out from) && !MiniJson.TryReadString(from, out from)) from = null;
            return TextCommandCodec.TryParse(text, id, from, out command);
        }

        public string EncodeReply(BridgeCommand command, string result)
        {
            if (command == null || command.CorrelationId == null) return result; // no id: a plain v1 reply
            return "{\"reply_to\":" + command.CorrelationId + ",\"message\":" + MiniJson.Quote(result) + "}";
        }
    }

    /// <summary>The JSON the v2 frames need: one object; values are kept as JSON text. Nested objects and arrays (fields
    /// a newer appliance may add) are skipped over whole, so they never make the frame unreadable.</summary>
    internal static class MiniJson
    {
        /// <summary>Reads {"key": value, ...}; a nested object or array is kept as its JSON text.</summary>
        public static bool TryReadObject(string json, out Dictionary<string, string> fields)
        {
            fields = null;
            if (json == null) return false;
            var result = new Dictionary<string, string>(StringComparer.Ordinal);
            int i = SkipSpace(json, 0);
            if (i >= json.Length || json[i] != '{') return false;
            i = SkipSpace(json, i + 1);
            if (i < json.Length && json[i] == '}') { fields = result; return SkipSpace(json, i + 1) == json.Length; }
            while (true)
            {
                int keyEnd = ScanString(json, i);
                if (keyEnd < 0) return false;
                string key;
                if (!TryReadString(json.Substring(i, keyEnd - i), out key)) return false;
                i = SkipSpace(json, keyEnd);
                if (i >= json.Length || json[i] != ':') return false;
                i = SkipSpace(json, i + 1);
                int valueEnd = i >= json.Length ? -1
                    : json[i] == '"' ? ScanString(json, i)
                    : json[i] == '{' || json[i] == '[' ? ScanNested(json, i)
                    : ScanScalar(json, i);
                if (valueEnd <= i) return false;
                result[key] = json.Substring(i, valueEnd - i);
                i = SkipSpace(json, valueEnd);
                if (i >= json.Length) return false;
                if (json[i] == '}') { fields = result; return SkipSpace(json, i + 1) == json.Length; }
                if (json[i] != ',') return false;
                i = SkipSpace(json, i + 1);
            }
        }

        /// <summary>Decodes a JSON string literal (quotes included).</summary>
        public static bool TryReadString(string literal, out string value)
        {
            value = null;
            if (literal == null || literal.Length < 2 || literal[0] != '"' || literal[literal.Length - 1] != '"') return false;
            var text = new StringBuilder(literal.Length);
            for (int i = 1; i < literal.Length - 1; i++)
            {
                char c = literal[i];
                if (c != '\\') { text.Append(c); continue; }
                if (++i >= literal.Length - 1) return false;
                switch (literal[i])
                {
                    case '"': text.Append('"'); break;
                    case '\\': text.Append('\\'); break;
                    case '/': text.Append('/'); break;
                    case 'b': text.Append('\b'); break;
                    case 'f': text.Append('\f'); break;
                    case 'n': text.Append('\n'); break;
                    case 'r': text.Append('\r'); break;
                    case 't': text.Append('\t'); break;
                    case 'u':
                        int code;
                        if (i + 4 >= literal.Length || !int.TryParse(literal.Substring(i + 1, 4), NumberStyles.AllowHexSpecifier, CultureInfo.InvariantCulture, out code)) return false;
                        text.Append((char)code);
                        i += 4;
                        break;
                    default: return false;
                }
            }
            value = text.ToString();
            return true;
        }

        /// <summary>A JSON string literal, or an integer (what v2 command ids may be).</summary>
        public static bool IsStringOrInteger(string json)
        {
            string ignored;
            if (TryReadString(json, out ignored)) return true;
            long number;
            return long.TryParse(json, NumberStyles.AllowLeadingSign, CultureInfo.InvariantCulture, out number);
        }

        /// <summary>The JSON string literal of a text.</summary>
        public static string Quote(string text)
        {
            var json = new StringBuilder(text.Length + 2);
            json.Append('"');
            foreach (char c in text)
            {
                switch (c)
                {
                    case '"': json.Append("\\\""); break;
                    case '\\': json.Append("\\\\"); break;
                    case '\n': json.Append("\\n"); break;
                    case '\r': json.Append("\\r"); break;
                    case '\t': json.Append("\\t"); break;
                    default:
                        if (c < ' ') json.Append("\\u").Append(((int)c).ToString("x4", CultureInfo.InvariantCulture));
                        else json.Append(c);
                        break;
                }
            }
            return json.Append('"').ToString();
        }

        private static int SkipSpace(string s, int i)
        {
            while (i < s.Length && (s[i] == ' ' || s[i] == '\t' || s[i] == '\r' || s[i] == '\n')) i++;
            return i;
        }

        /// <summary>End (exclusive) of the string literal starting at i, or -1.</summary>
        private static int ScanString(string s, int i)
        {
            if (i >= s.Length || s[i] != '"') return -1;
            for (i++; i < s.Length; i++)
            {
                if (s[i] == '\\') { i++; continue; }
                if (s[i] == '"') return i + 1;
            }
            return -1;
        }

        /// <summary>End (exclusive) of the object or array starting at i (brackets balanced, strings skipped), or -1.</summary>
        private static int ScanNested(string s, int i)
        {
            int depth = 0;
            for (; i < s.Length; i++)
            {
                char c = s[i];
                if (c == '"')
                {
                    int end = ScanString(s, i);
                    if (end < 0) return -1;
                    i = end - 1;
                }
                else if (c == '{' || c == '[') depth++;
                else if (c == '}' || c == ']')
                {
                    if (--depth == 0) return i + 1;
                }
            }
            return -1;
        }

        /// <summary>End of a number, true, false or null starting at i.</summary>
        private static int ScanScalar(string s, int i)
        {
            int start = i;
            while (i < s.Length && (char.IsLetterOrDigit(s[i]) || s[i] == '-' || s[i] == '+' || s[i] == '.')) i++;
            return i > start ? i : -1;
        }
    }

    /// <summary>One argument of a command, for the command manifest (what an LLM reads to know how to call it).</summary>
    public sealed class CommandArgument
    {
        public CommandArgument(string name, string type, string description)
        {
            if (string.IsNullOrEmpty(name)) throw new ArgumentException("an argument needs a name", "name");
            if (type != "string" && type != "number" && type != "integer" && type != "boolean")
                throw new ArgumentException("type is one of string, number, integer, boolean", "type");
            Name = name;
            Type = type;
            Description = description ?? "";
            Required = true;
        }

        public string Name { get; private set; }
        /// <summary>JSON Schema type: string, number, integer or boolean.</summary>
        public string Type { get; private set; }
        public string Description { get; private set; }
        public bool Required { get; set; }
    }

    /// <summary>A command handler: returns the reply text, or null to send no reply.</summary>
    public delegate string CommandHandler(BridgeCommand command);

    /// <summary>A handler that answers later: the task's result is the reply (null for none). On Unity's main
    /// thread the continuation runs there too (UnitySynchronizationContext).</summary>
    public delegate Task<string> AsyncCommandHandler(BridgeCommand command);

    /// <summary>What the dispatcher did with a message.</summary>
    public struct DispatchResult
    {
        /// <summary>A handler was registered for the command's name (it may still have thrown).</summary>
        public bool Handled;
        /// <summary>The decoded command, or null when the message was not a command.</summary>
        public BridgeCommand Command;
        /// <summary>Encoded text to send back, or null for no reply (or when the reply comes later, see PendingReply).</summary>
        public string Reply;
        /// <summary>For an async handler: completes with the encoded reply (null for none). Never faults: a failed
        /// handler task yields an "error: ..." reply.</summary>
        public Task<string> PendingReply;
        /// <summary>The handler's exception; Reply then carries "error: ...".</summary>
        public Exception Exception;
        /// <summary>For an async handler: its own task, to observe (and log) the exception of a failed one.</summary>
        public Task HandlerTask;
    }

    /// <summary>Maps command names (case-insensitive) to handlers. Not thread-safe by design: register, unregister
    /// and dispatch from one thread (Unity's main thread in CommandListener).</summary>
    public sealed class CommandDispatcher
    {
        private readonly Dictionary<string, CommandHandler> handlers =
            new Dictionary<string, CommandHandler>(StringComparer.OrdinalIgnoreCase);
        private readonly Dictionary<string, AsyncCommandHandler> asyncHandlers =
            new Dictionary<string, AsyncCommandHandler>(StringComparer.OrdinalIgnoreCase);
        private readonly Dictionary<string, KeyValuePair<string, CommandArgument[]>> descriptions =
            new Dictionary<string, KeyValuePair<string, CommandArgument[]>>(StringComparer.OrdinalIgnoreCase);

        public CommandDispatcher() : this(new TextCommandCodec()) { }

        public CommandDispatcher(ICommandCodec codec)
        {
            if (codec == null) throw new ArgumentNullException("codec");
            Codec = codec;
        }

        private ICommandCodec codec;

        /// <summary>How commands are read and replies written; replaceable (CommandListener follows a changed protocol
        /// version with it, keeping the registered handlers).</summary>
        public ICommandCodec Codec
        {
            get { return codec; }
            set { if (value == null) throw new ArgumentNullException("value"); codec = value; }
        }

        public IEnumerable<string> CommandNames
        {
            get { var names = new List<string>(handlers.Keys); names.AddRange(asyncHandlers.Keys); return names; }
        }

        /// <summary>Registers (or replaces) the handler of a command name. Returns true when it replaced one.</summary>
        public bool Register(string name, CommandHandler handler)
        {
            if (string.IsNullOrEmpty(name) || name.IndexOfAny(new[] { ' ', '\t', '\r', '\n' }) >= 0)
                throw new ArgumentException("a command name is one non-empty word", "name");
            if (handler == null) throw new ArgumentNullException("handler");
            CommandHandler current;
            // Registering the same handler again (a device re-registering with a successor listener) is no replacement.
            bool replaced = (handlers.TryGetValue(name, out current) && current != handler) | asyncHandlers.Remove(name);
            handlers[name] = handler;
            return replaced;
        }

        /// <summary>Registers a handler whose reply comes later (a Task&lt;string&gt;). Returns true when it replaced one.</summary>
        public bool RegisterAsync(string name, AsyncCommandHandler handler)
        {
            if (string.IsNullOrEmpty(name) || name.IndexOfAny(new[] { ' ', '\t', '\r', '\n' }) >= 0)
                throw new ArgumentException("a command name is one non-empty word", "name");
            if (handler == null) throw new ArgumentNullException("handler");
            AsyncCommandHandler current;
            bool replaced = (asyncHandlers.TryGetValue(name, out current) && current != handler) | handlers.Remove(name);
            asyncHandlers[name] = handler;
            return replaced;
        }

        /// <summary>Removes an async handler if it is still <paramref name="handler"/>.</summary>
        public bool Unregister(string name, AsyncCommandHandler handler)
        {
            AsyncCommandHandler current;
            if (name == null || !asyncHandlers.TryGetValue(name, out current)) return false;
            if (handler != null && current != handler) return false;
            return asyncHandlers.Remove(name);
        }

        /// <summary>Removes a name's handler, but only if it is still <paramref name="handler"/>: a device that
        /// goes away must not remove the handler a newer device registered under the same name.</summary>
        public bool Unregister(string name, CommandHandler handler)
        {
            CommandHandler current;
            if (name == null || !handlers.TryGetValue(name, out current)) return false;
            if (handler != null && current != handler) return false;
            return handlers.Remove(name);
        }

        /// <summary>Says what a command does and which arguments it takes, for the manifest (arguments in order, as the
        /// words after the name).</summary>
        public void Describe(string name, string description, params CommandArgument[] arguments)
        {
            if (string.IsNullOrEmpty(name)) throw new ArgumentException("a command name is one non-empty word", "name");
            descriptions[name] = new KeyValuePair<string, CommandArgument[]>(description ?? "", arguments ?? new CommandArgument[0]);
        }

        /// <summary>The command manifest of the registered handlers: {"type":"manifest","commands":[{"name","description",
        /// "arguments": a JSON Schema object}]}, names sorted (docs/protocol.md, "Command manifest"). CommandListener sends
        /// it under protocol v2 after each connect and when handlers change (Send Manifest, on by default).</summary>
        public string ManifestJson()
        {
            var names = new List<string>(CommandNames);
            names.Sort(StringComparer.OrdinalIgnoreCase);
            var json = new StringBuilder("{\"type\":\"manifest\",\"commands\":[");
            for (int n = 0; n < names.Count; n++)
            {
                KeyValuePair<string, CommandArgument[]> described;
                if (!descriptions.TryGetValue(names[n], out described))
                    described = new KeyValuePair<string, CommandArgument[]>("", new CommandArgument[0]);
                if (n > 0) json.Append(',');
                json.Append("{\"name\":").Append(MiniJson.Quote(names[n]));
                json.Append(",\"description\":").Append(MiniJson.Quote(described.Key));
                json.Append(",\"arguments\":{\"type\":\"object\",\"properties\":{");
                var required = new List<string>();
                for (int a = 0; a < described.Value.Length; a++)
                {
                    var argument = described.Value[a];
                    if (a > 0) json.Append(',');
                    json.Append(MiniJson.Quote(argument.Name)).Append(":{\"type\":").Append(MiniJson.Quote(argument.Type));
                    json.Append(",\"description\":").Append(MiniJson.Quote(argument.Description)).Append('}');
                    if (argument.Required) required.Add(MiniJson.Quote(argument.Name));
                }
                json.Append("},\"required\":[").Append(string.Join(",", required.ToArray())).Append("]}}");
            }
            return json.Append("]}").ToString();
        }

        public bool IsRegistered(string name)
        {
            return name != null && (handlers.ContainsKey(name) || asyncHandlers.ContainsKey(name));
        }

        /// <summary>Decodes a message without running anything (to refuse it, e.g. when it is stale).</summary>
        public bool TryDecode(string message, out BridgeCommand command)
        {
            return Codec.TryDecode(message, out command);
        }

        /// <summary>The encoded "error: ..." reply for a command that was refused or not run.</summary>
        public string EncodeError(BridgeCommand command, string error)
        {
            return Codec.EncodeReply(command, "error: " + error);
        }

        /// <summary>Decodes a message and runs its handler. A throwing handler yields the reply "error: message".</summary>
        public DispatchResult Dispatch(string message)
        {
            var result = new DispatchResult();
            BridgeCommand command;
            if (!Codec.TryDecode(message, out command)) return result;
            return Dispatch(command);
        }

        /// <summary>Runs the handler of a decoded command.</summary>
        public DispatchResult Dispatch(BridgeCommand command)
        {
            var result = new DispatchResult();
            result.Command = command;
            AsyncCommandHandler asyncHandler;
            if (asyncHandlers.TryGetValue(command.Name, out asyncHandler))
            {
                result.Handled = true;
                Task<string> task;
                try
                {
                    task = asyncHandler(command);
                    if (task == null) return result;
                }
                catch (Exception e)
                {
                    result.Exception = e;
                    result.Reply = Codec.EncodeReply(command, "error: " + command.Name + ": " + e.Message);
                    return result;
                }
                result.HandlerTask = task;
                var codec = Codec;
                // ContinueWith without a scheduler argument runs on the current one; the await-free form keeps the
                // reply encoding off any particular thread, and the caller sends it.
                result.PendingReply = task.ContinueWith(t =>
                {
                    if (t.IsFaulted) return codec.EncodeReply(command, "error: " + command.Name + ": " + t.Exception.GetBaseException().Message);
                    if (t.IsCanceled) return codec.EncodeReply(command, "error: " + command.Name + ": cancelled");
                    return t.Result == null ? null : codec.EncodeReply(command, t.Result);
                }, TaskContinuationOptions.ExecuteSynchronously);
                return result;
            }
            CommandHandler handler;
            if (!handlers.TryGetValue(command.Name, out handler)) return result;
            result.Handled = true;
            string reply;
            try
            {
                reply = handler(command);
            }
            catch (Exception e)
            {
                result.Exception = e;
                reply = "error: " + command.Name + ": " + e.Message;
            }
            if (reply != null) result.Reply = Codec.EncodeReply(command, reply);
            return result;
        }
    }
}
