"""Fuzz the bundle reader (agent.bundle.verify_bundle) with extraction.

Input: byte 0 is a flag byte, the rest is the bundle file. Flag bit 0: fix every tar header's checksum first (so the
fuzzer gets past the checksum to the header fields and the manifest; without it, the checksum check itself is
fuzzed). Accepted bundles must extract to exactly the manifest's members, as plain files inside the destination,
with the sizes and sha256 the manifest lists, and no more bytes than the bundle holds. A refusal (BundleRejected)
must leave nothing behind.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import sys

from agent.bundle import _MEMBER_RE, MANIFEST, MAX_MEMBERS, verify_bundle
from agent.errors import BundleRejected
from tests.fuzz.common import check, scratch

MAX_BYTES = 4 << 20  # the reader's size limit for this harness: bigger inputs are refused as too_large
_DIR = scratch("bundle")
_BLOCK = 512


def fix_checksums(data: bytearray) -> None:
    """Rewrite the checksum of every header the archive's own sizes lead to (stops where a size does not parse)."""
    pos = 0
    while pos + _BLOCK <= len(data):
        block = data[pos:pos + _BLOCK]
        if block == bytes(_BLOCK):
            return
        block[148:156] = b" " * 8
        data[pos + 148:pos + 156] = b"%06o\x00 " % (sum(block) & 0o777777)
        digits = bytes(block[124:136]).replace(b"\x00", b" ").strip()
        if not digits or any(c not in b"01234567" for c in digits):
            return
        pos += _BLOCK + -(-int(digits, 8) // _BLOCK) * _BLOCK


def test_one_input(data: bytes) -> None:
    if not data:
        return
    body = bytearray(data[1:])
    if data[0] & 1:
        fix_checksums(body)
    path = _DIR / "in.bundle"
    path.write_bytes(body)
    out = _DIR / "out"
    dest = out / "release"
    try:
        try:
            verified = verify_bundle(path, dest, max_bytes=MAX_BYTES)
        except BundleRejected:
            check(not out.exists() or not any(out.iterdir()), f"a refused bundle left {list(out.iterdir())}")
            return
        manifest = verified.manifest
        check(len(body) <= MAX_BYTES, "a bundle over the size limit was accepted")
        check(verified.bytes == len(body), "the verified size is not the file's size")
        check(sorted(p.name for p in out.iterdir()) == ["release"], f"extraction left {list(out.iterdir())}")
        names = sorted(p.name for p in dest.iterdir())
        check(names == sorted([MANIFEST, *manifest.files]), f"extracted {names}, manifest lists {manifest.files}")
        check(len(names) <= MAX_MEMBERS, "more members than allowed")
        total = 0
        for p in dest.iterdir():
            st = os.lstat(p)
            check(stat.S_ISREG(st.st_mode), f"{p.name} is not a regular file")
            check(p.resolve().parent == dest.resolve(), f"{p.name} is outside the destination")
            if p.name == MANIFEST:
                total += st.st_size
                continue
            check(bool(_MEMBER_RE.match(p.name)), f"unsafe member name {p.name!r} extracted")
            entry = manifest.files[p.name]
            check(st.st_size == entry.bytes, f"{p.name} is {st.st_size} bytes, manifest says {entry.bytes}")
            check(hashlib.sha256(p.read_bytes()).hexdigest() == entry.sha256, f"{p.name} does not match its sha256")
            total += st.st_size
        check(total <= len(body), f"extracted {total} bytes from a {len(body)}-byte bundle")
    finally:
        if out.exists():
            shutil.rmtree(out)


def main() -> None:
    from tests.fuzz.runner import fuzz

    fuzz("bundle", sys.argv)


if __name__ == "__main__":
    main()
