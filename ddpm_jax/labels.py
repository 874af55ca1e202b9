"""Class labels of class-conditional sampling: the label modes, the one rule for labels and
classifier-free guidance, and the class of each sample. NumPy only, no I/O.

Modes: 'none' draws with the null label (the unconditional model that label dropout trained);
'balanced' gives sample n class n mod N. The command line of sample.py also takes a
comma-separated list of classes, cycled over the samples.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from absl import logging

from ddpm_jax.spec import finite_scale

LABEL_MODES = ("none", "balanced")  # class-conditional evaluation / grids: null label, n mod N
DEPRECATED_ALIASES = {"all": "balanced"}  # sample.py's old word for n mod N
UNKNOWN = object()  # num_classes not known yet (no model loaded)


def check_labels_and_guidance(labels: Any, guidance: float | None,
                              num_classes: int | None | object = UNKNOWN, *,
                              labels_name: str = "labels", guidance_name: str = "guidance",
                              class_lists: bool = False) -> None:
    """Raises ValueError, naming the fields as the caller's user writes them, unless:
    guidance is None or a weight >= 0; guidance comes with labels (not None / 'none');
    labels other than None / 'none' have a class-conditional model (num_classes not None;
    UNKNOWN skips that check). class_lists: the labels may also be a list of classes."""
    has_labels = labels is not None and labels != "none"
    finite_scale(guidance_name, guidance)
    if guidance is not None and not has_labels:
        raise ValueError(
                f"{guidance_name}={guidance!r} needs {labels_name}: guidance steers each sample "
                f"towards its class, so set {labels_name}='balanced' (class n mod N)"
                f"{' or a list of classes' if class_lists else ''}, or leave {guidance_name} unset.")
    if has_labels and num_classes is None:
        raise ValueError(f"{labels_name}={labels!r} needs a class-conditional model, and this "
                         "model is unconditional (trained without model.num_classes): train with "
                         f"model.num_classes set, or use {labels_name}='none'.")


def canonical_mode(text: str, name: str = "labels") -> str:
    """The label text with a deprecated alias ('all') replaced by its mode (a warning logged)."""
    text = text.strip()
    if text in DEPRECATED_ALIASES:
        logging.warning("%s=%s is deprecated: write %s=%s (the same: sample n of class n mod N).",
                        name, text, name, DEPRECATED_ALIASES[text])
        return DEPRECATED_ALIASES[text]
    return text


def parse_labels(text: str) -> list[int]:
    """'3,1,4' -> [3, 1, 4] (no range check: that needs the model)."""
    try:
        labels = [int(v) for v in text.split(",")]
    except ValueError:
        raise ValueError("write 'balanced', 'none' or comma-separated class numbers, e.g. "
                         "'0,1,2'.") from None
    if min(labels) < 0:
        raise ValueError("class numbers are >= 0.")
    return labels


def balanced(num_classes: int, num_samples: int) -> np.ndarray:
    """[num_samples] int32: sample n of class n mod num_classes."""
    return np.arange(num_samples, dtype=np.int32) % num_classes


def check_label_text(text: str | None, name: str = "labels") -> str | list[int] | None:
    """A command line's label text, parsed before any model loads: None (the null label, also
    for 'none'), 'balanced' ('all': its deprecated alias) or a list of classes. ValueError
    naming `name` for a list that does not parse."""
    if text is None or text.strip() == "none":
        return None
    mode = canonical_mode(text, name)
    if mode == "balanced":
        return mode
    try:
        return parse_labels(mode)
    except ValueError as e:
        raise ValueError(f"{name}={text}: {e}") from None


def sample_labels(classes: str | list[int] | None, num_classes: int | None, num_samples: int, *,
                  name: str = "labels") -> np.ndarray | None:
    """The class of each sample ([num_samples] int32), or None for the null label.

    classes: as `check_label_text` returns: None, 'balanced' (n mod N) or a list of classes,
    cycled over the samples. ValueError (naming `name`) for labels on an unconditional model
    or classes the model lacks.
    """
    if classes is None:
        return None
    shown = classes if isinstance(classes, str) else ",".join(map(str, classes))
    check_labels_and_guidance(shown, None, num_classes, labels_name=name, class_lists=True)
    if classes == "balanced":
        return balanced(num_classes, num_samples)
    if max(classes) >= num_classes:
        raise ValueError(f"{name}={shown}: this model has classes 0..{num_classes - 1}.")
    return np.resize(np.asarray(classes, dtype=np.int32), num_samples)
