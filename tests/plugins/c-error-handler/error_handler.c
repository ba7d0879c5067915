/*
 * Test plugin: fails every batch from two calls deep, so tests can check that a C handler's
 * error reaches the host log with its message and the file:line trail PGS_FAIL / PGS_TRACE
 * write (C has no stack trace of its own). A row whose `content` is 'assert' fails an
 * assert() instead: wasi-libc prints the assertion to stderr and traps, and the host's trap
 * report must carry that text.
 */
/* zig cc defines NDEBUG when optimising, which turns assert() off; this plugin wants it on. */
#undef NDEBUG
#include <assert.h>

#include "pgstream.h"

static bool check_content(const pgs_event_t *event, pgs_error_t *err) {
    pgs_string_t content;
    if (pgs_get_text(pgs_row(event), "content", &content) == PGS_VALUE) {
        assert(!pgs_str_eq(content, "assert") && "c-error-handler was told to assert");
        return PGS_FAIL(err, "c-error-handler refuses content '%.*s'", PGS_STR(content));
    }
    return PGS_FAIL(err, "c-error-handler refuses an event without content");
}

static bool check_batch(const handler_list_change_event_t *events, pgs_error_t *err) {
    for (size_t i = 0; i < events->len; i++)
        if (!check_content(&events->ptr[i], err)) return PGS_TRACE(err);
    return true;
}

bool exports_handler_handle(handler_list_change_event_t *events, handler_error_t *err) {
    bool ok = check_batch(events, err) || PGS_TRACE(err);
    handler_list_change_event_free(events);
    return ok;
}
