// LightController.cs: an example device. All the networking lives in CommandListener; a device only
// registers what it understands. C# 7.2 at most (compiled by Mono's mcs in the tests).
//
// Commands:  on | off | toggle | intensity <0..8> | status
// Replies:   "light on", "light off", "intensity 1.5", "error: ..." for bad arguments.

using System.Globalization;
using UnityEngine;

namespace WebSocketBridge.Examples
{
    [AddComponentMenu("WebSocket Bridge/Examples/Light Controller")]
    [RequireComponent(typeof(Light))]
    public sealed class LightController : MonoBehaviour
    {
        [Tooltip("Listener to register with; empty means CommandListener.Default, waited for if it is not there yet.")]
        [SerializeField] private CommandListener listener;

        private Light lamp;
        private CommandListener registeredWith;
        private CommandHandler on, off, toggle, intensity, status;

        private void Awake()
        {
            lamp = GetComponent<Light>();
            on = command => Switch(true);
            off = command => Switch(false);
            toggle = command => Switch(!lamp.enabled);
            status = command => Describe();
            intensity = SetIntensity;
        }

        private void OnEnable()
        {
            TryRegister();
        }

        private void Update()
        {
            // The listener may not exist yet at OnEnable (scene order, additive scenes), or may have been destroyed
            // and replaced (fake null): keep trying instead of giving up.
            if (registeredWith == null) TryRegister();
        }

        private void TryRegister()
        {
            var target = listener != null ? listener : CommandListener.Default;
            if (target == null) return;
            registeredWith = target;
            // Descriptions and arguments go into the command manifest (what an LLM reads to call them).
            registeredWith.Register("on", on, "Turns the light on");
            registeredWith.Register("off", off, "Turns the light off");
            registeredWith.Register("toggle", toggle, "Turns the light on if it is off, off if it is on");
            registeredWith.Register("intensity", intensity, "Sets the light's brightness",
                new CommandArgument("value", "number", "brightness from 0 to 8"));
            registeredWith.Register("status", status, "Tells whether the light is on and its brightness");
        }

        private void OnDisable()
        {
            if (registeredWith == null) return; // also true when the listener was destroyed first (scene unload)
            registeredWith.Unregister("on", on);
            registeredWith.Unregister("off", off);
            registeredWith.Unregister("toggle", toggle);
            registeredWith.Unregister("intensity", intensity);
            registeredWith.Unregister("status", status);
            registeredWith = null;
        }

        private string Switch(bool enable)
        {
            lamp.enabled = enable;
            return Describe();
        }

        private string SetIntensity(BridgeCommand command)
        {
            float value;
            if (command.Args.Length != 1 ||
                !float.TryParse(command.Args[0], NumberStyles.Float, CultureInfo.InvariantCulture, out value) ||
                value < 0f || value > 8f)
            {
                return "error: usage: intensity <0..8>";
            }
            lamp.intensity = value;
            return "intensity " + value.ToString(CultureInfo.InvariantCulture);
        }

        private string Describe()
        {
            return lamp.enabled ? "light on" : "light off";
        }
    }
}
