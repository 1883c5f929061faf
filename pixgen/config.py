"""Stage configs are frozen dataclasses; their canonical JSON and its hash identify an asset."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any


def to_dict(config: Any) -> dict:
    return dataclasses.asdict(config)


def canonical_json(value: Any) -> str:
    """Key-sorted, whitespace-free JSON, so equal configs give equal strings (and hashes)."""
    if dataclasses.is_dataclass(value):
        value = dataclasses.asdict(value)
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def config_hash(value: Any) -> str:
    return hashlib.sha256(canonical_json(value).encode()).hexdigest()[:16]


def from_dict(cls, data: dict):
    """Rebuild a config, keeping only the fields `cls` knows (tuples come back from JSON as lists)."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for name, value in data.items():
        if name in fields:
            kwargs[name] = tuple(value) if isinstance(value, list) else value
    return cls(**kwargs)
