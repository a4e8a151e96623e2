//! What the config types show of themselves in their JSON schema
//! (`schemars`), where their Rust type is not what an operator writes: a
//! duration is text such as `"30s"`, a size text such as `"512M"`. The
//! schema is what the config reference (`reference.rs`) is rendered from,
//! so these shapes and the defaults they print are what the man page and
//! docs/config.md say. A leaf: the section files use it, it uses none.

use std::borrow::Cow;

use schemars::{json_schema, JsonSchema, Schema, SchemaGenerator};

/// A duration as written in the config: `"90s"`, `"1m"`, `"500ms"`
/// (humantime). Only the schema: parsing is `super::duration` and the
/// fields' own checks.
pub(crate) struct DurationText;

impl JsonSchema for DurationText {
    fn schema_name() -> Cow<'static, str> {
        "Duration".into()
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({ "type": "string", "format": "duration" })
    }

    fn inline_schema() -> bool {
        true
    }
}

/// A byte size as written in the config: `"512M"`, `"8G"` or a number of
/// bytes (`size.rs`).
pub(crate) struct SizeText;

impl JsonSchema for SizeText {
    fn schema_name() -> Cow<'static, str> {
        "Size".into()
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({ "type": "string", "format": "size" })
    }

    fn inline_schema() -> bool {
        true
    }
}

/// Writes a duration default as the config would (`"1m"`, `"50us"`), for
/// the schema's `default`; serde calls this only through schemars, since
/// the config types are never serialized otherwise.
pub(crate) fn duration_text<S: serde::Serializer>(
    value: &std::time::Duration,
    s: S,
) -> Result<S::Ok, S::Error> {
    s.serialize_str(&humantime::format_duration(*value).to_string())
}

/// Writes a byte-count default as the config would: the largest binary
/// unit that divides it (`536870912` is `"512M"`).
pub(crate) fn size_text<S: serde::Serializer>(value: &u64, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&size_string(*value))
}

pub(crate) fn size_string(bytes: u64) -> String {
    for (shift, unit) in [(50, "P"), (40, "T"), (30, "G"), (20, "M"), (10, "K")] {
        if bytes != 0 && bytes.is_multiple_of(1u64 << shift) {
            return format!("{}{unit}", bytes >> shift);
        }
    }
    bytes.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_print_in_the_largest_exact_unit() {
        assert_eq!(size_string(512 << 20), "512M");
        assert_eq!(size_string(1 << 40), "1T");
        assert_eq!(size_string(4097), "4097");
        assert_eq!(size_string(0), "0");
    }
}
