// Unit tests of pgstream.ts, run in Node by `make js-test` (bundled with fake-host.mjs in place
// of the host interface). The end-to-end behaviour in the real engine is covered by the e2e
// suite; these pin the parsing and planning rules, the same cases as the Rust guest SDK's.

import assert from "node:assert/strict";
import test from "node:test";

import {
  FieldError,
  Row,
  TypeOid,
  UNCHANGED,
  WritePlan,
  handler,
  isPartial,
  oldPointKey,
  parseTimestamp,
  pointKey,
  rowJson,
  toWitError,
} from "../pgstream.ts";
import * as fakeHost from "./fake-host.mjs";

const text = (val) => ({ tag: "text", val });
const NULL = { tag: "null" };
const UNCHANGED_VALUE = { tag: "unchanged" };
const column = (name, typeOid, value) => ({ name, typeOid, value });
const event = (operation, row, extra = {}) => ({
  operation,
  schema: "public",
  table: "documents",
  row,
  oldRow: null,
  keyColumns: ["id"],
  lsn: 1,
  commitTime: 0,
  xid: 1,
  ...extra,
});

test("getters decode by type and keep null and unchanged apart", () => {
  const row = new Row([
    column("id", TypeOid.INT8, text("9007199254740991")),
    column("big", TypeOid.INT8, text("9007199254740993")),
    column("price", TypeOid.NUMERIC, text("12.50")),
    column("ratio", TypeOid.FLOAT8, text("-Infinity")),
    column("ok", TypeOid.BOOL, text("f")),
    column("meta", TypeOid.JSONB, text('{"k": [1, "v"]}')),
    column("gone", TypeOid.TEXT, NULL),
    column("body", TypeOid.TEXT, UNCHANGED_VALUE),
  ]);
  assert.equal(row.int("id"), 9007199254740991);
  assert.throws(() => row.int("big"), /use bigint\(\)/);
  assert.equal(row.bigint("big"), 9007199254740993n);
  assert.equal(row.float("price"), 12.5);
  assert.equal(row.float("ratio"), -Infinity);
  assert.equal(row.bool("ok"), false);
  assert.deepEqual(row.json("meta"), { k: [1, "v"] });
  assert.equal(row.text("gone"), null);
  assert.equal(row.int("gone"), null);
  assert.equal(row.text("body"), UNCHANGED);
  assert.equal(row.value("big"), "9007199254740993");
  assert.equal(row.value("ok"), false);
  assert.equal(row.has("missing"), false);
});

test("getters throw FieldError naming the column and why", () => {
  const row = new Row([column("n", TypeOid.INT4, text("12a"))]);
  assert.throws(
    () => row.int("n"),
    (error) =>
      error instanceof FieldError &&
      error.column === "n" &&
      error.typeOid === TypeOid.INT4 &&
      error.message === 'column "n" (type oid 23): "12a" is not an integer',
  );
  assert.throws(() => row.text("nope"), { name: "FieldError", message: 'no column named "nope"' });
  assert.throws(() => row.float("n"), /is not a number/);
  assert.throws(() => row.bool("n"), /is not a bool/);
});

test("timestamps parse with offsets, fractions, dates and BC years", () => {
  const iso = (value, oid) => parseTimestamp(value, oid).toISOString();
  assert.equal(iso("2024-05-01 12:30:00.25+02", TypeOid.TIMESTAMPTZ), "2024-05-01T10:30:00.250Z");
  assert.equal(iso("2024-05-01 05:00:00-05:30", TypeOid.TIMESTAMPTZ), "2024-05-01T10:30:00.000Z");
  assert.equal(iso("1969-12-31 23:59:59.999999", TypeOid.TIMESTAMP), "1969-12-31T23:59:59.999Z");
  assert.equal(iso("2000-03-01", TypeOid.DATE), "2000-03-01T00:00:00.000Z");
  assert.equal(iso("0099-01-01", TypeOid.DATE), "0099-01-01T00:00:00.000Z");
  const ad = parseTimestamp("0001-01-01", TypeOid.DATE).getTime();
  const bc = parseTimestamp("0001-01-01 BC", TypeOid.DATE).getTime();
  assert.equal(ad - bc, 366 * 86_400_000);
  for (const bad of [
    "2024-05-01 12:30:00",
    "2024-13-01 12:30:00+00",
    "2024-05-01T12:30:00+00",
    "2024-05-01 12:30:00.1234567+00",
    "2024-05-01 12:30:00+00 extra",
    "infinity",
    "",
  ]) {
    assert.throws(() => parseTimestamp(bad, TypeOid.TIMESTAMPTZ), Error, bad);
  }
  assert.throws(() => parseTimestamp("2024-05-01", TypeOid.TEXT), /not a date or timestamp type/);
  const row = new Row([column("at", TypeOid.TIMESTAMPTZ, text("1970-01-01 00:00:01+00"))]);
  assert.equal(row.date("at").getTime(), 1000);
});

test("rowJson types values, omits unchanged columns and escapes strings", () => {
  const update = event("update", [
    column("id", TypeOid.INT8, text("7")),
    column("price", TypeOid.NUMERIC, text("NaN")),
    column("ok", TypeOid.BOOL, text("f")),
    column("meta", TypeOid.JSONB, text('{"k": "v"}')),
    column("title", TypeOid.TEXT, text('a "quoted"\nline\u0001')),
    column("gone", TypeOid.TEXT, NULL),
    column("content", TypeOid.TEXT, UNCHANGED_VALUE),
  ]);
  assert.equal(
    rowJson(update),
    '{"id":7,"price":"NaN","ok":false,"meta":{"k": "v"},"title":"a \\"quoted\\"\\nline\\u0001","gone":null}',
  );
});

test("rowJson fills unchanged columns from the old row and skips columns", () => {
  const update = event(
    "update",
    [
      column("id", TypeOid.INT8, text("7")),
      column("body", TypeOid.TEXT, UNCHANGED_VALUE),
      column("content", TypeOid.TEXT, text("new")),
    ],
    {
      oldRow: [
        column("id", TypeOid.INT8, text("7")),
        column("body", TypeOid.TEXT, text("old body")),
        column("content", TypeOid.TEXT, text("old")),
      ],
    },
  );
  assert.equal(rowJson(update, { skip: ["content"] }), '{"id":7,"body":"old body"}');
});

test("pointKey follows key column order and rejects missing keys", () => {
  const deleted = event(
    "delete",
    [column("id", TypeOid.INT4, text("5")), column("tenant", TypeOid.TEXT, text("acme"))],
    { keyColumns: ["tenant", "id"] },
  );
  assert.deepEqual(pointKey(deleted), { schema: "public", table: "documents", key: ["acme", "5"] });
  assert.equal(oldPointKey(deleted), null);
  deleted.row[0].value = NULL;
  assert.throws(() => pointKey(deleted), {
    name: "FieldError",
    message: 'key column "id" has no value in this event',
  });
  const rekeyed = event("update", [column("id", TypeOid.INT4, text("2"))], {
    oldRow: [column("id", TypeOid.INT4, text("1"))],
  });
  assert.deepEqual(oldPointKey(rekeyed).key, ["1"]);
});

const key = (table, id) => ({ schema: "public", table, key: [id] });

test("WritePlan keeps the last action per point and kept vectors keep the pending text", () => {
  fakeHost.reset();
  const plan = new WritePlan();
  plan.upsert(key("docs", "1"), "first", '{"v":1}');
  plan.delete(key("docs", "2"));
  plan.upsert(key("docs", "2"), "again", "{}");
  plan.upsert(key("docs", "1"), null, '{"v":2}');
  plan.upsert(key("docs", "3"), "gone", "{}");
  plan.delete(key("docs", "3"));
  plan.upsert(key("docs", "4"), null, '{"only":"payload"}');
  plan.execute();
  assert.deepEqual(fakeHost.calls, [
    ["delete", [key("docs", "3")]],
    ["embed", ["first", "again"]],
    [
      "upsert",
      [
        { key: key("docs", "1"), vector: [5, 0.5], payload: '{"v":2}' },
        { key: key("docs", "2"), vector: [5, 0.5], payload: "{}" },
        { key: key("docs", "4"), vector: null, payload: '{"only":"payload"}' },
      ],
    ],
  ]);
});

test("WritePlan merges follow the upsert of their point and take its text", () => {
  // The same sequence as the Rust SDK's test of the same name: the calls must match.
  fakeHost.reset();
  const plan = new WritePlan();
  plan.upsert(key("docs", "1"), "first", '{"v":1}');
  plan.merge(key("docs", "1"), null, '{"n":1}');
  plan.merge(key("docs", "2"), null, '{"n":2}');
  plan.merge(key("docs", "2"), "second", '{"n":3}');
  plan.delete(key("docs", "3"));
  plan.merge(key("docs", "3"), "third", '{"n":4}');
  plan.merge(key("docs", "4"), null, '{"n":5}');
  plan.upsert(key("docs", "4"), null, '{"v":4}');
  plan.execute();
  assert.deepEqual(fakeHost.calls, [
    ["delete", [key("docs", "3")]],
    ["embed", ["first", "second", "third"]],
    [
      "upsert",
      [
        { key: key("docs", "1"), vector: [5, 0.5], payload: '{"v":1}' },
        { key: key("docs", "4"), vector: null, payload: '{"v":4}' },
      ],
    ],
    [
      "merge",
      [
        { key: key("docs", "1"), vector: null, payload: '{"n":1}' },
        { key: key("docs", "2"), vector: [6, 0.5], payload: '{"n":2}' },
        { key: key("docs", "2"), vector: null, payload: '{"n":3}' },
        { key: key("docs", "3"), vector: [5, 0.5], payload: '{"n":4}' },
      ],
    ],
  ]);
});

test("isPartial says when rowJson lacks an unchanged column", () => {
  const row = [
    { name: "id", typeOid: TypeOid.INT4, value: { tag: "text", val: "5" } },
    { name: "content", typeOid: TypeOid.TEXT, value: { tag: "unchanged" } },
  ];
  const base = { operation: "update", schema: "public", table: "docs", keyColumns: ["id"] };
  assert.equal(isPartial({ ...base, row, oldRow: undefined }), true);
  assert.equal(isPartial({ ...base, row, oldRow: [row[0]] }), true);
  const kept = { name: "content", typeOid: TypeOid.TEXT, value: { tag: "text", val: "kept" } };
  assert.equal(isPartial({ ...base, row, oldRow: [row[0], kept] }), false);
  assert.equal(isPartial({ ...base, row: [row[0], kept], oldRow: undefined }), false);
});

test("WritePlan truncate drops earlier writes of its table only", () => {
  fakeHost.reset();
  const plan = new WritePlan();
  plan.upsert(key("docs", "1"), "a", "{}");
  plan.upsert(key("other", "1"), "b", "{}");
  plan.delete(key("docs", "9"));
  plan.truncate("public", "docs");
  plan.upsert(key("docs", "2"), "c", "{}");
  assert.equal(plan.isEmpty(), false);
  plan.execute();
  assert.deepEqual(
    fakeHost.calls.map(([name, ...args]) => (name === "upsert" ? [name, args[0].length] : [name, ...args])),
    [
      ["delete-table", "public", "docs"],
      ["embed", ["b", "c"]],
      ["upsert", 2],
    ],
  );
  assert.equal(new WritePlan().isEmpty(), true);
});

test("a host error becomes a HostError naming the call and the host's message", () => {
  fakeHost.reset();
  const plan = new WritePlan();
  plan.upsert(key("docs", "1"), "a", "{}");
  fakeHost.failNext("embed", "no embedder");
  assert.throws(() => plan.execute(), { name: "HostError", message: "embed failed: no embedder" });
});

test("handler turns any exception into the WIT error with message and stack", () => {
  const failing = handler(() => {
    throw new RangeError("bad row");
  });
  assert.throws(
    () => failing([]),
    (error) =>
      !(error instanceof Error) &&
      Object.keys(error).join() === "message" &&
      error.message.startsWith("RangeError: bad row\n") &&
      /\n\s+at /.test(error.message),
  );
  const hostError = new Error("[object Object] (see error.payload)");
  hostError.payload = { message: "sink is down" };
  assert.match(toWitError(hostError).message, /^host call failed: sink is down/);
  assert.deepEqual(toWitError({ message: "plain" }), { message: "plain" });
  assert.deepEqual(toWitError(42), { message: "thrown: 42" });
  let called = false;
  handler((events) => {
    called = events.length === 0;
  })([]);
  assert.equal(called, true);
});
