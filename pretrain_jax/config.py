"""Gin configuration: where configs live, parsing them with clear errors, reading bindings.

Imports nothing of ours beyond `errors` (no JAX, models or data), so it stays cheap to import;
whoever parses gin first imports the modules that register its configurables
(`pretrain_jax.registry` imports them all).
"""

from __future__ import annotations

import difflib
import inspect
import logging
import os
import re
import sys

import gin
from absl import logging as absl_logging

from pretrain_jax.errors import UserError

GIN_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "gin_configs")


def configure(gin_files: list[str], bindings: list[str]) -> None:
  """Parses gin files (here or in gin_configs/) and NAME=VALUE bindings; UserError if bad.

  The configurables must already be registered (import `pretrain_jax.registry`).
  """
  absl_logging.set_verbosity(absl_logging.ERROR)  # seqio warns about uncached sources
  # Includes resolve in gin_configs/ first. gin has no public way to put a search path before
  # the working directory, and its package-path reader crashes when the working directory
  # holds a folder named like an include's ('runs/' from a training run, say).
  if GIN_DIR not in gin.config._LOCATION_PREFIXES:  # pylint: disable=protected-access
    gin.config._LOCATION_PREFIXES.insert(0, GIN_DIR)  # pylint: disable=protected-access
  resolved = []
  for f in gin_files:
    path = f if os.path.exists(f) else os.path.join(GIN_DIR, f)
    if not os.path.exists(path):
      raise UserError(f"--gin_file={f}: no such file (looked here and in {GIN_DIR})")
    resolved.append(path)
  root = logging.getLogger()
  level = root.level
  root.setLevel(logging.CRITICAL)  # gin logs every search-path miss of an include as an error
  try:
    gin.parse_config_files_and_bindings(resolved, bindings, finalize_config=False)
  except ImportError as e:  # an `import` statement in a gin file (gin adds where it stands)
    raise UserError(_import_failure(e)) from None
  except (ValueError, KeyError, SyntaxError, IOError, TypeError) as e:
    message = " ".join(str(e).split("\n")[0].split())
    raise UserError(f"gin: {message}{_suggestion(message)}") from None
  finally:
    root.setLevel(level)


def _import_failure(e: ImportError) -> str:
  """One line for a gin file's failing `import`: the statement, its file and line, the reason."""
  lines = str(e).split("\n")
  where = re.search(r'In file "([^"]+)", line (\d+)', str(e))
  statement = next((l.strip() for l in lines[1:] if l.strip().startswith(("import ", "from "))),
                   f"import {e.name}" if e.name else "an import")
  place = f"{where.group(1)}:{where.group(2)}" if where else "a gin file"
  reason = " ".join(lines[0].split()) or type(e).__name__
  return (f"gin: `{statement}` in {place} failed: {reason}; install that module or remove "
          "the import (pretrain_jax's own configurables need none)")


def bound(name: str, default=None):
  """The value bound to `name` ("train.task"); `@f()` references are evaluated, `@f` returned."""
  try:
    value = gin.query_parameter(name)
  except ValueError:
    return default
  if isinstance(value, gin.config.ConfigurableReference):
    fn = value.scoped_configurable_fn
    return fn() if value.evaluate else fn
  return value


def _suggestion(message: str) -> str:
  """' Did you mean ...?' for a misspelt configurable or parameter in a gin error message, or
  the import that registers ours when none is."""
  if "No configurable matching" in message and "pretrain_jax.registry" not in sys.modules:
    return " (import pretrain_jax.registry first: it registers our configurables)"
  registry = gin.config._REGISTRY  # pylint: disable=protected-access
  if m := re.search(r"Configurable '([\w.]+)' doesn't have a parameter named '(\w+)'", message):
    try:
      choices = list(inspect.signature(registry.get_match(m.group(1)).wrapped).parameters)
    except Exception:  # pylint: disable=broad-except
      return ""
    wrong = m.group(2)
  elif m := re.search(r"No configurable matching '([\w.]+)'", message):
    choices = sorted({sel.rsplit(".", 1)[-1] for sel, _ in registry.items()})
    wrong = m.group(1).rsplit(".", 1)[-1]
  else:
    return ""
  close = difflib.get_close_matches(wrong, choices, n=3)
  return f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
