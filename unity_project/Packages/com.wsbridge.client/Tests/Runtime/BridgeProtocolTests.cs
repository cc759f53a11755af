// BridgeProtocolTests.cs: edit-mode/play-mode tests for the Unity Test Framework (Window > General > Test
// Runner, with "testables": ["com.wsbridge.client"] in Packages/manifest.json). Only WebSocketBridge.Core is
// used, so the same tests also run outside Unity: the repository's test suite compiles them with Mono's mcs
// against a small NUnit stand-in (tests/integration/unity/NUnitStandIn.cs) and runs every [Test].

using System;
using NUnit.Framework;

namespace WebSocketBridge.Tests
{
    [TestFixture]
    public class BridgeProtocolTests
    {
        [Test]
        public void TextCodecSplitsNameAndArguments()
        {
            BridgeCommand command;
            Assert.IsTrue(new TextCommandCodec().TryDecode("  move  1 2\t3 ", out command));
            Assert.AreEqual("move", command.Name);
            Assert.AreEqual("1 2\t3 ", command.Arguments);
            Assert.AreEqual(3, command.Args.Length);
            Assert.IsNull(command.CorrelationId);
        }

        [Test]
        public void JsonCodecRepliesWithReplyTo()
        {
            var codec = new JsonCommandCodec();
            BridgeCommand command;
            Assert.IsTrue(codec.TryDecode("{\"id\":\"c-1\",\"from\":\"LLM\",\"message\":\"open door\"}", out command));
            Assert.AreEqual("open", command.Name);
            Assert.AreEqual("LLM", command.From);
            Assert.AreEqual("{\"reply_to\":\"c-1\",\"message\":\"opening \\\"door\\\"\"}", codec.EncodeReply(command, "opening \"door\""));
        }

        [Test]
        public void JsonCodecRepliesToACommandWithoutIdAsText()
        {
            var codec = new JsonCommandCodec();
            BridgeCommand command;
            Assert.IsTrue(codec.TryDecode("{\"id\":null,\"from\":\"LLM\",\"message\":\"on\"}", out command));
            Assert.AreEqual("lit", codec.EncodeReply(command, "lit"));
        }

        [Test]
        public void AsyncHandlerResultIsTheReply()
        {
            var dispatcher = new CommandDispatcher(new JsonCommandCodec());
            dispatcher.RegisterAsync("scan", c => System.Threading.Tasks.Task.FromResult("found 3"));
            var result = dispatcher.Dispatch("{\"id\":9,\"from\":\"LLM\",\"message\":\"scan\"}");
            Assert.IsTrue(result.Handled);
            Assert.AreEqual("{\"reply_to\":9,\"message\":\"found 3\"}", result.PendingReply.Result);
        }

        [Test]
        public void EndpointCarriesGroups()
        {
            Assert.AreEqual("wss://h/ws/kiosk?groups=lobby,lights",
                BridgeClient.BuildEndpoint("https://h", "kiosk", new[] { "lobby", "lights" }).ToString());
        }

        [Test]
        public void FinalCloseCodesAreNotRetried()
        {
            Assert.IsTrue(BridgeCloseCodes.IsFinal(BridgeCloseCodes.Unauthorized));
            Assert.IsTrue(BridgeCloseCodes.IsFinal(BridgeCloseCodes.TokenExpired));
            Assert.IsTrue(BridgeCloseCodes.IsFinal(BridgeCloseCodes.DisconnectedByAdmin));
            Assert.IsTrue(BridgeCloseCodes.IsFinal(BridgeCloseCodes.GroupNotAllowed));
            Assert.IsTrue(BridgeCloseCodes.IsFinal(BridgeCloseCodes.Banned));
            Assert.IsFalse(BridgeCloseCodes.IsFinal(BridgeCloseCodes.GoingAway));
        }

        [Test]
        public void BackoffStaysWithinTheCeiling()
        {
            var random = new Random(3);
            for (int attempt = 0; attempt < 20; attempt++)
            {
                var delay = BridgeClient.ComputeBackoff(attempt, TimeSpan.FromSeconds(0.5), TimeSpan.FromSeconds(30), random);
                Assert.IsTrue(delay >= TimeSpan.Zero && delay <= TimeSpan.FromSeconds(30));
            }
        }

        [Test]
        public void AnEmptyTokenIsRefused()
        {
            Assert.Throws<ArgumentException>(() => new BridgeClient(new BridgeClientOptions { ServerUrl = "ws://h", ClientId = "a", Token = "" }));
        }
    }
}
