#!/usr/bin/env bash
# `hostcrypt attach` in a guest: a Debian 6.12 cloud kernel under
# qemu-system-x86_64 (TCG) runs hostcryptd and hostcrypt from a busybox
# initramfs; for each of ublk (module ublk_drv) and the kernel's NBD
# client (module nbd):
#   create a volume → hostcryptd → attach --via ublk|nbd → /dev/hostcrypt/V
#   is the kernel's /dev/ublkbN or /dev/nbdN with the volume's sector size
#   as its logical block size → mkfs.ext4, mount, files + SHA-256 → fio with verify writes
#   while hostcryptd is killed with -9 and started again (the new daemon
#   recovers the ublk device, or gives the NBD device fresh sockets; the
#   filesystem stays mounted; fio's verify passes) → detach refused while mounted → umount, mount again,
#   every file verifies → detach (the name goes away) → no plaintext in
#   the backing → dm-crypt: cryptsetup open --type plain with the
#   break-glass parameters (docs/operating.md) on the same backing through
#   a loop device, mount, every file verifies.
# Temp volumes with `attach = "nbd"` and `attach = "auto"` (ublk) are
# attached at start and detached at stop.
# Prints "attach VM: PASS" and exits 0, or says what failed. The e2e suite
# runs it as root (tests/e2e/attach.rs).
#   tests/vm/attach.sh [--bin target/debug]
set -euo pipefail
cd "$(dirname "$0")/../.."
bin=target/release
while [ $# -gt 0 ]; do
  case "$1" in
    --bin) bin=$2; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
for tool in hostcryptd hostcrypt volume-dek; do
  [ -x "$bin/$tool" ] || { echo "build first: cargo build --workspace --bins ($bin/$tool)" >&2; exit 2; }
done
. tests/vm/lib.sh
vm_prepare
command -v fio >/dev/null || _vm_install fio
vm_workdir

root=$work/root
vm_initramfs_begin "$root"
# Stripped copies: the debug binaries carry line tables the guest does not need.
mkdir -p "$work/bin"
for tool in hostcryptd hostcrypt volume-dek; do
  strip -o "$work/bin/$tool" "$bin/$tool"
done
vm_add_tool "$root" "$work/bin/hostcryptd" "$work/bin/hostcrypt" "$work/bin/volume-dek" \
  "$(command -v mke2fs)" "$(command -v fio)" "$(command -v cryptsetup)"
vm_add_modules "$root" ublk_drv nbd dm_crypt loop xts aesni_intel

cat > "$root/init" <<'EOF'
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
mkdir -p /tmp /run/cryptsetup /mnt /hc
fail() { echo "HOSTCRYPT-ATTACH-VM: FAIL at $(cut -d" " -f1 /proc/uptime) s: $*"; grep -v audit /hc/d.log 2>/dev/null | tail -25; dmesg | tail -15; poweroff -f; }
# Each step says when (seconds since boot): a slow step shows how slow.
say() { echo "guest: [$(cut -d" " -f1 /proc/uptime) s] $*"; }
vm-load ublk_drv nbd dm_crypt loop xts aesni_intel || fail "modules"
cd /hc
head -c 32 /dev/urandom > kek; chmod 600 kek
cat > c.toml <<'TOML'
[daemon]
state_dir = "/hc/state"
control = "/hc/control.sock"
[nbd]
unix = "/hc/nbd.sock"
[kek.main]
provider = "local"
path = "/hc/kek"
[[volume]]
name = "u"
backing = "/hc/u.img"
role = "cache"
kek = "main"
[[volume]]
name = "v"
backing = "/hc/v.img"
role = "cache"
kek = "main"
[[volume]]
name = "t"
backing = "/hc/t.img"
role = "temp"
size = "16M"
attach = "nbd"
[[volume]]
name = "a"
backing = "/hc/a.img"
role = "temp"
size = "16M"
attach = "auto"
TOML
hc() { /opt/hostcrypt --config /hc/c.toml "$@"; }
hc create u --size 64M --sector-size 4096 >/dev/null || fail "create u"
hc create v --size 64M --sector-size 4096 >/dev/null || fail "create v"
start_daemon() {
  /opt/hostcryptd --config /hc/c.toml >> /hc/d.log 2>&1 &
  pid=$!
  i=0
  until hc status >/dev/null 2>&1; do
    i=$((i + 1)); [ $i -gt 300 ] && fail "hostcryptd did not start"; sleep 0.1
  done
}
await_link() {
  i=0
  until [ -b "/dev/hostcrypt/$1" ]; do i=$((i + 1)); [ $i -gt 300 ] && fail "$2: no /dev/hostcrypt/$1"; sleep 0.1; done
}
start_daemon
# The temp volumes are attached by the config at start: t with
# attach = "nbd", a with attach = "auto" (ublk: the module is loaded).
await_link t 'attach = "nbd"'
await_link a 'attach = "auto"'
say "temp volumes attached at start: t as $(basename "$(readlink /dev/hostcrypt/t)"), a as $(basename "$(readlink /dev/hostcrypt/a)")"
case "$(readlink /dev/hostcrypt/t)" in /dev/nbd*) ;; *) fail "attach = nbd made $(readlink /dev/hostcrypt/t)" ;; esac
case "$(readlink /dev/hostcrypt/a)" in /dev/ublkb*) ;; *) fail "attach = auto made $(readlink /dev/hostcrypt/a), not ublk" ;; esac

# One volume through each way in: attach, mkfs.ext4, files, fio with
# verify across a kill -9 restart, detach refused while mounted, files
# verify, detach, then dm-crypt reads the same files from the backing.
exercise() {
  via=$1 vol=$2
  dev=$(hc attach "$vol" --via "$via") || fail "attach --via $via"
  [ "$dev" = "/dev/hostcrypt/$vol" ] && [ -b "$dev" ] || fail "attach printed $dev"
  kdev=$(basename "$(readlink "$dev")")
  case "$via:$kdev" in nbd:nbd*|ublk:ublkb*) ;; *) fail "--via $via made $kdev" ;; esac
  say "$via: attached as $kdev, logical block $(cat /sys/block/$kdev/queue/logical_block_size)"
  [ "$(cat /sys/block/$kdev/queue/logical_block_size)" = 4096 ] || fail "$via: logical block size"
  hc attach "$vol" >/dev/null 2>&1 && fail "$via: a second attach succeeded"
  /opt/mke2fs -q -F -t ext4 "$dev" || fail "$via: mkfs.ext4"
  mount -t ext4 "$dev" /mnt || fail "$via: mount"
  dd if=/dev/urandom of=/mnt/random.bin bs=1M count=8 2>/dev/null || fail "$via: write a file"
  i=0; while [ $i -lt 2000 ]; do echo "HOSTCRYPT-PLAINTEXT-MARKER-$i"; i=$((i + 1)); done > /mnt/marker.txt
  (cd /mnt && sha256sum random.bin marker.txt) > /tmp/sums
  sync
  # fio writes and verifies while the daemon dies and comes back.
  /opt/fio --name=attach --filename=/mnt/fio.dat --size=16M --bs=4k --rw=randwrite \
    --ioengine=psync --direct=1 --fsync=32 --verify=crc32c --do_verify=1 --verify_fatal=1 \
    --randrepeat=0 > /tmp/fio.log 2>&1 &
  fio=$!
  i=0
  until [ "$(stat -c %s /mnt/fio.dat 2>/dev/null || echo 0)" -gt 0 ] && grep -q . /proc/$fio/io 2>/dev/null; do
    i=$((i + 1)); [ $i -gt 600 ] && fail "$via: fio did not start"; sleep 0.05
  done
  kill -9 $pid; wait $pid 2>/dev/null
  kill -0 $fio 2>/dev/null || fail "$via: fio ended before the kill"
  say "$via: hostcryptd killed with -9 while fio writes"
  start_daemon
  say "$via: hostcryptd serves again"
  wait $fio || { cat /tmp/fio.log; fail "$via: fio (verify) across the restart"; }
  grep -q "err= 0" /tmp/fio.log || { cat /tmp/fio.log; fail "$via: fio reported errors"; }
  say "$via: fio verified across the restart: $(grep -o 'WRITE: bw=[^,]*' /tmp/fio.log)"
  hc attached | grep "^$vol " | grep -q "mounted on /mnt" || fail "$via: attached does not show the mount"
  hc status | grep -q "attached $vol as /dev/hostcrypt/$vol" || fail "$via: status does not show the attachment"
  hc detach "$vol" 2>/tmp/detach.err && fail "$via: detach of a mounted device succeeded"
  grep -q "in use" /tmp/detach.err || fail "$via: detach refused without saying why: $(cat /tmp/detach.err)"
  umount /mnt || fail "$via: umount"
  echo 3 > /proc/sys/vm/drop_caches
  mount -t ext4 "$dev" /mnt || fail "$via: mount again"
  (cd /mnt && sha256sum -c /tmp/sums >/dev/null) || fail "$via: files differ after the restart"
  umount /mnt
  hc detach "$vol" || fail "$via: detach"
  [ -e "/dev/hostcrypt/$vol" ] && fail "$via: /dev/hostcrypt/$vol is still there"
  [ -e "/sys/block/$kdev/size" ] && [ "$(cat /sys/block/$kdev/size)" != 0 ] && fail "$via: $kdev outlived detach"
  grep -q HOSTCRYPT-PLAINTEXT-MARKER "/hc/$vol.img" && fail "$via: plaintext in the backing"
  # Break-glass: the same backing with dm-crypt, no hostcrypt.
  /opt/volume-dek "/hc/$vol.img" /hc/kek /tmp/dek.bin || fail "$via: unwrap the DEK"
  loop=$(losetup -f)
  losetup "$loop" "/hc/$vol.img" || fail "$via: losetup"
  /opt/cryptsetup open --type plain --cipher aes-xts-plain64 --key-size 512 --sector-size 4096 \
    --iv-large-sectors --offset 2048 --key-file /tmp/dek.bin "$loop" hc || fail "$via: cryptsetup open"
  rm -f /tmp/dek.bin
  mount -t ext4 -o ro /dev/mapper/hc /mnt || fail "$via: mount through dm-crypt"
  (cd /mnt && sha256sum -c /tmp/sums >/dev/null) || fail "$via: files differ through dm-crypt"
  say "$via: dm-crypt (plain, aes-xts-plain64, 4096-byte sectors) reads the same files"
  umount /mnt; /opt/cryptsetup close hc; losetup -d "$loop"
}
exercise ublk u
exercise nbd v
# At stop the temp volumes' devices go with them (their data is erased).
kill $pid; wait $pid 2>/dev/null
[ -e /dev/hostcrypt/t ] && fail "/dev/hostcrypt/t outlived the daemon"
[ -e /dev/hostcrypt/a ] && fail "/dev/hostcrypt/a outlived the daemon"
# The temp volumes' devices from before each kill -9 were removed by the
# next daemon (a new temp volume is another disk), and the ones it
# attached at start are gone with the stop.
for b in /sys/block/nbd*/backend; do
  grep -q "^hostcrypt:t:" "$b" 2>/dev/null && fail "$b: a temp volume's device is still connected"
done
left=$(ls /sys/class/ublk-char 2>/dev/null | tr '\n' ' ')
[ -z "$left" ] || fail "ublk devices left after the stop: $left"
if dmesg | grep -iE "I/O error|blk_update"; then fail "I/O errors"; fi
echo "HOSTCRYPT-ATTACH-VM: PASS"
poweroff -f
EOF
chmod +x "$root/init"
vm_pack "$root" "$work/initrd.gz"

console=$work/console.log
accel=${HOSTCRYPT_QEMU_ACCEL:-tcg}
vm_boot "$console" "$work/initrd.gz" ""
if grep -q "HOSTCRYPT-ATTACH-VM: PASS" "$console"; then
  grep "guest:" "$console" | tr -d '\r'
  passed=1
  echo "attach VM: PASS ($vm_kernel, accel $accel; for ublk and nbd: attach, mkfs.ext4, fio verify across a kill -9 restart, detach refused while mounted, files verified, dm-crypt plain reads the same files)"
else
  echo "attach VM: FAIL; the guest's steps, then the end of its console:" >&2
  grep "guest:" "$console" | tr -d '\r' >&2
  tr -d '\r' < "$console" | tail -60 >&2
  exit 1
fi
