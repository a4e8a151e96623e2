#!/usr/bin/python3
"""The client side of the power-loss campaign (tests/campaigns/powerloss.rs).

Usage: powerloss_client.py URI LOG SIZE STOP_FILE SEED

Writes 4 KiB blocks, each to a block of the export never written before
(a seeded permutation), every seventh with FUA and a FLUSH after every
tenth, at QD1 and a steady pace, until STOP_FILE exists or every block is
written. After each acknowledgement it appends to LOG (O_APPEND, the
recording backend's log):

    A <k> <offset> <length> <fua 0|1>      a write acknowledged
    D                                      a FLUSH acknowledged

Block k holds its number as 8-byte little-endian words, so the checker
knows what each acknowledged block must read back as.
"""

import os
import random
import struct
import sys
import time

import nbd

uri, log_path, size, stop_file, seed = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
BLOCK = 4096
blocks = list(range(size // BLOCK))
random.Random(seed).shuffle(blocks)
log = os.open(log_path, os.O_WRONLY | os.O_APPEND)
h = nbd.NBD()
h.connect_uri(uri)
for k, block in enumerate(blocks):
    if os.path.exists(stop_file):
        break
    offset = block * BLOCK
    fua = 1 if k % 7 == 6 else 0
    h.pwrite(struct.pack("<Q", k) * (BLOCK // 8), offset, nbd.CMD_FLAG_FUA if fua else 0)
    os.write(log, f"A {k} {offset} {BLOCK} {fua}\n".encode())
    if k % 10 == 9:
        h.flush()
        os.write(log, b"D\n")
    # Workload shape, not synchronization: spread the writes over the
    # key operations the test runs meanwhile.
    time.sleep(0.002)
h.shutdown()
print("OK", k)
