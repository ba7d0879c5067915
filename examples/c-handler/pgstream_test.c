/*
 * Unit test of the helper, run natively by `make test-c`: the generated WIT types are real
 * (handler.h), the host imports are fakes that record the calls, and every allocation the
 * helper makes is counted (the build renames malloc/realloc/free to the counted_* below) so
 * the test proves a batch frees all it allocated. Prints "N passed, 0 failed".
 */
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "pgstream.h"

/* pgstream.c is compiled with malloc/realloc/free renamed to these; this file's own
 * allocations go to the real allocator uncounted. */
void *counted_malloc(size_t size);
void *counted_realloc(void *ptr, size_t size);
void counted_free(void *ptr);

static long live_allocations;

void *counted_malloc(size_t size) {
    live_allocations++;
    return malloc(size);
}
void *counted_realloc(void *ptr, size_t size) {
    if (!ptr) live_allocations++;
    return realloc(ptr, size);
}
void counted_free(void *ptr) {
    if (ptr) live_allocations--;
    free(ptr);
}

static int passed, failed;
#define CHECK(cond)                                                                  \
    do {                                                                             \
        if (cond) {                                                                  \
            passed++;                                                                \
        } else {                                                                     \
            failed++;                                                                \
            fprintf(stderr, "%s:%d: check failed: %s\n", __FILE__, __LINE__, #cond); \
        }                                                                            \
    } while (0)

static pgs_string_t s(const char *text) { return (pgs_string_t){(uint8_t *)text, strlen(text)}; }

static bool same(pgs_string_t a, const char *b) { return pgs_str_eq(a, b); }

/* ---- fake host ------------------------------------------------------------------------ */

static char calls[4096];  /* a transcript of the host calls */
static bool fail_upsert;

static void record(const char *format, ...) __attribute__((format(printf, 1, 2)));
static void record(const char *format, ...) {
    va_list args;
    va_start(args, format);
    size_t len = strlen(calls);
    vsnprintf(calls + len, sizeof calls - len, format, args);
    va_end(args);
}

static void record_key(const pgs_point_key_t *key) {
    record("%.*s.%.*s[", PGS_STR(key->schema), PGS_STR(key->table));
    for (size_t i = 0; i < key->key.len; i++)
        record("%s%.*s", i ? "," : "", PGS_STR(key->key.ptr[i]));
    record("]");
}

bool pgstream_handler_host_embed(handler_list_string_t *texts,
                                 pgstream_handler_host_list_vector_t *ret,
                                 pgstream_handler_host_error_t *err) {
    (void)err;
    record("embed(");
    /* Like the canonical ABI, the results are allocated in the guest's memory. */
    ret->ptr = counted_malloc(texts->len * sizeof *ret->ptr);
    ret->len = texts->len;
    for (size_t i = 0; i < texts->len; i++) {
        record("%s%.*s", i ? "," : "", PGS_STR(texts->ptr[i]));
        ret->ptr[i].ptr = counted_malloc(2 * sizeof(float));
        ret->ptr[i].len = 2;
        ret->ptr[i].ptr[0] = (float)i;
        ret->ptr[i].ptr[1] = (float)texts->ptr[i].len;
    }
    record(") ");
    return true;
}

bool pgstream_handler_host_upsert(pgstream_handler_host_list_point_t *points,
                                  pgstream_handler_host_error_t *err) {
    record("upsert(");
    for (size_t i = 0; i < points->len; i++) {
        const pgstream_handler_host_point_t *p = &points->ptr[i];
        record("%s", i ? " " : "");
        record_key(&p->key);
        if (p->vector.is_some)
            record("=v%g", (double)p->vector.val.ptr[0]);
        record(":%.*s", PGS_STR(p->payload));
    }
    record(") ");
    if (fail_upsert) {
        const char *message = "sink is down";
        err->message.ptr = counted_malloc(strlen(message));
        memcpy(err->message.ptr, message, strlen(message));
        err->message.len = strlen(message);
        return false;
    }
    return true;
}

bool pgstream_handler_host_merge(pgstream_handler_host_list_point_t *points,
                                 pgstream_handler_host_error_t *err) {
    (void)err;
    record("merge(");
    for (size_t i = 0; i < points->len; i++) {
        const pgstream_handler_host_point_t *p = &points->ptr[i];
        record("%s", i ? " " : "");
        record_key(&p->key);
        if (p->vector.is_some)
            record("=v%g", (double)p->vector.val.ptr[0]);
        record(":%.*s", PGS_STR(p->payload));
    }
    record(") ");
    return true;
}

bool pgstream_handler_host_delete(pgstream_handler_host_list_point_key_t *keys,
                                  pgstream_handler_host_error_t *err) {
    (void)err;
    record("delete(");
    for (size_t i = 0; i < keys->len; i++) {
        record("%s", i ? " " : "");
        record_key(&keys->ptr[i]);
    }
    record(") ");
    return true;
}

bool pgstream_handler_host_delete_table(handler_string_t *schema, handler_string_t *table,
                                        pgstream_handler_host_error_t *err) {
    (void)err;
    record("delete-table(%.*s.%.*s) ", PGS_STR(*schema), PGS_STR(*table));
    return true;
}

void pgstream_handler_host_log(pgstream_handler_host_log_level_t level, handler_string_t *message) {
    record("log%u(%.*s) ", (unsigned)level, PGS_STR(*message));
}

/* The generated frees the helper calls, as handler.c defines them. */
void handler_string_free(handler_string_t *ret) {
    if (ret->len > 0) counted_free(ret->ptr);
    ret->ptr = NULL;
    ret->len = 0;
}

void pgstream_handler_host_list_vector_free(pgstream_handler_host_list_vector_t *ptr) {
    if (ptr->len > 0) {
        for (size_t i = 0; i < ptr->len; i++)
            if (ptr->ptr[i].len > 0) counted_free(ptr->ptr[i].ptr);
        counted_free(ptr->ptr);
    }
}

/* ---- events ----------------------------------------------------------------------------- */

static pgs_column_t text_col(const char *name, uint32_t oid, const char *value) {
    pgs_column_t c = {s(name), oid, {PGSTREAM_HANDLER_TYPES_VALUE_TEXT, {s(value)}}};
    return c;
}
static pgs_column_t null_col(const char *name, uint32_t oid) {
    pgs_column_t c = {s(name), oid, {PGSTREAM_HANDLER_TYPES_VALUE_NULL, {{NULL, 0}}}};
    return c;
}
static pgs_column_t unchanged_col(const char *name, uint32_t oid) {
    pgs_column_t c = {s(name), oid, {PGSTREAM_HANDLER_TYPES_VALUE_UNCHANGED, {{NULL, 0}}}};
    return c;
}

static pgs_string_t ID_KEY[] = {{(uint8_t *)"id", 2}};

static pgs_event_t event(uint8_t op, pgs_column_t *cols, size_t n) {
    pgs_event_t e;
    memset(&e, 0, sizeof e);
    e.operation = op;
    e.schema = s("public");
    e.table = s("docs");
    e.row.ptr = cols;
    e.row.len = n;
    e.key_columns.ptr = ID_KEY;
    e.key_columns.len = 1;
    return e;
}

#define N(array) (sizeof(array) / sizeof *(array))

/* ---- tests ------------------------------------------------------------------------------ */

static void typed_getters_keep_null_and_unchanged_apart(void) {
    pgs_column_t cols[] = {
        text_col("id", PGS_OID_INT8, "-9223372036854775808"),
        text_col("score", PGS_OID_FLOAT8, "1e+20"),
        text_col("nan", PGS_OID_FLOAT8, "NaN"),
        text_col("ninf", PGS_OID_FLOAT4, "-Infinity"),
        text_col("ok", PGS_OID_BOOL, "t"),
        text_col("title", PGS_OID_TEXT, "h\xc3\xa9llo"),
        text_col("doc", PGS_OID_JSONB, "{\"a\": [1, 2]}"),
        text_col("at", PGS_OID_TIMESTAMPTZ, "2024-05-01 12:30:00.25+02"),
        null_col("missing", PGS_OID_TEXT),
        unchanged_col("content", PGS_OID_TEXT),
    };
    pgs_event_t e = event(PGS_INSERT, cols, N(cols));
    const pgs_row_t *row = pgs_row(&e);
    int64_t i;
    double d;
    bool b;
    pgs_string_t t;
    CHECK(pgs_get_int64(row, "id", &i) == PGS_VALUE && i == INT64_MIN);
    CHECK(pgs_get_double(row, "score", &d) == PGS_VALUE && d == 1e20);
    CHECK(pgs_get_double(row, "nan", &d) == PGS_VALUE && isnan(d));
    CHECK(pgs_get_double(row, "ninf", &d) == PGS_VALUE && isinf(d) && d < 0);
    CHECK(pgs_get_bool(row, "ok", &b) == PGS_VALUE && b);
    CHECK(pgs_get_text(row, "title", &t) == PGS_VALUE && same(t, "h\xc3\xa9llo"));
    CHECK(pgs_get_json(row, "doc", &t) == PGS_VALUE && same(t, "{\"a\": [1, 2]}"));
    CHECK(pgs_get_json(row, "title", &t) == PGS_INVALID);
    CHECK(pgs_get_timestamp(row, "at", &i) == PGS_VALUE && i == INT64_C(1714559400250000));
    CHECK(pgs_get_text(row, "missing", &t) == PGS_NULL);
    CHECK(pgs_get_int64(row, "missing", &i) == PGS_NULL);
    CHECK(pgs_get_text(row, "content", &t) == PGS_UNCHANGED);
    CHECK(pgs_get_int64(row, "title", &i) == PGS_INVALID);
    CHECK(pgs_get_bool(row, "title", &b) == PGS_INVALID);
    CHECK(pgs_get_text(row, "nope", &t) == PGS_NO_COLUMN);
    CHECK(pgs_get_text(pgs_old_row(&e), "id", &t) == PGS_NO_COLUMN);
}

static void parsers_refuse_what_postgres_never_prints(void) {
    int64_t i;
    double d;
    CHECK(pgs_parse_int64(s("9223372036854775807"), &i) && i == INT64_MAX);
    CHECK(!pgs_parse_int64(s("9223372036854775808"), &i));
    CHECK(!pgs_parse_int64(s(""), &i));
    CHECK(!pgs_parse_int64(s("-"), &i));
    CHECK(!pgs_parse_int64(s("12a"), &i));
    CHECK(!pgs_parse_double(s(""), &d));
    CHECK(!pgs_parse_double(s(" 1"), &d));
    CHECK(!pgs_parse_double(s("0x10"), &d));
    CHECK(!pgs_parse_double(s("inf"), &d));
    CHECK(!pgs_parse_double(s("1.5x"), &d));
    /* A numeric longer than the parser's stack buffer. */
    char long_number[200];
    memset(long_number, '1', sizeof long_number - 1);
    long_number[sizeof long_number - 1] = '\0';
    CHECK(pgs_parse_double(s(long_number), &d) && d > 1e198);
}

static void timestamps_decode_offsets_dates_and_specials(void) {
    int64_t t;
    CHECK(pgs_parse_timestamp(s("2024-05-01 05:00:00-05:30"), PGS_OID_TIMESTAMPTZ, &t) &&
          t == INT64_C(1714559400000000));
    CHECK(pgs_parse_timestamp(s("1970-01-01 00:00:00+00"), PGS_OID_TIMESTAMPTZ, &t) && t == 0);
    CHECK(pgs_parse_timestamp(s("1969-12-31 23:59:59.5"), PGS_OID_TIMESTAMP, &t) && t == -500000);
    CHECK(pgs_parse_timestamp(s("2000-03-01"), PGS_OID_DATE, &t) &&
          t == INT64_C(951868800000000));
    CHECK(pgs_parse_timestamp(s("0001-01-01 BC"), PGS_OID_DATE, &t) &&
          t == INT64_C(-62167219200000000));
    CHECK(pgs_parse_timestamp(s("infinity"), PGS_OID_DATE, &t) && t == INT64_MAX);
    CHECK(pgs_parse_timestamp(s("-infinity"), PGS_OID_TIMESTAMPTZ, &t) && t == INT64_MIN);
    CHECK(!pgs_parse_timestamp(s("2024-05-01 12:30:00"), PGS_OID_TIMESTAMPTZ, &t));
    CHECK(!pgs_parse_timestamp(s("2024-13-01"), PGS_OID_DATE, &t));
    CHECK(!pgs_parse_timestamp(s("2024-05-01"), PGS_OID_TEXT, &t));
    CHECK(!pgs_parse_timestamp(s("2024-05-01 12:30:00.1234567"), PGS_OID_TIMESTAMP, &t));
    CHECK(!pgs_parse_timestamp(s("2024-05-01x"), PGS_OID_DATE, &t));
}

static void row_json_types_values_and_escapes(void) {
    pgs_column_t cols[] = {
        text_col("id", PGS_OID_INT8, "7"),
        text_col("price", PGS_OID_NUMERIC, "NaN"),
        text_col("ratio", PGS_OID_FLOAT8, "-0.5e-3"),
        text_col("ok", PGS_OID_BOOL, "f"),
        text_col("meta", PGS_OID_JSONB, "{\"k\": \"v\"}"),
        text_col("title", PGS_OID_TEXT, "a \"quoted\"\nline\x01\\"),
        text_col("n\"ame", PGS_OID_TEXT, "x"),
        null_col("gone", PGS_OID_TEXT),
        unchanged_col("content", PGS_OID_TEXT),
    };
    pgs_event_t e = event(PGS_UPDATE, cols, N(cols));
    long before = live_allocations;
    pgs_string_t json = pgs_row_json(&e, NULL, 0);
    CHECK(same(json, "{\"id\":7,\"price\":\"NaN\",\"ratio\":-0.5e-3,\"ok\":false,"
                     "\"meta\":{\"k\": \"v\"},\"title\":\"a \\\"quoted\\\"\\nline\\u0001\\\\\","
                     "\"n\\\"ame\":\"x\",\"gone\":null}"));
    handler_string_free(&json);
    CHECK(live_allocations == before);
}

static void row_json_fills_unchanged_from_the_old_row_and_skips_columns(void) {
    pgs_column_t cols[] = {
        text_col("id", PGS_OID_INT8, "7"),
        unchanged_col("body", PGS_OID_TEXT),
        unchanged_col("notes", PGS_OID_TEXT),
        text_col("content", PGS_OID_TEXT, "new"),
    };
    pgs_column_t old[] = {
        text_col("id", PGS_OID_INT8, "7"),
        text_col("body", PGS_OID_TEXT, "old body"),
        text_col("content", PGS_OID_TEXT, "old"),
    };
    pgs_event_t e = event(PGS_UPDATE, cols, N(cols));
    e.old_row.is_some = true;
    e.old_row.val.ptr = old;
    e.old_row.val.len = N(old);
    const char *skip[] = {"content"};
    pgs_string_t json = pgs_row_json(&e, skip, 1);
    CHECK(same(json, "{\"id\":7,\"body\":\"old body\"}"));
    handler_string_free(&json);
}

static void a_row_is_partial_when_an_unchanged_column_has_no_old_value(void) {
    pgs_column_t cols[] = {text_col("id", PGS_OID_INT4, "5"), unchanged_col("content", PGS_OID_TEXT)};
    pgs_column_t key_only[] = {text_col("id", PGS_OID_INT4, "5")};
    pgs_column_t full[] = {text_col("id", PGS_OID_INT4, "5"), text_col("content", PGS_OID_TEXT, "kept")};
    pgs_event_t e = event(PGS_UPDATE, cols, N(cols));
    CHECK(pgs_is_partial(&e));
    e.old_row.is_some = true;
    e.old_row.val.ptr = key_only;
    e.old_row.val.len = N(key_only);
    CHECK(pgs_is_partial(&e));
    e.old_row.val.ptr = full;
    e.old_row.val.len = N(full);
    CHECK(!pgs_is_partial(&e));
    pgs_event_t sent = event(PGS_UPDATE, full, N(full));
    CHECK(!pgs_is_partial(&sent));
}

static void point_keys_follow_key_order_and_refuse_missing_values(void) {
    pgs_column_t cols[] = {text_col("id", PGS_OID_INT4, "5"), text_col("tenant", PGS_OID_TEXT, "acme")};
    pgs_string_t key_columns[] = {s("tenant"), s("id")};
    pgs_event_t e = event(PGS_DELETE, cols, N(cols));
    e.key_columns.ptr = key_columns;
    e.key_columns.len = 2;
    pgs_point_key_t key;
    pgs_error_t err = {{NULL, 0}};
    CHECK(pgs_point_key(&e, &key, &err));
    CHECK(key.key.len == 2 && same(key.key.ptr[0], "acme") && same(key.key.ptr[1], "5"));
    CHECK(same(key.schema, "public") && same(key.table, "docs"));
    CHECK(!pgs_old_point_key(&e, &key));
    pgs_point_key_release(&key);

    cols[1] = null_col("tenant", PGS_OID_TEXT);
    CHECK(!pgs_point_key(&e, &key, &err));
    CHECK(same(err.message, "key column \"tenant\" of public.docs is null in this event"));
    handler_string_free(&err.message);
    CHECK(live_allocations == 0);
}

static void errors_carry_their_locations(void) {
    pgs_error_t err;
    CHECK(!PGS_FAIL(&err, "bad row %d", 42));
    int fail_line = __LINE__ - 1;
    CHECK(!PGS_TRACE(&err));
    int trace_line = __LINE__ - 1;
    char expected[512];
    snprintf(expected, sizeof expected,
             "bad row 42\n    at %s:%d in errors_carry_their_locations"
             "\n    at %s:%d in errors_carry_their_locations",
             __FILE__, fail_line, __FILE__, trace_line);
    CHECK(same(err.message, expected));
    handler_string_free(&err.message);

    calls[0] = '\0';
    pgs_log(PGS_LOG_WARN, "%d rows", 3);
    CHECK(strcmp(calls, "log3(3 rows) ") == 0);
    CHECK(live_allocations == 0);
}

static pgs_point_key_t key_of(const char *table, const char *id) {
    pgs_point_key_t key;
    key.schema = s("public");
    key.table = s(table);
    key.key.ptr = counted_malloc(sizeof *key.key.ptr);
    key.key.ptr[0] = s(id);
    key.key.len = 1;
    return key;
}

static pgs_string_t payload(const char *json) {
    pgs_string_t out = {counted_malloc(strlen(json)), strlen(json)};
    memcpy(out.ptr, json, out.len);
    return out;
}

static void plan_keeps_the_last_action_per_point(void) {
    pgs_string_t first = s("first"), again = s("again"), gone = s("gone");
    pgs_plan_t plan;
    pgs_plan_init(&plan);
    pgs_plan_upsert(&plan, key_of("docs", "1"), &first, payload("{\"v\":1}"));
    pgs_plan_delete(&plan, key_of("docs", "2"));
    pgs_plan_upsert(&plan, key_of("docs", "2"), &again, payload("{}"));
    pgs_plan_upsert(&plan, key_of("docs", "1"), NULL, payload("{\"v\":2}"));
    pgs_plan_upsert(&plan, key_of("docs", "3"), &gone, payload("{}"));
    pgs_plan_delete(&plan, key_of("docs", "3"));
    pgs_plan_upsert(&plan, key_of("docs", "4"), NULL, payload("{\"only\":\"payload\"}"));
    calls[0] = '\0';
    pgs_error_t err;
    CHECK(pgs_plan_execute(&plan, &err));
    CHECK(strcmp(calls, "delete(public.docs[3]) embed(first,again) "
                        "upsert(public.docs[1]=v0:{\"v\":2} public.docs[2]=v1:{} "
                        "public.docs[4]:{\"only\":\"payload\"}) ") == 0);
    if (failed) fprintf(stderr, "calls: %s\n", calls);
    pgs_plan_free(&plan);
    CHECK(live_allocations == 0);
}

/* The same sequence as the Rust SDK's test of the same name: the calls must match. */
static void merges_follow_the_upsert_of_their_point_and_take_its_text(void) {
    pgs_string_t first = s("first"), second = s("second"), third = s("third");
    pgs_plan_t plan = {0};
    pgs_plan_upsert(&plan, key_of("docs", "1"), &first, payload("{\"v\":1}"));
    pgs_plan_merge(&plan, key_of("docs", "1"), NULL, payload("{\"n\":1}"));
    pgs_plan_merge(&plan, key_of("docs", "2"), NULL, payload("{\"n\":2}"));
    pgs_plan_merge(&plan, key_of("docs", "2"), &second, payload("{\"n\":3}"));
    pgs_plan_delete(&plan, key_of("docs", "3"));
    pgs_plan_merge(&plan, key_of("docs", "3"), &third, payload("{\"n\":4}"));
    pgs_plan_merge(&plan, key_of("docs", "4"), NULL, payload("{\"n\":5}"));
    pgs_plan_upsert(&plan, key_of("docs", "4"), NULL, payload("{\"v\":4}"));
    calls[0] = '\0';
    pgs_error_t err;
    CHECK(pgs_plan_execute(&plan, &err));
    CHECK(strcmp(calls, "delete(public.docs[3]) embed(first,second,third) "
                        "upsert(public.docs[1]=v0:{\"v\":1} public.docs[4]:{\"v\":4}) "
                        "merge(public.docs[1]:{\"n\":1} public.docs[2]=v1:{\"n\":2} "
                        "public.docs[2]:{\"n\":3} public.docs[3]=v2:{\"n\":4}) ") == 0);
    if (failed) fprintf(stderr, "calls: %s\n", calls);
    pgs_plan_free(&plan);
    CHECK(live_allocations == 0);
}

static void truncate_drops_earlier_writes_of_its_table_only(void) {
    pgs_string_t a = s("a"), b = s("b"), c = s("c");
    pgs_plan_t plan = {0};
    pgs_plan_upsert(&plan, key_of("docs", "1"), &a, payload("{}"));
    pgs_plan_upsert(&plan, key_of("other", "1"), &b, payload("{}"));
    pgs_plan_delete(&plan, key_of("docs", "9"));
    pgs_plan_truncate(&plan, s("public"), s("docs"));
    pgs_plan_upsert(&plan, key_of("docs", "1"), &c, payload("{}"));
    pgs_plan_truncate(&plan, s("public"), s("other"));
    pgs_plan_truncate(&plan, s("public"), s("docs"));
    pgs_plan_upsert(&plan, key_of("docs", "2"), &c, payload("{}"));
    calls[0] = '\0';
    pgs_error_t err;
    CHECK(pgs_plan_execute(&plan, &err));
    CHECK(strcmp(calls, "delete-table(public.docs) delete-table(public.other) embed(c) "
                        "upsert(public.docs[2]=v0:{}) ") == 0);
    pgs_plan_free(&plan);
    CHECK(live_allocations == 0);
}

static void many_points_and_a_failing_host_free_everything(void) {
    /* Enough points to make the index grow several times. */
    static char ids[5000][8];
    pgs_string_t text = s("t");
    pgs_plan_t plan = {0};
    for (int round = 0; round < 2; round++)
        for (int i = 0; i < 5000; i++) {
            snprintf(ids[i], sizeof ids[i], "%d", i);
            if (i % 3 == 0)
                pgs_plan_delete(&plan, key_of("docs", ids[i]));
            else
                pgs_plan_upsert(&plan, key_of("docs", ids[i]), &text, payload("{}"));
        }
    CHECK(plan.actions_len == 5000);
    fail_upsert = true;
    calls[0] = '\0';
    pgs_error_t err;
    CHECK(!pgs_plan_execute(&plan, &err) && !PGS_TRACE(&err));
    CHECK(strncmp((char *)err.message.ptr, "sink is down\n    at ", 20) == 0);
    fail_upsert = false;
    handler_string_free(&err.message);
    pgs_plan_free(&plan);
    CHECK(live_allocations == 0);
}

int main(void) {
    typed_getters_keep_null_and_unchanged_apart();
    parsers_refuse_what_postgres_never_prints();
    timestamps_decode_offsets_dates_and_specials();
    row_json_types_values_and_escapes();
    row_json_fills_unchanged_from_the_old_row_and_skips_columns();
    point_keys_follow_key_order_and_refuse_missing_values();
    errors_carry_their_locations();
    plan_keeps_the_last_action_per_point();
    merges_follow_the_upsert_of_their_point_and_take_its_text();
    a_row_is_partial_when_an_unchanged_column_has_no_old_value();
    truncate_drops_earlier_writes_of_its_table_only();
    many_points_and_a_failing_host_free_everything();
    printf("%d passed, %d failed\n", passed, failed);
    return failed != 0;
}
