// BridgeProtocol.cs: what the text messages moved by BridgeClient mean.
//
// Plain C# (no UnityEngine), C# 7.2 at most so that Mono's mcs compiles it (see BridgeClient.cs).
//
// Wire protocol v1 (docs/protocol.md): a controller's command reaches the client as bare text,
// "<name> <arguments...>"; the client's reply is bare text, which every controller receives as
// {"sender": "<client id>", "message": "<reply>"}.
//
// The codec is the seam for later versions: a v2 codec could decode {"id": 7, "command": "on"} into a
// BridgeCommand with CorrelationId = "7" and encode the reply as {"id": 7, "result": "..."}.
// BridgeClient (the transport) and the handlers stay as they are.

using System;
using System.Collections.Generic;

namespace WebSocketBridge
{
    /// <summary>One command received from a controller.</summary>
    public sealed class BridgeCommand
    {
        private static readonly char[] Whitespace = { ' ', '\t', '\r', '\n' };
        private string[] args;

        public BridgeCommand(string name, string arguments, string raw, string correlationId)
        {
            Name = name ?? "";
            Arguments = arguments ?? "";
            Raw = raw ?? "";
            CorrelationId = correlationId;
        }

        /// <summary>The command name: the first word of the message.</summary>
        public string Name { get; private set; }
        /// <summary>Everything after the name and the whitespace that follows it, unchanged.</summary>
        public string Arguments { get; private set; }
        /// <summary>The whole message as received.</summary>
        public string Raw { get; private set; }
        /// <summary>Id of the request a reply answers; always null in protocol v1.</summary>
        public string CorrelationId { get; private set; }

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

    /// <summary>Protocol v1: bare text commands, bare text replies.</summary>
    public sealed class TextCommandCodec : ICommandCodec
    {
        private static readonly char[] Whitespace = { ' ', '\t', '\r', '\n' };

        public bool TryDecode(string message, out BridgeCommand command)
        {
            command = null;
            if (message == null) return false;
            string trimmed = message.TrimStart(Whitespace);
            if (trimmed.Length == 0) return false;
            int end = trimmed.IndexOfAny(Whitespace);
            if (end < 0)
            {
                command = new BridgeCommand(trimmed, "", message, null);
                return true;
            }
            string name = trimmed.Substring(0, end);
            string arguments = trimmed.Substring(end).TrimStart(Whitespace);
            command = new BridgeCommand(name, arguments, message, null);
            return true;
        }

        public string EncodeReply(BridgeCommand command, string result)
        {
            return result;
        }
    }

    /// <summary>A command handler: returns the reply text, or null to send no reply.</summary>
    public delegate string CommandHandler(BridgeCommand command);

    /// <summary>What the dispatcher did with a message.</summary>
    public struct DispatchResult
    {
        /// <summary>A handler was registered for the command's name (it may still have thrown).</summary>
        public bool Handled;
        /// <summary>The decoded command, or null when the message was not a command.</summary>
        public BridgeCommand Command;
        /// <summary>Encoded text to send back, or null for no reply.</summary>
        public string Reply;
        /// <summary>The handler's exception; Reply then carries "error: ...".</summary>
        public Exception Exception;
    }

    /// <summary>Maps command names (case-insensitive) to handlers. Not thread-safe by design: register, unregister
    /// and dispatch from one thread (Unity's main thread in CommandListener).</summary>
    public sealed class CommandDispatcher
    {
        private readonly Dictionary<string, CommandHandler> handlers =
            new Dictionary<string, CommandHandler>(StringComparer.OrdinalIgnoreCase);

        public CommandDispatcher() : this(new TextCommandCodec()) { }

        public CommandDispatcher(ICommandCodec codec)
        {
            if (codec == null) throw new ArgumentNullException("codec");
            Codec = codec;
        }

        public ICommandCodec Codec { get; private set; }

        public IEnumerable<string> CommandNames { get { return handlers.Keys; } }

        /// <summary>Registers (or replaces) the handler of a command name. Returns true when it replaced one.</summary>
        public bool Register(string name, CommandHandler handler)
        {
            if (string.IsNullOrEmpty(name) || name.IndexOfAny(new[] { ' ', '\t', '\r', '\n' }) >= 0)
                throw new ArgumentException("a command name is one non-empty word", "name");
            if (handler == null) throw new ArgumentNullException("handler");
            bool replaced = handlers.ContainsKey(name);
            handlers[name] = handler;
            return replaced;
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

        public bool IsRegistered(string name)
        {
            return name != null && handlers.ContainsKey(name);
        }

        /// <summary>Decodes a message and runs its handler. A throwing handler yields the reply "error: message".</summary>
        public DispatchResult Dispatch(string message)
        {
            var result = new DispatchResult();
            BridgeCommand command;
            if (!Codec.TryDecode(message, out command)) return result;
            result.Command = command;
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
