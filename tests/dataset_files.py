"""Reading a generated dataset folder in the generators' tests: its JSONL records, a digest of every file."""
from __future__ import annotations

import hashlib
import json


def read_jsonl(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def digest(folder):
    """sha256 over every file's relative path and bytes, in sorted order."""
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(folder)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()
