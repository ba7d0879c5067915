/*
 * Accepts every batch and does nothing: the C figure of the per-language benchmark (the cost
 * of handing a batch to a C component and of freeing it, nothing else).
 */
#include "handler.h"

bool exports_handler_handle(handler_list_change_event_t *events, handler_error_t *err) {
    (void)err;
    /* The events are ours (wit-bindgen's C convention for exported functions' arguments). */
    handler_list_change_event_free(events);
    return true;
}
