"""Warnings from dependencies that we understand and that tell a user nothing, silenced by their exact message;
every other warning stays visible.

:func:`silence_known_warnings` is called by ``main.py`` (:func:`ldm.train.main`) and the demo.
"""
from __future__ import annotations

import warnings

KNOWN_WARNINGS: tuple[tuple[str, str], ...] = (
    # pytorch_lightning's own pytree helper uses a torch API that torch has deprecated: nothing to change here
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", "Lightning calls a torch API that torch deprecated"),
    # the frozen first stage and condition encoder of stage two are in eval mode on purpose (first_stage.freeze)
    (r"Found \d+ module\(s\) in eval mode at the start of training", "frozen stage-two submodules are in eval mode"),
)


def silence_known_warnings() -> None:
    """Ignores the warnings of :data:`KNOWN_WARNINGS` (message regex, reason) in this process."""
    for message, _reason in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message)
