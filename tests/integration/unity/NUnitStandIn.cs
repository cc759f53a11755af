// NUnitStandIn.cs: the few NUnit members the package's Tests/ use, and a runner that invokes every [Test],
// so the Unity Test Framework tests also run here (Mono has no NUnit). Not NUnit: add members when the
// package tests start using them, with NUnit's signatures. C# 7.2 (mcs).

using System;
using System.Linq;
using System.Reflection;

namespace NUnit.Framework
{
    [AttributeUsage(AttributeTargets.Class)]
    public sealed class TestFixtureAttribute : Attribute { }

    [AttributeUsage(AttributeTargets.Method)]
    public sealed class TestAttribute : Attribute { }

    public sealed class AssertionException : Exception
    {
        public AssertionException(string message) : base(message) { }
    }

    public static class Assert
    {
        public static void IsTrue(bool condition) { if (!condition) throw new AssertionException("expected true"); }
        public static void IsFalse(bool condition) { if (condition) throw new AssertionException("expected false"); }
        public static void IsNull(object value) { if (value != null) throw new AssertionException("expected null, got " + value); }
        public static void IsNotNull(object value) { if (value == null) throw new AssertionException("expected not null"); }

        public static void AreEqual(object expected, object actual)
        {
            if (!Equals(expected, actual)) throw new AssertionException("expected <" + expected + ">, got <" + actual + ">");
        }

        public static T Throws<T>(Action code) where T : Exception
        {
            try { code(); }
            catch (T e) { return e; }
            catch (Exception e) { throw new AssertionException("expected " + typeof(T).Name + ", got " + e.GetType().Name); }
            throw new AssertionException("expected " + typeof(T).Name + ", nothing was thrown");
        }
    }
}

internal static class NUnitRunner
{
    private static int Main()
    {
        int failed = 0, run = 0;
        var fixtures = typeof(NUnitRunner).Assembly.GetTypes()
            .Where(t => t.GetCustomAttributes(typeof(NUnit.Framework.TestFixtureAttribute), false).Length > 0);
        foreach (var fixture in fixtures)
        {
            foreach (var test in fixture.GetMethods().Where(m => m.GetCustomAttributes(typeof(NUnit.Framework.TestAttribute), false).Length > 0))
            {
                run++;
                try
                {
                    test.Invoke(Activator.CreateInstance(fixture), null);
                    Console.WriteLine("ok " + fixture.Name + "." + test.Name);
                }
                catch (TargetInvocationException e)
                {
                    failed++;
                    Console.WriteLine("FAIL: " + fixture.Name + "." + test.Name + ": " + e.InnerException.Message);
                }
            }
        }
        Console.WriteLine(failed == 0 ? "PASS nunit " + run : failed + " of " + run + " failed");
        Console.Out.Flush();
        Environment.Exit(failed == 0 && run > 0 ? 0 : 1);
        return 0;
    }
}
