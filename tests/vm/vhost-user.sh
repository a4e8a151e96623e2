#!/usr/bin/env bash
# A real VM on hostcryptd's vhost-user-blk export: a Debian cloud kernel
# boots under qemu-system-x86_64 (software emulation, TCG, by default) with
# guest memory in a shared memfd and a two-queue vhost-user-blk-pci disk
# on the volume's socket, and a busybox initramfs:
#   virtio_blk → /dev/vda (checks: 4096-byte logical blocks for a volume
#   with 4096-byte sectors, two queues, the volume name as serial) →
#   16 MiB written and read back with O_DIRECT → a discard reads as zeros
#   → mkfs.ext4 → mount → files + SHA-256 → umount → mount again → every
#   file verifies → with the filesystem mounted, files written with fsync
#   while the host kills hostcryptd with -9 and starts it again, then
#   while it stops it with SIGTERM and starts it again (qemu reconnects,
#   `reconnect-ms`; the new daemon resubmits what the old one had taken,
#   INFLIGHT_SHMFD) → no I/O error → umount, mount again, every file
#   verifies; the host then checks the plaintext never reached the
#   backing file.
# Prints "vhost-user VM: PASS" and exits 0, or says what failed. The e2e
# suite runs it as root (tests/e2e/vhost_user.rs).
#   tests/vm/vhost-user.sh [--bin target/release]
# Needs root (apt); the kernel and qemu come from tests/vm/lib.sh (cached
# under target/vm).
set -euo pipefail
cd "$(dirname "$0")/../.."
bin=target/release
while [ $# -gt 0 ]; do
  case "$1" in
    --bin) bin=$2; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
[ -x "$bin/hostcryptd" ] || { echo "build first: cargo build --release" >&2; exit 2; }
. tests/vm/lib.sh
vm_prepare

vm_workdir

# --- the initramfs ---------------------------------------------------------
root=$work/root
vm_initramfs_begin "$root"
vm_add_tool "$root" "$(command -v mke2fs)"
vm_add_modules "$root" virtio_pci virtio_blk

cat > "$root/init" <<'EOF'
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
fail() { echo "HOSTCRYPT-VHOST-VM: FAIL: $*"; poweroff -f; }
vm-load virtio_pci virtio_blk || fail "modules"
i=0
until [ -b /dev/vda ]; do i=$((i + 1)); [ $i -gt 100 ] && fail "no /dev/vda"; sleep 0.1; done
q=/sys/block/vda/queue
echo "guest: /dev/vda $(cat /sys/block/vda/size) sectors, logical block $(cat $q/logical_block_size)," \
  "$(ls /sys/block/vda/mq | wc -l) queues, serial $(cat /sys/block/vda/serial)," \
  "discard max $(cat $q/discard_max_bytes), write-zeroes max $(cat $q/write_zeroes_max_bytes)"
[ "$(cat $q/logical_block_size)" = 4096 ] || fail "logical block size"
[ "$(ls /sys/block/vda/mq | wc -l)" = 2 ] || fail "queues"
[ "$(cat /sys/block/vda/serial)" = vm0 ] || fail "serial"
dd if=/dev/urandom of=/tmp/data bs=1M count=16 2>/dev/null
dd if=/tmp/data of=/dev/vda bs=1M oflag=direct 2>/dev/null || fail "O_DIRECT write"
a=$(sha256sum < /tmp/data)
b=$(dd if=/dev/vda bs=1M count=16 iflag=direct 2>/dev/null | sha256sum)
[ "$a" = "$b" ] || fail "O_DIRECT read back differs"
blkdiscard -o 0 -l 1048576 /dev/vda || fail "discard"
c=$(dd if=/dev/vda bs=1M count=1 iflag=direct 2>/dev/null | sha256sum)
z=$(dd if=/dev/zero bs=1M count=1 2>/dev/null | sha256sum)
[ "$c" = "$z" ] || fail "a discarded range does not read as zeros"
/opt/mke2fs -q -F -t ext4 /dev/vda || fail "mkfs.ext4"
mount -t ext4 /dev/vda /mnt || fail "mount"
dd if=/dev/urandom of=/mnt/random.bin bs=1M count=8 2>/dev/null || fail "write a file"
mkdir /mnt/dir; cp /bin/busybox /mnt/dir/busybox
i=0; while [ $i -lt 2000 ]; do echo "HOSTCRYPT-PLAINTEXT-MARKER-$i"; i=$((i + 1)); done > /mnt/dir/marker.txt
(cd /mnt && find . -type f | sort | xargs sha256sum) > /tmp/sums
umount /mnt || fail "umount"
echo 3 > /proc/sys/vm/drop_caches
mount -t ext4 /dev/vda /mnt || fail "mount again"
(cd /mnt && sha256sum -c /tmp/sums >/dev/null) || fail "files differ after remount"
# The host restarts hostcryptd while these writes run: each waits out the
# restart, none fails.
mkdir /mnt/restart
writer() {
  j=0
  while [ $j -lt 64 ]; do
    dd if=/dev/urandom of=/mnt/restart/$1-$j bs=64k count=4 conv=fsync 2>/dev/null || fail "write $1-$j"
    j=$((j + 1))
  done
  echo "HOSTCRYPT-VHOST-VM: WRITER-DONE $1"
}
echo "HOSTCRYPT-VHOST-VM: RESTART-NOW kill"
writer kill
echo "HOSTCRYPT-VHOST-VM: RESTART-NOW term"
writer term
(cd /mnt && find . -type f | sort | xargs sha256sum) > /tmp/sums
umount /mnt || fail "umount after the restarts"
echo 3 > /proc/sys/vm/drop_caches
mount -t ext4 /dev/vda /mnt || fail "mount after the restarts"
(cd /mnt && sha256sum -c /tmp/sums >/dev/null) || fail "files differ after the restarts"
echo "guest: $(ls /mnt/restart | wc -l) files written across the restarts verify"
umount /mnt
sync
if dmesg | grep -iE "I/O error|blk_update"; then fail "I/O errors"; fi
echo "HOSTCRYPT-VHOST-VM: PASS"
poweroff -f
EOF
chmod +x "$root/init"
vm_pack "$root" "$work/initrd.gz"

# --- hostcryptd with a vhost-user socket --------------------------------------
head -c 32 /dev/urandom > "$work/kek"; chmod 600 "$work/kek"
cat > "$work/c.toml" <<EOF
[daemon]
state_dir = "$work/state"
control = "$work/control.sock"
[nbd]
unix = "$work/nbd.sock"
[kek.main]
provider = "local"
path = "$work/kek"
[[volume]]
name = "vm0"
backing = "$work/vm0.img"
role = "cache"
kek = "main"
allow_discards = true
vhost_user = "$work/vm0.vhost"
vhost_user_queues = 2
EOF
"$bin/hostcrypt" --config "$work/c.toml" create vm0 --size 256M >/dev/null
start_daemon() {
  "$bin/hostcryptd" --config "$work/c.toml" >>"$work/daemon.log" 2>&1 &
  daemon_pid=$!
  for _ in $(seq 300); do
    # Serving: the control socket answers (a killed daemon's vhost-user
    # socket file is still there until the new one replaces it).
    "$bin/hostcrypt" --config "$work/c.toml" status 2>/dev/null | grep -q "vhost-user" && return 0
    sleep 0.1
  done
  echo "no vhost-user socket" >&2; cat "$work/daemon.log" >&2; exit 1
}
fail_host() {
  echo "vhost-user VM: FAIL: $*; guest console:" >&2
  tr -d '\r' < "$console" | tail -40 >&2
  echo "daemon log:" >&2; tail -20 "$work/daemon.log" >&2
  exit 1
}
start_daemon

# --- boot --------------------------------------------------------------------
console=$work/console.log
accel=${HOSTCRYPT_QEMU_ACCEL:-tcg}
vm_machine=q35,memory-backend=mem
vm_start "$console" "$work/initrd.gz" "" \
  -object memory-backend-memfd,id=mem,size=512M,share=on \
  -chardev socket,id=vm0,path="$work/vm0.vhost",reconnect-ms=300 \
  -device vhost-user-blk-pci,chardev=vm0,num-queues=2
# Each restart while the guest's writer runs: it must not have finished
# before the daemon is gone, or the restart proved nothing.
for how in kill term; do
  vm_await "$console" "RESTART-NOW $how" 600 || fail_host "the guest did not reach the $how restart"
  if [ $how = kill ]; then kill -KILL "$daemon_pid"; else kill -TERM "$daemon_pid"; fi
  wait "$daemon_pid" || true
  grep -q "WRITER-DONE $how" "$console" && fail_host "the guest's writes ended before the $how restart"
  start_daemon
done
wait "$vm_pid" || true
vm_pid=""
kill -TERM "$daemon_pid"; wait "$daemon_pid" || true
daemon_pid=""
if grep -q "HOSTCRYPT-VHOST-VM: PASS" "$console"; then
  if grep -q "HOSTCRYPT-PLAINTEXT-MARKER" "$work/vm0.img"; then
    echo "vhost-user VM: FAIL: plaintext found in the backing file" >&2; exit 1
  fi
  grep "guest:" "$console" | tr -d '\r'
  resubmitted=$( (grep -o "resubmitting [0-9]* requests" "$work/daemon.log" || true) | awk '{ n += $2 } END { print n + 0 }')
  passed=1
  echo "vhost-user VM: PASS ($vm_kernel, accel $accel; 16 MiB O_DIRECT written and read back, discard, mkfs.ext4, files verified after a remount and across a kill -9 and a SIGTERM restart of hostcryptd ($resubmitted requests resubmitted), no plaintext in the backing)"
else
  fail_host "the guest did not pass"
fi
