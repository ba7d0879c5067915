//! Rows as JSON objects, written by hand so a handler needs no JSON library for its payloads.
//!
//! Column values keep their meaning where JSON has it: integers, floats and numerics whose
//! text is a valid JSON number become numbers, bools become `true`/`false`, `json`/`jsonb`
//! values (already valid JSON, checked by Postgres) are embedded as they are, NULL is `null`,
//! and everything else (including `NaN`/`Infinity`) is a string.

use std::fmt::Write;

use crate::row::type_oid;
use crate::{Column, Value};

/// Writes the row as a JSON object. Unchanged columns take their value from `old_row` when it
/// has one for them, and are left out otherwise; columns named in `skip` are left out.
pub(crate) fn row_json(row: &[Column], old_row: Option<&[Column]>, skip: &[&str]) -> String {
    let mut out = String::with_capacity(64 + row.len() * 32);
    out.push('{');
    let mut first = true;
    for column in row {
        if skip.contains(&column.name.as_str()) {
            continue;
        }
        let value = match &column.value {
            Value::Unchanged => {
                let old = old_row
                    .and_then(|old| old.iter().find(|old| old.name == column.name))
                    .map(|old| &old.value);
                match old {
                    Some(old @ (Value::Null | Value::Text(_))) => old,
                    Some(Value::Unchanged) | None => continue,
                }
            }
            value => value,
        };
        if !first {
            out.push(',');
        }
        first = false;
        write_string(&mut out, &column.name);
        out.push(':');
        match value {
            Value::Text(text) => write_value(&mut out, text, column.type_oid),
            Value::Null | Value::Unchanged => out.push_str("null"),
        }
    }
    out.push('}');
    out
}

/// Writes one non-null value of type `oid` as JSON.
pub(crate) fn write_value(out: &mut String, text: &str, oid: u32) {
    match oid {
        type_oid::INT2
        | type_oid::INT4
        | type_oid::INT8
        | type_oid::OID
        | type_oid::FLOAT4
        | type_oid::FLOAT8
        | type_oid::NUMERIC
            if is_json_number(text) =>
        {
            out.push_str(text)
        }
        type_oid::BOOL if text == "t" => out.push_str("true"),
        type_oid::BOOL if text == "f" => out.push_str("false"),
        type_oid::JSON | type_oid::JSONB => out.push_str(text),
        _ => write_string(out, text),
    }
}

/// Writes `text` as a JSON string literal.
pub(crate) fn write_string(out: &mut String, text: &str) {
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c < ' ' => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Whether `text` is a number in JSON's grammar: `-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?`.
fn is_json_number(text: &str) -> bool {
    let bytes = text.as_bytes();
    let mut at = 0;
    let digits = |at: &mut usize| {
        let start = *at;
        while bytes.get(*at).is_some_and(u8::is_ascii_digit) {
            *at += 1;
        }
        *at - start
    };
    if bytes.get(at) == Some(&b'-') {
        at += 1;
    }
    let integer_start = at;
    match digits(&mut at) {
        0 => return false,
        n if n > 1 && bytes[integer_start] == b'0' => return false,
        _ => {}
    }
    if bytes.get(at) == Some(&b'.') {
        at += 1;
        if digits(&mut at) == 0 {
            return false;
        }
    }
    if matches!(bytes.get(at), Some(b'e' | b'E')) {
        at += 1;
        if matches!(bytes.get(at), Some(b'+' | b'-')) {
            at += 1;
        }
        if digits(&mut at) == 0 {
            return false;
        }
    }
    at == bytes.len()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Operation;
    use crate::row::tests::{column, event, text};

    #[test]
    fn json_numbers_are_recognised() {
        for good in ["0", "-1", "12.5", "1e+20", "1E-7", "-0.0"] {
            assert!(is_json_number(good), "{good}");
        }
        for bad in [
            "", "-", "01", "1.", ".5", "NaN", "Infinity", "1e", "+1", "1 ",
        ] {
            assert!(!is_json_number(bad), "{bad}");
        }
    }

    #[test]
    fn row_json_types_values_and_omits_unchanged_columns() {
        let event = event(
            Operation::Update,
            vec![
                column("id", type_oid::INT8, text("7")),
                column("price", type_oid::NUMERIC, text("NaN")),
                column("ok", type_oid::BOOL, text("f")),
                column("meta", type_oid::JSONB, text(r#"{"k": "v"}"#)),
                column("title", type_oid::TEXT, text("a \"quoted\"\nline\u{1}")),
                column("gone", type_oid::TEXT, Value::Null),
                column("content", type_oid::TEXT, Value::Unchanged),
            ],
        );
        assert_eq!(
            event.row_json(),
            r#"{"id":7,"price":"NaN","ok":false,"meta":{"k": "v"},"title":"a \"quoted\"\nline\u0001","gone":null}"#
        );
    }

    #[test]
    fn row_json_with_fills_unchanged_from_old_row_and_skips_columns() {
        let mut event = event(
            Operation::Update,
            vec![
                column("id", type_oid::INT8, text("7")),
                column("body", type_oid::TEXT, Value::Unchanged),
                column("content", type_oid::TEXT, text("new")),
            ],
        );
        event.old_row = Some(vec![
            column("id", type_oid::INT8, text("7")),
            column("body", type_oid::TEXT, text("old body")),
            column("content", type_oid::TEXT, text("old")),
        ]);
        assert_eq!(
            event.row_json_with(&["content"]),
            r#"{"id":7,"body":"old body"}"#
        );
    }
}
