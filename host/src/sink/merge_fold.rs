//! The points of a `merge` call as the stores apply them: one write per point, in the order
//! the handler gave them.
//!
//! A store applies one write per point and request (an `INSERT ... ON CONFLICT` or
//! `UPDATE ... FROM` touches each row once, a Qdrant batch is not ordered within itself), so
//! the points of a call are first folded per key here: a later point's payload keys replace
//! an earlier one's, and its vector, when it has one, replaces the earlier vector. Each
//! payload is parsed once, which is also where one that is not a JSON object is refused
//! before anything is written.

use std::collections::HashMap;

use serde_json::{Map, Value};

use super::SinkError;
use crate::point::{Point, PointKey};

/// One point's folded merge.
#[derive(Debug, PartialEq)]
pub(crate) struct MergedPoint<'a> {
    pub(crate) key: &'a PointKey,
    /// The last vector given for the point, if any.
    pub(crate) vector: Option<&'a [f32]>,
    /// The keys to merge into the stored payload.
    pub(crate) payload: Map<String, Value>,
}

/// The points of one call folded to one write per key, in order of each key's first write;
/// `Err` names the first point whose payload is not a JSON object.
pub(crate) fn fold_merges(points: &[Point]) -> Result<Vec<MergedPoint<'_>>, SinkError> {
    let mut merged: Vec<MergedPoint<'_>> = Vec::with_capacity(points.len());
    let mut position: HashMap<&PointKey, usize> = HashMap::with_capacity(points.len());
    for point in points {
        let payload = match serde_json::from_str::<Value>(&point.payload) {
            Ok(Value::Object(object)) => object,
            Ok(other) => {
                return Err(SinkError::Rejected(format!(
                    "merge needs a JSON object as payload; the point for {} has {}",
                    describe(&point.key),
                    kind(&other)
                )));
            }
            Err(error) => {
                return Err(SinkError::Rejected(format!(
                    "the payload of the merge for {} is not valid JSON: {error}",
                    describe(&point.key)
                )));
            }
        };
        let vector = point.vector.as_deref();
        match position.get(&point.key) {
            Some(&index) => {
                let earlier = &mut merged[index];
                earlier.payload.extend(payload);
                earlier.vector = vector.or(earlier.vector);
            }
            None => {
                position.insert(&point.key, merged.len());
                merged.push(MergedPoint {
                    key: &point.key,
                    vector,
                    payload,
                });
            }
        }
    }
    Ok(merged)
}

fn describe(key: &PointKey) -> String {
    format!("{}.{} key {:?}", key.schema, key.table, key.key)
}

fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn point(id: &str, vector: Option<f32>, payload: &str) -> Point {
        Point {
            key: PointKey {
                schema: "public".into(),
                table: "docs".into(),
                key: vec![id.into()],
            },
            vector: vector.map(|v| vec![v; 2]),
            payload: payload.into(),
        }
    }

    #[test]
    fn later_writes_of_a_point_win_keys_and_vector_and_points_keep_first_order() {
        let points = [
            point("2", Some(1.0), r#"{"a": 1, "b": 1}"#),
            point("1", None, r#"{"a": 9}"#),
            point("2", None, r#"{"b": 2, "c": 3}"#),
            point("1", Some(5.0), r#"{}"#),
        ];
        let merged = fold_merges(&points).unwrap();
        assert_eq!(merged.len(), 2);
        assert_eq!(merged[0].key.key, vec!["2".to_owned()]);
        assert_eq!(merged[0].vector, Some(&[1.0, 1.0][..]));
        assert_eq!(
            Value::Object(merged[0].payload.clone()),
            json!({"a": 1, "b": 2, "c": 3})
        );
        assert_eq!(merged[1].vector, Some(&[5.0, 5.0][..]));
        assert_eq!(Value::Object(merged[1].payload.clone()), json!({"a": 9}));
    }

    #[test]
    fn a_payload_that_is_not_an_object_is_refused_with_its_key() {
        let error = fold_merges(&[point("1", None, "{}"), point("7", None, "[1]")]).unwrap_err();
        assert!(!error.is_retryable());
        let message = error.to_string();
        assert!(message.contains("key [\"7\"]"), "{message}");
        assert!(message.contains("an array"), "{message}");
        let error = fold_merges(&[point("1", None, "{oops")]).unwrap_err();
        assert!(error.to_string().contains("not valid JSON"), "{error}");
    }
}
