#!/usr/bin/python3
"""An NBD server that answers reads wrongly on purpose.

Usage: hostile_nbd.py SOCKET SIZE MODE_FILE RECORD_FILE

Serves one in-memory export of SIZE bytes on a Unix socket: fixed
newstyle, OPT_STRUCTURED_REPLY accepted, OPT_GO/OPT_INFO with
NBD_INFO_BLOCK_SIZE advertising a 64 KiB minimum block (so a client's
small writes become read-modify-write), FLUSH, no multi-conn.

MODE_FILE holds the misbehaviour for reads; it is read again at every
read request and handshake, so a test can create a volume while the
server behaves and switch afterwards. Missing or empty means `good`.

    good          one OFFSET_DATA chunk with the data, DONE
    none-done     a NONE chunk with DONE: nothing written
    short         the first half as data, DONE
    overlap       the data, then its first 4 KiB again, DONE
    out-of-range  the data, then 4 KiB past the request's end, DONE
    unnegotiated  refuses OPT_STRUCTURED_REPLY, then replies structured
                  anyway (a connection that negotiated them is dropped
                  at its first request, so the client reconnects)
    wrong-cookie  a NONE+DONE chunk for a cookie never sent (a simple
                  reply on a connection without structured replies)

One mode misbehaves on writes instead:

    stale-write   the first write received in this mode is held: never
                  answered (the client's write times out) and applied
                  only right after the server next answers a FLUSH, as a
                  backend that completes a timed-out write late, over a
                  newer one the client had flushed

The structured misbehaviours on a connection that did not negotiate
structured replies (left by `unnegotiated`) drop it first, so the client
reconnects and negotiates them.

Every write's payload is appended to RECORD_FILE (and applied), so a
test can look for what must never reach a backend.
"""

import os
import socket
import struct
import sys
import threading

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
OPTION_REPLY_MAGIC = 0x3E889045565A9
SIMPLE_MAGIC = 0x67446698
STRUCTURED_MAGIC = 0x668E33EF
OPT_ABORT, OPT_INFO, OPT_GO, OPT_STRUCTURED_REPLY = 2, 6, 7, 8
REP_ACK, REP_INFO = 1, 3
REP_ERR_UNSUP = (1 << 31) | 1
INFO_EXPORT, INFO_BLOCK_SIZE = 0, 3
FLAGS = 1 | 4  # HAS_FLAGS, SEND_FLUSH
CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH = 0, 1, 2, 3
FLAG_DONE = 1
TYPE_NONE, TYPE_DATA = 0, 1
EINVAL = 22
MIN_BLOCK, MAX_BLOCK = 64 << 10, 1 << 20

sock_path, size, mode_file, record_path = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
disk = bytearray(size)
lock = threading.Lock()
# stale-write: the held write (offset, payload), and whether one was taken.
stale = {"held": None, "taken": False}
record = open(record_path, "ab")


def mode():
    try:
        with open(mode_file) as f:
            return f.read().strip() or "good"
    except FileNotFoundError:
        return "good"


def recv(conn, n):
    buf = bytearray()
    while len(buf) < n:
        chunk = conn.recv(n - len(buf))
        if not chunk:
            raise EOFError
        buf += chunk
    return bytes(buf)


def option_reply(conn, opt, kind, payload=b""):
    conn.sendall(struct.pack(">QIII", OPTION_REPLY_MAGIC, opt, kind, len(payload)) + payload)


def negotiate(conn):
    """Returns whether structured replies were negotiated."""
    conn.sendall(struct.pack(">QQH", NBDMAGIC, IHAVEOPT, 1 | 2))
    recv(conn, 4)
    structured = False
    while True:
        magic, opt, length = struct.unpack(">QII", recv(conn, 16))
        if magic != IHAVEOPT:
            raise EOFError
        recv(conn, length)
        if opt == OPT_STRUCTURED_REPLY and mode() != "unnegotiated":
            structured = True
            option_reply(conn, opt, REP_ACK)
        elif opt in (OPT_GO, OPT_INFO):
            option_reply(conn, opt, REP_INFO, struct.pack(">HQH", INFO_EXPORT, size, FLAGS))
            option_reply(conn, opt, REP_INFO,
                         struct.pack(">HIII", INFO_BLOCK_SIZE, MIN_BLOCK, MIN_BLOCK, MAX_BLOCK))
            option_reply(conn, opt, REP_ACK)
            if opt == OPT_GO:
                return structured
        elif opt == OPT_ABORT:
            option_reply(conn, opt, REP_ACK)
            raise EOFError
        else:
            option_reply(conn, opt, REP_ERR_UNSUP)


def simple(conn, error, cookie, payload=b""):
    conn.sendall(struct.pack(">IIQ", SIMPLE_MAGIC, error, cookie) + payload)


def chunk(flags, kind, cookie, payload):
    return struct.pack(">IHHQI", STRUCTURED_MAGIC, flags, kind, cookie, len(payload)) + payload


def data(flags, cookie, offset, payload):
    return chunk(flags, TYPE_DATA, cookie, struct.pack(">Q", offset) + payload)


def read_reply(how, cookie, offset, out):
    n = len(out)
    if how == "none-done":
        return chunk(FLAG_DONE, TYPE_NONE, cookie, b"")
    if how == "short":
        return data(FLAG_DONE, cookie, offset, out[: n // 2])
    if how == "overlap":
        return data(0, cookie, offset, out) + data(FLAG_DONE, cookie, offset, out[:4096])
    if how == "out-of-range":
        return data(0, cookie, offset, out) + data(FLAG_DONE, cookie, offset + n, b"\0" * 4096)
    if how == "wrong-cookie":
        return chunk(FLAG_DONE, TYPE_NONE, cookie ^ (1 << 63), b"")
    return data(FLAG_DONE, cookie, offset, out)


def apply(offset, payload):
    with lock:
        disk[offset:offset + len(payload)] = payload
        record.write(payload)
        record.flush()


def serve(conn):
    try:
        structured = negotiate(conn)
        while True:
            _, flags, kind, cookie, offset, length = struct.unpack(">IHHQQI", recv(conn, 28))
            if kind == CMD_DISC:
                return
            payload = recv(conn, length) if kind == CMD_WRITE else b""
            if kind in (CMD_READ, CMD_WRITE) and offset + length > size:
                simple(conn, EINVAL, cookie)
                continue
            if kind == CMD_WRITE:
                with lock:
                    hold = mode() == "stale-write" and not stale["taken"]
                    if hold:
                        stale["taken"] = True
                        stale["held"] = (offset, payload)
                if hold:
                    continue
                apply(offset, payload)
                simple(conn, 0, cookie)
            elif kind == CMD_FLUSH:
                simple(conn, 0, cookie)
                with lock:
                    late, stale["held"] = stale["held"], None
                if late:
                    apply(*late)
            elif kind == CMD_READ:
                with lock:
                    out = bytes(disk[offset:offset + length])
                how = mode()
                if how == "unnegotiated":
                    if structured:
                        return  # reconnect, to a handshake that refuses them
                    conn.sendall(data(FLAG_DONE, cookie, offset, out))
                elif structured:
                    conn.sendall(read_reply(how, cookie, offset, out))
                elif how == "wrong-cookie":
                    simple(conn, 0, cookie ^ (1 << 63), out)
                elif how != "good":
                    return  # reconnect, to a handshake that accepts them
                else:
                    simple(conn, 0, cookie, out)
            else:
                simple(conn, 0, cookie)
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
