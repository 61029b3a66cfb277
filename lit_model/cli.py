"""Run a typed script function as a command line (jsonargparse), with the habits users expect of one.

`script_main(fn, **defaults)` is jsonargparse's `CLI(fn, as_positional=False, set_defaults=defaults)` plus:
  - no prefix matching: `--dropbp.rat 0.5` is an error, not `--dropbp.rate 0.5` (argparse's `allow_abbrev`, which
    jsonargparse 4.x still enables, warning that 5.0 turns it off);
  - a short error for a mistyped option, "unknown option --dropbp.rat; did you mean --dropbp.rate?", instead of the
    whole usage text; exit status 2 for usage errors (argparse's convention);
  - user errors raised by the run (ValueError, FileNotFoundError, FileExistsError, PermissionError and every
    exception type defined in lit_model) as one message without a traceback, exit status 1. `--debug` (unless the
    function has a `debug` argument of its own) or LIT_DEBUG=1 shows the traceback instead. Torch's advice to load
    files with weights_only=False is removed from any message shown (lit_model.errors);
  - negative numbers in any notation as values: `--train.learning_rate -1e-3` (argparse takes "-1e-3" for an option);
  - a run's own `hyperparameters.yaml` accepted as `--config`: the keys the run added (mode, metrics) or that are no
    longer arguments are dropped, with a note, and only then does jsonargparse see the file.
It keeps `torch.set_float32_matmul_precision("high")` (TF32 matmuls on GPUs that have them) and flushes stdout at the
end, as the scripts' entry point always did.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import os
import re
import sys
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from lit_model.errors import strip_unsafe_advice

DEBUG_ENV = "LIT_DEBUG"
USAGE_ERROR, FAILURE = 2, 1  # exit statuses
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, PermissionError, NotADirectoryError, IsADirectoryError)
# Any number argparse should take as a value, not as an option: -1, -0.5, -.5, -1e-3, -1.5E+2, -inf.
NEGATIVE_NUMBER = re.compile(r"^-(?:\d+\.?\d*(?:[eE][-+]?\d+)?|\.\d+(?:[eE][-+]?\d+)?|inf|infinity|nan)$", re.I)


def script_main(fn: Callable[..., Any], **defaults: Any) -> Any:
    """Parse `sys.argv` into `fn`'s arguments, call it and return what it returns (see the module docstring).

    `defaults` override the function's own defaults (e.g. `out_dir` of a wrapper script). Exits with status 2 on a
    usage error and 1 on a user error raised by `fn`; other exceptions (bugs) propagate with their traceback.
    """
    from jsonargparse import CLI

    argv = sys.argv[1:]
    debug = os.environ.get(DEBUG_ENV, "").strip().lower() in ("1", "true", "yes", "on")
    if "--debug" in argv and "debug" not in inspect.signature(fn).parameters:
        argv = [a for a in argv if a != "--debug"]
        debug = True
    argv = filter_config_arguments(argv, fn)
    torch.set_float32_matmul_precision("high")
    try:
        result = CLI(fn, args=argv, as_positional=False, set_defaults=defaults or None,
                     parser_class=_parser_class(debug), allow_abbrev=False)
    except Exception as err:
        if debug or not is_user_error(err):
            raise
        sys.stdout.flush()
        print(f"error: {user_message(err)}", file=sys.stderr)
        print(f"(run with --debug or {DEBUG_ENV}=1 for the traceback)", file=sys.stderr)
        raise SystemExit(FAILURE) from None
    sys.stdout.flush()
    return result


def is_user_error(err: BaseException) -> bool:
    """Whether `err` is one a user caused and can fix (bad input, a missing file), rather than a bug."""
    return isinstance(err, USER_ERRORS) or any(
        klass.__module__.split(".")[0] == "lit_model" for klass in type(err).__mro__
    )


def user_message(err: BaseException) -> str:
    """The text of a user error as shown: its message, without torch's unsafe loading advice."""
    if isinstance(err, OSError) and err.strerror and err.filename:  # FileNotFoundError(errno, text, name)
        text = f"{err.strerror}: {err.filename}"
    else:
        text = str(err)
    return strip_unsafe_advice(text) or type(err).__name__


# ---- --config files -------------------------------------------------------------------------------------------------


def filter_config_arguments(argv: list[str], fn: Callable[..., Any]) -> list[str]:
    """`argv` with each `--config FILE` that holds keys `fn` does not take replaced by the file's text without them.

    A run's hyperparameters.yaml records the arguments and then some (mode, metrics); an older run's may hold
    arguments since renamed. jsonargparse refuses any unknown key, so they are dropped first, with a note on stderr.
    Nested keys are checked for dataclass arguments (`train:`, `data:` ...). Anything that is not a readable YAML
    mapping is left for jsonargparse to report.
    """
    out = list(argv)
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            index, value, prefix = i + 1, argv[i + 1], ""
        elif arg.startswith("--config="):
            index, value, prefix = i, arg.removeprefix("--config="), "--config="
        else:
            continue
        filtered = _filtered_config(value, fn)
        if filtered is not None:
            out[index] = prefix + filtered
    return out


def _filtered_config(value: str, fn: Callable[..., Any]) -> Optional[str]:
    """The YAML text of config `value` (a path or inline YAML) without keys `fn` does not take; None if none."""
    import yaml

    path = Path(value)
    try:
        text = path.read_text(encoding="utf-8") if path.is_file() else value
        data = yaml.safe_load(text)
    except (OSError, UnicodeDecodeError, yaml.YAMLError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    accepted = _accepted_keys(fn)
    dropped: list[str] = []
    kept: dict[str, Any] = {}
    for key, item in data.items():
        if key not in accepted:
            dropped.append(str(key))
            continue
        fields = accepted[key]
        if fields is not None and isinstance(item, dict):
            unknown = [k for k in item if k not in fields]
            dropped += [f"{key}.{k}" for k in unknown]
            item = {k: v for k, v in item.items() if k not in unknown}
        kept[key] = item
    if not dropped:
        return None
    source = str(path) if path.is_file() else "--config"
    print(f"note: ignoring keys of {source} that are not arguments of {getattr(fn, '__name__', 'the script')}: "
          f"{', '.join(dropped)}", file=sys.stderr)
    return yaml.safe_dump(kept, sort_keys=False)


def _accepted_keys(fn: Callable[..., Any]) -> dict[str, Optional[set[str]]]:
    """`fn`'s argument names -> the field names of a dataclass argument (None for other arguments)."""
    import typing

    try:
        hints = typing.get_type_hints(fn)
    except Exception:  # unresolvable annotations: fall back to the defaults' types
        hints = {}
    accepted: dict[str, Optional[set[str]]] = {"config": None}
    for name, parameter in inspect.signature(fn).parameters.items():
        candidates = [hints.get(name), *typing.get_args(hints.get(name)), type(parameter.default)]
        klass = next((c for c in candidates if isinstance(c, type) and dataclasses.is_dataclass(c)), None)
        accepted[name] = {f.name for f in dataclasses.fields(klass)} if klass is not None else None
    return accepted


# ---- the parser -----------------------------------------------------------------------------------------------------


def _parser_class(debug: bool) -> type:
    """jsonargparse's ArgumentParser with short usage errors and negative numbers as values (module docstring)."""
    from jsonargparse import ArgumentParser

    class ScriptParser(ArgumentParser):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._negative_number_matcher = NEGATIVE_NUMBER  # argparse's own misses -1e-3

        def error(self, message: str, ex: Optional[Exception] = None) -> Any:
            if not self.exit_on_error or debug:  # jsonargparse's internal parsers raise; --debug: full usage text
                return super().error(message, ex)
            sys.stdout.flush()
            print(f"error: {usage_message(message, _option_strings(self))}", file=sys.stderr)
            print(f"Run `{Path(sys.argv[0]).name} --help` for the options.", file=sys.stderr)
            raise SystemExit(USAGE_ERROR)

    return ScriptParser


def _option_strings(parser: Any) -> list[str]:
    return [s for action in parser._actions for s in action.option_strings if s.startswith("--")]


def usage_message(message: str, options: list[str]) -> str:
    """jsonargparse's error text made short: unknown options with the closest known ones, keys as options."""
    unknown = re.match(r"^unrecognized arguments: (.*)$", message.strip(), re.S)
    if unknown:
        parts = []
        for token in unknown.group(1).split():
            if not token.startswith("-"):
                continue
            name = token.split("=", 1)[0]
            close = difflib.get_close_matches(name, options, n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]}?" if close else ""
            parts.append(f"unknown option {name}{hint}")
        if parts:
            return "\n".join(parts)
        return f"unexpected argument(s) {unknown.group(1)}: every argument is given as --name value"
    message = re.sub(r'Parser key "([^"]+)":\s*', r"--\1: ", message)
    message = re.sub(r"Expected a <class '(\w+)'>\.? Got value: (.*)",
                     lambda m: f"expected {_KINDS.get(m.group(1), m.group(1))}, got {m.group(2)!r}", message)
    message = re.sub(r"<class '(\w+)'>", r"\1", message)
    return message.strip()


_KINDS = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string"}
