"""Keeps a vector store in sync with a table that has a `content` text column.

- insert / update / read (a row a backfill delivers): embeds `content` and writes the point
  (keyed by the row's key columns) with the row, `content` included, as its JSON payload, so
  retrieval can read the text back from the store;
- update that left some TOASTed column unchanged (Postgres did not send it): the payload lacks
  that column, so it is merged into the stored payload instead of replacing it and the stored
  value survives; when `content` itself is unchanged the stored vector is kept;
- update that changed the key: deletes the point of the old key;
- `content` NULL or blank (empty or only ASCII whitespace): deletes the point (there is
  nothing to embed);
- delete: deletes the point; truncate: deletes every point of the table.

A batch costs one `embed` call and one `upsert` call (plus one `merge` and one `delete` when
needed), whatever its size: `WritePlan` keeps the last action per row.

`pgstream.py` (next to this file) is the helper module: typed rows, keys, payloads, write plans.
"""

import pgstream
from pgstream import UNCHANGED, Event, Operation, WritePlan

# The column whose text is embedded.
CONTENT = "content"

# What counts as blank: the ASCII whitespace of the Rust example's `trim_ascii`.
ASCII_WHITESPACE = " \t\n\r\f"


def handle(events: list[Event]) -> None:
    plan = WritePlan()
    for event in events:
        if event.operation in (Operation.INSERT, Operation.UPDATE, Operation.READ):
            key = event.point_key()
            old_key = event.old_point_key()
            if old_key is not None and old_key != key:
                plan.delete(old_key)
            content = event.row.text(CONTENT)
            if content is not UNCHANGED and (
                content is None or not content.strip(ASCII_WHITESPACE)
            ):
                # Blank text has no meaning to embed, and OpenAI-compatible servers refuse
                # empty input: such a row gets no point.
                plan.delete(key)
                continue
            text = None if content is UNCHANGED else content
            if event.is_partial():
                plan.merge(key, text, event.row_json())
            else:
                plan.upsert(key, text, event.row_json())
        elif event.operation == Operation.DELETE:
            plan.delete(event.point_key())
        elif event.operation == Operation.TRUNCATE:
            plan.truncate(event.schema, event.table)
    plan.execute()


WitWorld = pgstream.export(handle)
