/*
 * pgstream.h -- write pgstream-host handlers in C.
 *
 * A handler is a WebAssembly component exporting `handle(events)` from wit/handler.wit.
 * `wit-bindgen c` generates handler.h/handler.c (the canonical ABI glue); this helper sits on
 * top of them and gives:
 *
 *   - typed getters for column values, decoded from Postgres' text format by type OID, that
 *     keep SQL NULL apart from an UNCHANGED (TOASTed, not sent) value: pgs_get_int64,
 *     pgs_get_double, pgs_get_bool, pgs_get_text, pgs_get_json, pgs_get_timestamp;
 *   - the usual point key and payload: pgs_point_key, pgs_old_point_key, pgs_row_json;
 *   - a write plan that collapses a batch into one `embed`, one `upsert` and at most one
 *     `delete` call, keeping only the last action per point (pgs_plan_*);
 *   - errors that carry where they happened: PGS_FAIL(err, fmt, ...) fills the WIT error
 *     with a message and "at file:line in function", PGS_TRACE(err) adds one more such line
 *     as the error goes up, so the host log shows a stack of C locations.
 *
 * Memory, following wit-bindgen's C conventions:
 *   - `exports_handler_handle` OWNS its `events`: free them with
 *     handler_list_change_event_free(events) before returning (after pgs_plan_free, since
 *     plans and keys point into the events' strings);
 *   - the error message of a failed `handle` must be heap memory (the generated
 *     post-return function frees it): the PGS_FAIL family takes care of that;
 *   - strings handed out by the getters (pgs_get_text, pgs_get_json) point into the events:
 *     no copy, valid until the events are freed.
 *
 * Strings are `pgs_string_t` ({ptr, len}, UTF-8, NOT NUL-terminated): print them with
 * printf("%.*s", PGS_STR(s)).
 */
#ifndef PGSTREAM_H
#define PGSTREAM_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "handler.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Shorter names for the generated types. */
typedef handler_string_t pgs_string_t;
typedef pgstream_handler_types_change_event_t pgs_event_t;
typedef pgstream_handler_types_column_t pgs_column_t;
typedef pgstream_handler_types_list_column_t pgs_row_t;
typedef pgstream_handler_types_point_key_t pgs_point_key_t;
typedef pgstream_handler_types_error_t pgs_error_t;

/* event->operation */
#define PGS_INSERT PGSTREAM_HANDLER_TYPES_OPERATION_INSERT
#define PGS_UPDATE PGSTREAM_HANDLER_TYPES_OPERATION_UPDATE
#define PGS_DELETE PGSTREAM_HANDLER_TYPES_OPERATION_DELETE
#define PGS_TRUNCATE PGSTREAM_HANDLER_TYPES_OPERATION_TRUNCATE
/* A row a backfill delivers: treat it as an upsert. */
#define PGS_READ PGSTREAM_HANDLER_TYPES_OPERATION_READ

/* Log levels for pgs_log. */
#define PGS_LOG_TRACE PGSTREAM_HANDLER_TYPES_LOG_LEVEL_TRACE
#define PGS_LOG_DEBUG PGSTREAM_HANDLER_TYPES_LOG_LEVEL_DEBUG
#define PGS_LOG_INFO PGSTREAM_HANDLER_TYPES_LOG_LEVEL_INFO
#define PGS_LOG_WARN PGSTREAM_HANDLER_TYPES_LOG_LEVEL_WARN
#define PGS_LOG_ERROR PGSTREAM_HANDLER_TYPES_LOG_LEVEL_ERROR

/* Postgres type OIDs (pg_type.oid) of the built-in types the helper knows. */
enum {
    PGS_OID_BOOL = 16,
    PGS_OID_BYTEA = 17,
    PGS_OID_INT8 = 20,
    PGS_OID_INT2 = 21,
    PGS_OID_INT4 = 23,
    PGS_OID_TEXT = 25,
    PGS_OID_OID = 26,
    PGS_OID_JSON = 114,
    PGS_OID_FLOAT4 = 700,
    PGS_OID_FLOAT8 = 701,
    PGS_OID_VARCHAR = 1043,
    PGS_OID_DATE = 1082,
    PGS_OID_TIMESTAMP = 1114,
    PGS_OID_TIMESTAMPTZ = 1184,
    PGS_OID_NUMERIC = 1700,
    PGS_OID_UUID = 2950,
    PGS_OID_JSONB = 3802,
};

/* `printf("%.*s", PGS_STR(s))` prints a pgs_string_t. */
#define PGS_STR(s) (int)(s).len, (const char *)(s).ptr

/* Whether `s` holds exactly the NUL-terminated `text`. */
bool pgs_str_eq(pgs_string_t s, const char *text);

/* ---------------------------------------------------------------------------------------- */
/* Reading rows                                                                             */

/* What a getter found. Only PGS_VALUE writes `*out`. */
typedef enum pgs_field {
    /* The column has a value; it was written to *out. */
    PGS_VALUE = 0,
    /* SQL NULL. */
    PGS_NULL,
    /* A TOASTed value this UPDATE did not change: Postgres did not send it. It is NOT null:
     * the stored value is still the old one. */
    PGS_UNCHANGED,
    /* The row has no column of that name. */
    PGS_NO_COLUMN,
    /* The text does not parse as the requested type (or the type OID does not fit it). */
    PGS_INVALID,
} pgs_field_t;

/* A short English description of `field` ("null", "unchanged", "no such column", ...). */
const char *pgs_field_describe(pgs_field_t field);

/* The row after the change (insert, update), or the key / old row (delete). */
static inline const pgs_row_t *pgs_row(const pgs_event_t *event) { return &event->row; }

/* The row before an update when Postgres sent it, else NULL. */
static inline const pgs_row_t *pgs_old_row(const pgs_event_t *event) {
    return event->old_row.is_some ? &event->old_row.val : NULL;
}

/* The column named `name` (exact, case-sensitive), or NULL. `row` may be NULL. */
const pgs_column_t *pgs_column(const pgs_row_t *row, const char *name);

/* The value's text, without parsing (any type). Points into the event: no copy. */
pgs_field_t pgs_get_text(const pgs_row_t *row, const char *name, pgs_string_t *out);
/* Integers (int2, int4, int8, oid, or any text that is a decimal int64). */
pgs_field_t pgs_get_int64(const pgs_row_t *row, const char *name, int64_t *out);
/* Floats: `1.5`, `1e+20`, `NaN`, `Infinity`, `-Infinity` (float4, float8, numeric, ints). */
pgs_field_t pgs_get_double(const pgs_row_t *row, const char *name, double *out);
/* Booleans: `t`/`true`, `f`/`false`. */
pgs_field_t pgs_get_bool(const pgs_row_t *row, const char *name, bool *out);
/* The JSON document of a json/jsonb column, as Postgres printed it (valid JSON). Other types
 * are PGS_INVALID. Points into the event: no copy. */
pgs_field_t pgs_get_json(const pgs_row_t *row, const char *name, pgs_string_t *out);
/* A date, timestamp or timestamptz column (ISO DateStyle, the default) as microseconds since
 * the Unix epoch, UTC; timestamp without time zone is taken as UTC, a date as midnight UTC.
 * `infinity` / `-infinity` become INT64_MAX / INT64_MIN. */
pgs_field_t pgs_get_timestamp(const pgs_row_t *row, const char *name, int64_t *unix_micros);

/* Parsers behind the getters, for text you hold yourself. Each returns false on bad input. */
bool pgs_parse_int64(pgs_string_t text, int64_t *out);
bool pgs_parse_double(pgs_string_t text, double *out);
bool pgs_parse_bool(pgs_string_t text, bool *out);
bool pgs_parse_timestamp(pgs_string_t text, uint32_t type_oid, int64_t *unix_micros);

/* ---------------------------------------------------------------------------------------- */
/* Keys and payloads                                                                        */

/* The point key of the event's row: schema, table and the key columns' text in
 * `key-columns` order. The strings point into the event; only the array of key values is
 * allocated: release it with pgs_point_key_release (or hand the key to a plan, which then
 * owns it). Fails (filling `err`) when a key column is missing, NULL or unchanged. */
bool pgs_point_key(const pgs_event_t *event, pgs_point_key_t *out, pgs_error_t *err);

/* The point key of the row before an update, when the old row carries the key columns
 * (REPLICA IDENTITY FULL, or the update changed the key). False when it does not. */
bool pgs_old_point_key(const pgs_event_t *event, pgs_point_key_t *out);

/* Whether two keys name the same point. */
bool pgs_point_key_eq(const pgs_point_key_t *a, const pgs_point_key_t *b);

/* Frees what pgs_point_key allocated (not the strings, which belong to the event). */
void pgs_point_key_release(pgs_point_key_t *key);

/* The row as a JSON object: column name to value. Integers, floats and numerics whose text is
 * a JSON number become numbers, bools true/false, json/jsonb documents are embedded as they
 * are, NULL is null, everything else (NaN, Infinity included) a string. Unchanged columns take
 * their value from the old row when it has them (REPLICA IDENTITY FULL) and are left out
 * otherwise; the `skip_len` columns named in `skip` are left out. Returns heap memory: free
 * it with handler_string_free, or hand it to a plan. */
pgs_string_t pgs_row_json(const pgs_event_t *event, const char *const *skip, size_t skip_len);

/* Whether pgs_row_json leaves a column out for want of its value: the update left it unchanged
 * (TOASTed, not sent) and the old row does not have it. Write such a row with pgs_plan_merge,
 * so the stored value of the missing column survives. */
bool pgs_is_partial(const pgs_event_t *event);

/* Appends the JSON for one non-null value of type `type_oid` (as pgs_row_json writes it) to
 * the heap string `*out` (which may start as {NULL, 0}). */
void pgs_json_append_value(pgs_string_t *out, pgs_string_t text, uint32_t type_oid);

/* ---------------------------------------------------------------------------------------- */
/* Writing: a batch collapsed into as few host calls as possible                            */

/* The writes of one batch, collapsed to the last action per point. A batch is ordered (a row
 * inserted then deleted must end up deleted, a truncate wipes what came before it), so the
 * plan records it in order, keeps the last action per point, and pgs_plan_execute runs:
 * delete-table per truncated table, one delete, one embed, one upsert, one merge. That gives
 * the same result as replaying the events one by one (a point upserted then merged in one
 * batch is in both calls, and the merge runs after the upsert). Texts and table names are borrowed from the
 * events; keys and payloads handed to the plan are owned by it. */
typedef struct pgs_plan {
    struct pgs_action *actions;
    size_t actions_len, actions_cap;
    /* Open-addressing index of live actions by key: position + 1, 0 when empty. */
    uint32_t *slots;
    size_t slots_cap, slots_used;
    /* Truncated tables: schema, table, schema, table, ... */
    pgs_string_t *truncated;
    size_t truncated_len, truncated_cap;
} pgs_plan_t;

/* An empty plan (also `pgs_plan_t plan = {0};`). */
void pgs_plan_init(pgs_plan_t *plan);
/* Writes the point `key` with `payload`, which replaces the stored payload, embedding `*text`
 * for its vector. With `text` NULL the stored vector is kept (the embedded text did not
 * change); if this batch already embeds a text for the point, that text is kept. Takes `key`
 * and `payload`; `text` must outlive the plan (it normally points into the event). */
void pgs_plan_upsert(pgs_plan_t *plan, pgs_point_key_t key, const pgs_string_t *text,
                     pgs_string_t payload);
/* Writes the point `key` merging `payload` (a JSON object) into the stored payload: its keys
 * replace or add those of the same name, the stored point's other keys stay. For a row whose
 * payload is partial (pgs_is_partial), so a column the update left unchanged keeps its stored
 * value. `text` as for pgs_plan_upsert. A point the store does not have is created from
 * `payload` when there is a text to embed, and skipped (with a warning in the host's log)
 * otherwise. Takes `key` and `payload`. */
void pgs_plan_merge(pgs_plan_t *plan, pgs_point_key_t key, const pgs_string_t *text,
                    pgs_string_t payload);
/* Deletes the point `key`. Takes `key`. */
void pgs_plan_delete(pgs_plan_t *plan, pgs_point_key_t key);
/* Deletes every point of schema.table and forgets the writes planned for it so far. */
void pgs_plan_truncate(pgs_plan_t *plan, pgs_string_t schema, pgs_string_t table);
/* Runs the plan; stops at the first host error, which lands in `err`. */
bool pgs_plan_execute(pgs_plan_t *plan, pgs_error_t *err);
/* Frees everything the plan owns; it is empty again afterwards. */
void pgs_plan_free(pgs_plan_t *plan);

/* ---------------------------------------------------------------------------------------- */
/* Errors and logging                                                                       */

/* Fills `err` with the printf-style message and "\n    at FILE:LINE in FUNCTION"; evaluates to
 * false, so `return PGS_FAIL(err, "bad id %lld", id);` or `ok = PGS_FAIL(...)`. */
#define PGS_FAIL(err, ...) pgs_fail_at((err), __FILE__, __LINE__, __func__, __VA_ARGS__)
/* Adds "\n    at FILE:LINE in FUNCTION" to an error already in `err` (one filled by a
 * callee); evaluates to false: `if (!step(err)) return PGS_TRACE(err);`. */
#define PGS_TRACE(err) pgs_trace_at((err), __FILE__, __LINE__, __func__)

bool pgs_fail_at(pgs_error_t *err, const char *file, int line, const char *function,
                 const char *format, ...) __attribute__((format(printf, 5, 6)));
bool pgs_trace_at(pgs_error_t *err, const char *file, int line, const char *function);

/* Writes a printf-style line to the host's log. */
void pgs_log(pgstream_handler_types_log_level_t level, const char *format, ...)
    __attribute__((format(printf, 2, 3)));

#ifdef __cplusplus
}
#endif

#endif /* PGSTREAM_H */
