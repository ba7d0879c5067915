/*
 * Keeps a vector store in sync with a table that has a `content` text column, as the example
 * handlers in every language do (this file is also what `pgstream-host new --lang c` starts a
 * project with):
 *
 * - insert / update / read (a row a backfill delivers): embeds `content` and writes the point
 *   (keyed by the row's key columns) with the row, `content` included, as its JSON payload, so
 *   retrieval can read the text back from the store;
 * - update that left some TOASTed column unchanged (Postgres did not send it): the payload
 *   lacks that column, so it is merged into the stored payload instead of replacing it and
 *   the stored value survives; when `content` itself is unchanged the stored vector is kept;
 * - update that changed the key: deletes the point of the old key;
 * - `content` NULL or blank (empty or only ASCII whitespace): deletes the point (there is
 *   nothing to embed);
 * - delete: deletes the point; truncate: deletes every point of the table.
 *
 * A batch costs one `embed` and one `upsert` call (plus one `merge` and one `delete` when
 * needed), whatever its size: the plan collapses it to the last action per row. pgstream.h
 * documents the helper.
 */
#include "pgstream.h"

/* The column whose text is embedded. Change it to match your table. */
static const char *const CONTENT = "content";

/* Empty or only the ASCII whitespace of the Rust example's `trim_ascii`. */
static bool is_blank(pgs_string_t text) {
    for (size_t i = 0; i < text.len; i++) {
        switch (text.ptr[i]) {
        case ' ': case '\t': case '\n': case '\r': case '\f':
            continue;
        default:
            return false;
        }
    }
    return true;
}

static bool plan_event(pgs_plan_t *plan, const pgs_event_t *event, pgs_error_t *err) {
    pgs_point_key_t key, old_key;
    switch (event->operation) {
    case PGS_INSERT:
    case PGS_UPDATE:
    case PGS_READ: {
        if (!pgs_point_key(event, &key, err)) return PGS_TRACE(err);
        if (pgs_old_point_key(event, &old_key)) {
            if (pgs_point_key_eq(&old_key, &key))
                pgs_point_key_release(&old_key);
            else
                pgs_plan_delete(plan, old_key);
        }
        pgs_string_t content;
        pgs_field_t field = pgs_get_text(pgs_row(event), CONTENT, &content);
        /* Blank text has no meaning to embed, and OpenAI-compatible servers refuse empty input:
         * such a row gets no point. */
        if (field == PGS_VALUE && is_blank(content)) field = PGS_NULL;
        switch (field) {
        case PGS_VALUE:
        case PGS_UNCHANGED: {
            const pgs_string_t *text = field == PGS_VALUE ? &content : NULL;
            pgs_string_t payload = pgs_row_json(event, NULL, 0);
            if (pgs_is_partial(event))
                pgs_plan_merge(plan, key, text, payload);
            else
                pgs_plan_upsert(plan, key, text, payload);
            return true;
        }
        case PGS_NULL:
            pgs_plan_delete(plan, key);
            return true;
        default:
            pgs_point_key_release(&key);
            return PGS_FAIL(err, "column \"%s\" of %.*s.%.*s %s", CONTENT,
                            PGS_STR(event->schema), PGS_STR(event->table),
                            pgs_field_describe(field));
        }
    }
    case PGS_DELETE:
        if (!pgs_point_key(event, &key, err)) return PGS_TRACE(err);
        pgs_plan_delete(plan, key);
        return true;
    case PGS_TRUNCATE:
        pgs_plan_truncate(plan, event->schema, event->table);
        return true;
    }
    return PGS_FAIL(err, "unknown operation %u", (unsigned)event->operation);
}

bool exports_handler_handle(handler_list_change_event_t *events, handler_error_t *err) {
    pgs_plan_t plan;
    pgs_plan_init(&plan);
    bool ok = true;
    for (size_t i = 0; ok && i < events->len; i++)
        ok = plan_event(&plan, &events->ptr[i], err) || PGS_TRACE(err);
    if (ok && !pgs_plan_execute(&plan, err)) ok = PGS_TRACE(err);
    /* The plan points into the events: free it first. We own the events (wit-bindgen). */
    pgs_plan_free(&plan);
    handler_list_change_event_free(events);
    return ok;
}
