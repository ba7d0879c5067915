#!/bin/sh
# Builds {{name}}.wasm, the handler component, from handler.ts (and the modules it imports).
#
#   sh build.sh
#
# 1. tsc type-checks the TypeScript against types/pgstream-handler.d.ts (the WIT, as TS);
# 2. rolldown bundles handler.ts and its imports into build/{{name}}.js, one ES module (the
#    host functions, `pgstream:handler/host@0.2.0`, stay imports: the component provides them);
# 3. componentize-qjs embeds that module in the QuickJS engine and writes the component.
#
# Tools: from `npm install` (./node_modules/.bin), or wherever these variables point:
#   PGSTREAM_TSC                path to tsc               (default ./node_modules/.bin/tsc)
#   PGSTREAM_ROLLDOWN           path to rolldown          (default ./node_modules/.bin/rolldown)
#   PGSTREAM_COMPONENTIZE_QJS   path to componentize-qjs  (default ./node_modules/.bin/componentize-qjs)
#   PGSTREAM_WIT                the WIT folder            (default ./wit)
set -eu
cd "$(dirname "$0")"

tsc=${PGSTREAM_TSC:-./node_modules/.bin/tsc}
rolldown=${PGSTREAM_ROLLDOWN:-./node_modules/.bin/rolldown}
componentize=${PGSTREAM_COMPONENTIZE_QJS:-./node_modules/.bin/componentize-qjs}
wit=${PGSTREAM_WIT:-./wit}

for tool in "$tsc" "$rolldown" "$componentize"; do
  if [ ! -x "$tool" ]; then
    echo "build.sh: $tool not found: run 'npm install' here, or set the PGSTREAM_* variables (see build.sh)" >&2
    exit 1
  fi
done

mkdir -p build
"$tsc" -p .
"$rolldown" handler.ts --format esm --platform neutral --external pgstream:handler/host@0.2.0 \
  --file build/{{name}}.js --log-level warn
# --sync: a component without the component-model async ABI, which pgstream-host runs.
"$componentize" --sync --wit "$wit" --world handler --js build/{{name}}.js --output {{name}}.wasm >/dev/null
echo "built {{name}}.wasm"
