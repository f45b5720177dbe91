#!/usr/bin/env python3
"""Writes the fuzz seed corpus from the recorded transcripts' reply lines.

    make-seeds.py OUTDIR [TRANSCRIPT...]   (default: Tests/DflockdClientTests/Transcripts/*.txt)

Input layout: see Tests/Fuzz/FuzzHarness.swift. For every reply line: a codec seed (the line,
decoded against every command). For every client of every section: connection seeds with its
first requests (up to 4) and the replies that answer them, whole and cut in pieces, with LF and
CRLF, with and without auth, a socket timeout and an EOF at the end.
"""
import glob
import os
import re
import sys

COMMANDS = ["auth", "l", "r", "n", "e", "w", "sl", "sr", "sn", "se", "sw", "stats", "ping"]
STEP = re.compile(r"^([A-Za-z0-9_]+) (>|<) (.*)$")


def python_bytes(literal):
    """b'...' as the transcripts write it (Python repr escapes)."""
    body = literal[2:-1]
    return body.encode("latin-1").decode("unicode_escape").encode("latin-1")


def parse(path):
    """Yields (section, client, [requests as bytes], [reply lines as bytes])."""
    sections = {}
    section = ""
    with open(path, encoding="utf-8") as f:
        for raw in f:
            line = raw.rstrip("\n")
            if line.startswith("## "):
                section = line[3:].strip()
                continue
            m = STEP.match(line)
            if not m:
                continue
            client, op, rest = m.groups()
            entry = sections.setdefault((section, client), ([], []))
            if op == ">":
                entry[0].append(python_bytes(rest))
            else:
                entry[1].append(rest.encode("utf-8"))
    for (section, client), (requests, replies) in sections.items():
        yield section, client, requests, replies


def command_number(request):
    name = request.split(b"\n", 1)[0].decode("utf-8", "replace")
    return COMMANDS.index(name) if name in COMMANDS else None


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    out = sys.argv[1]
    here = os.path.dirname(os.path.abspath(__file__))
    paths = sys.argv[2:] or sorted(glob.glob(os.path.join(here, "..", "DflockdClientTests", "Transcripts", "*.txt")))
    os.makedirs(out, exist_ok=True)
    seeds = set()
    for path in paths:
        for _section, _client, requests, replies in parse(path):
            for reply in replies:
                seeds.add(bytes([0x00, 0, 1]) + reply + b"\n")  # the request byte is unused by the codec
                seeds.add(bytes([0x30, 0, 1]) + reply + b"\r\n")
            numbers = [command_number(r) for r in requests]
            if not requests or None in numbers:
                continue
            count = min(4, len(requests))
            answered = replies[:count]
            payload = b"".join(r + b"\n" for r in answered)
            header = bytes([count - 1]) + bytes(numbers[:count])
            for flags in (0x01, 0x03, 0x05, 0x09, 0x71, 0xF1):
                seeds.add(bytes([flags]) + header + payload)
            seeds.add(bytes([0x21]) + header + payload.replace(b"\n", b"\r\n"))
            if count > len(answered):
                seeds.add(bytes([0x09]) + header + payload)  # EOF with calls pending
    for i, seed in enumerate(sorted(seeds)):
        with open(os.path.join(out, "seed-%04d" % i), "wb") as f:
            f.write(seed)
    print("make-seeds: %d seeds in %s" % (len(seeds), out))


if __name__ == "__main__":
    main()
