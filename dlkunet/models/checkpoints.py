"""Loading checkpoints saved by the authors' reference code.

The reference names its modules ``inc``, ``down{i}.maxpool_conv.1``, ``up{i}.up`` / ``up{i}.conv``
and ``outc.conv``, with ``dwconv1`` / ``bn1`` / ``dwconv2`` / ``bn2`` / ``lka`` inside each Block;
``up1`` is the deepest decoder level.  This module maps those keys onto ``DLKUNet``'s.
"""
from __future__ import annotations

import os
import re
from typing import Dict, Mapping, Tuple

import torch
from torch import Tensor, nn

_BLOCK_KEYS = (
    (r"dwconv1\.", "conv1."), (r"bn1\.", "conv1.bn."),
    (r"dwconv2\.", "conv2."), (r"bn2\.", "conv2.bn."),
    (r"lka\.", "lka."),
)


def _block_key(rest: str, key: str) -> str:
    for pattern, replacement in _BLOCK_KEYS:
        if re.match(pattern, rest):
            return re.sub("^" + pattern, replacement, rest)
    raise KeyError(f"unrecognised key in a reference Block: {key!r}")


def convert_key(key: str, depth: int) -> str:
    """One reference key -> the matching ``DLKUNet`` key (raises KeyError if it has none)."""
    if key.startswith("inc."):
        return "stem." + _block_key(key[4:], key)
    if key.startswith("outc.conv."):
        return "head." + key[len("outc.conv."):]
    match = re.match(r"down(\d+)\.maxpool_conv\.1\.(.*)", key)
    if match:
        return f"downs.{int(match.group(1)) - 1}.block." + _block_key(match.group(2), key)
    match = re.match(r"up(\d+)\.(up|conv)\.(.*)", key)
    if match:
        index = int(match.group(1)) - 1
        if match.group(2) == "up":
            return f"ups.{index}.up.{match.group(3)}"
        return f"ups.{index}.block." + _block_key(match.group(3), key)
    raise KeyError(f"unrecognised reference key {key!r}")


def convert_reference_state_dict(state: Mapping[str, Tensor], depth: int) -> Tuple[Dict[str, Tensor], list]:
    """Map a reference state_dict (``module.`` prefix allowed) to ours; also return keys that map to nothing."""
    out, unknown = {}, []
    for key, value in state.items():
        bare = key[len("module."):] if key.startswith("module.") else key
        try:
            out[convert_key(bare, depth)] = value
        except KeyError:
            unknown.append(key)
    return out, unknown


def load_reference_checkpoint(model: nn.Module, source, strict: bool = True) -> Dict[str, list]:
    """Load a reference checkpoint (a path or a state_dict) into ``model``.

    Returns ``{"missing": [...], "unexpected": [...]}`` (our key names for missing, the file's for
    unexpected).  With ``strict`` any mismatch raises a ``RuntimeError`` that lists the keys by name.
    """
    if isinstance(source, (str, os.PathLike)):
        if not os.path.exists(source):
            raise FileNotFoundError(f"checkpoint not found: {source}")
        state = torch.load(source, map_location="cpu", weights_only=True)
    else:
        state = source
    if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]
    converted, unknown = convert_reference_state_dict(state, len(model.downs) + 1)
    own = model.state_dict()
    unexpected = unknown + [k for k in converted if k not in own]
    missing = [k for k in own if k not in converted]
    mismatched = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                  for k, v in converted.items() if k in own and own[k].shape != v.shape]
    if strict and (missing or unexpected or mismatched):
        lines = []
        if missing:
            lines.append("missing keys: " + ", ".join(missing))
        if unexpected:
            lines.append("unexpected keys: " + ", ".join(unexpected))
        if mismatched:
            lines.append("shape mismatches: " + "; ".join(mismatched))
        raise RuntimeError("reference checkpoint does not match the model:\n  " + "\n  ".join(lines))
    loadable = {k: v for k, v in converted.items() if k in own and own[k].shape == v.shape}
    model.load_state_dict(loadable, strict=False)
    return {"missing": missing, "unexpected": unexpected, "mismatched": mismatched}
