"""The training scripts' command line, one role per module (YAML recipes, read by the same parser, are in
``recipes.py``):

* ``values.py``: typed flag values and the parser whose errors are one line;
* ``definitions.py``: the flags both scripts share, by group, and ``script_parser``;
* ``checks.py``: parsed flags to typed settings, and the checks that run before any work.

Every bad value is one line on stderr, ``error: <flag or file>: <what is wrong>; <what is allowed>``, and a non-zero
exit, before anything is written.
"""

from .checks import check_every_flag_placed, section, training_settings
from .definitions import script_parser
from .values import (
    ArgumentParser,
    device_value,
    fraction,
    module_patterns,
    nonnegative_float,
    positive_float,
    positive_int,
    probability,
    prompt_template_value,
    seed_value,
)

__all__ = [
    "ArgumentParser",
    "check_every_flag_placed",
    "device_value",
    "fraction",
    "module_patterns",
    "nonnegative_float",
    "positive_float",
    "positive_int",
    "probability",
    "prompt_template_value",
    "script_parser",
    "section",
    "seed_value",
    "training_settings",
]
