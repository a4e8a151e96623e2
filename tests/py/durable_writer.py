#!/usr/bin/env python3
"""The client side of the kill -9 write campaign: writes 4 KiB blocks at
random offsets through libnbd, each block once per trial with a pattern
that names the trial and the block, with FUA on every fourth write and a
FLUSH after every eighth. It logs, line-buffered, what the server
acknowledged and when it became durable, and keeps going until the server
dies under it:
  S i   about to send block i (it may or may not land)
  W i   write of block i acknowledged (not yet durable)
  D i   write of block i acknowledged with FUA (durable)
  F     a FLUSH completed: every acknowledged write before it is durable
Usage: durable_writer.py URI LOG BLOCKS TRIAL SEED"""
import random
import struct
import sys

import nbd


def pattern(trial, index):
    head = b"HC" + struct.pack("<II", trial, index)
    fill = ((trial * 31 + index) & 0xFF) | 1
    return head + bytes([fill]) * (4096 - len(head))


def main():
    uri, log_path, blocks, trial, seed = sys.argv[1:6]
    blocks, trial = int(blocks), int(trial)
    order = list(range(blocks))
    random.Random(int(seed)).shuffle(order)
    h = nbd.NBD()
    h.connect_uri(uri)
    with open(log_path, "w", buffering=1) as log:
        try:
            for n, index in enumerate(order):
                log.write(f"S {index}\n")
                fua = n % 4 == 3
                h.pwrite(pattern(trial, index), index * 4096, nbd.CMD_FLAG_FUA if fua else 0)
                log.write(f"{'D' if fua else 'W'} {index}\n")
                if n % 8 == 7:
                    h.flush()
                    log.write("F\n")
        except nbd.Error:
            pass  # the server was killed: expected


main()
