#!/usr/bin/python3
"""A small NBD server that records every write and FLUSH, in order.

Usage: recording_nbd.py SOCKET SIZE RECORD_DIR

Serves one in-memory export of SIZE bytes on a Unix socket (fixed
newstyle, OPT_GO, simple replies; FLUSH and FUA, no TRIM or WRITE_ZEROES,
no multi-conn, so one connection carries everything in one order).
Appends to RECORD_DIR/log, before replying to the request:

    W <offset> <length> <fua 0|1> <offset in RECORD_DIR/data>
    F

and every written payload to RECORD_DIR/data. Other processes (the test's
client) append their own lines to the same log with O_APPEND, so the log
is one timeline. From it a power cut at any FLUSH, with any subset of the
later writes lost, can be rebuilt (tests/campaigns/powerloss.rs).
"""

import os
import socket
import struct
import sys
import threading

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
REPLY_MAGIC = 0x3E889045565A9
OPT_ABORT, OPT_INFO, OPT_GO = 2, 6, 7
REP_ACK, REP_INFO = 1, 3
REP_ERR_UNSUP = (1 << 31) | 1
FLAGS = 1 | 4 | 8  # HAS_FLAGS, SEND_FLUSH, SEND_FUA
CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH = 0, 1, 2, 3
FLAG_FUA = 1
EINVAL = 22

sock_path, size, record = sys.argv[1], int(sys.argv[2]), sys.argv[3]
disk = bytearray(size)
lock = threading.Lock()
os.makedirs(record, exist_ok=True)
log = os.open(os.path.join(record, "log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
data = open(os.path.join(record, "data"), "ab")


def recv(conn, n):
    buf = bytearray()
    while len(buf) < n:
        chunk = conn.recv(n - len(buf))
        if not chunk:
            raise EOFError
        buf += chunk
    return bytes(buf)


def option_reply(conn, opt, kind, payload=b""):
    conn.sendall(struct.pack(">QIII", REPLY_MAGIC, opt, kind, len(payload)) + payload)


def negotiate(conn):
    conn.sendall(struct.pack(">QQH", NBDMAGIC, IHAVEOPT, 1 | 2))
    recv(conn, 4)
    while True:
        magic, opt, length = struct.unpack(">QII", recv(conn, 16))
        if magic != IHAVEOPT:
            raise EOFError
        recv(conn, length)
        if opt in (OPT_GO, OPT_INFO):
            option_reply(conn, opt, REP_INFO, struct.pack(">HQH", 0, size, FLAGS))
            option_reply(conn, opt, REP_ACK)
            if opt == OPT_GO:
                return
        elif opt == OPT_ABORT:
            option_reply(conn, opt, REP_ACK)
            raise EOFError
        else:
            option_reply(conn, opt, REP_ERR_UNSUP)


def reply(conn, error, cookie, payload=b""):
    conn.sendall(struct.pack(">IIQ", 0x67446698, error, cookie) + payload)


def serve(conn):
    try:
        negotiate(conn)
        while True:
            _, flags, kind, cookie, offset, length = struct.unpack(">IHHQQI", recv(conn, 28))
            if kind == CMD_DISC:
                return
            payload = recv(conn, length) if kind == CMD_WRITE else b""
            if kind in (CMD_READ, CMD_WRITE) and offset + length > size:
                reply(conn, EINVAL, cookie)
                continue
            with lock:
                if kind == CMD_READ:
                    out = bytes(disk[offset:offset + length])
                elif kind == CMD_WRITE:
                    disk[offset:offset + length] = payload
                    at = data.tell()
                    data.write(payload)
                    data.flush()
                    fua = 1 if flags & FLAG_FUA else 0
                    os.write(log, f"W {offset} {length} {fua} {at}\n".encode())
                elif kind == CMD_FLUSH:
                    os.write(log, b"F\n")
            reply(conn, 0, cookie, out if kind == CMD_READ else b"")
    except (EOFError, ConnectionError):
        pass
    finally:
        conn.close()


def main():
    if os.path.exists(sock_path):
        os.unlink(sock_path)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(sock_path)
    server.listen(16)
    while True:
        conn, _ = server.accept()
        threading.Thread(target=serve, args=(conn,), daemon=True).start()


main()
