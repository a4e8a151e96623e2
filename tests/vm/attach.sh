#!/usr/bin/env bash
# `hostcrypt attach` in a guest: a Debian 6.12 cloud kernel under
# qemu-system-x86_64 (TCG) runs hostcryptd and hostcrypt from a busybox
# initramfs, with the kernel's NBD client (module nbd):
#   create a volume → hostcryptd → attach → /dev/hostcrypt/v is the
#   kernel's /dev/nbdN with the volume's sector size as its logical block
#   size → mkfs.ext4, mount, files + SHA-256 → fio with verify writes
#   while hostcryptd is killed with -9 and started again (the new daemon
#   gives the device fresh sockets; the filesystem stays mounted; fio's
#   verify passes) → detach refused while mounted → umount, mount again,
#   every file verifies → detach (the name goes away) → no plaintext in
#   the backing → dm-crypt: cryptsetup open --type plain with the
#   break-glass parameters (docs/operating.md) on the same backing through
#   a loop device, mount, every file verifies.
# A temp volume with `attach = "nbd"` is attached at start and detached
# at stop.
# Prints "attach VM: PASS" and exits 0, or says what failed. The e2e suite
# runs it as root (tests/e2e/attach.rs).
#   tests/vm/attach.sh [--bin target/debug]
# Not here yet (issue 27): ublk.
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
vm_add_modules "$root" nbd dm_crypt loop xts aesni_intel

cat > "$root/init" <<'EOF'
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
mkdir -p /tmp /run/cryptsetup /mnt /hc
fail() { echo "HOSTCRYPT-ATTACH-VM: FAIL: $*"; tail -5 /hc/d.log 2>/dev/null; poweroff -f; }
vm-load nbd dm_crypt loop xts aesni_intel || fail "modules"
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
TOML
hc() { /opt/hostcrypt --config /hc/c.toml "$@"; }
hc create v --size 96M --sector-size 4096 >/dev/null || fail "create"
start_daemon() {
  /opt/hostcryptd --config /hc/c.toml >> /hc/d.log 2>&1 &
  pid=$!
  i=0
  until hc status >/dev/null 2>&1; do
    i=$((i + 1)); [ $i -gt 300 ] && fail "hostcryptd did not start"; sleep 0.1
  done
}
start_daemon
# The temp volume is attached by the config (attach = "nbd") at start.
i=0
until [ -b /dev/hostcrypt/t ]; do i=$((i + 1)); [ $i -gt 300 ] && fail "attach = nbd: no /dev/hostcrypt/t"; sleep 0.1; done
tnbd=$(basename "$(readlink /dev/hostcrypt/t)")
echo "guest: temp volume attached at start as $tnbd"
dev=$(hc attach v) || fail "attach"
[ "$dev" = /dev/hostcrypt/v ] && [ -b "$dev" ] || fail "attach printed $dev"
nbd=$(basename "$(readlink "$dev")")
echo "guest: attached as $nbd, logical block $(cat /sys/block/$nbd/queue/logical_block_size), backend $(cat /sys/block/$nbd/backend)"
[ "$(cat /sys/block/$nbd/queue/logical_block_size)" = 4096 ] || fail "logical block size"
hc attach v >/dev/null 2>&1 && fail "a second attach succeeded"
/opt/mke2fs -q -F -t ext4 "$dev" || fail "mkfs.ext4"
mount -t ext4 "$dev" /mnt || fail "mount"
dd if=/dev/urandom of=/mnt/random.bin bs=1M count=8 2>/dev/null || fail "write a file"
i=0; while [ $i -lt 2000 ]; do echo "HOSTCRYPT-PLAINTEXT-MARKER-$i"; i=$((i + 1)); done > /mnt/marker.txt
(cd /mnt && sha256sum random.bin marker.txt) > /tmp/sums
sync
# fio writes and verifies while the daemon dies and comes back.
/opt/fio --name=attach --filename=/mnt/fio.dat --size=24M --bs=4k --rw=randwrite \
  --ioengine=psync --direct=1 --fsync=32 --verify=crc32c --do_verify=1 --verify_fatal=1 \
  --randrepeat=0 > /tmp/fio.log 2>&1 &
fio=$!
i=0
until [ "$(stat -c %s /mnt/fio.dat 2>/dev/null || echo 0)" -gt 0 ] && grep -q . /proc/$fio/io 2>/dev/null; do
  i=$((i + 1)); [ $i -gt 600 ] && fail "fio did not start"; sleep 0.05
done
kill -9 $pid; wait $pid 2>/dev/null
kill -0 $fio 2>/dev/null || fail "fio ended before the kill"
echo "guest: hostcryptd killed with -9 while fio writes"
start_daemon
wait $fio || { cat /tmp/fio.log; fail "fio (verify) across the restart"; }
grep -q "err= 0" /tmp/fio.log || { cat /tmp/fio.log; fail "fio reported errors"; }
echo "guest: fio verified across the restart: $(grep -o 'WRITE: bw=[^,]*' /tmp/fio.log)"
hc attached | grep -q "mounted on /mnt" || fail "attached does not show the mount"
hc status | grep -q "attached v as /dev/hostcrypt/v" || fail "status does not show the attachment"
hc detach v 2>/tmp/detach.err && fail "detach of a mounted device succeeded"
grep -q "in use" /tmp/detach.err || fail "detach refused without saying why: $(cat /tmp/detach.err)"
umount /mnt || fail "umount"
echo 3 > /proc/sys/vm/drop_caches
mount -t ext4 "$dev" /mnt || fail "mount again"
(cd /mnt && sha256sum -c /tmp/sums >/dev/null) || fail "files differ after the restart"
umount /mnt
hc detach v || fail "detach"
[ -e /dev/hostcrypt/v ] && fail "/dev/hostcrypt/v is still there"
# At stop the temp volume's device goes with it (its data is erased).
kill $pid; wait $pid 2>/dev/null
[ -e /dev/hostcrypt/t ] && fail "/dev/hostcrypt/t outlived the daemon"
# The temp volume's device from before the kill -9 was disconnected by
# the next daemon (a new temp volume is another disk), and the one it
# attached at start is gone with the stop.
for b in /sys/block/nbd*/backend; do
  grep -q "^hostcrypt:t:" "$b" 2>/dev/null && fail "$b: a temp volume's device is still connected"
done
grep -q HOSTCRYPT-PLAINTEXT-MARKER /hc/v.img && fail "plaintext in the backing"
# Break-glass: the same backing with dm-crypt, no hostcrypt.
/opt/volume-dek /hc/v.img /hc/kek /tmp/dek.bin || fail "unwrap the DEK"
loop=$(losetup -f)
losetup "$loop" /hc/v.img || fail "losetup"
/opt/cryptsetup open --type plain --cipher aes-xts-plain64 --key-size 512 --sector-size 4096 \
  --iv-large-sectors --offset 2048 --key-file /tmp/dek.bin "$loop" hc || fail "cryptsetup open"
mount -t ext4 -o ro /dev/mapper/hc /mnt || fail "mount through dm-crypt"
(cd /mnt && sha256sum -c /tmp/sums >/dev/null) || fail "files differ through dm-crypt"
echo "guest: dm-crypt (plain, aes-xts-plain64, 4096-byte sectors) reads the same files"
umount /mnt; /opt/cryptsetup close hc; losetup -d "$loop"
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
  echo "attach VM: PASS ($vm_kernel, accel $accel; attach via nbd, mkfs.ext4, fio verify across a kill -9 restart, detach refused while mounted, files verified, dm-crypt plain reads the same files)"
else
  echo "attach VM: FAIL; guest console:" >&2
  tr -d '\r' < "$console" | tail -60 >&2
  exit 1
fi
