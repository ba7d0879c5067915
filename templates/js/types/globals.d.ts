// What a handler may use beyond the ECMAScript library (tsconfig "lib": es2023). The QuickJS
// engine of componentize-qjs has no console of its own; pgstream.ts installs this one, which
// writes each call as a line of pgstream-host's log. There is no fetch, no timers, no
// filesystem and no process: the sandbox grants none of them.

interface Console {
  /** A line at info level. */
  log(...data: unknown[]): void;
  /** A line at info level. */
  info(...data: unknown[]): void;
  /** A line at warn level. */
  warn(...data: unknown[]): void;
  /** A line at error level. */
  error(...data: unknown[]): void;
  /** A line at debug level (shown with RUST_LOG=debug). */
  debug(...data: unknown[]): void;
}

declare var console: Console;
