//! Schema adjustments the derives cannot express.

use schemars::Schema;

/// For an `Option<Enum>` field: keep the field's doc comment as its description.
///
/// kube's `OptionalEnum` rewrite hoists the enum's schema out of `anyOf: [enum, null]` and, with
/// it, the enum type's description, replacing the field's own (which is what `kubectl explain`
/// readers need). Dropping the inner description first leaves the field's in place.
pub(crate) fn field_doc_wins(schema: &mut Schema) {
    if let Some(any_of) = schema.get_mut("anyOf").and_then(|v| v.as_array_mut()) {
        for alternative in any_of {
            if let Some(obj) = alternative.as_object_mut() {
                obj.remove("description");
            }
        }
    }
}
