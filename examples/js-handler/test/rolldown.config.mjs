// Bundles the helper's tests for Node, with the host interface replaced by fake-host.mjs.
// `make js-test` names the output file in PGSTREAM_JS_TEST_OUT.
import { fileURLToPath } from "node:url";

const here = (path) => fileURLToPath(new URL(path, import.meta.url));

export default {
  input: here("./pgstream.test.mjs"),
  platform: "node",
  external: [/^node:/],
  resolve: { alias: { "pgstream:handler/host@0.2.0": here("./fake-host.mjs") } },
  output: { file: process.env.PGSTREAM_JS_TEST_OUT, format: "esm" },
};
