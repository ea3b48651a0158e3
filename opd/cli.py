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


class RunHaltedError(RuntimeError):
    """A run stopped on purpose mid-way (e.g. a non-finite loss); the message is one line saying where and
    what was kept. The entry point prints it and exits with status 3."""


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


def progress_bar(total: int, *, initial: int = 0, desc: str = ""):
    """A tqdm bar with rate and ETA when stderr is a terminal; disabled (no output) in log files and pipes,
    where the progress lines are the record."""
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="step", disable=not sys.stderr.isatty(),
                dynamic_ncols=True, leave=False)


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


def _in_sweep() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    try:
        return HydraConfig.get().mode == RunMode.MULTIRUN
    except ValueError:  # no Hydra job (a library call)
        return False


def _record_failure(err: BaseException, cfg: Any) -> Path | None:
    """Write `error.txt` (the exception with its traceback, then the resolved config) into the job directory."""
    import traceback

    from omegaconf import OmegaConf

    try:
        path = output_dir() / "error.txt"
    except Exception:  # outside a Hydra run there is no job directory
        return None
    config = OmegaConf.to_yaml(cfg, resolve=False) if cfg is not None else ""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(traceback.format_exception(err)) + "\n# resolved config\n" + config)
    return path


def entry_point(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a Hydra task function.

    A single run: a ConfigError prints `error: <message>` and exits with status 2, leaving no job directory.
    In a sweep (`-m`), one job's failure must not end the sweep: its exception and resolved config go to
    `<job dir>/error.txt`, one `error: job <n>: ...` line goes to stderr, the job returns NaN and the sweep
    goes on; the table and figure commands list such jobs as failed."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Exception as err:
            if _in_sweep():
                from hydra.core.hydra_config import HydraConfig

                path = _record_failure(err, args[0] if args else None)
                first = str(err).splitlines()[0] if str(err) else type(err).__name__
                print(f"error: job {HydraConfig.get().job.num}: {first} ({path})", file=sys.stderr, flush=True)
                return float("nan")
            if isinstance(err, RunHaltedError):
                print(f"error: {err}", file=sys.stderr)
                sys.exit(3)
            if not isinstance(err, ConfigError):
                raise
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
        # `group@package=option` (e.g. model@tasks.arithmetic.teacher=hf) is an option of `group`.
        group = groups.get(key) or (key.split("@", 1)[0] if "@" in key else None)
        if not sep or group is None or value in ("", "null"):
            continue
        if group == "experiment":
            options = experiment_presets(entry, conf_dir)
        else:
            options = sorted(p.stem for p in (conf_dir / group).glob("*.yaml"))
        for choice in value.split(","):
            if choice not in options and not choice.startswith(("glob(", "range(")):
                raise ConfigError(f"{key}: expected one of {', '.join(options)} (for experiments.{entry}), "
                                  f"got {choice!r}")


def sweep_jobs(argv: list[str], config_name: str, conf_dir: Path = CONF_DIR) -> list[list[str]]:
    """The override list of every job a `-m` command line would launch (the basic sweeper's cartesian
    product of command-line sweeps and a preset's `hydra.sweeper.params`), in launch order."""
    from hydra import compose, initialize_config_dir
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from omegaconf import OmegaConf

    overrides = [a for a in argv if not a.startswith("-")]
    with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
        base = [o for o in overrides if "," not in o.partition("=")[2] and "(" not in o.partition("=")[2]]
        cfg = compose(config_name=config_name, overrides=base, return_hydra_config=True)
    params = OmegaConf.to_container(cfg.hydra.sweeper.params) if cfg.hydra.sweeper.get("params") else {}
    swept = {o.partition("=")[0] for o in overrides}
    extra = [f"{k}={v}" for k, v in (params or {}).items() if k not in swept]
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides + extra)
    batches = BasicSweeper.split_arguments(parsed, None)
    return [list(job) for batch in batches for job in batch]


def composition_error(err: Exception) -> ConfigError:
    """Hydra's/OmegaConf's multi-line composition report as one ConfigError line naming the key."""
    import re

    text = " ".join(str(err).split())
    cause = err.__cause__ or err.__context__
    detail = " ".join(str(cause).split()) if cause is not None else text
    key = re.search(r"full_key: (\S+)", text + " " + detail) or re.search(r"override '([^']+)'", text) or \
        re.search(r"Key '([^']+)'", text + " " + detail)
    detail = re.split(r" full_key:| object_type=| To append", detail)[0].strip()
    if "not in struct" in detail or "Could not append to config" in text:
        detail = "not a key of this configuration (the schema is opd/train/config.py; no '+key=' additions)"
    return ConfigError(f"{key.group(1) if key else 'overrides'}: {detail}")


def validate_jobs(argv: list[str], config_name: str, validate: Callable[[Any], Any] | None,
                  conf_dir: Path = CONF_DIR) -> None:
    """Compose and validate every job the command line would run (one, or every job of a `-m` sweep) before
    the first one starts: a ConfigError names the key (and, in a sweep, the job's overrides)."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    sweep = "-m" in argv or "--multirun" in argv
    try:
        jobs = sweep_jobs(argv, config_name, conf_dir) if sweep else [[a for a in argv if not a.startswith("-")]]
        with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
            for num, job in enumerate(jobs):
                try:
                    cfg = compose(config_name=config_name, overrides=job)
                    if validate is not None:
                        validate(cfg)
                except ConfigError as err:
                    if not sweep:
                        raise
                    raise ConfigError(f"{err} (sweep job {num}: {' '.join(job)}; no job was run)") from None
    except (HydraException, OmegaConfBaseException) as err:
        raise composition_error(err) from None


def run_main(main: Callable[[], Any], groups: dict[str, str], entry: str,
             validate: Callable[[Any], Any] | None = None) -> None:
    """`python -m experiments.<entry>`: check the group choices on the command line, compose and validate
    every job (one line, exit status 2, nothing written, on a bad value); then run Hydra."""
    argv = sys.argv[1:]
    try:
        check_group_choices(argv, groups, entry)
        if not any(a in argv for a in ("--cfg", "-c", "--info", "--help", "-h", "--hydra-help")):
            validate_jobs(argv, entry, validate)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    main()
