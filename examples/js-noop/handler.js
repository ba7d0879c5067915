// A handler that accepts every batch and does nothing: the benchmark's measure of what the
// JavaScript engine costs per event (lifting the batch into JS objects, the call itself),
// next to the Rust noop-handler.
export function handle(_events) {}
