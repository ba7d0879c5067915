// Fails every batch with an exception thrown two calls deep, so the e2e test can check that
// the host's log holds the JS message and its stack (function names and positions), not only
// an anonymous trap.

import { handler, pointKey } from "../../../examples/js-handler/pgstream.ts";
import type { ChangeEvent } from "../../../examples/js-handler/pgstream.ts";

function checkContent(event: ChangeEvent): void {
  throw new RangeError(`js-error-handler refuses row ${pointKey(event).key.join(",")}`);
}

function visit(events: ChangeEvent[]): void {
  for (const event of events) checkContent(event);
}

export const handle = handler(visit);
