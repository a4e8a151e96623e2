#!/usr/bin/env python3
"""Scrapes a hostcryptd metrics endpoint and parses it with the reference
parser (prometheus_client's OpenMetrics parser, strict: it rejects a
malformed exposition). Prints the samples as JSON lines:
{"name", "labels", "value"}. Usage: scrape.py URL"""
import json
import sys
import time
import urllib.error
import urllib.request

from prometheus_client.openmetrics.parser import text_string_to_metric_families

# The endpoint binds on its own thread after the NBD socket appears:
# retry "connection refused" until a deadline instead of failing on it.
deadline = time.monotonic() + 30
while True:
    try:
        with urllib.request.urlopen(sys.argv[1], timeout=10) as response:
            content_type = response.headers.get("Content-Type", "")
            text = response.read().decode()
        break
    except urllib.error.URLError as e:
        refused = isinstance(e.reason, ConnectionRefusedError)
        if not refused or time.monotonic() > deadline:
            raise
        time.sleep(0.05)
if not content_type.startswith("application/openmetrics-text"):
    sys.exit("unexpected content type: %r" % content_type)
for family in text_string_to_metric_families(text):
    for sample in family.samples:
        print(json.dumps({"name": sample.name, "labels": sample.labels, "value": sample.value, "type": family.type}))
