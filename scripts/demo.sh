#!/usr/bin/env bash
# Builds hostcryptd and serves the embedded demo volume (local KEK, 1 GiB
# sparse backing file, Unix socket) from ./hostcrypt-demo. Ctrl-C stops it.
set -euo pipefail
cd "$(dirname "$0")/.."
# The ublk bindings are generated at build time, through libclang.
if ! ldconfig -p 2>/dev/null | grep -q 'libclang[-.0-9]*\.so' && command -v apt-get >/dev/null; then
  echo "==> installing libclang-dev (the ublk bindings are generated at build time)"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends libclang-dev >/dev/null
fi
exec cargo run --release --locked --bin hostcryptd -- "$@"
