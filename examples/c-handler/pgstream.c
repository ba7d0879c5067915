/*
 * pgstream.c -- the helper behind pgstream.h: typed getters, keys and payloads, the write
 * plan, errors with locations. Plain C11 + wasi-libc; no JSON or date library needed.
 */
#include "pgstream.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Allocation failure inside a 256 MiB sandbox leaves nothing sensible to do: trap, telling
 * why on stderr (the host puts the guest's stderr in its trap report). */
static void *grow(void *ptr, size_t size) {
    void *grown = realloc(ptr, size ? size : 1);
    if (!grown) {
        fprintf(stderr, "pgstream.c: out of memory allocating %zu bytes\n", size);
        abort();
    }
    return grown;
}

bool pgs_str_eq(pgs_string_t s, const char *text) {
    size_t len = strlen(text);
    return s.len == len && (len == 0 || memcmp(s.ptr, text, len) == 0);
}

static bool strings_equal(pgs_string_t a, pgs_string_t b) {
    return a.len == b.len && (a.len == 0 || memcmp(a.ptr, b.ptr, a.len) == 0);
}

/* ---------------------------------------------------------------------------------------- */
/* Growable heap strings                                                                    */

typedef struct {
    pgs_string_t s;
    size_t cap;
} buffer_t;

static void buffer_reserve(buffer_t *b, size_t extra) {
    if (b->s.len + extra <= b->cap) return;
    size_t cap = b->cap ? b->cap * 2 : 64;
    while (cap < b->s.len + extra) cap *= 2;
    b->s.ptr = grow(b->s.ptr, cap);
    b->cap = cap;
}

static void buffer_push(buffer_t *b, const void *bytes, size_t len) {
    buffer_reserve(b, len);
    if (len) memcpy(b->s.ptr + b->s.len, bytes, len);
    b->s.len += len;
}

static void buffer_byte(buffer_t *b, uint8_t byte) { buffer_push(b, &byte, 1); }

static void buffer_cstr(buffer_t *b, const char *text) { buffer_push(b, text, strlen(text)); }

static void buffer_vprintf(buffer_t *b, const char *format, va_list args) {
    va_list again;
    va_copy(again, args);
    int needed = vsnprintf(NULL, 0, format, args);
    if (needed > 0) {
        buffer_reserve(b, (size_t)needed + 1);
        vsnprintf((char *)b->s.ptr + b->s.len, (size_t)needed + 1, format, again);
        b->s.len += (size_t)needed;
    }
    va_end(again);
}

/* ---------------------------------------------------------------------------------------- */
/* Parsing Postgres' text format                                                            */

bool pgs_parse_int64(pgs_string_t text, int64_t *out) {
    const uint8_t *p = text.ptr;
    size_t len = text.len, at = 0;
    bool negative = false;
    if (at < len && (p[at] == '-' || p[at] == '+')) negative = p[at++] == '-';
    if (at == len) return false;
    /* Accumulate negatively so INT64_MIN parses without overflow. */
    int64_t value = 0;
    for (; at < len; at++) {
        if (p[at] < '0' || p[at] > '9') return false;
        int digit = p[at] - '0';
        if (value < (INT64_MIN + digit) / 10) return false;
        value = value * 10 - digit;
    }
    if (!negative) {
        if (value == INT64_MIN) return false;
        value = -value;
    }
    *out = value;
    return true;
}

bool pgs_parse_double(pgs_string_t text, double *out) {
    /* strtod needs a NUL-terminated string; Postgres' float text is short, numerics can be
     * long (up to 131072 digits before the point), hence the heap fallback. */
    char stack[64];
    char *copy = text.len < sizeof stack ? stack : grow(NULL, text.len + 1);
    if (text.len) memcpy(copy, text.ptr, text.len);
    copy[text.len] = '\0';
    /* strtod also takes hex floats, leading blanks and "inf"; Postgres prints none of those,
     * so anything but its own spellings is refused. */
    bool ok = text.len > 0 && copy[0] != ' ' && !strchr(copy, 'x') && !strchr(copy, 'X');
    if (ok) {
        char *end;
        double value = strtod(copy, &end);
        ok = *end == '\0';
        bool spelled_out = strpbrk(copy, "nNiI") != NULL;
        if (ok && spelled_out)
            ok = strcmp(copy, "NaN") == 0 || strcmp(copy, "Infinity") == 0 ||
                 strcmp(copy, "-Infinity") == 0;
        if (ok) *out = value;
    }
    if (copy != stack) free(copy);
    return ok;
}

bool pgs_parse_bool(pgs_string_t text, bool *out) {
    if (pgs_str_eq(text, "t") || pgs_str_eq(text, "true")) {
        *out = true;
        return true;
    }
    if (pgs_str_eq(text, "f") || pgs_str_eq(text, "false")) {
        *out = false;
        return true;
    }
    return false;
}

/* A cursor over the ASCII text of a timestamp. */
typedef struct {
    const uint8_t *p;
    size_t len, at;
} cursor_t;

static bool cursor_eat(cursor_t *c, uint8_t byte) {
    if (c->at < c->len && c->p[c->at] == byte) {
        c->at++;
        return true;
    }
    return false;
}

/* A run of at least `min`, at most `max` digits; `*digits` gets how many there were. */
static bool cursor_number(cursor_t *c, size_t min, size_t max, int64_t *value, size_t *digits) {
    size_t start = c->at;
    int64_t v = 0;
    while (c->at < c->len && c->p[c->at] >= '0' && c->p[c->at] <= '9') {
        if (c->at - start == max) return false;
        v = v * 10 + (c->p[c->at] - '0');
        c->at++;
    }
    if (c->at - start < min) return false;
    *value = v;
    if (digits) *digits = c->at - start;
    return true;
}

static int64_t floor_div(int64_t a, int64_t b) {
    int64_t q = a / b;
    return (a % b != 0 && ((a < 0) != (b < 0))) ? q - 1 : q;
}

/* Days from 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's days_from_civil). */
static int64_t days_from_civil(int64_t year, int64_t month, int64_t day) {
    if (month <= 2) year -= 1;
    int64_t era = floor_div(year, 400);
    int64_t year_of_era = year - era * 400;
    int64_t month_from_march = (month + 9) % 12;
    int64_t day_of_year = (153 * month_from_march + 2) / 5 + day - 1;
    int64_t day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    return era * 146097 + day_of_era - 719468;
}

#define MICROS_PER_SECOND INT64_C(1000000)

bool pgs_parse_timestamp(pgs_string_t text, uint32_t type_oid, int64_t *unix_micros) {
    if (type_oid != PGS_OID_DATE && type_oid != PGS_OID_TIMESTAMP &&
        type_oid != PGS_OID_TIMESTAMPTZ)
        return false;
    if (pgs_str_eq(text, "infinity")) {
        *unix_micros = INT64_MAX;
        return true;
    }
    if (pgs_str_eq(text, "-infinity")) {
        *unix_micros = INT64_MIN;
        return true;
    }
    cursor_t c = {text.ptr, text.len, 0};
    bool before_christ = c.len >= 3 && memcmp(c.p + c.len - 3, " BC", 3) == 0;
    if (before_christ) c.len -= 3;

    int64_t year, month, day;
    if (!cursor_number(&c, 4, 9, &year, NULL) || !cursor_eat(&c, '-') ||
        !cursor_number(&c, 2, 2, &month, NULL) || !cursor_eat(&c, '-') ||
        !cursor_number(&c, 2, 2, &day, NULL))
        return false;
    /* 1 BC is year 0 of the proleptic Gregorian calendar, 2 BC is -1, and so on. */
    if (before_christ) year = 1 - year;
    if (month < 1 || month > 12 || day < 1 || day > 31) return false;
    /* |days| < 2^39 for a 9-digit year; times 86400e6 fits an int64 only below ~292k years. */
    int64_t days = days_from_civil(year, month, day);
    if (__builtin_mul_overflow(days, 86400 * MICROS_PER_SECOND, &days)) return false;
    int64_t micros = days;

    if (type_oid != PGS_OID_DATE) {
        int64_t hour, minute, second, fraction = 0, digits_value;
        size_t digits;
        if (!cursor_eat(&c, ' ') || !cursor_number(&c, 2, 2, &hour, NULL) ||
            !cursor_eat(&c, ':') || !cursor_number(&c, 2, 2, &minute, NULL) ||
            !cursor_eat(&c, ':') || !cursor_number(&c, 2, 2, &second, NULL))
            return false;
        /* Postgres prints 24:00:00 for the end of a day; 60 is a leap second it accepts. */
        if (hour > 24 || minute > 59 || second > 60) return false;
        if (cursor_eat(&c, '.')) {
            if (!cursor_number(&c, 1, 6, &digits_value, &digits)) return false;
            fraction = digits_value;
            for (size_t i = digits; i < 6; i++) fraction *= 10;
        }
        int64_t time = ((hour * 60 + minute) * 60 + second) * MICROS_PER_SECOND + fraction;
        if (__builtin_add_overflow(micros, time, &micros)) return false;
    }

    if (type_oid == PGS_OID_TIMESTAMPTZ) {
        int64_t sign, hours, minutes, seconds;
        if (cursor_eat(&c, '+'))
            sign = 1;
        else if (cursor_eat(&c, '-'))
            sign = -1;
        else
            return false;
        if (!cursor_number(&c, 2, 2, &hours, NULL)) return false;
        int64_t offset = hours * 3600;
        if (cursor_eat(&c, ':')) {
            if (!cursor_number(&c, 2, 2, &minutes, NULL)) return false;
            offset += minutes * 60;
            if (cursor_eat(&c, ':')) {
                if (!cursor_number(&c, 2, 2, &seconds, NULL)) return false;
                offset += seconds;
            }
        }
        /* The text is local time at `offset`; UTC is local time minus the offset. */
        if (__builtin_sub_overflow(micros, sign * offset * MICROS_PER_SECOND, &micros))
            return false;
    }
    if (c.at != c.len) return false;
    *unix_micros = micros;
    return true;
}

/* ---------------------------------------------------------------------------------------- */
/* Getters                                                                                  */

const char *pgs_field_describe(pgs_field_t field) {
    switch (field) {
    case PGS_VALUE: return "has a value";
    case PGS_NULL: return "is null";
    case PGS_UNCHANGED: return "is unchanged (TOASTed, not sent)";
    case PGS_NO_COLUMN: return "is not a column of the row";
    case PGS_INVALID: return "does not parse as the requested type";
    }
    return "is in an unknown state";
}

const pgs_column_t *pgs_column(const pgs_row_t *row, const char *name) {
    if (!row) return NULL;
    for (size_t i = 0; i < row->len; i++)
        if (pgs_str_eq(row->ptr[i].name, name)) return &row->ptr[i];
    return NULL;
}

/* The column's state, and its text and type when it has a value. */
static pgs_field_t lookup(const pgs_row_t *row, const char *name, pgs_string_t *text,
                          uint32_t *type_oid) {
    const pgs_column_t *column = pgs_column(row, name);
    if (!column) return PGS_NO_COLUMN;
    switch (column->value.tag) {
    case PGSTREAM_HANDLER_TYPES_VALUE_NULL: return PGS_NULL;
    case PGSTREAM_HANDLER_TYPES_VALUE_UNCHANGED: return PGS_UNCHANGED;
    default:
        *text = column->value.val.text;
        *type_oid = column->type_oid;
        return PGS_VALUE;
    }
}

pgs_field_t pgs_get_text(const pgs_row_t *row, const char *name, pgs_string_t *out) {
    uint32_t oid;
    return lookup(row, name, out, &oid);
}

pgs_field_t pgs_get_int64(const pgs_row_t *row, const char *name, int64_t *out) {
    pgs_string_t text;
    uint32_t oid;
    pgs_field_t field = lookup(row, name, &text, &oid);
    if (field != PGS_VALUE) return field;
    return pgs_parse_int64(text, out) ? PGS_VALUE : PGS_INVALID;
}

pgs_field_t pgs_get_double(const pgs_row_t *row, const char *name, double *out) {
    pgs_string_t text;
    uint32_t oid;
    pgs_field_t field = lookup(row, name, &text, &oid);
    if (field != PGS_VALUE) return field;
    return pgs_parse_double(text, out) ? PGS_VALUE : PGS_INVALID;
}

pgs_field_t pgs_get_bool(const pgs_row_t *row, const char *name, bool *out) {
    pgs_string_t text;
    uint32_t oid;
    pgs_field_t field = lookup(row, name, &text, &oid);
    if (field != PGS_VALUE) return field;
    return pgs_parse_bool(text, out) ? PGS_VALUE : PGS_INVALID;
}

pgs_field_t pgs_get_json(const pgs_row_t *row, const char *name, pgs_string_t *out) {
    pgs_string_t text;
    uint32_t oid;
    pgs_field_t field = lookup(row, name, &text, &oid);
    if (field != PGS_VALUE) return field;
    if (oid != PGS_OID_JSON && oid != PGS_OID_JSONB) return PGS_INVALID;
    *out = text;
    return PGS_VALUE;
}

pgs_field_t pgs_get_timestamp(const pgs_row_t *row, const char *name, int64_t *unix_micros) {
    pgs_string_t text;
    uint32_t oid;
    pgs_field_t field = lookup(row, name, &text, &oid);
    if (field != PGS_VALUE) return field;
    return pgs_parse_timestamp(text, oid, unix_micros) ? PGS_VALUE : PGS_INVALID;
}

/* ---------------------------------------------------------------------------------------- */
/* Errors and logging                                                                       */

/* Replaces whatever `err` holds: a failed `handle` hands it to the post-return function,
 * which frees it, so it must be heap memory. */
static void error_set(pgs_error_t *err, const char *format, ...)
    __attribute__((format(printf, 2, 3)));
static void error_set(pgs_error_t *err, const char *format, ...) {
    buffer_t b = {{NULL, 0}, 0};
    va_list args;
    va_start(args, format);
    buffer_vprintf(&b, format, args);
    va_end(args);
    err->message = b.s;
}

static void error_append_location(pgs_error_t *err, const char *file, int line,
                                  const char *function) {
    /* The message may have been filled by the host (an import's error), exactly sized; an
     * empty one may hold a dangling non-NULL pointer (the canonical ABI's zero-size
     * allocation), which must not reach realloc. */
    buffer_t b = {err->message, err->message.len};
    if (b.s.len == 0) b.s.ptr = NULL;
    buffer_cstr(&b, "\n    at ");
    buffer_cstr(&b, file);
    char number[16];
    snprintf(number, sizeof number, ":%d", line);
    buffer_cstr(&b, number);
    buffer_cstr(&b, " in ");
    buffer_cstr(&b, function);
    err->message = b.s;
}

bool pgs_fail_at(pgs_error_t *err, const char *file, int line, const char *function,
                 const char *format, ...) {
    buffer_t b = {{NULL, 0}, 0};
    va_list args;
    va_start(args, format);
    buffer_vprintf(&b, format, args);
    va_end(args);
    err->message = b.s;
    error_append_location(err, file, line, function);
    return false;
}

bool pgs_trace_at(pgs_error_t *err, const char *file, int line, const char *function) {
    error_append_location(err, file, line, function);
    return false;
}

void pgs_log(pgstream_handler_types_log_level_t level, const char *format, ...) {
    buffer_t b = {{NULL, 0}, 0};
    va_list args;
    va_start(args, format);
    buffer_vprintf(&b, format, args);
    va_end(args);
    pgstream_handler_host_log(level, &b.s);
    free(b.s.ptr);
}

/* ---------------------------------------------------------------------------------------- */
/* Keys                                                                                     */

static bool key_of(const pgs_event_t *event, const pgs_row_t *row, pgs_point_key_t *out,
                   pgs_error_t *err) {
    size_t n = event->key_columns.len;
    pgs_string_t *values = grow(NULL, n * sizeof *values);
    for (size_t i = 0; i < n; i++) {
        pgs_string_t name = event->key_columns.ptr[i];
        const pgs_column_t *column = NULL;
        for (size_t j = 0; row && j < row->len; j++)
            if (strings_equal(row->ptr[j].name, name)) {
                column = &row->ptr[j];
                break;
            }
        if (!column || column->value.tag != PGSTREAM_HANDLER_TYPES_VALUE_TEXT) {
            if (err)
                error_set(err, "key column \"%.*s\" of %.*s.%.*s %s in this event", PGS_STR(name),
                          PGS_STR(event->schema), PGS_STR(event->table),
                          column ? pgs_field_describe(column->value.tag ==
                                                              PGSTREAM_HANDLER_TYPES_VALUE_NULL
                                                          ? PGS_NULL
                                                          : PGS_UNCHANGED)
                                 : pgs_field_describe(PGS_NO_COLUMN));
            free(values);
            return false;
        }
        values[i] = column->value.val.text;
    }
    out->schema = event->schema;
    out->table = event->table;
    out->key.ptr = values;
    out->key.len = n;
    return true;
}

bool pgs_point_key(const pgs_event_t *event, pgs_point_key_t *out, pgs_error_t *err) {
    return key_of(event, pgs_row(event), out, err);
}

bool pgs_old_point_key(const pgs_event_t *event, pgs_point_key_t *out) {
    const pgs_row_t *old = pgs_old_row(event);
    return old && key_of(event, old, out, NULL);
}

bool pgs_point_key_eq(const pgs_point_key_t *a, const pgs_point_key_t *b) {
    if (!strings_equal(a->schema, b->schema) || !strings_equal(a->table, b->table) ||
        a->key.len != b->key.len)
        return false;
    for (size_t i = 0; i < a->key.len; i++)
        if (!strings_equal(a->key.ptr[i], b->key.ptr[i])) return false;
    return true;
}

void pgs_point_key_release(pgs_point_key_t *key) {
    free(key->key.ptr);
    key->key.ptr = NULL;
    key->key.len = 0;
}

/* ---------------------------------------------------------------------------------------- */
/* JSON                                                                                     */

/* Whether `text` is a number in JSON's grammar: -?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)? */
static bool is_json_number(pgs_string_t text) {
    const uint8_t *p = text.ptr;
    size_t len = text.len, at = 0, start;
#define DIGITS() \
    for (start = at; at < len && p[at] >= '0' && p[at] <= '9'; at++) {}
    if (at < len && p[at] == '-') at++;
    DIGITS();
    if (at == start || (at - start > 1 && p[start] == '0')) return false;
    if (at < len && p[at] == '.') {
        at++;
        DIGITS();
        if (at == start) return false;
    }
    if (at < len && (p[at] == 'e' || p[at] == 'E')) {
        at++;
        if (at < len && (p[at] == '+' || p[at] == '-')) at++;
        DIGITS();
        if (at == start) return false;
    }
#undef DIGITS
    return at == len;
}

static void json_string(buffer_t *b, pgs_string_t text) {
    static const char hex[] = "0123456789abcdef";
    buffer_reserve(b, text.len + 2);
    buffer_byte(b, '"');
    size_t run = 0; /* start of the bytes not yet copied */
    for (size_t i = 0; i < text.len; i++) {
        uint8_t c = text.ptr[i];
        if (c >= 0x20 && c != '"' && c != '\\') continue;
        buffer_push(b, text.ptr + run, i - run);
        run = i + 1;
        switch (c) {
        case '"': buffer_cstr(b, "\\\""); break;
        case '\\': buffer_cstr(b, "\\\\"); break;
        case '\n': buffer_cstr(b, "\\n"); break;
        case '\r': buffer_cstr(b, "\\r"); break;
        case '\t': buffer_cstr(b, "\\t"); break;
        default: {
            char escape[6] = {'\\', 'u', '0', '0', hex[c >> 4], hex[c & 15]};
            buffer_push(b, escape, sizeof escape);
        }
        }
    }
    buffer_push(b, text.ptr + run, text.len - run);
    buffer_byte(b, '"');
}

static void json_value(buffer_t *b, pgs_string_t text, uint32_t oid) {
    switch (oid) {
    case PGS_OID_INT2:
    case PGS_OID_INT4:
    case PGS_OID_INT8:
    case PGS_OID_OID:
    case PGS_OID_FLOAT4:
    case PGS_OID_FLOAT8:
    case PGS_OID_NUMERIC:
        if (is_json_number(text)) {
            buffer_push(b, text.ptr, text.len);
            return;
        }
        break;
    case PGS_OID_BOOL:
        if (pgs_str_eq(text, "t")) {
            buffer_cstr(b, "true");
            return;
        }
        if (pgs_str_eq(text, "f")) {
            buffer_cstr(b, "false");
            return;
        }
        break;
    case PGS_OID_JSON:
    case PGS_OID_JSONB:
        /* Postgres checked it is valid JSON. */
        buffer_push(b, text.ptr, text.len);
        return;
    }
    json_string(b, text);
}

void pgs_json_append_value(pgs_string_t *out, pgs_string_t text, uint32_t type_oid) {
    buffer_t b = {*out, out->len};
    json_value(&b, text, type_oid);
    *out = b.s;
}

pgs_string_t pgs_row_json(const pgs_event_t *event, const char *const *skip, size_t skip_len) {
    const pgs_row_t *row = pgs_row(event), *old = pgs_old_row(event);
    buffer_t b = {{NULL, 0}, 0};
    buffer_reserve(&b, 64 + row->len * 32);
    buffer_byte(&b, '{');
    bool first = true;
    for (size_t i = 0; i < row->len; i++) {
        const pgs_column_t *column = &row->ptr[i];
        bool skipped = false;
        for (size_t s = 0; s < skip_len && !skipped; s++)
            skipped = pgs_str_eq(column->name, skip[s]);
        if (skipped) continue;
        const pgstream_handler_types_value_t *value = &column->value;
        if (value->tag == PGSTREAM_HANDLER_TYPES_VALUE_UNCHANGED) {
            value = NULL;
            for (size_t j = 0; old && j < old->len; j++)
                if (strings_equal(old->ptr[j].name, column->name)) {
                    value = &old->ptr[j].value;
                    break;
                }
            if (!value || value->tag == PGSTREAM_HANDLER_TYPES_VALUE_UNCHANGED) continue;
        }
        if (!first) buffer_byte(&b, ',');
        first = false;
        json_string(&b, column->name);
        buffer_byte(&b, ':');
        if (value->tag == PGSTREAM_HANDLER_TYPES_VALUE_TEXT)
            json_value(&b, value->val.text, column->type_oid);
        else
            buffer_cstr(&b, "null");
    }
    buffer_byte(&b, '}');
    return b.s;
}

bool pgs_is_partial(const pgs_event_t *event) {
    const pgs_row_t *row = pgs_row(event), *old = pgs_old_row(event);
    for (size_t i = 0; i < row->len; i++) {
        if (row->ptr[i].value.tag != PGSTREAM_HANDLER_TYPES_VALUE_UNCHANGED) continue;
        bool known = false;
        for (size_t j = 0; old && j < old->len && !known; j++)
            known = strings_equal(old->ptr[j].name, row->ptr[i].name) &&
                    old->ptr[j].value.tag != PGSTREAM_HANDLER_TYPES_VALUE_UNCHANGED;
        if (!known) return true;
    }
    return false;
}

/* ---------------------------------------------------------------------------------------- */
/* The write plan                                                                           */

enum action_kind { ACTION_WRITE, ACTION_DELETE, ACTION_DROPPED };

struct pgs_action {
    enum action_kind kind;
    uint32_t hash;
    pgs_point_key_t key;
    /* Write: the text to embed, when has_text; else the stored vector is kept. */
    bool has_text;
    pgs_string_t text;
    /* Write: delete the stored point first (it was deleted earlier in the batch and is now
     * written by merges only, which must not meet its old payload). */
    bool delete_first;
    /* Write: the payload that replaces the stored one (upsert), when has_payload. */
    bool has_payload;
    pgs_string_t payload;
    /* Write: payloads merged in after it (merge), in order. */
    pgs_string_t *merges;
    size_t merges_len, merges_cap;
};

void pgs_plan_init(pgs_plan_t *plan) { memset(plan, 0, sizeof *plan); }

/* FNV-1a over the key's parts, each followed by its length so ("ab","c") != ("a","bc"). */
static uint32_t key_hash(const pgs_point_key_t *key) {
    uint32_t h = 2166136261u;
#define MIX(s)                                                    \
    do {                                                          \
        for (size_t k = 0; k < (s).len; k++) h = (h ^ (s).ptr[k]) * 16777619u; \
        h = (h ^ (uint32_t)(s).len) * 16777619u;                 \
    } while (0)
    MIX(key->schema);
    MIX(key->table);
    for (size_t i = 0; i < key->key.len; i++) MIX(key->key.ptr[i]);
#undef MIX
    return h;
}

/* The slot holding `key`'s action, or the empty slot where it would go. */
static size_t find_slot(const pgs_plan_t *plan, const pgs_point_key_t *key, uint32_t hash) {
    size_t mask = plan->slots_cap - 1;
    for (size_t i = hash & mask;; i = (i + 1) & mask) {
        uint32_t entry = plan->slots[i];
        if (entry == 0) return i;
        const struct pgs_action *action = &plan->actions[entry - 1];
        if (action->hash == hash && pgs_point_key_eq(&action->key, key)) return i;
    }
}

/* Rebuilds the index over the live actions, with room for `want` of them. */
static void reindex(pgs_plan_t *plan, size_t want) {
    size_t cap = 16;
    while (cap < want * 2) cap *= 2;
    free(plan->slots);
    plan->slots = grow(NULL, cap * sizeof *plan->slots);
    memset(plan->slots, 0, cap * sizeof *plan->slots);
    plan->slots_cap = cap;
    plan->slots_used = 0;
    for (size_t i = 0; i < plan->actions_len; i++) {
        struct pgs_action *action = &plan->actions[i];
        if (action->kind == ACTION_DROPPED) continue;
        plan->slots[find_slot(plan, &action->key, action->hash)] = (uint32_t)(i + 1);
        plan->slots_used++;
    }
}

static void action_release(struct pgs_action *action) {
    pgs_point_key_release(&action->key);
    if (action->kind == ACTION_WRITE) {
        if (action->has_payload) handler_string_free(&action->payload);
        for (size_t i = 0; i < action->merges_len; i++) handler_string_free(&action->merges[i]);
        free(action->merges);
    }
    action->kind = ACTION_DROPPED;
}

static void merges_push(struct pgs_action *action, pgs_string_t payload) {
    if (action->merges_len == action->merges_cap) {
        action->merges_cap = action->merges_cap ? action->merges_cap * 2 : 2;
        action->merges = grow(action->merges, action->merges_cap * sizeof *action->merges);
    }
    action->merges[action->merges_len++] = payload;
}

/* The action recorded for `key`, or NULL. */
static struct pgs_action *plan_find(pgs_plan_t *plan, const pgs_point_key_t *key, uint32_t hash) {
    if (plan->slots_cap == 0) return NULL;
    uint32_t entry = plan->slots[find_slot(plan, key, hash)];
    return entry == 0 ? NULL : &plan->actions[entry - 1];
}

/* Records `next` as the action of its point: replaces the point's earlier action in place
 * (so the point keeps its position) or appends. */
static void plan_set(pgs_plan_t *plan, struct pgs_action next) {
    if ((plan->slots_used + 1) * 2 > plan->slots_cap) reindex(plan, plan->slots_used + 1);
    size_t slot = find_slot(plan, &next.key, next.hash);
    if (plan->slots[slot] != 0) {
        struct pgs_action *current = &plan->actions[plan->slots[slot] - 1];
        /* A kept vector after a pending embed in this batch: the embed still has to happen. */
        if (next.kind == ACTION_WRITE && !next.has_text && current->kind == ACTION_WRITE &&
            current->has_text) {
            next.has_text = true;
            next.text = current->text;
        }
        action_release(current);
        *current = next;
        return;
    }
    if (plan->actions_len == plan->actions_cap) {
        plan->actions_cap = plan->actions_cap ? plan->actions_cap * 2 : 16;
        plan->actions = grow(plan->actions, plan->actions_cap * sizeof *plan->actions);
    }
    plan->actions[plan->actions_len] = next;
    plan->slots[slot] = (uint32_t)++plan->actions_len;
    plan->slots_used++;
}

void pgs_plan_upsert(pgs_plan_t *plan, pgs_point_key_t key, const pgs_string_t *text,
                     pgs_string_t payload) {
    struct pgs_action action = {.kind = ACTION_WRITE,
                                .hash = key_hash(&key),
                                .key = key,
                                .has_text = text != NULL,
                                .text = text ? *text : (pgs_string_t){NULL, 0},
                                .has_payload = true,
                                .payload = payload};
    plan_set(plan, action);
}

void pgs_plan_merge(pgs_plan_t *plan, pgs_point_key_t key, const pgs_string_t *text,
                    pgs_string_t payload) {
    uint32_t hash = key_hash(&key);
    struct pgs_action *current = plan_find(plan, &key, hash);
    if (current && current->kind == ACTION_WRITE) {
        pgs_point_key_release(&key);
        if (text) {
            current->has_text = true;
            current->text = *text;
        }
        merges_push(current, payload);
        return;
    }
    struct pgs_action action = {.kind = ACTION_WRITE,
                                .hash = hash,
                                .key = key,
                                .has_text = text != NULL,
                                .text = text ? *text : (pgs_string_t){NULL, 0},
                                /* After a delete in this batch, the merge must not meet the
                                 * old stored payload. */
                                .delete_first = current != NULL};
    merges_push(&action, payload);
    plan_set(plan, action);
}

void pgs_plan_delete(pgs_plan_t *plan, pgs_point_key_t key) {
    struct pgs_action action = {.kind = ACTION_DELETE, .hash = key_hash(&key), .key = key};
    plan_set(plan, action);
}

void pgs_plan_truncate(pgs_plan_t *plan, pgs_string_t schema, pgs_string_t table) {
    bool dropped = false;
    for (size_t i = 0; i < plan->actions_len; i++) {
        struct pgs_action *action = &plan->actions[i];
        if (action->kind != ACTION_DROPPED && strings_equal(action->key.schema, schema) &&
            strings_equal(action->key.table, table)) {
            action_release(action);
            dropped = true;
        }
    }
    /* Truncates are rare: rebuilding the index is simpler than deleting from it. */
    if (dropped) reindex(plan, plan->slots_used);
    for (size_t i = 0; i < plan->truncated_len; i += 2)
        if (strings_equal(plan->truncated[i], schema) &&
            strings_equal(plan->truncated[i + 1], table))
            return;
    if (plan->truncated_len + 2 > plan->truncated_cap) {
        plan->truncated_cap = plan->truncated_cap ? plan->truncated_cap * 2 : 8;
        plan->truncated = grow(plan->truncated, plan->truncated_cap * sizeof *plan->truncated);
    }
    plan->truncated[plan->truncated_len++] = schema;
    plan->truncated[plan->truncated_len++] = table;
}

bool pgs_plan_execute(pgs_plan_t *plan, pgs_error_t *err) {
    for (size_t i = 0; i < plan->truncated_len; i += 2)
        if (!pgstream_handler_host_delete_table(&plan->truncated[i], &plan->truncated[i + 1],
                                                err))
            return false;

    size_t deletes = 0, upserts = 0, merges = 0, texts = 0;
    for (size_t i = 0; i < plan->actions_len; i++) {
        const struct pgs_action *action = &plan->actions[i];
        bool write = action->kind == ACTION_WRITE;
        deletes += action->kind == ACTION_DELETE || (write && action->delete_first);
        upserts += write && action->has_payload;
        merges += write ? action->merges_len : 0;
        texts += write && action->has_text;
    }
    /* The call arguments are shallow copies: the host only reads them. */
    pgstream_handler_host_list_point_key_t keys = {grow(NULL, deletes * sizeof *keys.ptr), 0};
    handler_list_string_t text_list = {grow(NULL, texts * sizeof *text_list.ptr), 0};
    pgstream_handler_host_list_point_t points = {grow(NULL, upserts * sizeof *points.ptr), 0};
    pgstream_handler_host_list_point_t merged = {grow(NULL, merges * sizeof *merged.ptr), 0};
    pgstream_handler_host_list_vector_t vectors = {NULL, 0};
    bool ok = true;

    for (size_t i = 0; i < plan->actions_len; i++) {
        const struct pgs_action *action = &plan->actions[i];
        if (action->kind == ACTION_DELETE ||
            (action->kind == ACTION_WRITE && action->delete_first))
            keys.ptr[keys.len++] = action->key;
        if (action->kind == ACTION_WRITE && action->has_text)
            text_list.ptr[text_list.len++] = action->text;
    }
    if (keys.len) ok = pgstream_handler_host_delete(&keys, err);
    if (ok && text_list.len) {
        ok = pgstream_handler_host_embed(&text_list, &vectors, err);
        if (ok && vectors.len != text_list.len) {
            error_set(err, "embed returned %zu vectors for %zu texts", vectors.len,
                      text_list.len);
            ok = false;
        }
    }
    if (ok) {
        size_t next_vector = 0;
        for (size_t i = 0; i < plan->actions_len; i++) {
            const struct pgs_action *action = &plan->actions[i];
            if (action->kind != ACTION_WRITE) continue;
            /* The vector goes with the point's upsert when it has one, else its first merge. */
            bool vector_pending = action->has_text;
            if (action->has_payload) {
                pgstream_handler_host_point_t *point = &points.ptr[points.len++];
                point->key = action->key;
                point->vector.is_some = vector_pending;
                if (vector_pending) point->vector.val = vectors.ptr[next_vector];
                point->payload = action->payload;
                vector_pending = false;
            }
            for (size_t m = 0; m < action->merges_len; m++) {
                pgstream_handler_host_point_t *point = &merged.ptr[merged.len++];
                point->key = action->key;
                point->vector.is_some = vector_pending;
                if (vector_pending) point->vector.val = vectors.ptr[next_vector];
                point->payload = action->merges[m];
                vector_pending = false;
            }
            next_vector += action->has_text;
        }
        if (points.len) ok = pgstream_handler_host_upsert(&points, err);
        if (ok && merged.len) ok = pgstream_handler_host_merge(&merged, err);
    }
    pgstream_handler_host_list_vector_free(&vectors);
    free(merged.ptr);
    free(points.ptr);
    free(text_list.ptr);
    free(keys.ptr);
    return ok;
}

void pgs_plan_free(pgs_plan_t *plan) {
    for (size_t i = 0; i < plan->actions_len; i++)
        if (plan->actions[i].kind != ACTION_DROPPED) action_release(&plan->actions[i]);
    free(plan->actions);
    free(plan->slots);
    free(plan->truncated);
    pgs_plan_init(plan);
}
