#!/usr/bin/env bash
# Type-checks the laptop-only build (`--no-default-features`) for macOS on Apple silicon, from Linux.
#
#   rustup target add aarch64-apple-darwin && scripts/check-darwin.sh
#
# `cargo check` compiles no Rust to machine code and links nothing, but build scripts still run: `ring`'s
# (through boringtun and rustls) compiles C and assembly with the target's C compiler, and this machine has no
# darwin C toolchain (clang + the macOS SDK). So the C compiler and archiver for the target are stand-ins that
# write empty objects: the check then covers every Rust crate, ours included, and proves nothing about ring's C.
# Building a real macOS binary needs the SDK (on a Mac: plain `cargo build --no-default-features`).
set -euo pipefail
cd "$(dirname "$0")/.."
STUB=$(mktemp -d)
trap 'rm -rf "$STUB"' EXIT
cat > "$STUB/cc" <<'SH'
#!/bin/sh
out=""; prev=""
for a in "$@"; do [ "$prev" = "-o" ] && out=$a; prev=$a; done
case " $* " in *" -E "*) exit 0;; esac
[ -n "$out" ] && : > "$out"
exit 0
SH
cat > "$STUB/ar" <<'SH'
#!/bin/sh
printf '!<arch>\n' > "$2"
SH
chmod +x "$STUB/cc" "$STUB/ar"
CC_aarch64_apple_darwin=$STUB/cc AR_aarch64_apple_darwin=$STUB/ar \
  cargo check --no-default-features --bins --target aarch64-apple-darwin "$@"
