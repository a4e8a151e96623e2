#!/usr/bin/env bash
# Times a 1 GiB nbdcopy into and out of a hostcryptd export (release build,
# page-cached sparse backing, Unix socket), next to the same copy through
# `nbdkit file` (unencrypted) when nbdkit is installed. Prints MB/s.
# Usage: benches/nbdcopy.sh [SIZE_MIB]   (default 1024)
set -euo pipefail
cd "$(dirname "$0")/.."
size_mib=${1:-1024}
cargo build --release --locked --bins >/dev/null
work=$(mktemp -d /tmp/hostcrypt-bench.XXXXXX)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

./target/release/hostcrypt kek init-local "$work/kek.key" >/dev/null
cat > "$work/hostcryptd.toml" <<TOML
[nbd]
unix = "$work/hc.sock"
[kek.main]
provider = "local"
path = "$work/kek.key"
[[volume]]
name = "bench"
backing = "$work/hc.img"
role = "cache"
kek = "main"
TOML
./target/release/hostcrypt --config "$work/hostcryptd.toml" create bench --size "$((size_mib + 16))M" >/dev/null
./target/release/hostcryptd --config "$work/hostcryptd.toml" --log warn &
pids+=($!)
head -c "$((size_mib << 20))" /dev/urandom > "$work/in.bin"

wait_socket() { for _ in $(seq 300); do [ -S "$1" ] && return 0; sleep 0.05; done; echo "no socket $1" >&2; exit 1; }
rate() { # name uri
  local t0 t1 t2
  t0=$(date +%s.%N); nbdcopy "$work/in.bin" "$2"; t1=$(date +%s.%N)
  nbdcopy "$2" "$work/out.bin"; t2=$(date +%s.%N)
  cmp -n "$((size_mib << 20))" "$work/in.bin" "$work/out.bin" || { echo "$1: data mismatch" >&2; exit 1; }
  awk -v n="$1" -v s="$size_mib" -v a="$t0" -v b="$t1" -v c="$t2" \
    'BEGIN { printf "%-22s write %7.0f MB/s   read %7.0f MB/s\n", n, s*1.048576/(b-a), s*1.048576/(c-b) }'
}
wait_socket "$work/hc.sock"
rate "hostcryptd (XTS)" "nbd+unix:///bench?socket=$work/hc.sock"
if command -v nbdkit >/dev/null; then
  truncate -s "$((size_mib + 16))M" "$work/raw.img"
  nbdkit --exit-with-parent -U "$work/nk.sock" file "$work/raw.img" &
  pids+=($!)
  wait_socket "$work/nk.sock"
  rate "nbdkit file (plain)" "nbd+unix:///?socket=$work/nk.sock"
fi
