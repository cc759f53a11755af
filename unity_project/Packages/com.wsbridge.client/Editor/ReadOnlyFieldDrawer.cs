// ReadOnlyFieldDrawer.cs: shows a field marked [ReadOnlyField] greyed out in the Inspector (CommandListener's
// Status): visible, never editable. Editor only (WebSocketBridge.Editor.asmdef). C# 7.2 (compiled with mcs in the
// tests against the UnityEditor stand-in).

using UnityEditor;
using UnityEngine;

namespace WebSocketBridge.Editor
{
    [CustomPropertyDrawer(typeof(ReadOnlyFieldAttribute))]
    internal sealed class ReadOnlyFieldDrawer : PropertyDrawer
    {
        public override float GetPropertyHeight(SerializedProperty property, GUIContent label)
        {
            return EditorGUI.GetPropertyHeight(property, label, true);
        }

        public override void OnGUI(Rect position, SerializedProperty property, GUIContent label)
        {
            using (new EditorGUI.DisabledScope(true))
            {
                EditorGUI.PropertyField(position, property, label, true);
            }
        }
    }
}
