#!/usr/bin/env python3
"""Condenses heaptrack_print's PEAK MEMORY CONSUMERS into one line per call site: the bytes
held at the peak, the number of allocations, and the innermost frames from the gateway or
Pingora (allocator and runtime frames skipped). usage: condense_heaptrack.py PRINT.txt [N]"""
import re
import sys

text = open(sys.argv[1]).read()
limit = int(sys.argv[2]) if len(sys.argv) > 2 else 25
section = text.split("PEAK MEMORY CONSUMERS", 1)[-1].split("total runtime", 1)[0]
top = re.compile(r"^([\d.]+[KMG]?B?) peak memory consumed over (\d+) calls from")
sub = re.compile(r"^([\d.]+[KMG]?B?) consumed over (\d+) calls from:")
frame = re.compile(r"^\s+at (\S+?):(\d+)")
rows = []
current = None
kind = ""
expect_kind = False
for line in section.splitlines():
    m = top.match(line)
    if m:
        expect_kind = True
        current = None
        continue
    if expect_kind and line.strip():
        kind = line.strip()
        expect_kind = False
        continue
    m = sub.match(line)
    if m:
        current = {"size": m.group(1), "calls": int(m.group(2)), "kind": kind, "frames": []}
        rows.append(current)
        continue
    m = frame.match(line)
    if m and current is not None:
        path, no = m.group(1), m.group(2)
        ours = path.startswith("/work/main/src/") or (path.startswith("src/") and not path.startswith(("src/runtime", "src/task", "src/sync", "src/io", "src/loom")))
        if (ours or "pingora" in path) and len(current["frames"]) < 4:
            short = re.sub(r".*/(pingora-[a-z]+-[\d.]+/)", r"\1", path).replace("/work/main/", "")
            current["frames"].append(f"{short}:{no}")
for r in rows[:limit]:
    print(f"{r['size']:>8} in {r['calls']:>5} x {r['kind']:<14} " + " <- ".join(r["frames"]))
