#!/usr/bin/env bash
# Where does hostcryptd's CPU go on one fio job? Starts a release hostcryptd
# on a fresh 1 GiB volume in a temp dir, runs the fio job (default seq-read)
# while `perf record` samples the daemon (cpu-clock: works on VMs without a
# PMU), and prints the top symbols, self and with children.
#   benches/profile.sh [seq-read|seq-write|rand-read-4k|rand-write-4k] [seconds]
set -euo pipefail
job=${1:-seq-read}
secs=${2:-6}
root=$(cd "$(dirname "$0")/.." && pwd)
bin="$root/target/release"
command -v perf >/dev/null || { echo "needs perf (apt install linux-perf)" >&2; exit 1; }
[ -x "$bin/hostcryptd" ] || (cd "$root" && cargo build --release -q --bins)
dir=$(mktemp -d /tmp/hostcrypt-profile.XXXXXX)
pid=
cleanup() { [ -n "$pid" ] && kill "$pid" 2>/dev/null; wait 2>/dev/null; if [ -n "${KEEP_PERF:-}" ]; then cp "$dir/perf.data" "$KEEP_PERF"; fi; rm -rf "$dir"; }
trap cleanup EXIT
"$bin/hostcrypt" kek init-local "$dir/kek.key" >/dev/null
cat >"$dir/h.toml" <<CFG
[nbd]
unix = "$dir/nbd.sock"
[kek.main]
provider = "local"
path = "$dir/kek.key"
[[volume]]
name = "bench"
backing = "$dir/bench.img"
role = "cache"
kek = "main"
CFG
"$bin/hostcrypt" --config "$dir/h.toml" create bench --size 1GiB >/dev/null
"$bin/hostcryptd" --config "$dir/h.toml" --log warn & pid=$!
for _ in $(seq 100); do [ -S "$dir/nbd.sock" ] && break; sleep 0.05; done
export NBD_URI="nbd+unix:///bench?socket=$dir/nbd.sock" SIZE=1g NUMJOBS=1
# Fill the volume first so reads decrypt real ciphertext.
RUNTIME=3 fio --output=/dev/null "$root/benches/fio/seq-write.fio"
RUNTIME=$((secs + 1)) fio --output="$dir/fio.txt" "$root/benches/fio/$job.fio" &
fio_pid=$!
perf record -q -e cpu-clock -F 2000 -g -p "$pid" -o "$dir/perf.data" -- sleep "$secs" 2>/dev/null
wait $fio_pid
grep -E "IOPS|lat \(usec\).*avg|clat percentiles" "$dir/fio.txt" | head -3
echo "--- self time, top 25"
perf report -i "$dir/perf.data" --no-children --percent-limit 1 --stdio -g none 2>/dev/null | grep -v '^#' | grep -v '^$' | head -25
echo "--- by thread"
perf report -i "$dir/perf.data" --no-children --sort comm --stdio -g none 2>/dev/null | grep -v '^#' | grep -v '^$' | head -10
