// Keeps a vector store in sync with a table that has a `content` text column, as the example
// handlers in every language do (this file is also what `pgstream-host new --lang js` starts
// a project with; change it to fit your tables):
//
// - insert / update: embeds `content` and upserts the point (keyed by the row's key columns)
//   with the row as a JSON payload;
// - update that did not touch a TOASTed `content` (Postgres sends it as unchanged): upserts
//   without a vector, so the store keeps the embedding and replaces only the payload;
// - update that changed the key: deletes the point of the old key;
// - `content` NULL or blank (empty or only ASCII whitespace): deletes the point (there is
//   nothing to embed);
// - delete: deletes the point; truncate: deletes every point of the table.
//
// The payload is the row without `content`: the vector stands for the content, and leaving it
// out is what makes the unchanged case exact (a payload-only update then lacks nothing).
// A batch costs one `embed` call and one `upsert` call (plus one `delete` if anything was
// deleted), whatever its size: `WritePlan` collapses it to the last action per row. The host
// retries a batch whose call threw, so everything here must be safe to run twice (upserts and
// deletes by key are).

import { UNCHANGED, WritePlan, handler, oldPointKey, pointKey, row, rowJson, sameKey } from "./pgstream.ts";

/** The column whose text is embedded. Change it to match your table. */
const CONTENT = "content";

/** Blank: empty or only the ASCII whitespace of the Rust example's `trim_ascii`. */
const BLANK = /^[ \t\n\r\f]*$/;

export const handle = handler(function handleBatch(events) {
  const plan = new WritePlan();
  for (const event of events) {
    switch (event.operation) {
      case "insert":
      case "update": {
        const key = pointKey(event);
        const oldKey = oldPointKey(event);
        if (oldKey !== null && !sameKey(oldKey, key)) plan.delete(oldKey);
        const payload = rowJson(event, { skip: [CONTENT] });
        const content = row(event).text(CONTENT);
        // Blank text has no meaning to embed, and OpenAI-compatible servers refuse empty
        // input: such a row gets no point.
        if (content === UNCHANGED) plan.upsert(key, null, payload);
        else if (content === null || BLANK.test(content)) plan.delete(key);
        else plan.upsert(key, content, payload);
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
