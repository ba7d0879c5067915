"""Keeps a vector store in sync with a table that has a `content` text column.

- insert / update: embeds `content` and upserts the point (keyed by the row's key columns)
  with the row as a JSON payload;
- update that did not touch a TOASTed `content` (Postgres sends it as unchanged): upserts
  without a vector, so the store keeps the embedding and replaces only the payload;
- update that changed the key: deletes the point of the old key;
- `content` NULL or blank (empty or only ASCII whitespace): deletes the point (there is
  nothing to embed);
- delete: deletes the point; truncate: deletes every point of the table.

The payload is the row without `content`: the vector stands for it, and leaving it out is what
makes the unchanged case exact (a payload-only update then replaces the payload with one that
lacks nothing). A batch costs one `embed` call and one `upsert` call (plus one `delete` if
anything was deleted), whatever its size: `WritePlan` keeps the last action per row.

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
        if event.operation in (Operation.INSERT, Operation.UPDATE):
            key = event.point_key()
            old_key = event.old_point_key()
            if old_key is not None and old_key != key:
                plan.delete(old_key)
            payload = event.row_json(skip=[CONTENT])
            content = event.row.text(CONTENT)
            if content is UNCHANGED:
                plan.upsert(key, None, payload)
            elif content is None or not content.strip(ASCII_WHITESPACE):
                # Blank text has no meaning to embed, and OpenAI-compatible servers refuse
                # empty input: such a row gets no point.
                plan.delete(key)
            else:
                plan.upsert(key, content, payload)
        elif event.operation == Operation.DELETE:
            plan.delete(event.point_key())
        elif event.operation == Operation.TRUNCATE:
            plan.truncate(event.schema, event.table)
    plan.execute()


WitWorld = pgstream.export(handle)
