#!/usr/bin/env bash
# The Debian package end to end: builds it with cargo-deb and installs it
# with dpkg on this machine, then checks what an operator gets (both
# binaries, the man pages through `man`, the unit through
# `systemd-analyze verify`, the completions, `hostcryptd --check --offline`
# on the installed example config, nothing enabled, started or secret),
# then `dpkg -r` and `dpkg -P`: the binaries go, a key file, a volume and
# a header backup made meanwhile stay, and /etc/hostcrypt goes at purge
# only when nothing of the operator's is in it.
#
# Root only (dpkg); elsewhere it records a skip in HOSTCRYPT_SKIP_LOG, as
# the Rust tests do (tests/harness: `skip`), and CI=true fails it. It
# refuses to run where hostcrypt is installed or /etc/hostcrypt exists,
# and removes only what it created. The package is built from the debug
# profile that scripts/test.sh has just built (`--profile dev`: cargo-deb
# warns that it is meant for releases, the packaging is the same), so it
# adds no second full build. Docker's Debian images exclude
# /usr/share/man and /usr/share/doc from installs
# (/etc/dpkg/dpkg.cfg.d/excludes); `--path-include` puts ours back.
#
# Usage: tests/package.sh   (from scripts/test.sh; needs cargo-deb)
set -euo pipefail
cd "$(dirname "$0")/.."
started=$SECONDS

# One cargo-like result line, so scripts/test.sh's summary counts this as
# one test (a skip counts as passed there, and is subtracted again).
report() {
  local rc=$1
  if [ "$rc" -eq 0 ]; then
    echo "test result: ok. 1 passed; 0 failed; tests/package.sh in $((SECONDS - started)) s"
  else
    echo "test result: FAILED. 0 passed; 1 failed; tests/package.sh in $((SECONDS - started)) s"
  fi
}
trap 'report $?' EXIT

skip() {
  if [ "${CI:-}" = "true" ]; then
    echo "tests/package.sh cannot run here ($1); CI=true requires every test to run" >&2
    exit 1
  fi
  echo "skipped: $1"
  if [ -n "${HOSTCRYPT_SKIP_LOG:-}" ]; then
    echo "tests/package.sh: $1" >> "$HOSTCRYPT_SKIP_LOG"
  fi
  exit 0
}

fail() {
  echo "FAILED: $*" >&2
  exit 1
}

[ "$(id -u)" -eq 0 ] || skip "not root: installs the package with dpkg"
command -v dpkg >/dev/null 2>&1 || skip "no dpkg"
command -v cargo-deb >/dev/null 2>&1 || skip "no cargo-deb (cargo install cargo-deb --locked)"
for tool in man systemd-analyze; do
  command -v "$tool" >/dev/null 2>&1 || skip "no $tool"
done
if dpkg -s hostcrypt >/dev/null 2>&1; then
  skip "the hostcrypt package is installed here; not touching it"
fi
[ -e /etc/hostcrypt ] && skip "/etc/hostcrypt exists; not touching it"

version=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n 1)
work=$(mktemp -d)
# What this run creates outside $work, removed at the end whatever happens.
created=()
modes=()
for dir in /var/lib/hostcrypt /run/hostcrypt /var/log/hostcrypt; do
  if [ -e "$dir" ]; then
    # The package's tmpfiles snippet sets its mode; put it back after.
    modes+=("$(stat -c %a "$dir"):$dir")
  else
    created+=("$dir")
  fi
done
tag="pkgtest-$$"
key=/etc/hostcrypt/$tag-kek.key
volume=/var/lib/hostcrypt/$tag.img
backup=/var/lib/hostcrypt/$tag.header
cleanup() {
  local rc=$?
  trap - EXIT
  if dpkg -s hostcrypt >/dev/null 2>&1 || dpkg -l hostcrypt 2>/dev/null | grep -q '^rc'; then
    dpkg -P hostcrypt >/dev/null 2>&1 || true
  fi
  rm -f "$key" "$volume" "$backup"
  rmdir /etc/hostcrypt 2>/dev/null || true
  for dir in "${created[@]}"; do
    rmdir "$dir" 2>/dev/null || true
  done
  for mode in "${modes[@]}"; do
    chmod "${mode%%:*}" "${mode#*:}" || true
  done
  rm -rf "$work"
  report "$rc"
  exit "$rc"
}
trap cleanup EXIT

echo "==> cargo deb (debug profile)"
cargo deb -p hostcryptd --locked --profile dev --strip --fast --output "$work/" >"$work/build.log" 2>&1 ||
  { cat "$work/build.log"; fail "cargo deb"; }
deb="$work/hostcrypt_${version}_amd64.deb"
[ -f "$deb" ] || fail "no $deb; built: $(ls "$work")"
echo "    $(basename "$deb"), $(du -k "$deb" | cut -f1) KiB, after $((SECONDS - started)) s"

install_package() {
  dpkg -i --path-include='/usr/share/man/*' --path-include='/usr/share/doc/hostcrypt/*' \
    "$deb" >"$work/dpkg.log" 2>&1 || { cat "$work/dpkg.log"; fail "dpkg -i"; }
}

echo "==> dpkg -i"
install_package
[ "$(/usr/sbin/hostcryptd --version)" = "hostcryptd $version" ] || fail "hostcryptd --version"
[ "$(/usr/bin/hostcrypt --version)" = "hostcrypt $version" ] || fail "hostcrypt --version"

echo "==> man pages"
for page in hostcryptd.toml:5 hostcryptd:8 hostcrypt:8 hostcrypt-create:8 hostcrypt-kek-init-local:8; do
  where=$(man -w "${page#*:}" "${page%:*}") || fail "man -w ${page#*:} ${page%:*}"
  case "$where" in /usr/share/man/*) ;; *) fail "$page found at $where" ;; esac
done
# The reference renders, names every section, and groff has nothing to say about it.
text=$(LC_ALL=C.UTF-8 MANWIDTH=100 MANPAGER=cat man 5 hostcryptd.toml 2>"$work/man.err")
for word in '[daemon]' '[nbd]' '[[volume]]' 'provider = "vault"' ring_idle_poll take_over; do
  grep -qF -- "$word" <<<"$text" || fail "hostcryptd.toml(5) lacks $word"
done
[ ! -s "$work/man.err" ] || { cat "$work/man.err"; fail "man 5 hostcryptd.toml warned"; }

echo "==> systemd units"
service=$(dpkg -L hostcrypt | grep '/systemd/system/hostcryptd\.service$') || fail "no unit"
socket=$(dpkg -L hostcrypt | grep '/systemd/system/hostcryptd\.socket$') || fail "no socket unit"
grep -q '^ExecStart=/usr/sbin/hostcryptd ' "$service" || fail "ExecStart is not /usr/sbin/hostcryptd"
# With the man check on (the default): Documentation= names installed pages.
out=$(systemd-analyze verify "$service" "$socket" 2>&1) || fail "systemd-analyze verify: $out"
[ -z "$out" ] || fail "systemd-analyze verify: $out"
[ -f /usr/lib/tmpfiles.d/hostcrypt.conf ] || fail "no tmpfiles snippet"
[ -f /usr/lib/sysctl.d/99-hostcrypt.conf ] || fail "no sysctl snippet"
# Installed, not enabled, not started, and no key made.
for wants in /etc/systemd/system/*.wants/hostcryptd.*; do
  [ ! -e "$wants" ] || fail "$wants: the package enabled a unit"
done
[ "$(ls /etc/hostcrypt)" = "hostcryptd.toml" ] || fail "/etc/hostcrypt holds $(ls /etc/hostcrypt)"
dpkg-query -W -f='${Conffiles}\n' hostcrypt | grep -q ' /etc/hostcrypt/hostcryptd.toml ' ||
  fail "/etc/hostcrypt/hostcryptd.toml is not a conffile"

echo "==> completions"
for file in /usr/share/bash-completion/completions/hostcrypt \
            /usr/share/zsh/vendor-completions/_hostcrypt \
            /usr/share/fish/vendor_completions.d/hostcrypt.fish; do
  [ -s "$file" ] || fail "no $file"
done
bash -n /usr/share/bash-completion/completions/hostcrypt || fail "bash completion syntax"

echo "==> hostcryptd --check --offline on the installed example"
/usr/sbin/hostcryptd --config /etc/hostcrypt/hostcryptd.toml --check --offline >"$work/check.log" 2>&1 ||
  { cat "$work/check.log"; fail "hostcryptd --check --offline"; }

echo "==> a key, a volume and a header backup, then dpkg -r and dpkg -P"
# A config of this test's own (its state_dir under $work), so nothing of
# the machine's is read or written besides the three files named above.
cat >"$work/hostcryptd.toml" <<EOF
[daemon]
state_dir = "$work/state"

[nbd]
unix = "$work/nbd.sock"

[kek.main]
provider = "local"
path = "$key"

[[volume]]
name = "$tag"
backing = "$volume"
role = "cache"
kek = "main"
EOF
hostcrypt kek init-local "$key" >/dev/null
hostcrypt --config "$work/hostcryptd.toml" create "$tag" --size 16M >/dev/null
hostcrypt --config "$work/hostcryptd.toml" header backup "$tag" "$backup" >/dev/null
sum_before=$(sha256sum "$key" "$volume" "$backup")

dpkg -r hostcrypt >"$work/dpkg.log" 2>&1 || { cat "$work/dpkg.log"; fail "dpkg -r"; }
for gone in /usr/sbin/hostcryptd /usr/bin/hostcrypt "$service" /usr/share/man/man5/hostcryptd.toml.5.gz; do
  [ ! -e "$gone" ] || fail "$gone is left after dpkg -r"
done
[ -f /etc/hostcrypt/hostcryptd.toml ] || fail "dpkg -r removed the conffile"

dpkg -P hostcrypt >"$work/dpkg.log" 2>&1 || { cat "$work/dpkg.log"; fail "dpkg -P"; }
[ ! -e /etc/hostcrypt/hostcryptd.toml ] || fail "dpkg -P left the conffile"
[ "$(sha256sum "$key" "$volume" "$backup")" = "$sum_before" ] ||
  fail "the key file, volume or header backup changed or went at purge"
[ "$(ls /etc/hostcrypt)" = "$(basename "$key")" ] || fail "/etc/hostcrypt holds $(ls /etc/hostcrypt)"

echo "==> purge without files of the operator's"
rm -f "$key"
rmdir /etc/hostcrypt
install_package
dpkg -P hostcrypt >"$work/dpkg.log" 2>&1 || { cat "$work/dpkg.log"; fail "dpkg -P"; }
[ ! -e /etc/hostcrypt ] || fail "/etc/hostcrypt is left after purge: $(ls -A /etc/hostcrypt)"
[ -f "$volume" ] && [ -f "$backup" ] || fail "the volume or the header backup went at purge"

echo "==> package test passed in $((SECONDS - started)) s"
