#!/usr/bin/env python3
"""Drops the DWARF sections (custom sections named .debug_*) from a core WebAssembly module.

Usage: wasm_strip_debug.py IN.wasm OUT.wasm

zig's `-s` (and `-Wl,--strip-debug`) also drop the `name` section, the function names that
make a trap's wasm backtrace readable ("check_content" instead of "wasm function 31"). This
keeps every other section: the names, the component type, the producers. It is about 1 MB of
DWARF less for a small handler.
"""

import sys


def read_leb128(data: bytes, at: int) -> tuple[int, int]:
    """An unsigned LEB128 number at `at`, and the offset after it."""
    value = shift = 0
    while True:
        if at >= len(data):
            raise ValueError("truncated LEB128 number")
        byte = data[at]
        at += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, at


def strip_debug(module: bytes) -> bytes:
    if module[:4] != b"\0asm" or module[4:8] != b"\x01\0\0\0":
        raise ValueError("not a core WebAssembly module (version 1)")
    kept = [module[:8]]
    at = 8
    while at < len(module):
        start = at
        section_id = module[at]
        size, body = read_leb128(module, at + 1)
        end = body + size
        if end > len(module):
            raise ValueError(f"section at byte {start} runs past the end of the module")
        if section_id == 0:
            name_len, name_at = read_leb128(module, body)
            name = module[name_at : name_at + name_len]
            if name.startswith(b".debug_"):
                at = end
                continue
        kept.append(module[start:end])
        at = end
    return b"".join(kept)


def main() -> int:
    if len(sys.argv) != 3:
        print(__doc__.strip().splitlines()[2], file=sys.stderr)
        return 2
    with open(sys.argv[1], "rb") as source:
        module = source.read()
    try:
        stripped = strip_debug(module)
    except ValueError as error:
        print(f"{sys.argv[1]}: {error}", file=sys.stderr)
        return 1
    with open(sys.argv[2], "wb") as target:
        target.write(stripped)
    return 0


if __name__ == "__main__":
    sys.exit(main())
