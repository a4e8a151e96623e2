"""Sends out-of-range, oversized and unsupported requests with libnbd
(strict mode off) and checks the NBD error each gets, then that the same
connection still works. Exits non-zero on the first surprise."""
import errno
import sys

import nbd

uri = sys.argv[1]
h = nbd.NBD()
h.set_strict_mode(0)
# Simple replies: DF must then be refused (the structured case is in
# structured.py).
h.set_request_structured_replies(False)
h.connect_uri(uri)
size = h.get_size()


def expect_error(what, code, fn):
    try:
        fn()
    except nbd.Error as e:
        # libnbd's Python binding reports errno as a name ("EINVAL") in
        # some versions and as a number in others.
        got = e.errno if isinstance(e.errno, int) else getattr(errno, str(e.errno), None)
        if got != code:
            sys.exit(f"{what}: expected errno {errno.errorcode[code]}, got {e.errno} ({e})")
        print(f"{what}: {errno.errorcode[code]} as expected")
        return
    sys.exit(f"{what}: succeeded, expected {errno.errorcode[code]}")


expect_error("read past the end", errno.EINVAL, lambda: h.pread(8192, size - 4096))
expect_error("read at offset 2^63", errno.EINVAL, lambda: h.pread(512, 1 << 63))
expect_error("write past the end", errno.ENOSPC, lambda: h.pwrite(b"x" * 8192, size - 4096))
expect_error("zero past the end", errno.ENOSPC, lambda: h.zero(8192, size - 4096))
# Longer than the advertised maximum block size: EINVAL, or ENOSPC when
# the write also runs past the end (the spec's one error for no room).
expect_error("oversized write (33 MiB)", errno.EINVAL, lambda: h.pwrite(bytes(33 << 20), 0))
expect_error("oversized read (33 MiB)", errno.EINVAL, lambda: h.pread(33 << 20, 0))
expect_error("oversized write past the end", errno.ENOSPC, lambda: h.pwrite(bytes(33 << 20), size - 4096))
expect_error("trim without allow_discards", errno.EINVAL, lambda: h.trim(4096, 0))
# Flags that are not valid for the command, or not advertised: EINVAL.
h.pwrite(b"\x11" * 4096, 0)
expect_error("FUA on READ", errno.EINVAL, lambda: h.pread(4096, 0, nbd.CMD_FLAG_FUA))
expect_error("DF without structured replies", errno.EINVAL, lambda: h.pread(4096, 0, nbd.CMD_FLAG_DF))
expect_error("NO_HOLE on WRITE", errno.EINVAL, lambda: h.pwrite(b"y" * 4096, 0, nbd.CMD_FLAG_NO_HOLE))
# Without allow_discards zeroing means writing encrypted zeros: not fast,
# so FAST_ZERO is refused at once with ENOTSUP (and nothing is written).
assert h.can_fast_zero(), "FAST_ZERO not advertised"
expect_error("FAST_ZERO where zeroing is slow", errno.ENOTSUP, lambda: h.zero(4096, 0, nbd.CMD_FLAG_FAST_ZERO))
expect_error("unknown flag 1<<9 on WRITE", errno.EINVAL, lambda: h.pwrite(b"y" * 4096, 0, 1 << 9))
expect_error("FUA on FLUSH", errno.EINVAL, lambda: h.flush(nbd.CMD_FLAG_FUA))
# The refused writes changed nothing.
assert h.pread(4096, 0) == b"\x11" * 4096, "a refused write reached the disk"

# The connection survived all of that.
h.pwrite(b"\x5a" * 4096, 0)
assert h.pread(4096, 0) == b"\x5a" * 4096
h.flush()
h.shutdown()
print("ALL OK")
