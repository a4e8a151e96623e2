# The VM harness the guest tests share (tests/vm/*.sh source it): what a
# guest needs (packages, a Debian kernel, qemu-system-x86_64), a busybox
# initramfs built from the host's own tools and the kernel's modules, and
# one way to boot it. This machine's kernel has no nbd, ublk or dm-crypt
# module, so these tests run the kernel side in a guest under software
# emulation (TCG; HOSTCRYPT_QEMU_ACCEL=kvm where KVM works).
#
# Where things come from, and why:
# - Tools (busybox-static, cpio, e2fsprogs, nbd-client, cryptsetup-bin)
#   and the libraries qemu needs: the machine's configured apt sources.
# - The kernel: the newest Debian cloud kernel. ublk needs 6.0 or later and
#   Debian enables it (CONFIG_BLK_DEV_UBLK=m) from the 6.12 kernels of
#   bookworm-backports on; bookworm's own 6.1 has nbd and dm-crypt but no
#   ublk. When the configured sources lack bookworm-backports, the harness
#   reads that suite of the same Debian archive through an apt state of
#   its own under target/vm/apt, to download the kernel package only. The
#   machine's apt sources are never changed.
# - qemu-system-x86_64: the installed one, if any. Otherwise the one that
#   matches the installed qemu-utils (a backports qemu-utils cannot live
#   beside the release's qemu-system-x86: apt would remove it), downloaded
#   the same way and unpacked under target/vm/qemu, never installed.
# Everything downloaded is cached under target/vm/.
#
#   . tests/vm/lib.sh; vm_prepare          # packages, kernel, qemu
#   vm_initramfs_begin DIR                 # busybox and /init's mounts
#   vm_add_tool DIR EXE...                 # into /opt, with its libraries
#   vm_add_modules DIR MODULE...           # with their dependencies
#   vm_pack DIR OUT.gz
#   vm_boot CONSOLE INITRD APPEND [QEMU ARGS...]   # blocks until poweroff
#   vm_start CONSOLE INITRD APPEND [QEMU ARGS...]  # in the background ($vm_pid)
#   vm_await CONSOLE TEXT SECONDS          # the guest printed TEXT (or gave up)
#   vm_workdir                             # $work, cleaned up at exit

vm_cache=$(realpath -m "${HOSTCRYPT_VM_CACHE:-target/vm}")
# -machine, before ",accel=": a caller may add options (memory-backend=).
vm_machine=q35
vm_codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-bookworm}")
_vm_apt_updated=0

_vm_apt_update() {
  if [ $_vm_apt_updated = 0 ]; then apt-get update -qq; _vm_apt_updated=1; fi
}

_vm_install() {
  [ $# -gt 0 ] || return 0
  _vm_apt_update
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

# apt with the harness's own state: the backports suite of the archive the
# machine already uses, for downloads only.
_vm_apt_backports() {
  local dir=$vm_cache/apt
  if [ ! -f "$dir/updated" ]; then
    mkdir -p "$dir/lists/partial" "$dir/cache/archives/partial"
    local archive
    archive=$(grep -rhoE 'https?://[^ ]+/debian/?( |$)' /etc/apt/sources.list /etc/apt/sources.list.d/ 2>/dev/null \
      | grep -v security | head -1 | tr -d ' ')
    archive=${archive:-http://deb.debian.org/debian}
    echo "deb ${archive%/} $vm_codename-backports main" > "$dir/sources.list"
  fi
  local opts=(-o "Dir::Etc::SourceList=$dir/sources.list" -o "Dir::Etc::SourceParts=/dev/null"
    -o "Dir::State::Lists=$dir/lists" -o "Dir::Cache=$dir/cache" -o "Debug::NoLocking=1")
  if [ ! -f "$dir/updated" ]; then
    apt-get "${opts[@]}" update -qq && touch "$dir/updated"
  fi
  "$1" "${opts[@]}" "${@:2}"
}

# The kernel package the cloud metapackage points at, through apt "$@".
_vm_newest_kernel() {
  "$@" depends linux-image-cloud-amd64 2>/dev/null \
    | awk '$1 == "Depends:" && $2 ~ /^linux-image-[0-9]/ {print $2}' | sort -V | tail -1
}

_vm_fetch_kernel() {
  ls "$vm_cache"/kernel/boot/vmlinuz-* >/dev/null 2>&1 && return 0
  _vm_apt_update
  local pkg fetch=(apt-get)
  pkg=$(_vm_newest_kernel apt-cache)
  # 6.12 or later (ublk_drv); bookworm's own is 6.1.
  case "$pkg" in
    linux-image-6.1[2-9][.+-]*|linux-image-6.[2-9][0-9][.+-]*|linux-image-[7-9].*) ;;
    *)
      pkg=$(_vm_newest_kernel _vm_apt_backports apt-cache)
      fetch=(_vm_apt_backports apt-get)
      ;;
  esac
  [ -n "$pkg" ] || { echo "no Debian cloud kernel package found" >&2; return 1; }
  mkdir -p "$vm_cache/download"
  (cd "$vm_cache/download" && rm -f linux-image-*.deb && "${fetch[@]}" download "$pkg" >/dev/null)
  rm -rf "$vm_cache/kernel"
  dpkg-deb -x "$vm_cache"/download/linux-image-*.deb "$vm_cache/kernel"
}

_vm_fetch_qemu() {
  if command -v qemu-system-x86_64 >/dev/null 2>&1; then
    vm_qemu=(qemu-system-x86_64)
    return 0
  fi
  local root=$vm_cache/qemu
  if [ ! -x "$root/usr/bin/qemu-system-x86_64" ]; then
    local version fetch=(apt-get)
    version=$(dpkg-query -W -f='${Version}' qemu-utils 2>/dev/null || true)
    if [ -z "$version" ]; then
      # No qemu at all: the release's, installed whole.
      _vm_install qemu-system-x86 qemu-utils
      vm_qemu=(qemu-system-x86_64)
      return 0
    fi
    case "$version" in *bpo*) fetch=(_vm_apt_backports apt-get) ;; esac
    _vm_apt_update
    mkdir -p "$vm_cache/download/qemu"
    (cd "$vm_cache/download/qemu" && rm -f ./*.deb \
      && "${fetch[@]}" download "qemu-system-x86=$version" "qemu-system-common=$version" \
        "qemu-system-data=$version" >/dev/null)
    rm -rf "$root"
    for deb in "$vm_cache"/download/qemu/*.deb; do dpkg-deb -x "$deb" "$root"; done
  fi
  # Its libraries and firmware, from the configured sources.
  local missing
  missing=$(LD_LIBRARY_PATH="$root/usr/lib/x86_64-linux-gnu" ldd "$root/usr/bin/qemu-system-x86_64" \
    | awk '/not found/ {print $1}')
  if [ -n "$missing" ]; then
    _vm_install libcapstone4 libfdt1 libslirp0 libpmem1 librdmacm1 libibverbs1 libvdeplug2 \
      libaio1 libbpf1 libfuse3-3 libnuma1 liburing2 libpixman-1-0 libjpeg62-turbo libpng16-16
  fi
  [ -e /usr/share/seabios/bios-256k.bin ] || _vm_install seabios ipxe-qemu
  vm_qemu=("$root/usr/bin/qemu-system-x86_64" -L "$root/usr/share/qemu" -L /usr/share/seabios
    -L /usr/lib/ipxe/qemu)
}

# Packages, the kernel and qemu; sets vm_kernel, vm_kver, vm_moddir and
# vm_qemu (an array: the program and its firmware paths).
vm_prepare() {
  local need=() pair
  for pair in busybox:busybox-static nbd-client:nbd-client mke2fs:e2fsprogs cpio:cpio \
              cryptsetup:cryptsetup-bin; do
    command -v "${pair%%:*}" >/dev/null 2>&1 || need+=("${pair##*:}")
  done
  _vm_install "${need[@]}"
  _vm_fetch_kernel
  _vm_fetch_qemu
  vm_kernel=$(ls "$vm_cache"/kernel/boot/vmlinuz-* | sort -V | tail -1)
  vm_kver=${vm_kernel##*/vmlinuz-}
  vm_moddir=$vm_cache/kernel/lib/modules/$vm_kver
  [ -f "$vm_moddir/modules.dep" ] || busybox depmod -b "$vm_cache/kernel" "$vm_kver"
}

# A root with busybox; /init is the caller's (it starts with
# `#!/bin/busybox sh` and `/bin/busybox --install -s /bin`).
vm_initramfs_begin() {
  local root=$1
  mkdir -p "$root"/{bin,sbin,etc,proc,sys,dev,mnt,tmp,opt,run,lib/modules/"$vm_kver"}
  cp "$(command -v busybox)" "$root/bin/busybox"
  cp "$vm_moddir"/modules.* "$root/lib/modules/$vm_kver/"
  cp /etc/mke2fs.conf "$root/etc/" 2>/dev/null || true
  # `vm-load MODULE...` in the guest: modprobe each, unless built in.
  cat > "$root/bin/vm-load" <<'EOF'
#!/bin/busybox sh
for m in "$@"; do
  n=$(echo "$m" | tr - _)
  sed 's|.*/||; s|\.ko.*||; s|-|_|g' /lib/modules/*/modules.builtin | grep -qx "$n" && continue
  modprobe "$m" || { echo "vm-load: modprobe $m failed"; exit 1; }
done
EOF
  chmod +x "$root/bin/vm-load"
}

# Real tools under /opt, called by full path: Debian's static busybox
# prefers its own applets of the same names (an ext2-only mke2fs, a minimal
# nbd-client) over anything on PATH.
vm_add_tool() {
  local root=$1 exe lib
  shift
  for exe in "$@"; do
    cp "$exe" "$root/opt/"
    for lib in $(ldd "$exe" | grep -oE '/[^ ]+'); do
      mkdir -p "$root$(dirname "$lib")"
      cp -L "$lib" "$root$lib"
    done
  done
}

# Modules by name (virtio_blk, nbd, ublk_drv, dm_crypt...), with every
# module they depend on, as modules.dep lists them.
vm_add_modules() {
  local root=$1 name path dep
  shift
  for name in "$@"; do
    path=$(awk -F: -v n="$name" '{m=$1; sub(/.*\//, "", m); sub(/\.ko.*/, "", m); gsub(/-/, "_", m)
      if (m == n) {print $1; exit}}' "$vm_moddir/modules.dep")
    if [ -z "$path" ]; then
      # Built in: nothing to load (vm-load in the guest knows it too).
      awk '{m=$1; sub(/.*\//, "", m); sub(/\.ko.*/, "", m); gsub(/-/, "_", m); print m}' \
        "$vm_moddir/modules.builtin" | grep -qx "$name" && continue
      echo "no module $name in $vm_kver" >&2; return 1
    fi
    for dep in "$path" $(awk -F: -v p="$path" '$1 == p {print $2}' "$vm_moddir/modules.dep"); do
      local out=$root/lib/modules/$vm_kver/${dep%.xz}
      out=${out%.zst}
      mkdir -p "$(dirname "$out")"
      # Uncompressed: busybox's modprobe cannot read .ko.xz or .ko.zst.
      case "$dep" in
        *.xz) xz -dc "$vm_moddir/$dep" > "$out" ;;
        *.zst) zstd -qdc "$vm_moddir/$dep" > "$out" ;;
        *) cp "$vm_moddir/$dep" "$out" ;;
      esac
    done
  done
}

# Sets `work` to a new directory and `daemon_pid` and `passed` to empty
# and 0; at exit, kills $daemon_pid and removes $work if passed=1, or
# keeps it for inspection.
vm_workdir() {
  work=$(mktemp -d)
  daemon_pid=""
  passed=0
  trap _vm_cleanup EXIT
}

_vm_cleanup() {
  [ -n "$daemon_pid" ] && kill "$daemon_pid" 2>/dev/null || true
  [ -n "${vm_pid:-}" ] && kill "$vm_pid" 2>/dev/null || true
  if [ "$passed" = 1 ]; then rm -rf "$work"; else echo "kept for inspection: $work" >&2; fi
}

vm_pack() {
  # modules.dep again, for the uncompressed names.
  busybox depmod -b "$1" "$vm_kver"
  (cd "$1" && find . | cpio -o -H newc --quiet | gzip -1) > "$2"
}

# Boots the kernel with INITRD and the kernel command line APPEND, console
# to CONSOLE; extra qemu arguments follow. Returns when the guest powers
# off or HOSTCRYPT_VM_TIMEOUT (900 s) passes.
vm_boot() {
  local console=$1 initrd=$2 append=$3
  shift 3
  local accel=${HOSTCRYPT_QEMU_ACCEL:-tcg}
  timeout "${HOSTCRYPT_VM_TIMEOUT:-900}" "${vm_qemu[@]}" -machine "$vm_machine,accel=$accel" -cpu max -smp 2 -m 512 \
    -kernel "$vm_kernel" -initrd "$initrd" -append "console=ttyS0 panic=-1 quiet $append" \
    -nographic -no-reboot "$@" >"$console" 2>&1 || true
}

# vm_boot in the background: $vm_pid is its process, `wait "$vm_pid"`
# returns when the guest powers off.
vm_start() {
  vm_boot "$@" &
  vm_pid=$!
}

# Waits until the guest's console CONSOLE shows TEXT: 0 once it does, 1
# when the guest failed (a line with ": FAIL"), powered off without it, or
# SECONDS passed.
vm_await() {
  local console=$1 text=$2 deadline=$((SECONDS + $3))
  while [ $SECONDS -lt "$deadline" ]; do
    grep -qF -- "$text" "$console" 2>/dev/null && return 0
    grep -q ": FAIL" "$console" 2>/dev/null && return 1
    kill -0 "$vm_pid" 2>/dev/null || { grep -qF -- "$text" "$console"; return; }
    sleep 0.1
  done
  return 1
}
