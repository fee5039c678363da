"""State-dict key names of the adapter sites: the base module's tensors keep the base model's key names
(``<site>.weight``, not ``<site>.base.weight``), and base-model checkpoints load into an adapted model."""
from __future__ import annotations


def _state_dict_post_hook(module, state_dict, prefix, local_metadata) -> None:
    """``<prefix>base.<key>`` -> ``<prefix><key>``; this module's entries are the last ones (order kept)."""
    mine = []
    for k in reversed(state_dict):
        if not k.startswith(prefix):
            break
        mine.append(k)
    base_p = prefix + "base."
    for k in reversed(mine):
        v = state_dict.pop(k)
        state_dict[prefix + k[len(base_p):] if k.startswith(base_p) else k] = v


def _load_state_dict_pre_hook(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
    """Base-model key names (and the ``.base.`` names of earlier versions) load into ``.base``."""
    own = module._own_children
    for k in list(state_dict):
        if not k.startswith(prefix):
            continue
        rest = k[len(prefix):]
        head = rest.split(".", 1)[0]
        if head == "base" or head in own:
            continue
        state_dict[prefix + "base." + rest] = state_dict.pop(k)
