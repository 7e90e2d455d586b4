"""Typed flag values: argparse ``type`` callables that accept only what a setting allows, and the parser whose errors
are one line (``error: <flag>: <what is wrong>; <what is allowed>``)."""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Callable
from typing import Any

from ..errors import ConfigError

# Flags that were given other names or replaced, and what a command line that still has them should use.
REPLACED_FLAGS = {
    "--cm_diversity": "--cm_form",
    "--allow_unstable_cm": "--allow_unbounded_cm",
    "--cm_max_distance": "--cm_form (a bounded form: hinge, hinge_general, relative, band)",
    "--validation_images_per_class": "--num_validation_images",
    "--validation_steps": "--validation_epochs (a grid every N epochs)",
}


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one line, ``error: --flag: ...`` (no usage block), exit status 2.

    While a recipe is read, errors raise ``ConfigError`` naming the recipe file and key instead.
    """

    recipe_context: str | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # A prefix of a flag is refused, not guessed: `--cm_diversity paper` must not mean --cm_diversity_weight.
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)
        self.cm_only: set[str] = set()
        """The flags (dests) that do nothing without CM: set where they are defined, warned about when given with
        --no_capacity_manipulation."""
        self.script_defaults: dict[str, Any] = {}
        """Each flag's default as the script defines it, kept when a recipe (``--config``) replaces the defaults."""

    def script_default(self, dest: str) -> Any:
        """The script's own default for `dest`: a value that differs was given, on the command line or in a recipe."""
        return self.script_defaults.get(dest, self.get_default(dest))

    def error(self, message: str) -> None:  # type: ignore[override]
        message = message.removeprefix("argument ")
        if message.startswith("unrecognized arguments: "):
            replaced = [flag for flag in message.split()[2:] if flag.split("=")[0] in REPLACED_FLAGS]
            if replaced:
                flag = replaced[0].split("=")[0]
                message = f"{flag}: replaced by {REPLACED_FLAGS[flag]}; allowed: {REPLACED_FLAGS[flag]}"
        if self.recipe_context is not None:
            raise ConfigError(f"{self.recipe_context}: {message}")
        self.exit(2, f"error: {message}\n")


def _value(kind: type, check: Callable[[Any], bool], allowed: str) -> Callable[[str], Any]:
    """An argparse ``type`` that converts with `kind` and accepts only values passing `check`."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"got {text!r}; allowed: {allowed}") from None
        if not check(value):
            raise argparse.ArgumentTypeError(f"got {text!r}; allowed: {allowed}")
        return value

    parse.__name__ = allowed
    return parse


positive_int = _value(int, lambda v: v >= 1, "an integer >= 1")
nonnegative_int = _value(int, lambda v: v >= 0, "an integer >= 0")
positive_float = _value(float, lambda v: math.isfinite(v) and v > 0, "a finite number > 0")
nonnegative_float = _value(float, lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0")
probability = _value(float, lambda v: 0 <= v < 1, "a number in [0, 1)")
open_unit = _value(float, lambda v: 0 < v < 1, "a number in (0, 1)")
fraction = _value(float, lambda v: 0 < v <= 1, "a number in (0, 1]")
ratio = _value(float, lambda v: math.isfinite(v) and v >= 1, "a finite number >= 1")
# RMS gaps are in units of the unit-variance noise: beyond 10 a margin only makes the loss overflow.
margin_value = _value(float, lambda v: 0 < v <= 10, "a number in (0, 10]")


def device_value(text: str) -> str:
    """An argparse ``type`` for ``--device``: cpu, or cuda / cuda:N where CUDA is available here."""
    import torch

    if text == "cpu":
        return text
    if re.fullmatch(r"cuda(:\d+)?", text):
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"got {text!r}, but no CUDA device is available here; allowed: cpu")
        return text
    raise argparse.ArgumentTypeError(f"got {text!r}; allowed: cpu, cuda or cuda:N")


def module_patterns(text: str) -> str:
    """An argparse ``type`` for layer selections: comma-separated names (suffixes), or one regex that compiles."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"got {text!r}; allowed: comma-separated layer names or one regex")
    for name in names:
        try:
            re.compile(name)
        except re.error as err:
            raise argparse.ArgumentTypeError(
                f"got {text!r}: {name!r} is not a valid regex ({err}); allowed: comma-separated layer names or one "
                "regex"
            ) from None
    return text


def prompt_template_value(text: str) -> str:
    """An argparse ``type`` for class prompt templates: exactly one ``{}``, where the class name goes."""
    import string

    try:
        fields = [field for _, field, _, _ in string.Formatter().parse(text) if field is not None]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"got {text!r}: {err}; allowed: a text with one {{}}") from None
    if fields != [""]:
        raise argparse.ArgumentTypeError(
            f"got {text!r} with {len(fields)} fields {fields}; allowed: a text with exactly one {{}} for the class "
            "name (write {{ and }} for literal braces)"
        )
    return text


# numpy's seeds (the long-tail subsampling, derived seeds) are 32-bit; torch's accept more, the rule is one for all.
seed_value = _value(int, lambda v: 0 <= v < 2**32, "an integer in [0, 4294967295]")


def add_underscore_negation(group: argparse._ActionsContainer, flag: str) -> None:
    """argparse spells the negation of a BooleanOptionalAction ``--x_y`` as ``--no-x_y``; accept ``--no_x_y`` too,
    the spelling of every other flag here."""
    group.add_argument(
        f"--no_{flag}", dest=flag, action="store_false", default=argparse.SUPPRESS, help=argparse.SUPPRESS
    )
