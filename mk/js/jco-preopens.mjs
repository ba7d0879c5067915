// Preloaded into `jco` (node --import) so that its WASI components can read the project.
//
// jco 1.35 ships @bytecodealliance/preview2-shim 0.26, whose Node filesystem starts with no
// preopened directories; jco's componentize and types commands then fail with "failed to get
// path metadata" on any WIT path. This opens the working directory and the temp directory
// (nothing else) in every copy of the shim jco loads (each package folder has its own copy,
// and each copy keeps its own preopens).

import { createRequire } from "node:module";
import { existsSync, realpathSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { pathToFileURL } from "node:url";

const jcoBin = realpathSync(process.argv[1]);
// .../node_modules/@bytecodealliance/jco/dist/jco.js -> .../node_modules/@bytecodealliance
const scope = dirname(dirname(dirname(jcoBin)));
const roots = [join(scope, "jco"), join(scope, "jco-transpile")].filter(existsSync);
const preopens = { [process.cwd()]: process.cwd(), [tmpdir()]: tmpdir() };
const seen = new Set();
for (const root of roots) {
  const shim = createRequire(join(root, "package.json")).resolve(
    "@bytecodealliance/preview2-shim/filesystem",
  );
  if (seen.has(shim)) continue;
  seen.add(shim);
  const { _setPreopens } = await import(pathToFileURL(shim).href);
  _setPreopens(preopens);
}
