#!/usr/bin/env bash
# Builds hostcryptd and serves the embedded demo volume (local KEK, 1 GiB
# sparse backing file, Unix socket) from ./hostcrypt-demo. Ctrl-C stops it.
set -euo pipefail
cd "$(dirname "$0")/.."
exec cargo run --release --locked --bin hostcryptd -- "$@"
