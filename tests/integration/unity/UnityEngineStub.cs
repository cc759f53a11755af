// A stand-in for the few UnityEngine types the Unity scripts use, with Unity's signatures, so that
// CommandListener.cs and the examples are compiled here (with Mono's mcs) and a compile error shows up
// in the test suite rather than in the Unity editor. It is not Unity: members only do what the smoke
// test in ListenerSmoke.cs needs. Add a member here when a script starts using it, copying the signature
// from the Unity scripting reference.

using System;
using System.Collections.Generic;

namespace UnityEngine
{
    public class Object
    {
        public string name;
        private bool destroyed;

        /// <summary>Keeps the target's GameObject when a scene is loaded (Player.LoadScene unloads every other one).</summary>
        public static void DontDestroyOnLoad(Object target)
        {
            var host = target as GameObject;
            if (host == null && target is Component) host = ((Component)target).gameObject;
            if (host != null) host.KeptAcrossLoads = true;
        }

        /// <summary>Destroyed at the end of the frame, like Unity (Player.Frame runs OnDisable/OnDestroy then).</summary>
        public static void Destroy(Object target)
        {
            lock (DestroyQueue) DestroyQueue.Add(target);
        }

        /// <summary>Not Unity: what Destroy() scheduled, for the harness to destroy at the end of the frame.</summary>
        internal static readonly List<Object> DestroyQueue = new List<Object>();

        /// <summary>Marks the object destroyed: from then on it compares equal to null, like Unity's "fake null"
        /// (the C# object still exists, the engine object does not). The harness calls OnDisable/OnDestroy itself.</summary>
        public static void DestroyImmediate(Object target) { target.destroyed = true; }

        public static implicit operator bool(Object exists) { return !ReferenceEquals(exists, null) && !exists.destroyed; }

        public static bool operator ==(Object a, Object b)
        {
            bool aNull = ReferenceEquals(a, null) || a.destroyed;
            bool bNull = ReferenceEquals(b, null) || b.destroyed;
            if (aNull || bNull) return aNull && bNull;
            return ReferenceEquals(a, b);
        }

        public static bool operator !=(Object a, Object b) { return !(a == b); }
        public override bool Equals(object other) { return this == (other as Object); }
        public override int GetHashCode() { return base.GetHashCode(); }
    }

    public sealed class GameObject : Object
    {
        private readonly List<Component> components = new List<Component>();
        public GameObject(string name) { this.name = name; }
        /// <summary>Not Unity: DontDestroyOnLoad was called for it.</summary>
        internal bool KeptAcrossLoads;
        internal List<Component> Components { get { return components; } }
        public T AddComponent<T>() where T : Component, new()
        {
            var component = new T();
            component.gameObject = this;
            components.Add(component);
            return component;
        }
        public T GetComponent<T>() where T : class
        {
            foreach (var c in components) { var t = c as T; if (t != null) return t; }
            return null;
        }
    }

    public class Component : Object
    {
        public GameObject gameObject { get; internal set; }
        public T GetComponent<T>() where T : class { return gameObject.GetComponent<T>(); }
    }

    public class Behaviour : Component
    {
        public bool enabled = true;
    }

    public class MonoBehaviour : Behaviour { }

    public sealed class Light : Behaviour
    {
        public float intensity = 1f;
    }

    public static class Debug
    {
        /// <summary>Not Unity: the harness fails a test on every error logged, unless it expects it.</summary>
        public static event Action<string> ErrorLogged;

        private static void Error(string text)
        {
            Console.WriteLine("[Unity] " + text);
            var handler = ErrorLogged;
            if (handler != null) handler(text);
        }

        public static void Log(object message) { Console.WriteLine("[Unity] " + message); }
        public static void Log(object message, Object context) { Log(message); }
        /// <summary>Not Unity: the harness can check that a warning was logged.</summary>
        public static event Action<string> WarningLogged;

        public static void LogWarning(object message)
        {
            Console.WriteLine("[Unity] warning: " + message);
            var handler = WarningLogged;
            if (handler != null) handler(message.ToString());
        }
        public static void LogWarning(object message, Object context) { LogWarning(message); }
        public static void LogError(object message) { Error("error: " + message); }
        public static void LogError(object message, Object context) { LogError(message); }
        public static void LogException(Exception exception) { Error("exception: " + exception); }
        public static void LogException(Exception exception, Object context) { LogException(exception); }
    }

    public class TextAsset : Object
    {
        public TextAsset(string text) { this.text = text; }
        public string text { get; private set; }
    }

    public static class Resources
    {
        /// <summary>Not Unity: the assets of the Resources folders, by path without extension.</summary>
        public static readonly Dictionary<string, Object> Assets = new Dictionary<string, Object>();

        public static T Load<T>(string path) where T : Object
        {
            Object asset;
            return Assets.TryGetValue(path, out asset) ? asset as T : null;
        }
    }

    public static class Mathf
    {
        public static float Max(float a, float b) { return a > b ? a : b; }
        public static float Clamp(float value, float min, float max) { return value < min ? min : value > max ? max : value; }
    }

    public static class Time
    {
        private static readonly System.Diagnostics.Stopwatch Clock = System.Diagnostics.Stopwatch.StartNew();
        public static float realtimeSinceStartup { get { return (float)Clock.Elapsed.TotalSeconds; } }
    }

    public enum RuntimeInitializeLoadType { AfterSceneLoad, BeforeSceneLoad, AfterAssembliesLoaded, BeforeSplashScreen, SubsystemRegistration }

    [AttributeUsage(AttributeTargets.Method, AllowMultiple = false)]
    public class RuntimeInitializeOnLoadMethodAttribute : Attribute
    {
        public RuntimeInitializeOnLoadMethodAttribute() { }
        public RuntimeInitializeOnLoadMethodAttribute(RuntimeInitializeLoadType loadType) { }
    }

    [AttributeUsage(AttributeTargets.Field, Inherited = true, AllowMultiple = false)]
    public sealed class SerializeField : Attribute { }

    [AttributeUsage(AttributeTargets.Field, Inherited = true, AllowMultiple = false)]
    public abstract class PropertyAttribute : Attribute { }

    public struct Rect
    {
        public float x, y, width, height;
    }

    public class GUIContent
    {
        public string text;
    }

    [AttributeUsage(AttributeTargets.Field, Inherited = true, AllowMultiple = false)]
    public sealed class HideInInspector : Attribute { }

    [AttributeUsage(AttributeTargets.Field, Inherited = true, AllowMultiple = true)]
    public class HeaderAttribute : Attribute { public HeaderAttribute(string header) { } }

    [AttributeUsage(AttributeTargets.Field, Inherited = true, AllowMultiple = false)]
    public class TooltipAttribute : Attribute { public TooltipAttribute(string tooltip) { } }

    [AttributeUsage(AttributeTargets.Class, Inherited = false)]
    public sealed class DisallowMultipleComponent : Attribute { }

    [AttributeUsage(AttributeTargets.Class, Inherited = true, AllowMultiple = true)]
    public sealed class RequireComponent : Attribute { public RequireComponent(Type requiredComponent) { } }

    [AttributeUsage(AttributeTargets.Class)]
    public sealed class AddComponentMenu : Attribute { public AddComponentMenu(string menuName) { } }

    [AttributeUsage(AttributeTargets.Class)]
    public class DefaultExecutionOrder : Attribute { public DefaultExecutionOrder(int order) { } }
}

namespace UnityEditor
{
    public class SerializedProperty { }

    public abstract class PropertyDrawer
    {
        public virtual float GetPropertyHeight(SerializedProperty property, UnityEngine.GUIContent label) { return 18f; }
        public virtual void OnGUI(UnityEngine.Rect position, SerializedProperty property, UnityEngine.GUIContent label) { }
    }

    [AttributeUsage(AttributeTargets.Class, AllowMultiple = true)]
    public sealed class CustomPropertyDrawer : Attribute
    {
        public CustomPropertyDrawer(Type type) { }
    }

    public static class EditorGUI
    {
        public static float GetPropertyHeight(SerializedProperty property, UnityEngine.GUIContent label, bool includeChildren) { return 18f; }
        public static bool PropertyField(UnityEngine.Rect position, SerializedProperty property, UnityEngine.GUIContent label, bool includeChildren) { return false; }

        public struct DisabledScope : IDisposable
        {
            public DisabledScope(bool disabled) { }
            public void Dispose() { }
        }
    }

    public enum BuildTarget { StandaloneOSX = 2, StandaloneWindows = 5, iOS = 9, Android = 13, StandaloneWindows64 = 19, WebGL = 20, StandaloneLinux64 = 24 }

    public static class EditorUserBuildSettings
    {
        /// <summary>Settable here (in Unity it follows File > Build Settings).</summary>
        public static BuildTarget activeBuildTarget = BuildTarget.StandaloneLinux64;
    }

    /// <summary>Editor-only in Unity (compiled here with UNITY_EDITOR defined); the harness raises it to simulate
    /// a script recompile during play.</summary>
    public static class AssemblyReloadEvents
    {
        public delegate void AssemblyReloadCallback();
        public static event AssemblyReloadCallback beforeAssemblyReload;
        public static void RaiseBeforeAssemblyReload() { var h = beforeAssemblyReload; if (h != null) h(); }
    }
}

namespace UnityEngine.Events
{
    public class UnityEvent
    {
        private readonly System.Collections.Generic.List<UnityAction> listeners = new System.Collections.Generic.List<UnityAction>();
        public void AddListener(UnityAction call) { listeners.Add(call); }
        public void RemoveListener(UnityAction call) { listeners.Remove(call); }
        public void Invoke() { foreach (var call in listeners.ToArray()) call(); }
    }

    public delegate void UnityAction();

    // Abstract as in Unity before 2020.1, so that a script using the generic type directly fails here too.
    public abstract class UnityEvent<T0>
    {
        private readonly System.Collections.Generic.List<UnityAction<T0>> listeners = new System.Collections.Generic.List<UnityAction<T0>>();
        public void AddListener(UnityAction<T0> call) { listeners.Add(call); }
        public void RemoveListener(UnityAction<T0> call) { listeners.Remove(call); }
        public int GetPersistentEventCount() { return 0; }
        public void Invoke(T0 arg0) { foreach (var call in listeners.ToArray()) call(arg0); }
    }

    public delegate void UnityAction<T0>(T0 arg0);
}
