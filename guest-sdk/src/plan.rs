//! Collapsing a batch into as few host calls as possible while keeping its final outcome.
//!
//! The host interface is batched: one `embed` for every text of a batch and one `upsert` for
//! every point is far cheaper than one per event. But a batch is ordered (a row inserted and
//! deleted in it must end up deleted; a truncate wipes what came before it), so calls cannot
//! simply be grouped by kind. [`WritePlan`] records the batch in order, keeps only the last
//! action per point, and then runs: the table deletions of truncates, one `delete`, one
//! `embed`, one `upsert`, one `merge`. Because each point appears once after collapsing (a
//! point upserted then merged in one batch is in both calls, and the merge runs after the
//! upsert) and truncates run first, that order gives the same result as replaying the events
//! one by one.

use std::collections::HashMap;

use crate::{Error, Point, PointKey, host};

/// The writes of one batch, collapsed to the last action per point.
#[derive(Debug, Default)]
pub struct WritePlan {
    truncated: Vec<(String, String)>,
    actions: Vec<Action>,
    /// Position in `actions` of each point's action.
    index: HashMap<(String, String, Vec<String>), usize>,
}

#[derive(Debug)]
enum Action {
    /// Write the point; embed `text` for its vector, or keep the stored vector when `None`.
    Write {
        key: PointKey,
        text: Option<String>,
        /// Delete the stored point first (it was deleted earlier in the batch and is now
        /// written by merges only, which must not meet its old payload).
        delete_first: bool,
        /// The payload that replaces the stored one (`upsert`), if any.
        payload: Option<String>,
        /// Payloads merged in after it (`merge`), in order.
        merges: Vec<String>,
    },
    Delete(PointKey),
    /// Superseded by a truncate of its table.
    Dropped,
}

/// The host calls a plan turns into, in the order they must run.
#[derive(Debug, Default, PartialEq)]
struct Calls {
    delete_tables: Vec<(String, String)>,
    deletes: Vec<PointKey>,
    texts: Vec<String>,
    /// Points with, for those to embed, the index of their text in `texts`.
    upserts: Vec<(PointKey, Option<usize>, String)>,
    /// Merged points, likewise; a point's vector travels in its upsert when it has one.
    merges: Vec<(PointKey, Option<usize>, String)>,
}

fn map_key(key: &PointKey) -> (String, String, Vec<String>) {
    (key.schema.clone(), key.table.clone(), key.key.clone())
}

impl WritePlan {
    /// An empty plan.
    pub fn new() -> WritePlan {
        WritePlan::default()
    }

    fn set(&mut self, key: &PointKey, action: Action) {
        match self.index.get(&map_key(key)) {
            Some(&position) => self.actions[position] = action,
            None => {
                self.index.insert(map_key(key), self.actions.len());
                self.actions.push(action);
            }
        }
    }

    /// The action planned so far for `key`.
    fn current(&mut self, key: &PointKey) -> Option<&mut Action> {
        let position = *self.index.get(&map_key(key))?;
        Some(&mut self.actions[position])
    }

    /// Writes the point `key` with `payload`, which replaces the stored payload, embedding
    /// `text` for its vector. With `text` `None` the stored vector is kept (the embedded text
    /// did not change); if this batch already embeds a text for the point, that text is kept.
    pub fn upsert(&mut self, key: PointKey, text: Option<String>, payload: String) {
        let text = match (text, self.current(&key)) {
            (Some(text), _) => Some(text),
            (None, Some(Action::Write { text, .. })) => text.take(),
            (None, _) => None,
        };
        self.set(
            &key.clone(),
            Action::Write {
                key,
                text,
                delete_first: false,
                payload: Some(payload),
                merges: Vec::new(),
            },
        );
    }

    /// Writes the point `key` merging `payload` (a JSON object) into the stored payload: its
    /// keys replace or add those of the same name, the stored point's other keys stay. For a
    /// row whose payload is partial ([`ChangeEvent::is_partial`](crate::ChangeEvent::is_partial)),
    /// so a column the update left unchanged keeps its stored value. `text` as for
    /// [`WritePlan::upsert`]. A point the store does not have is created from `payload` when
    /// there is a text to embed, and skipped (with a warning in the host's log) otherwise.
    pub fn merge(&mut self, key: PointKey, text: Option<String>, payload: String) {
        match self.current(&key) {
            Some(Action::Write {
                text: planned,
                merges,
                ..
            }) => {
                if text.is_some() {
                    *planned = text;
                }
                merges.push(payload);
            }
            Some(action @ Action::Delete(_)) => {
                *action = Action::Write {
                    key,
                    text,
                    delete_first: true,
                    payload: None,
                    merges: vec![payload],
                };
            }
            Some(Action::Dropped) | None => self.set(
                &key.clone(),
                Action::Write {
                    key,
                    text,
                    delete_first: false,
                    payload: None,
                    merges: vec![payload],
                },
            ),
        }
    }

    /// Deletes the point `key`.
    pub fn delete(&mut self, key: PointKey) {
        self.set(&key.clone(), Action::Delete(key));
    }

    /// Deletes every point of `schema.table`, and forgets the writes planned for it so far.
    pub fn truncate(&mut self, schema: String, table: String) {
        let superseded: Vec<usize> = self
            .index
            .iter()
            .filter(|((s, t, _), _)| *s == schema && *t == table)
            .map(|(_, &position)| position)
            .collect();
        for position in superseded {
            self.actions[position] = Action::Dropped;
        }
        self.index
            .retain(|(s, t, _), _| *s != schema || *t != table);
        if !self.truncated.contains(&(schema.clone(), table.clone())) {
            self.truncated.push((schema, table));
        }
    }

    /// Whether the plan has nothing to do.
    pub fn is_empty(&self) -> bool {
        self.truncated.is_empty() && self.index.is_empty()
    }

    fn into_calls(self) -> Calls {
        let mut calls = Calls {
            delete_tables: self.truncated,
            ..Calls::default()
        };
        for action in self.actions {
            match action {
                Action::Write {
                    key,
                    text,
                    delete_first,
                    payload,
                    merges,
                } => {
                    let mut text_index = text.map(|text| {
                        calls.texts.push(text);
                        calls.texts.len() - 1
                    });
                    if delete_first {
                        calls.deletes.push(key.clone());
                    }
                    if let Some(payload) = payload {
                        calls
                            .upserts
                            .push((key.clone(), text_index.take(), payload));
                    }
                    for payload in merges {
                        calls.merges.push((key.clone(), text_index.take(), payload));
                    }
                }
                Action::Delete(key) => calls.deletes.push(key),
                Action::Dropped => {}
            }
        }
        calls
    }

    /// Runs the plan: `delete-table` per truncated table, then at most one `delete`, one
    /// `embed`, one `upsert` and one `merge`. Stops at the first host error.
    pub fn execute(self) -> Result<(), Error> {
        let calls = self.into_calls();
        for (schema, table) in &calls.delete_tables {
            host::delete_table(schema, table)?;
        }
        if !calls.deletes.is_empty() {
            host::delete(&calls.deletes)?;
        }
        let mut vectors = if calls.texts.is_empty() {
            Vec::new()
        } else {
            host::embed(&calls.texts)?
        };
        if vectors.len() != calls.texts.len() {
            return Err(Error::new(format!(
                "embed returned {} vectors for {} texts",
                vectors.len(),
                calls.texts.len()
            )));
        }
        let mut points = |writes: Vec<(PointKey, Option<usize>, String)>| -> Vec<Point> {
            writes
                .into_iter()
                .map(|(key, text_index, payload)| Point {
                    key,
                    vector: text_index.map(|index| std::mem::take(&mut vectors[index])),
                    payload,
                })
                .collect()
        };
        let upserts = points(calls.upserts);
        let merges = points(calls.merges);
        if !upserts.is_empty() {
            host::upsert(&upserts)?;
        }
        if !merges.is_empty() {
            host::merge(&merges)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(table: &str, id: &str) -> PointKey {
        PointKey {
            schema: "public".to_owned(),
            table: table.to_owned(),
            key: vec![id.to_owned()],
        }
    }

    #[test]
    fn last_action_per_point_wins_and_kept_vectors_keep_the_pending_text() {
        let mut plan = WritePlan::new();
        plan.upsert(key("docs", "1"), Some("first".into()), "{\"v\":1}".into());
        plan.delete(key("docs", "2"));
        plan.upsert(key("docs", "2"), Some("again".into()), "{}".into());
        plan.upsert(key("docs", "1"), None, "{\"v\":2}".into());
        plan.upsert(key("docs", "3"), Some("gone".into()), "{}".into());
        plan.delete(key("docs", "3"));
        plan.upsert(key("docs", "4"), None, "{\"only\":\"payload\"}".into());

        let calls = plan.into_calls();
        assert!(calls.delete_tables.is_empty());
        assert_eq!(calls.deletes, vec![key("docs", "3")]);
        assert_eq!(calls.texts, vec!["first".to_owned(), "again".to_owned()]);
        assert_eq!(
            calls.upserts,
            vec![
                (key("docs", "1"), Some(0), "{\"v\":2}".to_owned()),
                (key("docs", "2"), Some(1), "{}".to_owned()),
                (key("docs", "4"), None, "{\"only\":\"payload\"}".to_owned()),
            ]
        );
    }

    #[test]
    fn merges_follow_the_upsert_of_their_point_and_take_its_text() {
        let mut plan = WritePlan::new();
        plan.upsert(key("docs", "1"), Some("first".into()), "{\"v\":1}".into());
        plan.merge(key("docs", "1"), None, "{\"n\":1}".into());
        plan.merge(key("docs", "2"), None, "{\"n\":2}".into());
        plan.merge(key("docs", "2"), Some("second".into()), "{\"n\":3}".into());
        plan.delete(key("docs", "3"));
        plan.merge(key("docs", "3"), Some("third".into()), "{\"n\":4}".into());
        plan.merge(key("docs", "4"), None, "{\"n\":5}".into());
        plan.upsert(key("docs", "4"), None, "{\"v\":4}".into());

        let calls = plan.into_calls();
        assert_eq!(calls.deletes, vec![key("docs", "3")]);
        assert_eq!(
            calls.texts,
            vec!["first".to_owned(), "second".to_owned(), "third".to_owned()]
        );
        assert_eq!(
            calls.upserts,
            vec![
                (key("docs", "1"), Some(0), "{\"v\":1}".to_owned()),
                (key("docs", "4"), None, "{\"v\":4}".to_owned()),
            ]
        );
        assert_eq!(
            calls.merges,
            vec![
                (key("docs", "1"), None, "{\"n\":1}".to_owned()),
                (key("docs", "2"), Some(1), "{\"n\":2}".to_owned()),
                (key("docs", "2"), None, "{\"n\":3}".to_owned()),
                (key("docs", "3"), Some(2), "{\"n\":4}".to_owned()),
            ]
        );
    }

    #[test]
    fn truncate_drops_earlier_writes_of_its_table_only() {
        let mut plan = WritePlan::new();
        plan.upsert(key("docs", "1"), Some("a".into()), "{}".into());
        plan.upsert(key("other", "1"), Some("b".into()), "{}".into());
        plan.delete(key("docs", "9"));
        plan.truncate("public".into(), "docs".into());
        plan.upsert(key("docs", "2"), Some("c".into()), "{}".into());

        let calls = plan.into_calls();
        assert_eq!(
            calls.delete_tables,
            vec![("public".to_owned(), "docs".to_owned())]
        );
        assert!(calls.deletes.is_empty());
        assert_eq!(calls.texts, vec!["b".to_owned(), "c".to_owned()]);
        assert_eq!(calls.upserts.len(), 2);
    }
}
