#!/usr/bin/env python3
"""Writes the seed corpora under fuzz/seeds/TARGET/ (committed): valid
inputs for each target, so fuzzing starts from inputs that reach deep
into each parser. Run from fuzz/; the header seed needs hostcrypt built."""
import hashlib
import json
import os
import struct
import subprocess
import sys
import tempfile

IHAVEOPT = 0x49484156454F5054
REQ_MAGIC = 0x25609513


def write(target, name, data):
    os.makedirs(f"seeds/{target}", exist_ok=True)
    with open(f"seeds/{target}/{name}", "wb") as f:
        f.write(data)


def option(opt, data=b""):
    return struct.pack(">QII", IHAVEOPT, opt, len(data)) + data


def info_request(name, infos=(0, 1, 2, 3)):
    return struct.pack(">I", len(name)) + name + struct.pack(">H", len(infos)) + b"".join(
        struct.pack(">H", i) for i in infos)


flags = struct.pack(">I", 3)  # FIXED_NEWSTYLE | NO_ZEROES
for mode in (0, 1, 2):
    m = bytes([mode])
    write("handshake", f"go-default-{mode}", m + flags + option(7, info_request(b"")))
    write("handshake", f"list-info-go-{mode}", m + flags + option(3) + option(6, info_request(b"fuzz")) + option(7, info_request(b"fuzz")))
    write("handshake", f"starttls-{mode}", m + flags + option(5))
    write("handshake", f"export-name-{mode}", m + flags + option(1, b"fuzz"))
    write("handshake", f"structured-abort-{mode}", m + flags + option(8) + option(2))
    write("handshake", f"unknown-{mode}", m + flags + option(0x1234, b"x" * 17) + option(7, info_request(b"nope")))
    meta = struct.pack(">I", 4) + b"fuzz" + struct.pack(">I", 2) + struct.pack(">I", 15) + b"base:allocation" + struct.pack(">I", 5) + b"base:"
    write("handshake", f"structured-meta-go-{mode}", m + flags + option(8) + option(9, meta) + option(10, meta) + option(7, info_request(b"fuzz")))


def request(cmd, offset, length, flags=0, handle=1, payload=b""):
    return struct.pack(">IHHQQI", REQ_MAGIC, flags, cmd, handle, offset, length) + payload


# First byte: the negotiated features (bit 0 structured replies, bits 0+1
# base:allocation); each stream is seeded in all three modes.
streams = {
    "write-read-flush": request(1, 0, 4096, payload=b"\xab" * 4096) + request(0, 0, 4096, handle=2) + request(3, 0, 0, handle=3),
    "unaligned-fua": request(1, 511, 1000, flags=1, payload=b"\x11" * 1000) + request(0, 100, 3000, handle=2),
    "trim-zero-cache": request(4, 4096, 8192) + request(6, 0, 32768, flags=2, handle=2) + request(5, 0, 4096, handle=3) + request(2, 0, 0, handle=4),
    "out-of-range": request(0, (64 << 10) - 512, 4096) + request(1, 1 << 40, 512, payload=b"\0" * 512),
    "bad-flags": request(0, 0, 512, flags=0xffff) + request(9, 0, 0),
    "block-status-df": request(1, 8192, 4096, payload=b"\x22" * 4096) + request(7, 0, 65536, handle=2) + request(7, 0, 65536, flags=8, handle=3) + request(0, 8192, 4096, flags=4, handle=4),
}
for name, stream in streams.items():
    for mode in (0, 1, 3):
        write("transmission", f"{name}-{mode}", bytes([mode]) + stream)

hashes = b"".join(hashlib.sha256(bytes([i])).digest() for i in range(4))
record = bytearray(4096)
record[0:8] = b"HCJRNL\x00\x02"
record[8:24] = bytes(range(16))
record[24:32] = struct.pack("<Q", 1 << 20)
record[32:40] = struct.pack("<Q", 4 * 4096)
record[40:44] = struct.pack("<I", 2)
record[44:48] = struct.pack("<I", 4096)
fixed = bytearray(record)
fixed[0] = 0x49  # odd first byte: the target fixes the checksums up
write("journal", "hash-record-fixup", bytes(fixed) + hashes)
record[48:80] = hashlib.sha256(hashes).digest()
record[80:112] = hashlib.sha256(bytes(record[:80])).digest()
write("journal", "hash-record-valid", bytes(record) + hashes)
data_record = bytearray(4096)
data_record[0:8] = b"HCJRNL\x00\x01"
data_record[32:40] = struct.pack("<Q", 512)
write("journal", "data-record", bytes(data_record) + b"\x5a" * 512)

hostcrypt = os.path.join("..", "target", "debug", "hostcrypt")
if os.path.exists(hostcrypt):
    with tempfile.TemporaryDirectory() as d:
        kek = os.path.join(d, "kek")
        with open(kek, "wb") as f:
            f.write(os.urandom(32))
        os.chmod(kek, 0o600)
        with open(kek + "2", "wb") as f:
            f.write(os.urandom(32))
        os.chmod(kek + "2", 0o600)
        conf = os.path.join(d, "c.toml")
        for inner in ("", 'kek_inner = "second"\ninner_cipher = "adiantum"\n'):
            with open(conf, "w") as f:
                f.write(f'[server]\nunix = "{d}/s"\n[kek.main]\nprovider = "local"\npath = "{kek}"\n'
                        f'[kek.second]\nprovider = "local"\npath = "{kek}2"\n'
                        f'[[volume]]\nname = "v"\nbacking = "{d}/v.img"\nrole = "cache"\nkek = "main"\n{inner}')
            if os.path.exists(f"{d}/v.img"):
                os.remove(f"{d}/v.img")
            subprocess.run([hostcrypt, "--config", conf, "create", "v", "--size", "16M"],
                           check=True, capture_output=True)
            with open(f"{d}/v.img", "rb") as f:
                raw = f.read(4096)
            write("header", "adiantum" if inner else "xts", raw[8:4096 - 32])
else:
    sys.exit("build the CLI first (cargo build) for the header seeds")

for name in os.listdir("../systemd"):
    if name.endswith(".toml"):
        with open(f"../systemd/{name}", "rb") as f:
            write("config", name, f.read())
write("config", "tcp-tls", b'[server]\ntcp = "0.0.0.0:10809"\ntls = "require"\ntls_certificates = "/etc/hostcrypt/tls"\nmax_connections = 10\nhandshake_timeout = "5s"\n'
      b'[kek.v]\nprovider = "vault"\naddress = "http://127.0.0.1:8200"\nkey = "k"\ntoken_file = "/t"\n'
      b'[[volume]]\nname = "a"\nbacking = "/a"\nrole = "temp"\nsize = "1G"\nallow = ["uid:0", "dn:CN=x", "10.0.0.0/8"]\n')

for line in ({"op": "status"}, {"op": "reload"}, {"op": "rotate-kek", "volume": "v"},
             {"op": "reencrypt", "volume": "v", "action": "start", "rate_mbps": 100.0}):
    write("control", f"request-{line['op']}", json.dumps(line).encode())
write("control", "response-error", json.dumps({"ok": False, "error": "no such volume"}).encode())
write("control", "response-ok", json.dumps({"ok": True}).encode())

# client: what a server sends. Mode 0: greeting and option replies.
REPLY_MAGIC = 0x3E889045565A9


def opt_reply(opt, kind, data=b""):
    return struct.pack(">QIII", REPLY_MAGIC, opt, kind, len(data)) + data


greeting = struct.pack(">QQH", 0x4E42444D41474943, IHAVEOPT, 3)
go_ok = (opt_reply(7, 3, struct.pack(">HQH", 0, 1 << 20, 0x10d))
         + opt_reply(7, 3, struct.pack(">HIII", 3, 512, 4096, 1 << 20)) + opt_reply(7, 1))
write("client", "handshake-structured", b"\x00" + greeting + opt_reply(8, 1) + go_ok)
write("client", "handshake-plain", b"\x00" + greeting + opt_reply(8, (1 << 31) | 1) + go_ok)
write("client", "handshake-refused", b"\x00" + greeting + opt_reply(8, 1) + opt_reply(7, (1 << 31) | 6, b"no such export"))


# Mode 1: simple replies; mode 3: structured chunks (cookies 0..3: read 512 @0,
# read 64 KiB @4096, write, flush).
def simple(cookie, error=0, data=b""):
    return struct.pack(">IIQ", 0x67446698, error, cookie) + data


def chunk(flags, kind, cookie, payload):
    return struct.pack(">IHHQI", 0x668E33EF, flags, kind, cookie, len(payload)) + payload


write("client", "simple-all", b"\x01" + simple(2) + simple(0, 0, b"\x5a" * 512) + simple(3, 5)
      + simple(1, 0, b"\xa5" * 65536))
write("client", "structured-all", b"\x03"
      + chunk(0, 1, 1, struct.pack(">Q", 4096) + b"\x11" * 4096)
      + chunk(0, 2, 1, struct.pack(">QI", 8192, 61440))
      + chunk(1, 0, 1, b"")
      + chunk(1, 1, 0, struct.pack(">Q", 0) + b"\x22" * 512)
      + chunk(1, 0x8001, 2, struct.pack(">IH", 5, 4) + b"oops")
      + simple(3))
# Replies that leave a read unwritten or write it twice: each read must
# fail, never return its buffer's old contents (the target's oracle).
write("client", "structured-incomplete", b"\x03"
      + chunk(1, 0, 0, b"")
      + chunk(0, 1, 1, struct.pack(">Q", 4096) + b"\x11" * 4096)
      + chunk(1, 2, 1, struct.pack(">QI", 16384, 4096)))
write("client", "structured-overlap", b"\x03"
      + chunk(0, 1, 0, struct.pack(">Q", 0) + b"\x22" * 300)
      + chunk(1, 1, 0, struct.pack(">Q", 200) + b"\x33" * 312)
      + simple(2))


# vhost_request: a control byte (head index; bit 7 read-only, bit 6
# discards), a 16-entry descriptor table (addr, len, flags, next), then
# guest memory from 0x1000: headers at 0x1000, segments at 0x1100.
def descriptor(addr, length, flags, nxt):
    return struct.pack("<QIHH", addr, length, flags, nxt)


def vhost_input(control, table, header, segment=b""):
    table = b"".join(descriptor(*d) for d in table).ljust(256, b"\0")
    memory = header.ljust(0x100, b"\0") + segment
    return bytes([control]) + table + memory


NEXT, WRITE = 1, 2
for name, kind, data_flags, length in [("read", 0, NEXT | WRITE, 4096), ("write", 1, NEXT, 4096),
                                       ("get-id", 8, NEXT | WRITE, 20)]:
    write("vhost_request", name, vhost_input(0, [(0x1000, 16, NEXT, 1),
                                                 (0x2000, length, data_flags, 2),
                                                 (0x8000, 1, WRITE, 0)],
                                             struct.pack("<IIQ", kind, 0, 8)))
write("vhost_request", "flush", vhost_input(0, [(0x1000, 16, NEXT, 1), (0x8000, 1, WRITE, 0)],
                                            struct.pack("<IIQ", 4, 0, 0)))
for name, kind, flags in [("discard", 11, 0), ("write-zeroes-unmap", 13, 1)]:
    write("vhost_request", name, vhost_input(0x40, [(0x1000, 16, NEXT, 1), (0x1100, 16, NEXT, 2),
                                                    (0x8000, 1, WRITE, 0)],
                                             struct.pack("<IIQ", kind, 0, 0),
                                             struct.pack("<QII", 16, 8, flags)))
write("vhost_request", "loop", vhost_input(0, [(0x1000, 16, NEXT, 1), (0x2000, 512, NEXT | WRITE, 1)],
                                           struct.pack("<IIQ", 0, 0, 0)))
