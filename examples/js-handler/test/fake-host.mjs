// Stands in for the `pgstream:handler/host@0.2.0` imports when the helper's tests run in Node:
// records every call, answers `embed` with one short vector per text, and throws the way
// QuickJS throws a host error (an Error whose `payload` is the WIT error record) when told to.

export const calls = [];
let failing = null;

/** Makes the next call of `name` fail with `message`. */
export function failNext(name, message) {
  failing = { name, message };
}

/** Forgets the recorded calls. */
export function reset() {
  calls.length = 0;
  failing = null;
}

function record(name, args) {
  if (failing?.name === name) {
    const error = new Error("[object Object] (see error.payload)");
    error.payload = { message: failing.message };
    failing = null;
    throw error;
  }
  calls.push([name, ...args]);
}

export function embed(texts) {
  record("embed", [texts]);
  return texts.map((text) => [text.length, 0.5]);
}

export function upsert(points) {
  record("upsert", [points]);
}

export function merge(points) {
  record("merge", [points]);
}

function _delete(keys) {
  record("delete", [keys]);
}
export { _delete as delete };

export function deleteTable(schema, table) {
  record("delete-table", [schema, table]);
}

export function log(level, message) {
  record("log", [level, message]);
}
