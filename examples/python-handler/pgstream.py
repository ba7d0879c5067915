"""Write pgstream-host handlers in Python.

A handler is a WebAssembly component built with componentize-py against the
`pgstream:handler` WIT world. This module hides the generated bindings: write a function that
takes a batch of `Event`s and export it::

    import pgstream

    def handle(events: list[pgstream.Event]) -> None:
        for event in events:
            pgstream.log_info(f"{event.operation.name} {event.row.get('id')}")

    WitWorld = pgstream.export(handle)

Reading rows: `event.row.get("col")` decodes the column's text by its Postgres type OID
(ints, floats, `Decimal` for numeric, bools, parsed JSON, `datetime` / `date`, `bytes` for
bytea, `str` otherwise). SQL NULL is `None`; a TOASTed value that an UPDATE did not send is
`UNCHANGED`, which is not `None` and has no truth value, so it cannot be mistaken for either.
`event.row_json()` and `event.point_key()` build the usual point payload and key;
`WritePlan` collapses a batch into one `embed` call and one `upsert` call.

Errors: any exception escaping the handler becomes the WIT `error` result, its message
followed by the Python traceback, so the host logs both and retries the batch on a fresh
instance. Handlers must be idempotent: after a failure or a crash a batch is delivered again.
"""

from __future__ import annotations

import datetime as _dt
import json as _json
import re as _re
import traceback as _traceback
from decimal import Decimal, InvalidOperation
from typing import Any, Callable, Iterable, Optional, Sequence

import wit_world
from componentize_py_types import Err
from wit_world.imports import host as _host
from wit_world.imports import types as _types

__all__ = [
    "Column",
    "Event",
    "FieldError",
    "HostError",
    "LogLevel",
    "MissingColumn",
    "MissingKey",
    "Operation",
    "PgstreamError",
    "Point",
    "PointKey",
    "Row",
    "TypeOid",
    "UNCHANGED",
    "Unchanged",
    "WritePlan",
    "decode",
    "delete",
    "describe_exception",
    "delete_table",
    "embed",
    "export",
    "log",
    "log_debug",
    "log_error",
    "log_info",
    "log_warn",
    "merge",
    "row_json",
    "upsert",
]

# The WIT types, under the names handlers use.
Operation = _types.Operation
LogLevel = _types.LogLevel
Column = _types.Column
PointKey = _types.PointKey
Point = _types.Point


class TypeOid:
    """Postgres type OIDs (`pg_type.oid`) of the built-in types this module decodes."""

    BOOL = 16
    BYTEA = 17
    INT8 = 20
    INT2 = 21
    INT4 = 23
    TEXT = 25
    OID = 26
    JSON = 114
    FLOAT4 = 700
    FLOAT8 = 701
    VARCHAR = 1043
    DATE = 1082
    TIMESTAMP = 1114
    TIMESTAMPTZ = 1184
    NUMERIC = 1700
    UUID = 2950
    JSONB = 3802


# --------------------------------------------------------------------------------------------
# Errors


class PgstreamError(Exception):
    """Base class of the errors this module raises."""


class MissingColumn(PgstreamError, KeyError):
    """The row has no column of that name."""

    def __init__(self, column: str):
        super().__init__(column)
        self.column = column

    def __str__(self) -> str:
        return f"no column named {self.column!r}"


class FieldError(PgstreamError, ValueError):
    """A column's text does not decode as its type."""

    def __init__(self, column: str, type_oid: int, reason: str):
        super().__init__(f"column {column!r} (type oid {type_oid}): {reason}")
        self.column = column
        self.type_oid = type_oid
        self.reason = reason


class MissingKey(PgstreamError):
    """A key column is NULL or unchanged, so the row cannot be identified."""

    def __init__(self, column: str):
        super().__init__(f"key column {column!r} has no value in this event")
        self.column = column


class HostError(PgstreamError):
    """A host call (`embed`, `upsert`, `delete`, `delete-table`) returned an error."""

    def __init__(self, call: str, message: str):
        super().__init__(f"{call} failed: {message}")
        self.call = call
        self.message = message


# --------------------------------------------------------------------------------------------
# Unchanged


class Unchanged:
    """The type of `UNCHANGED`: a TOASTed value that an UPDATE did not change, so Postgres did
    not send it. The stored value is still the old one; it is neither NULL nor empty.

    It has no truth value (`if value:` raises) so that it is never silently taken for `None`
    or for an empty string: test it with `value is UNCHANGED`.
    """

    _instance: Optional["Unchanged"] = None

    def __new__(cls) -> "Unchanged":
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "UNCHANGED"

    def __bool__(self) -> bool:
        raise TypeError(
            "UNCHANGED has no truth value: Postgres did not send this TOASTed value; "
            "test it with `value is pgstream.UNCHANGED`"
        )


UNCHANGED = Unchanged()


# --------------------------------------------------------------------------------------------
# Decoding Postgres text output


# Postgres' ISO DateStyle output (the default): `2024-05-01 12:30:00.25+02`, years may have
# more than four digits, ` BC` follows the time zone.
_DATE_RE = _re.compile(r"(\d{4,})-(\d\d)-(\d\d)( BC)?")
_TIMESTAMP_RE = _re.compile(
    r"(\d{4,})-(\d\d)-(\d\d) (\d\d):(\d\d):(\d\d)(?:\.(\d{1,6}))?"
    r"(?:([+-])(\d\d)(?::(\d\d)(?::(\d\d))?)?)?( BC)?"
)
# JSON's number grammar: what a number column's text must match to be written as a JSON number.
_JSON_NUMBER_RE = _re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")

_INT_OIDS = frozenset((TypeOid.INT2, TypeOid.INT4, TypeOid.INT8, TypeOid.OID))
_FLOAT_OIDS = frozenset((TypeOid.FLOAT4, TypeOid.FLOAT8))
_NUMBER_OIDS = _INT_OIDS | _FLOAT_OIDS | {TypeOid.NUMERIC}
_JSON_OIDS = frozenset((TypeOid.JSON, TypeOid.JSONB))


def _date(text: str) -> _dt.date:
    match = _DATE_RE.fullmatch(text)
    if match is None:
        raise ValueError(f"{text!r} is not an ISO date")
    if match.group(4):
        raise ValueError(f"{text!r} is before year 1, which Python's date cannot hold")
    return _dt.date(int(match.group(1)), int(match.group(2)), int(match.group(3)))


def _timestamp(text: str, with_zone: bool) -> _dt.datetime:
    match = _TIMESTAMP_RE.fullmatch(text)
    if match is None or (match.group(8) is not None) != with_zone:
        kind = "timestamp with time zone" if with_zone else "timestamp"
        raise ValueError(f"{text!r} is not an ISO {kind}")
    (year, month, day, hour, minute, second, fraction, sign, off_h, off_m, off_s, bc) = (
        match.groups()
    )
    if bc:
        raise ValueError(f"{text!r} is before year 1, which Python's datetime cannot hold")
    tzinfo = None
    if with_zone:
        offset = _dt.timedelta(
            hours=int(off_h), minutes=int(off_m or 0), seconds=int(off_s or 0)
        )
        tzinfo = _dt.timezone(-offset if sign == "-" else offset)
    micros = int(fraction.ljust(6, "0")) if fraction else 0
    # Postgres accepts 24:00:00 as the end of a day; Python's time stops at 23:59:59.
    extra_day = int(hour) == 24
    value = _dt.datetime(
        int(year),
        int(month),
        int(day),
        0 if extra_day else int(hour),
        int(minute),
        int(second),
        micros,
        tzinfo,
    )
    return value + _dt.timedelta(days=1) if extra_day else value


def _bool(text: str) -> bool:
    if text in ("t", "true"):
        return True
    if text in ("f", "false"):
        return False
    raise ValueError(f"{text!r} is not a bool")


def _bytea(text: str) -> bytes:
    # The default `bytea_output = hex` prints `\x` then two hex digits per byte.
    if not text.startswith("\\x"):
        raise ValueError("bytea is not in hex output format (bytea_output = 'hex')")
    return bytes.fromhex(text[2:])


def _numeric(text: str) -> Decimal:
    try:
        return Decimal(text)
    except InvalidOperation:
        raise ValueError(f"{text!r} is not a numeric") from None


_DECODERS: dict[int, Callable[[str], Any]] = {
    TypeOid.INT2: int,
    TypeOid.INT4: int,
    TypeOid.INT8: int,
    TypeOid.OID: int,
    # Postgres prints `NaN`, `Infinity` and `-Infinity`, which `float` accepts.
    TypeOid.FLOAT4: float,
    TypeOid.FLOAT8: float,
    TypeOid.NUMERIC: _numeric,
    TypeOid.BOOL: _bool,
    TypeOid.JSON: _json.loads,
    TypeOid.JSONB: _json.loads,
    TypeOid.BYTEA: _bytea,
    TypeOid.DATE: _date,
    TypeOid.TIMESTAMP: lambda text: _timestamp(text, with_zone=False),
    TypeOid.TIMESTAMPTZ: lambda text: _timestamp(text, with_zone=True),
}


def decode(text: str, type_oid: int) -> Any:
    """Decodes a value in Postgres' text output format by its type OID.

    int2/int4/int8/oid -> `int`; float4/float8 -> `float`; numeric -> `Decimal`; bool ->
    `bool`; json/jsonb -> the parsed document; bytea -> `bytes`; date -> `datetime.date`;
    timestamp -> naive `datetime.datetime`; timestamptz -> aware `datetime.datetime` (with
    the offset Postgres printed); anything else -> the text itself. `infinity` and dates
    before year 1 or after 9999 do not fit Python's date types and raise `ValueError`: read
    such columns with `Row.text`.
    """
    decoder = _DECODERS.get(type_oid)
    if decoder is None:
        return text
    try:
        return decoder(text)
    except (ValueError, OverflowError) as error:
        raise ValueError(str(error) or f"{text!r} does not decode as type oid {type_oid}") from None


# --------------------------------------------------------------------------------------------
# Rows and events


def _value_text(value: Any) -> Any:
    """A WIT `value` as `str`, `None` (SQL NULL) or `UNCHANGED`."""
    if isinstance(value, _types.Value_Text):
        return value.value
    if isinstance(value, _types.Value_Null):
        return None
    return UNCHANGED


class Row:
    """The columns of one row, read by name (exact, case-sensitive)."""

    __slots__ = ("columns",)

    def __init__(self, columns: Sequence[Column]):
        self.columns = columns
        """The `Column`s (name, type OID, value), in table order."""

    def column(self, name: str) -> Column:
        """The column named `name`; raises `MissingColumn` if there is none."""
        for column in self.columns:
            if column.name == name:
                return column
        raise MissingColumn(name)

    def __contains__(self, name: object) -> bool:
        return any(column.name == name for column in self.columns)

    def names(self) -> list[str]:
        """The column names, in table order."""
        return [column.name for column in self.columns]

    def text(self, name: str) -> Any:
        """The column's text as Postgres printed it: `str`, `None` for NULL, or
        `UNCHANGED`."""
        return _value_text(self.column(name).value)

    def get(self, name: str) -> Any:
        """The column's value decoded by its type OID (see `decode`): `None` for NULL,
        `UNCHANGED` for a TOASTed value the update did not send. Raises `MissingColumn` or
        `FieldError`."""
        column = self.column(name)
        value = column.value
        if not isinstance(value, _types.Value_Text):
            return _value_text(value)
        try:
            return decode(value.value, column.type_oid)
        except ValueError as error:
            raise FieldError(column.name, column.type_oid, str(error)) from None

    __getitem__ = get

    def to_dict(self) -> dict[str, Any]:
        """Every column decoded by `get`, name to value (unchanged ones as `UNCHANGED`)."""
        return {column.name: self.get(column.name) for column in self.columns}

    def __repr__(self) -> str:
        return f"Row({', '.join(f'{c.name}={_value_text(c.value)!r}' for c in self.columns)})"


class Event:
    """One row change, in commit order: the WIT `change-event` with typed accessors.

    `operation`, `schema`, `table`, `key_columns`, `lsn`, `commit_time` (microseconds since
    the Unix epoch) and `xid` are the event's fields; `raw` is the WIT record itself.
    """

    __slots__ = ("raw",)

    def __init__(self, raw: _types.ChangeEvent):
        self.raw = raw

    @property
    def operation(self) -> Operation:
        """What happened: `Operation.INSERT`, `UPDATE`, `DELETE`, `TRUNCATE` or `READ` (a row
        a backfill delivers: treat it as an upsert)."""
        return self.raw.operation

    @property
    def schema(self) -> str:
        """Schema of the table, e.g. `public`."""
        return self.raw.schema

    @property
    def table(self) -> str:
        """Table name."""
        return self.raw.table

    @property
    def key_columns(self) -> list[str]:
        """Names of the columns that identify the row, in table column order."""
        return self.raw.key_columns

    @property
    def lsn(self) -> int:
        """WAL position of the commit of this change's transaction."""
        return self.raw.lsn

    @property
    def commit_time(self) -> int:
        """Commit time in microseconds since the Unix epoch."""
        return self.raw.commit_time

    @property
    def commit_datetime(self) -> _dt.datetime:
        """Commit time as an aware UTC `datetime`."""
        return _EPOCH + _dt.timedelta(microseconds=self.raw.commit_time)

    @property
    def xid(self) -> int:
        """Transaction id."""
        return self.raw.xid

    @property
    def row(self) -> Row:
        """The row after the change (insert, update), or the key / old row (delete)."""
        return Row(self.raw.row)

    @property
    def old_row(self) -> Optional[Row]:
        """The row before an update, when Postgres sent it (REPLICA IDENTITY FULL, or an
        update that changed the key)."""
        old = self.raw.old_row
        return None if old is None else Row(old)

    def point_key(self) -> PointKey:
        """The point key of this event's row: schema, table and the key columns' text in
        `key_columns` order. Raises `MissingKey` if a key column is NULL or unchanged."""
        return _key_of(self.raw, self.raw.row)

    def old_point_key(self) -> Optional[PointKey]:
        """The point key of the row before an update, when the old row carries the key
        columns; `None` otherwise."""
        old = self.raw.old_row
        if old is None:
            return None
        try:
            return _key_of(self.raw, old)
        except PgstreamError:
            return None

    def row_json(self, skip: Iterable[str] = ()) -> str:
        """The row as a JSON object: numbers and bools as JSON numbers and bools, json/jsonb
        columns as documents, NULL as `null`, everything else as strings. An unchanged column
        takes its value from the old row when the old row has it (REPLICA IDENTITY FULL) and
        is left out otherwise; columns named in `skip` are left out."""
        return row_json(self.raw.row, self.raw.old_row, skip)

    def is_partial(self) -> bool:
        """Whether `row_json` leaves a column out for want of its value: the update left it
        unchanged (TOASTed, not sent) and the old row does not have it. Write such a row with
        `WritePlan.merge`, so the stored value of the missing column survives."""
        old_values = {}
        if self.raw.old_row is not None:
            old_values = {old.name: old.value for old in self.raw.old_row}
        for column in self.raw.row:
            if isinstance(column.value, _types.Value_Unchanged):
                old = old_values.get(column.name)
                if old is None or isinstance(old, _types.Value_Unchanged):
                    return True
        return False

    def __repr__(self) -> str:
        return (
            f"Event({self.operation.name} {self.schema}.{self.table} lsn={self.lsn} "
            f"{self.row!r})"
        )


_EPOCH = _dt.datetime(1970, 1, 1, tzinfo=_dt.timezone.utc)


def _key_of(event: _types.ChangeEvent, columns: Sequence[Column]) -> PointKey:
    row = Row(columns)
    key = []
    for name in event.key_columns:
        value = row.column(name).value
        if not isinstance(value, _types.Value_Text):
            raise MissingKey(name)
        key.append(value.value)
    return PointKey(event.schema, event.table, key)


def _json_value(text: str, type_oid: int) -> str:
    if type_oid in _NUMBER_OIDS and _JSON_NUMBER_RE.fullmatch(text):
        return text
    if type_oid == TypeOid.BOOL and text in ("t", "f"):
        return "true" if text == "t" else "false"
    if type_oid in _JSON_OIDS:
        # Postgres checked it is valid JSON.
        return text
    return _json.dumps(text, ensure_ascii=False)


def row_json(
    row: Sequence[Column], old_row: Optional[Sequence[Column]] = None, skip: Iterable[str] = ()
) -> str:
    """A row of WIT `Column`s as a JSON object; see `Event.row_json`."""
    skip = frozenset(skip)
    parts = []
    for column in row:
        name = column.name
        if name in skip:
            continue
        value = column.value
        if isinstance(value, _types.Value_Unchanged):
            value = None
            if old_row is not None:
                for old in old_row:
                    if old.name == name:
                        value = old.value
                        break
            if value is None or isinstance(value, _types.Value_Unchanged):
                continue
        if isinstance(value, _types.Value_Text):
            encoded = _json_value(value.value, column.type_oid)
        else:
            encoded = "null"
        parts.append(f"{_json.dumps(name, ensure_ascii=False)}:{encoded}")
    return "{" + ",".join(parts) + "}"


# --------------------------------------------------------------------------------------------
# Host calls


def _call(name: str, function: Callable[..., Any], *args: Any) -> Any:
    try:
        return function(*args)
    except Err as error:
        raise HostError(name, _err_message(error)) from None


def embed(texts: list[str]) -> list[list[float]]:
    """Embeds texts with the pipeline's model: one vector per text, in order. Pass every text
    of a batch in one call. Raises `HostError`."""
    return _call("embed", _host.embed, texts)


def upsert(points: list[Point]) -> None:
    """Inserts or replaces points (idempotent). Raises `HostError`."""
    _call("upsert", _host.upsert, points)


def merge(points: list[Point]) -> None:
    """Writes points like `upsert`, but merges each payload (a JSON object) into the stored one
    instead of replacing it; a point without a vector keeps its stored vector (idempotent).
    Raises `HostError`."""
    _call("merge", _host.merge, points)


def delete(keys: list[PointKey]) -> None:
    """Deletes points; absent keys are ignored (idempotent). Raises `HostError`."""
    _call("delete", _host.delete, keys)


def delete_table(schema: str, table: str) -> None:
    """Deletes every point made from rows of `schema.table`. Raises `HostError`."""
    _call("delete-table", _host.delete_table, schema, table)


def log(level: LogLevel, message: str) -> None:
    """Writes a line to the host's log, tagged with the pipeline and plugin name."""
    _host.log(level, message)


def log_debug(message: str) -> None:
    """`log` at debug level."""
    _host.log(LogLevel.DEBUG, message)


def log_info(message: str) -> None:
    """`log` at info level."""
    _host.log(LogLevel.INFO, message)


def log_warn(message: str) -> None:
    """`log` at warn level."""
    _host.log(LogLevel.WARN, message)


def log_error(message: str) -> None:
    """`log` at error level."""
    _host.log(LogLevel.ERROR, message)


# --------------------------------------------------------------------------------------------
# Write plans


class WritePlan:
    """The writes of one batch, collapsed to the last action per point.

    A batch is ordered (a row inserted then deleted must end up deleted; a truncate wipes what
    came before it), so calls cannot simply be grouped by kind. The plan records the batch in
    order, keeps only the last action per point, and `execute` then runs: `delete-table` per
    truncated table, one `delete`, one `embed`, one `upsert`, one `merge`. Because each point
    appears once (a point upserted then merged in one batch is in both calls, and the merge
    runs after the upsert) and truncates run first, that gives the same result as replaying
    the events one by one.
    """

    __slots__ = ("_truncated", "_actions")

    def __init__(self) -> None:
        self._truncated: list[tuple[str, str]] = []
        # (schema, table, key) -> ("delete", PointKey) or
        # ("write", PointKey, text or None, delete first, upsert payload or None, merge payloads).
        # A dict keeps insertion order, and replacing a value keeps the original position.
        self._actions: dict[tuple[str, str, tuple[str, ...]], tuple] = {}

    def upsert(self, key: PointKey, text: Optional[str], payload: str) -> None:
        """Writes the point `key` with `payload`, which replaces the stored payload, embedding
        `text` for its vector. With `text` `None` the stored vector is kept (the embedded text
        did not change); if this batch already embeds a text for the point, that text is kept."""
        point = (key.schema, key.table, tuple(key.key))
        if text is None:
            pending = self._actions.get(point)
            if pending is not None and pending[0] == "write":
                text = pending[2]
        self._actions[point] = ("write", key, text, False, payload, [])

    def merge(self, key: PointKey, text: Optional[str], payload: str) -> None:
        """Writes the point `key` merging `payload` (a JSON object) into the stored payload:
        its keys replace or add those of the same name, the stored point's other keys stay.
        For a row whose payload is partial (`Event.is_partial`), so a column the update left
        unchanged keeps its stored value. `text` as for `upsert`. A point the store does not
        have is created from `payload` when there is a text to embed, and skipped (with a
        warning in the host's log) otherwise."""
        point = (key.schema, key.table, tuple(key.key))
        pending = self._actions.get(point)
        if pending is not None and pending[0] == "write":
            _, _, planned, delete_first, upsert_payload, merges = pending
            self._actions[point] = (
                "write",
                key,
                planned if text is None else text,
                delete_first,
                upsert_payload,
                merges + [payload],
            )
        else:
            # After a delete in this batch, the merge must not meet the old stored payload.
            self._actions[point] = ("write", key, text, pending is not None, None, [payload])

    def delete(self, key: PointKey) -> None:
        """Deletes the point `key`."""
        self._actions[(key.schema, key.table, tuple(key.key))] = ("delete", key)

    def truncate(self, schema: str, table: str) -> None:
        """Deletes every point of `schema.table` and forgets the writes planned for it so
        far."""
        self._actions = {
            point: action
            for point, action in self._actions.items()
            if point[0] != schema or point[1] != table
        }
        if (schema, table) not in self._truncated:
            self._truncated.append((schema, table))

    def __bool__(self) -> bool:
        return bool(self._truncated or self._actions)

    def calls(
        self,
    ) -> tuple[list[tuple[str, str]], list[PointKey], list[str], list[tuple], list[tuple]]:
        """The host calls the plan makes: tables to empty, keys to delete, texts to embed, and
        upserts and merges as `(key, index of its text or None, payload)` (a point's text goes
        with its upsert when it has one, else with its first merge)."""
        deletes: list[PointKey] = []
        texts: list[str] = []
        upserts: list[tuple] = []
        merges: list[tuple] = []
        for action in self._actions.values():
            if action[0] == "delete":
                deletes.append(action[1])
                continue
            _, key, text, delete_first, upsert_payload, merge_payloads = action
            index = None
            if text is not None:
                index = len(texts)
                texts.append(text)
            if delete_first:
                deletes.append(key)
            if upsert_payload is not None:
                upserts.append((key, index, upsert_payload))
                index = None
            for payload in merge_payloads:
                merges.append((key, index, payload))
                index = None
        return list(self._truncated), deletes, texts, upserts, merges

    def execute(self) -> None:
        """Runs the plan: `delete-table` per truncated table, then at most one `delete`, one
        `embed`, one `upsert` and one `merge`. Stops at the first host error (`HostError`)."""
        truncated, deletes, texts, upserts, merges = self.calls()
        for schema, table in truncated:
            delete_table(schema, table)
        if deletes:
            delete(deletes)
        vectors = embed(texts) if texts else []
        if len(vectors) != len(texts):
            raise HostError("embed", f"returned {len(vectors)} vectors for {len(texts)} texts")

        def points(writes: list[tuple]) -> list[Point]:
            return [
                Point(key, None if index is None else vectors[index], payload)
                for key, index, payload in writes
            ]

        if upserts:
            upsert(points(upserts))
        if merges:
            merge(points(merges))


# --------------------------------------------------------------------------------------------
# Exporting a handler


def _err_message(error: Err) -> str:
    value = error.value
    return value.message if isinstance(value, _types.Error) else repr(value)


def describe_exception(error: BaseException, skip_frames: int = 0) -> str:
    """The text the host logs for an exception that escaped a handler: its type and message,
    then the Python traceback without its first `skip_frames` frames."""
    if isinstance(error, Err):
        headline = f"host call failed: {_err_message(error)}"
    else:
        headline = f"{type(error).__name__}: {error}"
    if isinstance(error, ImportError):
        # The component has no filesystem: only modules imported while componentize-py built
        # it (at module level) are in it.
        headline += (
            " (a handler can only use modules imported at the top level of its module, when "
            "componentize-py builds it: move the import there, and pass the folder of a "
            "third-party package to componentize-py with -p)"
        )
    frames = error.__traceback__
    for _ in range(skip_frames):
        if frames is not None and frames.tb_next is not None:
            frames = frames.tb_next
    trace = "".join(_traceback.format_exception(type(error), error, frames))
    return f"{headline}\n{trace.rstrip()}"


def export(handle: Callable[[list[Event]], None]) -> type:
    """Makes `handle` the component's export. Assign the result to `WitWorld` at the top level
    of the module componentize-py builds (`WitWorld = pgstream.export(handle)`).

    `handle` receives each batch as a list of `Event`s. Returning means every event was
    handled; an exception makes the host log its message and traceback and retry the batch on
    a fresh instance.
    """

    class WitWorld(wit_world.WitWorld):
        def handle(self, events: list[_types.ChangeEvent]) -> None:
            try:
                handle([Event(event) for event in events])
            except BaseException as error:
                # The first frame is this wrapper: leave it out, the user's code starts below.
                raise Err(_types.Error(describe_exception(error, skip_frames=1))) from None

    WitWorld.__qualname__ = WitWorld.__name__ = "WitWorld"
    WitWorld.__doc__ = handle.__doc__
    return WitWorld
