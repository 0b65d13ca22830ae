"""`--init-from`: start a run from saved weights, torchvision's ``alexnet`` file or a fastalex
checkpoint, instead of a fresh initialisation.

Imports torch and errors.py only. The file's state_dict must match the model key for key and shape
for shape (the ``module.`` prefix of a DDP save and ``_orig_mod.`` of a compiled one are dropped),
except the head (the model's last two state_dict entries, fc8 / ``classifier.6``): when only its
class count differs it keeps its fresh initialisation, and the returned note says so. Anything
else is a one-line UserError listing the keys and shapes. Why fine-tune: docs/training.md.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import nn

from fastalex.errors import UserError

PREFIXES = ("module.", "_orig_mod.")  # DDP's and torch.compile's wrappers
SHOWN = 4  # mismatches named in the error line


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a state_dict file or of a fastalex checkpoint's ``model``, unwrapped."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"--init-from {path}: no such file") from None
    except Exception as e:  # pickle, zip and torch's own errors: not a weights file
        raise UserError(f"--init-from {path}: not a torch state_dict file ({e})") from None
    if isinstance(saved, dict) and isinstance(saved.get("model"), dict) and "config" in saved:
        saved = saved["model"]
    if not isinstance(saved, dict) or not all(isinstance(v, torch.Tensor) for v in saved.values()):
        raise UserError(f"--init-from {path}: holds no state_dict (a dict of tensors)")
    state = {}
    for key, value in saved.items():
        for prefix in PREFIXES:
            key = key.removeprefix(prefix)
        state[key] = value
    return state


def load_initial_weights(model: nn.Module, path: str | Path) -> str:
    """Copy the weights in `path` into `model` (in place); returns the line to log."""
    theirs = read_state_dict(path)
    ours = model.state_dict()
    head = list(ours)[-2:]
    problems = [f"missing {k} {tuple(ours[k].shape)}" for k in ours if k not in theirs]
    problems += [f"unexpected {k} {tuple(v.shape)}" for k, v in theirs.items() if k not in ours]
    reinit = False
    for key in ours:
        if key not in theirs or theirs[key].shape == ours[key].shape:
            continue
        if key in head and theirs[key].shape[1:] == ours[key].shape[1:]:
            reinit = True  # the class count differs: the head keeps its fresh initialisation
        else:
            problems.append(
                f"{key} {tuple(theirs[key].shape)} in the file, {tuple(ours[key].shape)} here"
            )
    if problems:
        more = f" (and {len(problems) - SHOWN} more)" if len(problems) > SHOWN else ""
        raise UserError(
            f"--init-from {path}: does not fit this --arch: {'; '.join(problems[:SHOWN])}{more}"
        )
    keep = head if reinit else []
    with torch.no_grad():
        for key, value in ours.items():
            if key not in keep:
                value.copy_(theirs[key])
    digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()[:12]
    note = f"initialised from {path} (sha256 {digest}…)"
    if reinit:
        there, here = theirs[head[0]].shape[0], ours[head[0]].shape[0]
        note += f"; head {', '.join(head)} re-initialised: {there} classes there, {here} here"
    return note
