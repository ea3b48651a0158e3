"""Shared plumbing for Hydra entry points: typed-config validation errors become one line on stderr,
before any computation, and leave no results behind."""

from __future__ import annotations

import functools
import logging
import shutil
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A configuration value that is not allowed. The message names the key and what is allowed."""


def require(condition: bool, key: str, allowed: str, got: Any) -> None:
    """Raise ConfigError('<key>: expected <allowed>, got <got>') unless `condition` holds."""
    if not condition:
        raise ConfigError(f"{key}: expected {allowed}, got {got!r}")


def require_choice(key: str, value: Any, choices: Iterable[Any]) -> None:
    choices = list(choices)
    require(value in choices, key, "one of " + ", ".join(map(str, choices)), value)


def progress(msg: str) -> None:
    """A progress line: through logging when a Hydra job configured it (console *and* the job's log file),
    else straight to stdout."""
    if logging.getLogger().handlers:
        logging.getLogger("opd").info(msg)
    else:
        print(msg, flush=True)


def output_dir() -> Path:
    """This Hydra job's output directory (hydra.job.chdir is off, so cwd is not it)."""
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().runtime.output_dir)


def _discard_empty_job_dir(path: Path) -> None:
    """Remove a job directory that holds only what Hydra wrote before the job ran (.hydra/, the log)."""
    if not path.is_dir():
        return
    own = {p.name for p in path.iterdir()}
    if own <= {".hydra", path.name + ".log", "main.log"} | {p for p in own if p.endswith(".log")}:
        shutil.rmtree(path, ignore_errors=True)


def entry_point(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a Hydra task function: a ConfigError prints `error: <message>` and exits with status 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ConfigError as err:
            try:
                _discard_empty_job_dir(output_dir())
            except Exception:  # outside a Hydra run there is no job directory to clean
                pass
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)

    return wrapper


CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def experiment_presets(entry: str, conf_dir: Path = CONF_DIR) -> list[str]:
    """conf/experiment options for entry point `entry` ("opd", "multitask", ...): a preset names its entry
    point in a `# entry: experiments.<name>` line; presets without one belong to experiments.opd."""
    out = []
    for path in sorted((conf_dir / "experiment").glob("*.yaml")):
        marks = [ln.split(":", 1)[1].strip() for ln in path.read_text().splitlines() if ln.startswith("# entry:")]
        if (marks[0] if marks else "experiments.opd") == f"experiments.{entry}":
            out.append(path.stem)
    return out


def check_group_choices(argv: list[str], groups: dict[str, str], entry: str, conf_dir: Path = CONF_DIR) -> None:
    """Refuse an unknown option of a config group (`loss=nope`), or an experiment preset of another entry
    point, with one ConfigError line before Hydra composes (whose own report is many lines, exit status 1).

    groups: command-line key -> conf/ directory, e.g. {"loss": "loss", "model@student": "model"}."""
    for arg in argv:
        key, sep, value = arg.lstrip("+~").partition("=")
        if not sep or key not in groups or value in ("", "null"):
            continue
        if groups[key] == "experiment":
            options = experiment_presets(entry, conf_dir)
        else:
            options = sorted(p.stem for p in (conf_dir / groups[key]).glob("*.yaml"))
        for choice in value.split(","):
            if choice not in options and not choice.startswith(("glob(", "range(")):
                raise ConfigError(f"{key}: expected one of {', '.join(options)} (for experiments.{entry}), "
                                  f"got {choice!r}")


def run_main(main: Callable[[], Any], groups: dict[str, str], entry: str) -> None:
    """`python -m experiments.<entry>`: check the group choices on the command line, then run Hydra."""
    try:
        check_group_choices(sys.argv[1:], groups, entry)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    main()
