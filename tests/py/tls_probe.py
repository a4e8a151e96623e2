"""Raw-socket NBD probes for the TLS tests, where libnbd would hide what the
server said: Python's ssl module does the TLS half after NBD_OPT_STARTTLS.

    tls_probe.py plaintext HOST PORT        options before TLS on a `require` listener
    tls_probe.py list HOST PORT CLIENTDIR   STARTTLS, then print the server
                                            certificate's CN and the OPT_LIST names
    tls_probe.py garbage HOST PORT          STARTTLS, then noise instead of a ClientHello
    tls_probe.py stall HOST PORT            STARTTLS, then nothing: wait to be closed

Each prints what it saw, one fact per line, and OK at the end.
"""

import os
import socket
import ssl
import struct
import sys
import time

IHAVEOPT = 0x49484156454F5054
REP_MAGIC = 0x3E889045565A9
OPT_EXPORT_NAME, OPT_ABORT, OPT_LIST, OPT_STARTTLS, OPT_INFO, OPT_GO = 1, 2, 3, 5, 6, 7
REP_ACK, REP_SERVER = 1, 2
NAMES = {
    1: "ACK", 2: "SERVER", 3: "INFO",
    (1 << 31) | 1: "ERR_UNSUP", (1 << 31) | 2: "ERR_POLICY", (1 << 31) | 3: "ERR_INVALID",
    (1 << 31) | 5: "ERR_TLS_REQD", (1 << 31) | 6: "ERR_UNKNOWN",
}


def recv_exact(s, n):
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise EOFError("server closed the connection")
        buf += chunk
    return buf


def connect(host, port):
    s = socket.create_connection((host, int(port)), timeout=20)
    hello = recv_exact(s, 18)
    assert hello[:8] == b"NBDMAGIC", hello
    s.sendall(struct.pack(">I", 3))  # fixed newstyle, no zeroes
    return s


def option(s, opt, data=b""):
    s.sendall(struct.pack(">QII", IHAVEOPT, opt, len(data)) + data)


def reply(s):
    magic, opt, kind, length = struct.unpack(">QIII", recv_exact(s, 20))
    assert magic == REP_MAGIC, hex(magic)
    return opt, NAMES.get(kind, hex(kind)), recv_exact(s, length)


def info_request(name):
    n = name.encode()
    return struct.pack(">I", len(n)) + n + struct.pack(">H", 0)


def list_names(s):
    option(s, OPT_LIST)
    names = []
    while True:
        _, kind, body = reply(s)
        if kind == "SERVER":
            (n,) = struct.unpack(">I", body[:4])
            names.append(body[4 : 4 + n].decode())
        else:
            assert kind == "ACK", kind
            return names


def starttls(s):
    option(s, OPT_STARTTLS)
    _, kind, _ = reply(s)
    assert kind == "ACK", f"STARTTLS answered {kind}"


def main():
    mode, host, port = sys.argv[1:4]
    s = connect(host, port)
    if mode == "plaintext":
        option(s, OPT_LIST)
        print("LIST", reply(s)[1])
        option(s, OPT_INFO, info_request("v"))
        print("INFO", reply(s)[1])
        option(s, OPT_GO, info_request("v"))
        print("GO", reply(s)[1])
        option(s, OPT_ABORT)
        print("ABORT", reply(s)[1])
    elif mode == "list":
        certs = sys.argv[4]
        starttls(s)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.load_verify_locations(os.path.join(certs, "ca-cert.pem"))
        ctx.load_cert_chain(
            os.path.join(certs, "client-cert.pem"), os.path.join(certs, "client-key.pem")
        )
        t = ctx.wrap_socket(s, server_hostname="localhost")
        subject = dict(x[0] for x in t.getpeercert()["subject"])
        print("SERVER_CN", subject["commonName"])
        print("TLS", t.version())
        print("EXPORTS", ",".join(list_names(t)))
        option(t, OPT_STARTTLS)
        print("STARTTLS_AGAIN", reply(t)[1])
        option(t, OPT_ABORT)
        reply(t)
    elif mode == "garbage":
        starttls(s)
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + os.urandom(200))
        print("CLOSED", wait_closed(s))
    elif mode == "stall":
        starttls(s)
        print("CLOSED", wait_closed(s))
    print("OK")


def wait_closed(s):
    """Seconds until the server closes the connection (an alert may come first)."""
    start = time.monotonic()
    s.settimeout(60)
    try:
        while s.recv(4096):
            pass
    except (ConnectionResetError, socket.timeout):
        pass
    return round(time.monotonic() - start, 1)


if __name__ == "__main__":
    main()
