"""YAML recipes (``--config recipe.yaml``): read with the script's own parser, so every value is type-checked as on
the command line; ``base: other.yaml`` inherits another recipe; command-line flags win."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError
from .flags import ArgumentParser, training_settings
from .settings import TrainingSettings

logger = logging.getLogger("capman_peft")


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, except that a key given twice is an error (YAML would silently keep the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} is given twice", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_recipe(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, tuple[Any, Path]]:
    """A YAML recipe as ``{key: (value, file)}``; ``base: other.yaml`` (relative to the file) is read first and
    overridden by this one."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise ConfigError(f"--config {path}: is a folder; give a YAML recipe file")
    if not path.is_file():
        raise ConfigError(f"--config {path}: no such file; give a YAML recipe")
    try:
        recipe = yaml.load(path.read_text(), Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader)
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        reason = " ".join(str(err).split())
        raise ConfigError(f"--config {path}: not valid YAML ({reason}); write one `flag: value` per line") from None
    if recipe is None:
        recipe = {}
    if not isinstance(recipe, dict):
        raise ConfigError(
            f"--config {path}: the top level is a {type(recipe).__name__}; it must be a mapping of `flag: value`"
        )
    values = {str(key): (value, path) for key, value in recipe.items()}
    base = values.pop("base", None)
    if base is None:
        return values
    if not isinstance(base[0], str):
        raise ConfigError(f"--config {path}: base: must be the file name of another recipe, got {base[0]!r}")
    base_path = path.parent / base[0]
    if base_path.resolve() in (*_seen, path.resolve()):
        raise ConfigError(f"--config {path}: base: {base[0]} makes a cycle of recipes")
    return {**load_recipe(base_path, (*_seen, path.resolve())), **values}


def _recipe_tokens(action: argparse.Action, key: str, value: Any, where: str) -> list[str] | None:
    """The command-line tokens meaning ``key: value`` (None: the value None), so the recipe is parsed exactly as
    the command line would be: ``key: true`` is ``--key``, whatever the key's spelling (``no_use_ema: true`` is
    ``--no_use_ema``), and ``key: false`` its opposite where the flag has one, else nothing."""
    flag = f"--{key}" if f"--{key}" in action.option_strings else action.option_strings[0]
    boolean = isinstance(
        action, (argparse.BooleanOptionalAction, argparse._StoreTrueAction, argparse._StoreFalseAction)
    )
    if boolean:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: {key}: got {value!r}; allowed: true or false (unquoted)")
        if isinstance(action, argparse.BooleanOptionalAction):
            positive, negative = action.option_strings[:2]
            return [
                (positive if flag != negative else negative) if value else (negative if flag != negative else positive)
            ]
        return [flag] if value else []
    if value is None:
        if action.default is not None:
            raise ConfigError(f"{where}: {key}: is empty; give a value")
        return None
    if isinstance(value, bool):
        raise ConfigError(
            f"{where}: {key}: got {str(value).lower()}, which YAML reads from an unquoted yes/no/on/off/true/false; "
            f"allowed: a value for {flag} (quote it if you meant the word)"
        )
    if isinstance(value, (list, dict)):
        raise ConfigError(f"{where}: {key}: got a {type(value).__name__}; allowed: a single value for {flag}")
    return [flag, str(value)]


def recipe_defaults(parser: ArgumentParser, recipe: dict[str, tuple[Any, Path]]) -> dict[str, Any]:
    """Parse a recipe with the script's own parser: every value is type-checked as on the command line."""
    names = {opt.lstrip("-"): action for action in parser._actions for opt in action.option_strings}
    for action in parser._actions:  # a flag's dest (label_dropout for --caption_dropout) names it too
        if action.option_strings:
            names.setdefault(action.dest, action)
    defaults: dict[str, Any] = {}
    for key, (value, path) in recipe.items():
        where = f"--config {path}"
        action = names.get(key)
        if action is None or action.dest in ("help", "config"):
            raise ConfigError(f"{where}: unknown key {key!r}; allowed: the script's flag names without '--'")
        tokens = _recipe_tokens(action, key, value, where)
        if tokens is None:
            defaults[action.dest] = None
            continue
        parser.recipe_context = f"{where}: {key}"
        try:
            parsed = parser.parse_args(tokens)
        finally:
            parser.recipe_context = None
        defaults[action.dest] = getattr(parsed, action.dest)
    return defaults


def parse_with_recipe(parser: ArgumentParser, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Add ``--config recipe.yaml`` to `parser` and parse: the recipe supplies defaults, command-line flags win."""
    parser.add_argument("--config", default=None, help="YAML recipe of flag values; command-line flags win.")
    known, _ = parser.parse_known_args(argv)
    if known.config:
        parser.script_defaults = {action.dest: action.default for action in parser._actions}
        try:
            parser.set_defaults(**recipe_defaults(parser, load_recipe(known.config)))
        except ConfigError as err:
            parser.exit(2, f"error: {err}\n")
    return parser.parse_args(argv)


def parse_settings(
    parser: ArgumentParser, argv: Sequence[str] | None = None
) -> tuple[argparse.Namespace, TrainingSettings]:
    """``--config recipe.yaml`` supplies defaults, flags on the command line override them; then the shared settings
    are built and checked (``training_settings``). Returns the parsed flags too, for the script's own settings."""
    args = parse_with_recipe(parser, argv)
    if args.capacity_manipulation is None:  # the text-to-image script's default: on when fine-tuning
        args.capacity_manipulation = not args.model_config_name_or_path
        if not args.capacity_manipulation:
            logger.info("--model_config_name_or_path: from scratch CM is off unless --capacity_manipulation is given")
    if not args.capacity_manipulation:
        ignored = [
            f"--{action.dest}"
            for action in parser._actions
            if action.dest in parser.cm_only
            and getattr(args, action.dest, action.default) != parser.script_default(action.dest)
        ]
        if ignored:
            logger.warning("--no_capacity_manipulation: %s have no effect without CM", ", ".join(sorted(set(ignored))))
    return args, training_settings(args)
