// pgstream.ts: typed access to the change events a pgstream-host handler receives, and the
// batched writes it answers with. Works from TypeScript and from JavaScript (the build bundles
// it with the handler).
//
//   import { handler, WritePlan, rowJson, pointKey, oldPointKey, Row, UNCHANGED } from "./pgstream.ts";
//
//   export const handle = handler((events) => {
//     for (const event of events) {
//       const id = new Row(event.row).int("id");   // number | null | UNCHANGED
//     }
//   });
//
// Values arrive in Postgres' text output format with the column's type OID; the getters of
// `Row` parse that text into JS values. Every getter keeps three states apart: `null` (SQL
// NULL), `UNCHANGED` (a TOASTed value this UPDATE did not send: the stored value is still the
// old one, it is NOT null) and the value.
//
// `console.log` and friends write to the host's log (the engine has no console of its own).
//
// Errors: a column that is missing or does not parse throws a `FieldError`. `handler()` turns
// any exception into the WIT `error` result with the message and the JS stack, so the host's
// log says what failed and where, and the host retries the batch on a fresh instance.

import type { ChangeEvent, Column, Point, PointKey } from "pgstream:handler/types@0.2.0";
import * as host from "pgstream:handler/host@0.2.0";

export type { ChangeEvent, Column, Point, PointKey };

/** Postgres type OIDs (`pg_type.oid`) of the built-in types the getters know. */
export const TypeOid = {
  BOOL: 16,
  BYTEA: 17,
  INT8: 20,
  INT2: 21,
  INT4: 23,
  TEXT: 25,
  OID: 26,
  JSON: 114,
  FLOAT4: 700,
  FLOAT8: 701,
  VARCHAR: 1043,
  DATE: 1082,
  TIMESTAMP: 1114,
  TIMESTAMPTZ: 1184,
  NUMERIC: 1700,
  UUID: 2950,
  JSONB: 3802,
} as const;

/** A TOASTed value the UPDATE did not change: Postgres did not send it. Not null. */
export const UNCHANGED: unique symbol = Symbol("unchanged");

/** One column's value: the value, `null` for SQL NULL, or `UNCHANGED`. */
export type Field<T> = T | null | typeof UNCHANGED;

/** A column could not be read as the requested type, or a key column has no value. */
export class FieldError extends Error {
  constructor(
    message: string,
    /** The column asked for. */
    readonly column: string,
    /** Its type OID, when the row has the column. */
    readonly typeOid?: number,
  ) {
    super(message);
    this.name = "FieldError";
  }
}

/** Typed getters over one row (`event.row` or `event.oldRow`). */
export class Row {
  constructor(readonly columns: readonly Column[]) {}

  /** The column named `name`, or undefined. */
  column(name: string): Column | undefined {
    return this.columns.find((column) => column.name === name);
  }

  /** Whether the row has a column named `name`. */
  has(name: string): boolean {
    return this.column(name) !== undefined;
  }

  private field<T>(name: string, parse: (text: string, oid: number) => T): Field<T> {
    const column = this.column(name);
    if (column === undefined) {
      throw new FieldError(`no column named ${JSON.stringify(name)}`, name);
    }
    switch (column.value.tag) {
      case "null":
        return null;
      case "unchanged":
        return UNCHANGED;
      case "text":
        try {
          return parse(column.value.val, column.typeOid);
        } catch (error) {
          const reason = error instanceof Error ? error.message : String(error);
          throw new FieldError(
            `column ${JSON.stringify(name)} (type oid ${column.typeOid}): ${reason}`,
            name,
            column.typeOid,
          );
        }
    }
  }

  /** The value as Postgres printed it. */
  text(name: string): Field<string> {
    return this.field(name, (text) => text);
  }

  /** An integer (int2, int4, int8, oid). Throws when it is not an integer or exceeds
   *  Number.MAX_SAFE_INTEGER; read such int8 values with `bigint`. */
  int(name: string): Field<number> {
    return this.field(name, (text) => {
      if (!/^-?\d+$/.test(text)) throw new Error(`${JSON.stringify(text)} is not an integer`);
      const value = Number(text);
      if (!Number.isSafeInteger(value)) {
        throw new Error(`${text} does not fit a JS number exactly; use bigint()`);
      }
      return value;
    });
  }

  /** An integer of any size (int8 beyond 2^53, numeric without fraction). */
  bigint(name: string): Field<bigint> {
    return this.field(name, (text) => {
      if (!/^-?\d+$/.test(text)) throw new Error(`${JSON.stringify(text)} is not an integer`);
      return BigInt(text);
    });
  }

  /** A float (float4, float8, numeric, or any integer type); `NaN`, `Infinity` and
   *  `-Infinity` as Postgres prints them. Numeric values may lose precision. */
  float(name: string): Field<number> {
    return this.field(name, (text) => {
      if (text === "NaN") return NaN;
      if (text === "Infinity") return Infinity;
      if (text === "-Infinity") return -Infinity;
      const value = Number(text);
      if (text.trim() === "" || Number.isNaN(value)) {
        throw new Error(`${JSON.stringify(text)} is not a number`);
      }
      return value;
    });
  }

  /** A bool (`t`/`f`). */
  bool(name: string): Field<boolean> {
    return this.field(name, (text) => {
      if (text === "t" || text === "true") return true;
      if (text === "f" || text === "false") return false;
      throw new Error(`${JSON.stringify(text)} is not a bool`);
    });
  }

  /** A json/jsonb document, parsed. */
  json(name: string): Field<unknown> {
    return this.field(name, (text) => JSON.parse(text) as unknown);
  }

  /** A date, timestamp or timestamptz as a Date (millisecond precision; a timestamp without
   *  time zone is read as UTC). Throws for `infinity`, which a Date cannot hold: read it
   *  with `text` when the column may hold it. */
  date(name: string): Field<Date> {
    return this.field(name, (text, oid) => parseTimestamp(text, oid));
  }

  /** The value decoded by its type OID: number (int2/int4/oid/float4/float8), bigint-safe
   *  number or string for int8 (a string beyond 2^53), boolean, parsed JSON, Date
   *  (date/timestamp/timestamptz), and the text itself for every other type. */
  value(name: string): Field<unknown> {
    return this.field(name, decode);
  }
}

/** Decodes one non-null value by its type OID (see `Row.value`). */
function decode(text: string, oid: number): unknown {
  switch (oid) {
    case TypeOid.INT2:
    case TypeOid.INT4:
    case TypeOid.OID:
    case TypeOid.FLOAT4:
    case TypeOid.FLOAT8:
      return Number(text);
    case TypeOid.INT8: {
      const value = Number(text);
      return Number.isSafeInteger(value) ? value : text;
    }
    case TypeOid.BOOL:
      return text === "t";
    case TypeOid.JSON:
    case TypeOid.JSONB:
      return JSON.parse(text) as unknown;
    case TypeOid.DATE:
    case TypeOid.TIMESTAMP:
    case TypeOid.TIMESTAMPTZ:
      return parseTimestamp(text, oid);
    default:
      return text;
  }
}

// Postgres' ISO output: `2024-05-01`, `2024-05-01 12:30:00.25`, `2024-05-01 12:30:00+02`,
// `...-05:30`, `...+05:30:15`, a year beyond 9999, and ` BC` at the end.
const TIMESTAMP_TEXT =
  /^(\d{4,})-(\d\d)-(\d\d)(?: (\d\d):(\d\d):(\d\d)(?:\.(\d{1,6}))?(?:([+-])(\d\d)(?::(\d\d)(?::(\d\d))?)?)?)?( BC)?$/;

/** Parses a date/timestamp/timestamptz text into a Date (UTC). */
export function parseTimestamp(text: string, oid: number): Date {
  if (oid !== TypeOid.DATE && oid !== TypeOid.TIMESTAMP && oid !== TypeOid.TIMESTAMPTZ) {
    throw new Error(`type oid ${oid} is not a date or timestamp type`);
  }
  if (text === "infinity" || text === "-infinity") {
    throw new Error(`${text} cannot be a Date`);
  }
  const match = TIMESTAMP_TEXT.exec(text);
  const hasTime = match?.[4] !== undefined;
  const hasOffset = match?.[8] !== undefined;
  if (
    !match ||
    hasTime !== (oid !== TypeOid.DATE) ||
    hasOffset !== (oid === TypeOid.TIMESTAMPTZ)
  ) {
    throw new Error(`${JSON.stringify(text)} is not an ISO ${oidName(oid)}`);
  }
  const number = (index: number) => Number(match[index] ?? 0);
  // 1 BC is year 0 of the proleptic Gregorian calendar, 2 BC is -1, and so on.
  const year = match[12] ? 1 - number(1) : number(1);
  const [month, day, hour, minute, second] = [number(2), number(3), number(4), number(5), number(6)];
  if (month < 1 || month > 12 || day < 1 || day > 31 || hour > 24 || minute > 59 || second > 60) {
    throw new Error(`${JSON.stringify(text)} is out of range`);
  }
  const millis = Number(((match[7] ?? "") + "000").slice(0, 3));
  const date = new Date(0);
  // setUTCFullYear, unlike Date.UTC, does not map years 0..99 to 1900..1999.
  date.setUTCFullYear(year, month - 1, day);
  date.setUTCHours(hour, minute, second, millis);
  if (hasOffset) {
    const offsetSeconds = (number(9) * 60 + number(10)) * 60 + number(11);
    // The text is local time at the offset; UTC is local time minus the offset.
    const sign = match[8] === "-" ? -1 : 1;
    date.setTime(date.getTime() - sign * offsetSeconds * 1000);
  }
  if (Number.isNaN(date.getTime())) {
    throw new Error(`${JSON.stringify(text)} is outside the range of a Date`);
  }
  return date;
}

function oidName(oid: number): string {
  return oid === TypeOid.DATE ? "date" : oid === TypeOid.TIMESTAMP ? "timestamp" : "timestamptz";
}

/** The row of an event (`event.row`) with typed getters. */
export function row(event: ChangeEvent): Row {
  return new Row(event.row);
}

/** The old row of an update (`event.oldRow`), when Postgres sent one. */
export function oldRow(event: ChangeEvent): Row | null {
  return event.oldRow ? new Row(event.oldRow) : null;
}

function keyOf(event: ChangeEvent, columns: readonly Column[]): PointKey {
  const values = new Row(columns);
  const key = event.keyColumns.map((name) => {
    const value = values.text(name);
    if (value === null || value === UNCHANGED) {
      throw new FieldError(`key column ${JSON.stringify(name)} has no value in this event`, name);
    }
    return value;
  });
  return { schema: event.schema, table: event.table, key };
}

/** The point key of the event's row: schema, table and the key columns' values as text, in
 *  key-column order. Throws a FieldError when a key column is missing, NULL or unchanged. */
export function pointKey(event: ChangeEvent): PointKey {
  return keyOf(event, event.row);
}

/** The point key of the row before an update, when the old row carries the key columns
 *  (REPLICA IDENTITY FULL, or the update changed the key); otherwise null. */
export function oldPointKey(event: ChangeEvent): PointKey | null {
  if (!event.oldRow) return null;
  try {
    return keyOf(event, event.oldRow);
  } catch {
    return null;
  }
}

/** Whether two point keys name the same point. */
export function sameKey(a: PointKey, b: PointKey): boolean {
  return (
    a.schema === b.schema &&
    a.table === b.table &&
    a.key.length === b.key.length &&
    a.key.every((value, index) => value === b.key[index])
  );
}

/** Options of `rowJson`. */
export interface RowJsonOptions {
  /** Columns to leave out (e.g. the embedded text). */
  skip?: readonly string[];
}

/** The row as a JSON object (a string, ready to be a point payload): integers, floats and
 *  numerics that are valid JSON numbers become numbers (their exact text, no rounding), bools
 *  become true/false, json/jsonb are embedded as documents, NULL is null, everything else
 *  (including NaN/Infinity) a string. An unchanged column takes its value from the old row
 *  when the old row has it (REPLICA IDENTITY FULL) and is left out otherwise. */
export function rowJson(event: ChangeEvent, options: RowJsonOptions = {}): string {
  const skip = options.skip ?? [];
  const parts: string[] = [];
  for (const column of event.row) {
    if (skip.includes(column.name)) continue;
    let value = column.value;
    if (value.tag === "unchanged") {
      const old = event.oldRow?.find((candidate) => candidate.name === column.name);
      if (!old || old.value.tag === "unchanged") continue;
      value = old.value;
    }
    const json = value.tag === "text" ? jsonValue(value.val, column.typeOid) : "null";
    parts.push(`${JSON.stringify(column.name)}:${json}`);
  }
  return `{${parts.join(",")}}`;
}

/** Whether `rowJson` leaves a column out for want of its value: the update left it unchanged
 *  (TOASTed, not sent) and the old row does not have it. Write such a row with
 *  `WritePlan.merge`, so the stored value of the missing column survives. */
export function isPartial(event: ChangeEvent): boolean {
  return event.row.some((column) => {
    if (column.value.tag !== "unchanged") return false;
    const old = event.oldRow?.find((candidate) => candidate.name === column.name);
    return !old || old.value.tag === "unchanged";
  });
}

const JSON_NUMBER = /^-?(?:0|[1-9]\d*)(?:\.\d+)?(?:[eE][+-]?\d+)?$/;

/** One non-null value of type `oid` as JSON text. */
function jsonValue(text: string, oid: number): string {
  switch (oid) {
    case TypeOid.INT2:
    case TypeOid.INT4:
    case TypeOid.INT8:
    case TypeOid.OID:
    case TypeOid.FLOAT4:
    case TypeOid.FLOAT8:
    case TypeOid.NUMERIC:
      return JSON_NUMBER.test(text) ? text : JSON.stringify(text);
    case TypeOid.BOOL:
      return text === "t" ? "true" : text === "f" ? "false" : JSON.stringify(text);
    case TypeOid.JSON:
    case TypeOid.JSONB:
      return text;
    default:
      return JSON.stringify(text);
  }
}

type Action =
  | {
      kind: "write";
      key: PointKey;
      text: string | null;
      /** Delete the stored point first: it was deleted earlier in the batch and is now
       *  written by merges only, which must not meet its old payload. */
      deleteFirst: boolean;
      /** The payload that replaces the stored one (`upsert`), if any. */
      payload: string | null;
      /** Payloads merged in after it (`merge`), in order. */
      merges: string[];
    }
  | { kind: "delete"; key: PointKey }
  | { kind: "dropped" };

function mapKey(key: PointKey): string {
  return JSON.stringify([key.schema, key.table, key.key]);
}

/** One write of a plan: a point and the index of its text among the embedded ones. */
interface PlannedWrite {
  key: PointKey;
  textIndex: number | null;
  payload: string;
}

/** The writes of one batch, collapsed to the last action per point, then run as one
 *  `delete-table` per truncated table, one `delete`, one `embed`, one `upsert` and one
 *  `merge`: the same outcome as replaying the events one by one (a point upserted then merged
 *  in one batch is in both calls, and the merge runs after the upsert), with a handful of host
 *  calls per batch. */
export class WritePlan {
  private truncated: [string, string][] = [];
  private actions: Action[] = [];
  /** Position in `actions` of each point's action. */
  private index = new Map<string, number>();

  private set(key: PointKey, action: Action): void {
    const id = mapKey(key);
    const position = this.index.get(id);
    if (position === undefined) {
      this.index.set(id, this.actions.length);
      this.actions.push(action);
    } else {
      this.actions[position] = action;
    }
  }

  private pending(key: PointKey): Action | undefined {
    const position = this.index.get(mapKey(key));
    return position === undefined ? undefined : this.actions[position];
  }

  /** Writes the point `key` with `payload`, which replaces the stored payload, embedding
   *  `text` for its vector. With `text` null the stored vector is kept (the embedded text did
   *  not change); if this batch already embeds a text for the point, that text is kept. */
  upsert(key: PointKey, text: string | null, payload: string): void {
    if (text === null) {
      const pending = this.pending(key);
      if (pending?.kind === "write") text = pending.text;
    }
    this.set(key, { kind: "write", key, text, deleteFirst: false, payload, merges: [] });
  }

  /** Writes the point `key` merging `payload` (a JSON object) into the stored payload: its
   *  keys replace or add those of the same name, the stored point's other keys stay. For a
   *  row whose payload is partial (`isPartial`), so a column the update left unchanged keeps
   *  its stored value. `text` as for `upsert`. A point the store does not have is created
   *  from `payload` when there is a text to embed, and skipped (with a warning in the host's
   *  log) otherwise. */
  merge(key: PointKey, text: string | null, payload: string): void {
    const pending = this.pending(key);
    if (pending?.kind === "write") {
      if (text !== null) pending.text = text;
      pending.merges.push(payload);
    } else {
      // After a delete in this batch, the merge must not meet the old stored payload.
      const deleteFirst = pending?.kind === "delete";
      this.set(key, { kind: "write", key, text, deleteFirst, payload: null, merges: [payload] });
    }
  }

  /** Deletes the point `key`. */
  delete(key: PointKey): void {
    this.set(key, { kind: "delete", key });
  }

  /** Deletes every point of `schema.table`, and forgets the writes planned for it so far. */
  truncate(schema: string, table: string): void {
    for (const [id, position] of this.index) {
      const action = this.actions[position];
      if (action && action.kind !== "dropped" && action.key.schema === schema && action.key.table === table) {
        this.actions[position] = { kind: "dropped" };
        this.index.delete(id);
      }
    }
    if (!this.truncated.some(([s, t]) => s === schema && t === table)) {
      this.truncated.push([schema, table]);
    }
  }

  /** Whether the plan has nothing to do. */
  isEmpty(): boolean {
    return this.truncated.length === 0 && this.index.size === 0;
  }

  /** Runs the plan: `deleteTable` per truncated table, then at most one `delete`, one
   *  `embed`, one `upsert` and one `merge`. Throws at the first host error. */
  execute(): void {
    for (const [schema, table] of this.truncated) {
      hostCall("delete-table", () => host.deleteTable(schema, table));
    }
    const deletes: PointKey[] = [];
    const texts: string[] = [];
    const upserts: PlannedWrite[] = [];
    const merges: PlannedWrite[] = [];
    for (const action of this.actions) {
      if (action.kind === "delete") {
        deletes.push(action.key);
      } else if (action.kind === "write") {
        let textIndex: number | null = null;
        if (action.text !== null) {
          textIndex = texts.length;
          texts.push(action.text);
        }
        if (action.deleteFirst) deletes.push(action.key);
        // The vector goes with the point's upsert when it has one, else with its first merge.
        if (action.payload !== null) {
          upserts.push({ key: action.key, textIndex, payload: action.payload });
          textIndex = null;
        }
        for (const payload of action.merges) {
          merges.push({ key: action.key, textIndex, payload });
          textIndex = null;
        }
      }
    }
    if (deletes.length > 0) hostCall("delete", () => host.delete(deletes));
    const vectors = texts.length > 0 ? hostCall("embed", () => host.embed(texts)) : [];
    if (vectors.length !== texts.length) {
      throw new Error(`embed returned ${vectors.length} vectors for ${texts.length} texts`);
    }
    const points = (writes: PlannedWrite[]): Point[] =>
      writes.map(({ key, textIndex, payload }) => ({
        key,
        vector: textIndex === null ? null : vectors[textIndex],
        payload,
      }));
    if (upserts.length > 0) {
      const written = points(upserts);
      hostCall("upsert", () => host.upsert(written));
    }
    if (merges.length > 0) {
      const merged = points(merges);
      hostCall("merge", () => host.merge(merged));
    }
  }
}

/** A host call failed (the host's message says why). */
export class HostError extends Error {
  constructor(
    /** The host function: embed, upsert, delete, delete-table. */
    readonly call: string,
    message: string,
  ) {
    super(`${call} failed: ${message}`);
    this.name = "HostError";
  }
}

/** The WIT `error` a host function threw, as QuickJS hands it over: an Error whose `payload`
 *  is the `{ message }` record. */
function hostErrorMessage(error: unknown): string | null {
  const payload = (error as { payload?: { message?: unknown } } | null)?.payload;
  return typeof payload?.message === "string" ? payload.message : null;
}

function hostCall<T>(call: string, run: () => T): T {
  try {
    return run();
  } catch (error) {
    const message = hostErrorMessage(error);
    throw message === null ? error : new HostError(call, message);
  }
}

/** Writes a line to the host's log (tagged with the pipeline and plugin). */
export function log(level: "trace" | "debug" | "info" | "warn" | "error", message: string): void {
  host.log(level, message);
}

/** One console argument as log text: strings as they are, errors with their stack, other
 *  values as JSON when they have a JSON form. */
function consoleText(value: unknown): string {
  if (typeof value === "string") return value;
  if (value instanceof Error) return toWitError(value).message;
  if (typeof value === "object" && value !== null) {
    try {
      return JSON.stringify(value, (_key, item: unknown) =>
        typeof item === "bigint" ? item.toString() : item,
      );
    } catch {
      return String(value);
    }
  }
  return String(value);
}

// The QuickJS engine of componentize-qjs has no `console`; this one writes each call as one
// line of the host's log at the matching level (console.log and console.info at info).
if (typeof (globalThis as { console?: unknown }).console === "undefined") {
  const at =
    (level: "debug" | "info" | "warn" | "error") =>
    (...data: unknown[]): void =>
      host.log(level, data.map(consoleText).join(" "));
  (globalThis as { console?: Console }).console = {
    log: at("info"),
    info: at("info"),
    warn: at("warn"),
    error: at("error"),
    debug: at("debug"),
  };
}

/** The WIT `error` for any thrown value: the message, then the JS stack when there is one. */
export function toWitError(error: unknown): { message: string } {
  if (error instanceof Error) {
    const hostMessage = hostErrorMessage(error);
    const head =
      hostMessage !== null
        ? `host call failed: ${hostMessage}`
        : error.name && error.name !== "Error"
          ? `${error.name}: ${error.message}`
          : error.message;
    const stack = typeof error.stack === "string" ? error.stack.trimEnd() : "";
    return { message: stack ? `${head}\n${stack}` : head };
  }
  if (typeof error === "object" && error !== null && typeof (error as { message?: unknown }).message === "string") {
    return { message: (error as { message: string }).message };
  }
  return { message: `thrown: ${String(error)}` };
}

/** Wraps a handler function as the component's `handle` export: any exception becomes the
 *  WIT error result (message + stack), which the host logs before retrying the batch.
 *  Export the result as `handle`: `export const handle = handler((events) => { ... });` */
export function handler(body: (events: ChangeEvent[]) => void): (events: ChangeEvent[]) => void {
  return (events) => {
    try {
      body(events);
    } catch (error) {
      throw toWitError(error);
    }
  };
}
