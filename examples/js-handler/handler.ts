// Keeps a vector store in sync with a table that has a `content` text column, as the example
// handlers in every language do (this file is also what `pgstream-host new --lang js` starts
// a project with; change it to fit your tables):
//
// - insert / update / read (a row a backfill delivers): embeds `content` and writes the point
//   (keyed by the row's key columns) with the row, `content` included, as its JSON payload, so
//   retrieval can read the text back from the store;
// - update that left some TOASTed column unchanged (Postgres did not send it): the payload
//   lacks that column, so it is merged into the stored payload instead of replacing it and the
//   stored value survives; when `content` itself is unchanged the stored vector is kept;
// - update that changed the key: deletes the point of the old key;
// - `content` NULL or blank (empty or only ASCII whitespace): deletes the point (there is
//   nothing to embed);
// - delete: deletes the point; truncate: deletes every point of the table.
//
// A batch costs one `embed` call and one `upsert` call (plus one `merge` and one `delete` when
// needed), whatever its size: `WritePlan` collapses it to the last action per row. The host
// retries a batch whose call threw, so everything here must be safe to run twice (writes and
// deletes by key are).

import { UNCHANGED, WritePlan, handler, isPartial, oldPointKey, pointKey, row, rowJson, sameKey } from "./pgstream.ts";

/** The column whose text is embedded. Change it to match your table. */
const CONTENT = "content";

/** Blank: empty or only the ASCII whitespace of the Rust example's `trim_ascii`. */
const BLANK = /^[ \t\n\r\f]*$/;

export const handle = handler(function handleBatch(events) {
  const plan = new WritePlan();
  for (const event of events) {
    switch (event.operation) {
      case "insert":
      case "update":
      case "read": {
        const key = pointKey(event);
        const oldKey = oldPointKey(event);
        if (oldKey !== null && !sameKey(oldKey, key)) plan.delete(oldKey);
        const content = row(event).text(CONTENT);
        // Blank text has no meaning to embed, and OpenAI-compatible servers refuse empty
        // input: such a row gets no point.
        if (content !== UNCHANGED && (content === null || BLANK.test(content))) {
          plan.delete(key);
          break;
        }
        const text = content === UNCHANGED ? null : content;
        if (isPartial(event)) plan.merge(key, text, rowJson(event));
        else plan.upsert(key, text, rowJson(event));
        break;
      }
      case "delete":
        plan.delete(pointKey(event));
        break;
      case "truncate":
        plan.truncate(event.schema, event.table);
        break;
    }
  }
  plan.execute();
});
