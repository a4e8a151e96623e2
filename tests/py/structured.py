"""Structured replies and base:allocation with libnbd, on a fresh cache
volume where only [1 MiB, 1 MiB + 64 KiB) and [8 MiB, 9 MiB) were written
(the caller wrote them): block status reports exactly those as data and
the rest as holes that read as zeros; REQ_ONE returns one extent; DF
reads work; errors arrive as error chunks; the connection survives.
Usage: structured.py URI"""
import errno
import sys

import nbd

MIB = 1 << 20
uri = sys.argv[1]
h = nbd.NBD()
h.set_strict_mode(0)
h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
h.connect_uri(uri)
assert h.get_structured_replies_negotiated(), "structured replies not negotiated"
assert h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION), "base:allocation not negotiated"
size = h.get_size()


def extents(offset, length, flags=0):
    got = []

    def cb(metacontext, off, entries, err):
        assert metacontext == nbd.CONTEXT_BASE_ALLOCATION, metacontext
        for i in range(0, len(entries), 2):
            got.append((entries[i], entries[i + 1]))
        return 0

    h.block_status(length, offset, cb, flags)
    return got


# Walk the first 16 MiB the way nbdinfo --map does.
walk, at = [], 0
while at < 16 * MIB:
    for length, flags in extents(at, 16 * MIB - at):
        walk.append((at, length, flags))
        at += length
data = [(o, l) for o, l, f in walk if f & 1 == 0]
holes = [(o, l) for o, l, f in walk if f & 1]
assert all(f & 3 in (0, 3) for _, _, f in walk), walk
merged = []
for o, l in data:
    if merged and merged[-1][0] + merged[-1][1] == o:
        merged[-1] = (merged[-1][0], merged[-1][1] + l)
    else:
        merged.append((o, l))
# The file system allocates whole blocks: data covers what was written and
# nothing far from it.
for want_o, want_l in ((MIB, 64 << 10), (8 * MIB, MIB)):
    assert any(o <= want_o and want_o + want_l <= o + l for o, l in merged), (want_o, merged)
assert sum(l for _, l in merged) <= 2 * MIB, merged
for o, l in holes[:8]:
    n = min(l, 64 << 10)
    assert h.pread(n, o) == bytes(n), f"hole at {o} does not read as zeros"
print(f"map of 16 MiB: {len(walk)} extents, data {merged}")

one = extents(0, 16 * MIB, nbd.CMD_FLAG_REQ_ONE)
assert len(one) == 1, one

assert h.pread(4096, MIB, nbd.CMD_FLAG_DF) == b"\x5c" * 4096
try:
    h.pread(8192, size - 4096)
    sys.exit("read past the end succeeded")
except nbd.Error as e:
    got = e.errno if isinstance(e.errno, int) else getattr(errno, str(e.errno), None)
    assert got == errno.EINVAL, e
try:
    extents(size - 4096, 8192)
    sys.exit("block status past the end succeeded")
except nbd.Error as e:
    got = e.errno if isinstance(e.errno, int) else getattr(errno, str(e.errno), None)
    assert got == errno.EINVAL, e
# With allow_discards a zeroed range becomes a hole: fast, so FAST_ZERO
# is honoured, and the range reads as zeros and maps as a hole.
assert h.can_fast_zero()
h.zero(MIB, 8 * MIB, nbd.CMD_FLAG_FAST_ZERO)
assert h.pread(4096, 8 * MIB) == bytes(4096)
assert all(f & 1 for _, f in extents(8 * MIB, MIB)), extents(8 * MIB, MIB)
h.pwrite(b"\x77" * 4096, 0)
assert h.pread(4096, 0) == b"\x77" * 4096
h.shutdown()
print("ALL OK")
