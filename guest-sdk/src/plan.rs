//! Collapsing a batch into as few host calls as possible while keeping its final outcome.
//!
//! The host interface is batched: one `embed` for every text of a batch and one `upsert` for
//! every point is far cheaper than one per event. But a batch is ordered (a row inserted and
//! deleted in it must end up deleted; a truncate wipes what came before it), so calls cannot
//! simply be grouped by kind. [`WritePlan`] records the batch in order, keeps only the last
//! action per point, and then runs: the table deletions of truncates, one `delete`, one
//! `embed`, one `upsert`. Because each point appears once after collapsing and truncates run
//! first, that order gives the same result as replaying the events one by one.

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
    Upsert {
        key: PointKey,
        text: Option<String>,
        payload: String,
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

    /// Writes the point `key` with `payload`, embedding `text` for its vector. With `text`
    /// `None` the stored vector is kept (the embedded text did not change); if this batch
    /// already embeds a text for the point, that text is kept and only the payload replaced.
    pub fn upsert(&mut self, key: PointKey, text: Option<String>, payload: String) {
        let text = match (text, self.index.get(&map_key(&key))) {
            (Some(text), _) => Some(text),
            (None, Some(&position)) => match &mut self.actions[position] {
                Action::Upsert { text, .. } => text.take(),
                Action::Delete(_) | Action::Dropped => None,
            },
            (None, None) => None,
        };
        self.set(&key.clone(), Action::Upsert { key, text, payload });
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
                Action::Upsert { key, text, payload } => {
                    let text_index = text.map(|text| {
                        calls.texts.push(text);
                        calls.texts.len() - 1
                    });
                    calls.upserts.push((key, text_index, payload));
                }
                Action::Delete(key) => calls.deletes.push(key),
                Action::Dropped => {}
            }
        }
        calls
    }

    /// Runs the plan: `delete-table` per truncated table, then at most one `delete`, one
    /// `embed` and one `upsert`. Stops at the first host error.
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
        let points: Vec<Point> = calls
            .upserts
            .into_iter()
            .map(|(key, text_index, payload)| Point {
                key,
                vector: text_index.map(|index| std::mem::take(&mut vectors[index])),
                payload,
            })
            .collect();
        if !points.is_empty() {
            host::upsert(&points)?;
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
