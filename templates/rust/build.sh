#!/bin/sh
# Builds {{name}}.wasm, the component to pass to `pgstream-host --plugin`.
# Needs Rust (https://rustup.rs) with the wasm32-wasip2 target, which this script adds when
# rustup is there. Honours CARGO_TARGET_DIR.
set -eu
cd "$(dirname "$0")"
if command -v rustup >/dev/null 2>&1 && ! rustup target list --installed | grep -qx wasm32-wasip2; then
    rustup target add wasm32-wasip2
fi
cargo build --release --target wasm32-wasip2
cp "${CARGO_TARGET_DIR:-target}/wasm32-wasip2/release/{{name_snake}}.wasm" {{name}}.wasm
echo "built $(pwd)/{{name}}.wasm"
