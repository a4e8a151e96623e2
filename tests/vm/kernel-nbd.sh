#!/usr/bin/env bash
# The kernel's NBD client against hostcryptd. This machine's kernel has no
# nbd module, so a Debian cloud kernel (which has it) boots under
# qemu-system-x86_64 (software emulation is enough) with a small initramfs:
# busybox, nbd-client, mke2fs. The guest reaches hostcryptd's loopback TCP
# listener through qemu's user-mode network (10.0.2.2), then:
#   nbd-client → /dev/nbd0 → mkfs.ext4 → mount → write files + SHA-256 →
#   umount → disconnect; the host restarts hostcryptd; the guest reconnects,
#   mounts, and checks every file; the host checks the plaintext never
#   reached the backing file.
# Prints "kernel nbd client: PASS" and exits 0, or says what failed.
#   tests/vm/kernel-nbd.sh [--bin target/release] [--install-only]
# --install-only prepares the VM harness (tests/vm/lib.sh: packages, the
# kernel, qemu), then stops (scripts/test.sh runs it before the suite; the
# suite runs the rest). Needs root (apt), and the Debian archive on the
# first run (downloads are cached under target/vm).
set -euo pipefail
cd "$(dirname "$0")/../.."
bin=target/release
install_only=0
while [ $# -gt 0 ]; do
  case "$1" in
    --bin) bin=$2; shift 2 ;;
    --install-only) install_only=1; shift ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done

. tests/vm/lib.sh
vm_prepare
[ $install_only = 1 ] && exit 0
[ -x "$bin/hostcryptd" ] || { echo "build first: cargo build --release" >&2; exit 2; }

vm_workdir

# --- the initramfs ---------------------------------------------------------
root=$work/root
vm_initramfs_begin "$root"
vm_add_tool "$root" "$(command -v nbd-client)" "$(command -v mke2fs)"
vm_add_modules "$root" virtio_pci virtio_net nbd

cat > "$root/init" <<'EOF'
#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/opt:/sbin:/bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
fail() { echo "HOSTCRYPT-KERNEL-NBD: FAIL: $*"; poweroff -f; }
port=$(sed -n 's/.*hc_port=\([0-9]*\).*/\1/p' /proc/cmdline)
port2=$(sed -n 's/.*hc_port2=\([0-9]*\).*/\1/p' /proc/cmdline)
vm-load virtio_pci virtio_net nbd || fail "modules"
ip link set lo up; ip link set eth0 up || fail "no eth0"
ip addr add 10.0.2.15/24 dev eth0; ip route add default via 10.0.2.2
connect() {
  i=0
  until /opt/nbd-client 10.0.2.2 "$port" /dev/nbd0 -N v -b 4096 >/dev/null 2>&1; do
    i=$((i + 1)); [ $i -gt 120 ] && fail "nbd-client could not connect"; sleep 1
  done
}
connect
size=$(cat /sys/block/nbd0/size)
echo "guest: /dev/nbd0 has $size 512-byte sectors"
/opt/mke2fs -q -F -t ext4 /dev/nbd0 || fail "mkfs.ext4"
mount -t ext4 /dev/nbd0 /mnt || fail "mount"
dd if=/dev/urandom of=/mnt/random.bin bs=1M count=16 2>/dev/null || fail "write"
mkdir /mnt/dir; cp /bin/busybox /mnt/dir/busybox
echo "HOSTCRYPT-PLAINTEXT-MARKER-0123456789" > /mnt/dir/marker.txt
(cd /mnt && find . -type f | sort | xargs sha256sum) > /tmp/sums
umount /mnt || fail "umount"
/opt/nbd-client -d /dev/nbd0
dmesg | grep -iE "I/O error|blk_update|nbd0: " | head -20
echo "HOSTCRYPT-KERNEL-NBD: PHASE1"
# The restarted daemon listens on another port, so this cannot reach the
# old one before it stops.
port=$port2
connect
mount -t ext4 /dev/nbd0 /mnt || fail "mount after reconnect"
(cd /mnt && sha256sum -c /tmp/sums) || fail "files differ after reconnect"
dmesg | grep -iE "nbd|I/O error" | head -20
umount /mnt; /opt/nbd-client -d /dev/nbd0
echo "HOSTCRYPT-KERNEL-NBD: PASS"
poweroff -f
EOF
chmod +x "$root/init"
vm_pack "$root" "$work/initrd.gz"

# --- hostcryptd on loopback TCP ----------------------------------------------
free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}
port=$(free_port)
port2=$(free_port)
head -c 32 /dev/urandom > "$work/kek"; chmod 600 "$work/kek"
cat > "$work/c.toml" <<EOF
[daemon]
# A state directory of its own: the daemon locks it, and another daemon
# (a test running beside this one) may be using the system's.
state_dir = "$work/state"
[nbd]
tcp = "127.0.0.1:$port"
[kek.main]
provider = "local"
path = "$work/kek"
[[volume]]
name = "v"
backing = "$work/v.img"
role = "cache"
kek = "main"
allow_discards = true
# qemu's user network reaches the host from 127.0.0.1; a volume without
# allow is closed to bare TCP addresses.
allow = ["127.0.0.1"]
EOF
"$bin/hostcrypt" --config "$work/c.toml" create v --size 256M >/dev/null
start_daemon() {
  "$bin/hostcryptd" --config "$work/c.toml" >>"$work/daemon.log" 2>&1 &
  daemon_pid=$!
  for _ in $(seq 300); do
    python3 -c "import socket; socket.create_connection(('127.0.0.1', $port), 1)" 2>/dev/null && return
    sleep 0.1
  done
  echo "hostcryptd did not listen" >&2; cat "$work/daemon.log" >&2; exit 1
}
start_daemon

# --- boot --------------------------------------------------------------------
console=$work/console.log
# Software emulation by default: nested KVM on these VMs fails on some
# instructions; HOSTCRYPT_QEMU_ACCEL=kvm where it works.
accel=${HOSTCRYPT_QEMU_ACCEL:-tcg}
vm_boot "$console" "$work/initrd.gz" "hc_port=$port hc_port2=$port2" \
  -netdev user,id=n0 -device virtio-net-pci,netdev=n0 &
qemu=$!
restarted=0
while kill -0 "$qemu" 2>/dev/null; do
  if [ $restarted -eq 0 ] && grep -q "HOSTCRYPT-KERNEL-NBD: PHASE1" "$console"; then
    # Between the two connections the daemon restarts: the data must come
    # back from the backing, not from anything the daemon kept.
    kill -TERM "$daemon_pid"; wait "$daemon_pid" || true
    sed -i "s/^tcp = .*/tcp = \"127.0.0.1:$port2\"/" "$work/c.toml"
    port=$port2
    start_daemon
    restarted=1
  fi
  sleep 0.5
done
wait "$qemu" || true
if grep -q "HOSTCRYPT-KERNEL-NBD: PASS" "$console" && [ $restarted -eq 1 ]; then
  if grep -q "HOSTCRYPT-PLAINTEXT-MARKER" "$work/v.img"; then
    echo "kernel nbd client: FAIL: plaintext found in the backing file" >&2; exit 1
  fi
  grep "guest:" "$console" | tr -d '\r'
  passed=1
  echo "kernel nbd client: PASS ($vm_kernel, accel $accel; mkfs.ext4, 16 MiB + files written, daemon restarted, reconnected, all SHA-256 equal, no plaintext in the backing)"
else
  echo "kernel nbd client: FAIL; guest console:" >&2
  tr -d '\r' < "$console" | tail -40 >&2
  echo "daemon log:" >&2; tail -20 "$work/daemon.log" >&2
  exit 1
fi
