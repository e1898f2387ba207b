#!/usr/bin/env python3
"""filter.wasm's code by crate: each function body's size from the code section, named from the
name section of the build with names (scripts/build-wasm.sh --names: the same code as
filter.wasm after wasm-opt). Prints the sections, then code bytes per crate, largest first.

    bash scripts/build-wasm.sh --names
    python3 scripts/wasm-size.py target/wasm32-unknown-unknown/wasm-names/tollgate_filter.wasm
"""
import re
import sys
from collections import Counter


def leb(b, i):
    n = shift = 0
    while True:
        x = b[i]
        i += 1
        n |= (x & 0x7F) << shift
        shift += 7
        if x < 0x80:
            return n, i


def sections(b):
    i = 8
    while i < len(b):
        sid = b[i]
        size, j = leb(b, i + 1)
        yield sid, b[j:j + size]
        i = j + size


def crate_of(name):
    """The crate a (mangled) function name belongs to; for `<A as B>` impls, A's crate."""
    if name.startswith("_ZN"):
        m = re.match(r"_ZN(\d+)", name)
        seg = name[m.end():m.end() + int(m.group(1))]
        if seg.startswith("_$LT$"):
            seg = seg[5:].lstrip("&*").replace("$RF$", "").replace("mut$u20$", "")
            return re.split(r"\.\.|\$", seg)[0] or "?"
        return seg
    if name.startswith("_R"):
        m = re.search(r"C(?:s[0-9A-Za-z]*_)?(\d+)", name)
        if m:
            n = int(m.group(1))
            return name[m.end():m.end() + n]
    return name.split("::")[0][:40] or "?"


def main(path):
    b = open(path, "rb").read()
    imported, bodies, names, sizes = 0, [], {}, Counter()
    for sid, data in sections(b):
        if sid == 0:
            nlen, k = leb(data, 0)
            title = data[k:k + nlen].decode()
            sizes["custom: " + title] += len(data)
            if title != "name":
                continue
            k += nlen
            while k < len(data):
                sub, k = data[k], k + 1
                size, k = leb(data, k)
                if sub == 1:
                    count, m = leb(data, k)
                    for _ in range(count):
                        idx, m = leb(data, m)
                        ln, m = leb(data, m)
                        names[idx] = data[m:m + ln].decode("utf-8", "replace")
                        m += ln
                k += size
            continue
        sizes[{1: "type", 2: "import", 3: "function", 5: "memory", 6: "global", 7: "export", 9: "element", 10: "code", 11: "data"}.get(sid, str(sid))] += len(data)
        if sid == 2:
            count, m = leb(data, 0)
            for _ in range(count):
                for _ in range(2):
                    ln, m = leb(data, m)
                    m += ln
                kind = data[m]
                m += 1
                if kind == 0:
                    imported += 1
                    _, m = leb(data, m)
                else:
                    raise SystemExit("only function imports are expected")
        if sid == 10:
            count, m = leb(data, 0)
            for _ in range(count):
                size, m = leb(data, m)
                bodies.append(size)
                m += size
    print(f"{path}: {len(b):,} bytes")
    for name, size in sizes.most_common():
        print(f"  section {name:<24} {size:>10,}")
    by_crate = Counter()
    for n, size in enumerate(bodies):
        name = names.get(imported + n, "?")
        by_crate[crate_of(name)] += size
    print(f"code by crate ({len(bodies)} functions):")
    for crate, size in by_crate.most_common(20):
        print(f"  {crate:<28} {size:>10,}")


main(sys.argv[1])
