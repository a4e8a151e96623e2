#!/usr/bin/env python3
"""The client side of the fault campaigns (tests/campaigns/faults.rs):
like durable_writer.py, it writes 4 KiB blocks in a seeded order through
libnbd, each block once per trial with a pattern naming the trial and the
block (the same pattern), FUA on every fourth write and a FLUSH after
every eighth; unlike it, it goes on past failed requests (the faults are
the point), and stops when STOP exists, every block is written, or the
connection is gone. It appends to LOG (O_APPEND, so the test can add its
own markers), one line per event:
  S i   about to send the write of block i
  W i   write of block i acknowledged (no FUA)
  D i   write of block i acknowledged with FUA (durable)
  E i   write of block i failed (no FUA)
  Y i   write of block i with FUA failed
  P     about to send a FLUSH
  F     the FLUSH succeeded: every write acknowledged before it is durable
  X     the FLUSH failed
  C     the connection is gone; the writer stops
  H     held between requests (nothing in flight): HOLD, a FIFO, exists;
        the writer goes on once the test opens it for writing and closes it
Usage: fault_writer.py URI LOG BLOCKS TRIAL SEED STOP HOLD"""
import os
import random
import struct
import sys

import nbd


def pattern(trial, index):
    head = b"HC" + struct.pack("<II", trial, index)
    fill = ((trial * 31 + index) & 0xFF) | 1
    return head + bytes([fill]) * (4096 - len(head))


def main():
    uri, log_path, blocks, trial, seed, stop, hold = sys.argv[1:8]
    blocks, trial = int(blocks), int(trial)
    order = list(range(blocks))
    random.Random(int(seed)).shuffle(order)
    fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def log(line):
        os.write(fd, (line + "\n").encode())

    h = nbd.NBD()
    h.connect_uri(uri)

    def gone():
        return h.aio_is_dead() or h.aio_is_closed()

    def held():
        if os.path.exists(hold):
            log("H")
            with open(hold) as fifo:
                fifo.read()

    for n, index in enumerate(order):
        if os.path.exists(stop):
            break
        held()
        fua = n % 4 == 3
        log(f"S {index}")
        try:
            h.pwrite(pattern(trial, index), index * 4096, nbd.CMD_FLAG_FUA if fua else 0)
            log(f"{'D' if fua else 'W'} {index}")
        except nbd.Error:
            if gone():
                log("C")
                return
            log(f"{'Y' if fua else 'E'} {index}")
        if n % 8 == 7:
            held()
            log("P")
            try:
                h.flush()
                log("F")
            except nbd.Error:
                if gone():
                    log("C")
                    return
                log("X")
    try:
        h.shutdown()
    except nbd.Error:
        pass


main()
