"""
Access to the Go Skynet byte captures, copied into C{tests/vectors/} from
the shared C{protocol-vectors} folder so that a fresh clone replays them.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

import bson

#: The client id the Go service issued in every capture.
CAPTURED_CLIENTID = "c11e4e1d-0000-4000-8000-000000000001"


def vectors_dir() -> Path:
    """
    The vectors folder: C{$SKYNET_PROTOCOL_VECTORS}, else C{tests/vectors/}
    beside this module.
    """
    env = os.environ.get("SKYNET_PROTOCOL_VECTORS")
    if env:
        return Path(env)
    return Path(__file__).resolve().parent / "vectors"


def load(name: str) -> dict[str, Any]:
    path = vectors_dir() / f"{name}.json"
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def names() -> list[str]:
    """
    Every scenario listed in the index.
    """
    with open(vectors_dir() / "index.json", encoding="utf-8") as f:
        return [v["name"] for v in json.load(f)["vectors"]]


def split_documents(data: bytes) -> list[bytes]:
    """
    Split a byte stream into its BSON documents (no trailing partial bytes).
    """
    docs = []
    offset = 0
    while offset < len(data):
        (length,) = struct.unpack_from("<i", data, offset)
        docs.append(data[offset : offset + length])
        offset += length
    assert offset == len(data), "trailing partial document"
    return docs


def split_whole(data: bytes) -> int:
    """
    How many whole documents (by their length prefixes) start C{data}.
    """
    count = offset = 0
    while offset + 4 <= len(data):
        (length,) = struct.unpack_from("<i", data, offset)
        if length < 5 or offset + length > len(data):
            break
        count += 1
        offset += length
    return count


def c2s(vector: dict[str, Any]) -> bytes:
    return bytes.fromhex(vector["client_to_server_hex"])


def s2c(vector: dict[str, Any]) -> bytes:
    return bytes.fromhex(vector["server_to_client_hex"])


def decode(doc: bytes) -> dict[str, Any]:
    return bson.decode(doc)
