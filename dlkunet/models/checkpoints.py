"""Loading checkpoints saved by the authors' reference code.

The reference names its modules ``inc``, ``down{i}.maxpool_conv.1``, ``up{i}.up`` / ``up{i}.conv``
and ``outc.conv``, with ``dwconv1`` / ``bn1`` / ``dwconv2`` / ``bn2`` / ``lka`` inside each Block;
``up1`` is the deepest decoder level.  This module maps those keys onto ``DLKUNet``'s, and its
errors name keys as the file does.
"""
from __future__ import annotations

import os
import re
from typing import Dict, Mapping, Tuple

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


# Our Block names -> the reference's, longest first (conv1.bn. before conv1.).
_OUR_BLOCK_KEYS = (("conv1.bn.", "bn1."), ("conv2.bn.", "bn2."), ("conv1.", "dwconv1."), ("conv2.", "dwconv2."),
                   ("lka.", "lka."))


def reference_key(key: str) -> str:
    """The inverse of :func:`convert_key`: our key -> the name it has in a reference checkpoint."""
    def block(rest: str) -> str:
        for ours, theirs in _OUR_BLOCK_KEYS:
            if rest.startswith(ours):
                return theirs + rest[len(ours):]
        return rest

    if key.startswith("stem."):
        return "inc." + block(key[len("stem."):])
    if key.startswith("head."):
        return "outc.conv." + key[len("head."):]
    match = re.match(r"downs\.(\d+)\.block\.(.*)", key)
    if match:
        return f"down{int(match.group(1)) + 1}.maxpool_conv.1." + block(match.group(2))
    match = re.match(r"ups\.(\d+)\.(up|block)\.(.*)", key)
    if match:
        index = int(match.group(1)) + 1
        if match.group(2) == "up":
            return f"up{index}.up.{match.group(3)}"
        return f"up{index}.conv." + block(match.group(3))
    return key


def reference_layout(state: Mapping[str, Tensor]) -> Dict[str, int]:
    """What a reference state_dict holds: levels, in_channels, base_width, num_classes (those it shows)."""
    bare = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state.items()}
    downs = [int(m.group(1)) for k in bare for m in [re.match(r"down(\d+)\.", k)] if m]
    layout = {"levels": 1 + max(downs, default=0)}
    first = bare.get("inc.dwconv1.pointwise.weight")
    if isinstance(first, Tensor) and first.dim() == 4:
        layout["base_width"], layout["in_channels"] = int(first.shape[0]), int(first.shape[1])
    head = bare.get("outc.conv.weight")
    if isinstance(head, Tensor) and head.dim() >= 1:
        layout["num_classes"] = int(head.shape[0])
    return layout


def _some(keys: list, limit: int = 5) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def _mismatch_message(model: nn.Module, source, state, missing, unexpected, mismatched) -> str:
    """A short account, in the file's key names, with the variant whose layout fits the file."""
    from .dlkunet import DEPTHS

    config = getattr(model, "config", {})
    ours = dict(levels=config.get("depth", len(model.downs) + 1), base_width=config.get("base_width"),
                in_channels=config.get("in_channels"), num_classes=getattr(model, "num_classes", None))
    theirs = reference_layout(state)
    name = f"reference checkpoint {source}" if isinstance(source, (str, os.PathLike)) else "reference state_dict"
    variant = {depth: letter for letter, depth in DEPTHS.items()}
    own_name = f"DLKUNet{variant.get(ours['levels'], '')}"
    lines = [f"{name} does not fit {own_name} ({ours['levels']} levels, C={ours['base_width']}, "
             f"{ours['in_channels']} input channel(s), {ours['num_classes']} classes)"]
    described = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in theirs.items())
    differs = {k: v for k, v in theirs.items() if ours.get(k) is not None and ours[k] != v}
    if differs:
        fits = variant.get(theirs["levels"])
        build = ", ".join(f"{k}={theirs[k]}" for k in ("in_channels", "num_classes", "base_width") if k in theirs)
        lines.append(f"the file holds {described}: "
                     + (f"build DLKUNet{fits}({build})" if fits else "no DLKUNet variant has that depth"))
    if unexpected:
        lines.append(f"in the file but not in the model ({len(unexpected)}): {_some(unexpected)}")
    if missing:
        lines.append(f"in the model but not in the file ({len(missing)}): {_some(missing)}")
    if mismatched:
        lines.append(f"shape mismatches ({len(mismatched)}): {_some(mismatched, 3)}")
    return "\n  ".join(lines)


class ReferenceCheckpointError(RuntimeError, ValueError):
    """A reference checkpoint does not fit the model (a RuntimeError, as load_state_dict raises)."""


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

    Returns ``{"missing": [...], "unexpected": [...], "mismatched": [...]}``, every key named as the
    reference names it (``missing``: what the model needs and the file lacks).  With ``strict`` any
    mismatch raises :class:`ReferenceCheckpointError` (a ``RuntimeError``) that names a few keys of
    each kind, and, when the file's depth, width or class count differs from the model's, the
    DLKUNet variant and arguments that fit the file.
    """
    if isinstance(source, (str, os.PathLike)):
        from ..checkpointing import torch_load_weights

        if not os.path.exists(source):
            raise FileNotFoundError(f"checkpoint not found: {source}")
        state = torch_load_weights(source, what="reference checkpoint")
    else:
        state = source
    if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ReferenceCheckpointError(f"{source if isinstance(source, (str, os.PathLike)) else 'source'}: "
                                       "not a state_dict of tensors")
    converted, unknown = convert_reference_state_dict(state, len(model.downs) + 1)
    original = {}
    for key in state:
        bare = key[len("module."):] if key.startswith("module.") else key
        try:
            original[convert_key(bare, 0)] = key
        except KeyError:
            pass
    own = model.state_dict()
    unexpected = unknown + [original[k] for k in converted if k not in own]
    missing = [reference_key(k) for k in own if k not in converted]
    mismatched = [f"{original[k]}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                  for k, v in converted.items() if k in own and own[k].shape != v.shape]
    if strict and (missing or unexpected or mismatched):
        raise ReferenceCheckpointError(_mismatch_message(model, source, state, missing, unexpected, mismatched))
    loadable = {k: v for k, v in converted.items() if k in own and own[k].shape == v.shape}
    model.load_state_dict(loadable, strict=False)
    return {"missing": missing, "unexpected": unexpected, "mismatched": mismatched}
