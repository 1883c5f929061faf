"""Whole-experiment pipelines: `pixgen run PIPELINE.yaml` runs pixgen commands as cached stages.

A pipeline file names its stages; each runs one pixgen command with fixed options (`with`) and
takes other stages' outputs as path options (`from`). Every stage writes one output under the
pipeline root, `<root>/<stage>` (`.zarr` for Zarr assets), and has a key: the hash of its command,
its options and the keys of the stages it reads. `<root>/pipeline.json` records the key of every
finished stage, so a second run skips it, and a changed config changes the keys of that stage and
of everything downstream, and of nothing else.

Each stage runs the real CLI's command in a process of its own, so it is exactly what a user would
type (`pixgen run --dry-run` prints the commands). Those processes are forked from a stage server
(multiprocessing's forkserver) that has imported pixgen once, rather than started afresh: a fresh
interpreter spends 2.5–3.9 s importing torch and the rest, more than many a small stage's work. On a
Dask cluster each stage is a fresh `python -m pixgen` on its worker. A stage is recorded only after
its command exits 0; the commands resume their own half-written assets, so rerunning after a
failure or a kill continues from the stage that stopped.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import multiprocessing
import multiprocessing.connection
import os
import subprocess
import threading
import sys
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, replace
from pathlib import Path

import click
import yaml

from . import PixgenError
from .config import config_hash
from .processes import die_with_parent, die_with_starter
from .stages import STAGES

STATE = "pipeline.json"
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
RESERVED = {"out", "force", "data-root", "help"}  # the pipeline sets these itself
# What the stage server imports once for every stage it forks, besides the CLI: the libraries the
# commands import only where used (scikit-learn's metrics in evaluations, torchattacks there and in
# PGD training, matplotlib in the report), 0.3–1.3 s each that a stage would otherwise spend.
STAGE_SERVER_PRELOAD = ["sklearn.metrics", "torchattacks", "matplotlib.figure", "matplotlib.backends.backend_agg"]
# Python 3.11's forkserver processes poll their exit status unsafely across threads (CPython
# gh-130895): Process.start() polls every running child, and racing a join of one that has just
# ended, it can take that stage's exit code for 255. Starts and joins take turns.
_POLLING = threading.Lock()


@dataclass(frozen=True)
class Stage:
    name: str
    command: str
    options: dict  # CLI option name (without --) → value, or list of values
    inputs: dict  # CLI option name → list of stage names
    key: str = ""

    def output(self, root: Path) -> Path:
        return root / (f"{self.name}.zarr" if STAGES[self.command].output == "zarr" else self.name)


def _commands() -> dict[str, click.Command]:
    return {name: spec.command for name, spec in STAGES.items()}


def _option_names(command: click.Command) -> dict[str, click.Option]:
    names = {}
    for param in command.params:
        if isinstance(param, click.Option):
            for opt in param.opts:
                if opt.startswith("--"):
                    names[opt[2:]] = param
    return names


def _as_list(value) -> list:
    return list(value) if isinstance(value, list) else [value]


def load(path: str | Path) -> list[Stage]:
    """Parse and check a pipeline file; return its stages in run order, keyed."""
    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise PixgenError(f"cannot read pipeline {path}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise PixgenError(f"{path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("stages"), dict) or not doc["stages"]:
        raise PixgenError(f"{path}: a pipeline is a mapping with a non-empty `stages:` mapping of stage name → {{run, with, from}}")
    extra = [k for k in doc if k != "stages" and not str(k).startswith("x-")]
    if extra:
        raise PixgenError(f"{path}: unknown top-level key {extra[0]!r} (a pipeline has `stages:`, and `x-…` keys for YAML anchors)")
    commands = _commands()
    stages = {}
    for name, spec in doc["stages"].items():
        where = f"{path}: stage {name!r}"
        if not isinstance(spec, dict) or set(spec) - {"run", "with", "from", "matrix"}:
            raise PixgenError(f"{where} must be a mapping with keys run, with (options), from (inputs) and matrix (lists of option values)")
        command = spec.get("run")
        if command not in commands:
            raise PixgenError(f"{where}: unknown stage command {command!r}; choose one of {', '.join(sorted(commands))}")
        known = _option_names(commands[command])
        options, inputs = {}, {}
        matrix = {}
        for section, target in (("with", options), ("from", inputs), ("matrix", matrix)):
            given = spec.get(section) or {}
            if not isinstance(given, dict):
                raise PixgenError(f"{where}: `{section}` must be a mapping of option → value")
            for option, value in given.items():
                option = str(option).replace("_", "-")
                if option in RESERVED or option not in known:
                    allowed = ", ".join(sorted(set(known) - RESERVED))
                    raise PixgenError(f"{where}: `pixgen {command}` has no option --{option} a pipeline may set (it takes {allowed})")
                if option in options or option in inputs:
                    raise PixgenError(f"{where}: --{option} is given twice")
                if option in matrix:
                    raise PixgenError(f"{where}: --{option} is given twice")
                if section == "matrix":
                    if not isinstance(value, list) or not value or known[option].multiple or any(isinstance(v, (list, dict)) for v in value):
                        raise PixgenError(f"{where}: matrix --{option} must be a non-empty list of single values, got {value!r}")
                elif isinstance(value, (list, dict)) and not (known[option].multiple or section == "from" and isinstance(value, list)):
                    raise PixgenError(f"{where}: --{option} takes one value, got {value!r}")
                target[option] = _as_list(value) if section == "from" else value
        stages[str(name)] = (Stage(str(name), command, options, inputs), matrix)
    expanded = _expand(stages, path)
    ordered = _keyed(_order(expanded, path))
    for stage in ordered:
        _check_options(stage, expanded, path)
    return ordered


def _expand(raw: dict[str, tuple[Stage, dict]], path: Path) -> dict[str, Stage]:
    """Matrix stages become one stage per combination of their values, named `<stage>.<option>-<value>…`
    and keyed on their own; a family (a matrix stage's members, or the stages expanded from
    reading one) is named by its stage's name. `from` a family gives all its members to an option
    that takes several values, and otherwise expands the reading stage once per member."""
    families: dict[str, list[str]] = {}
    expanded: dict[str, Stage] = {}
    for stage, matrix in _raw_order(raw, path):
        variants = [("", {})]
        for option, values in matrix.items():
            variants = [(f"{suffix}.{option}-{value}", {**chosen, option: value}) for suffix, chosen in variants for value in values]
        variants = [(suffix, chosen, {}) for suffix, chosen in variants]
        multiple = _option_names(_commands()[stage.command])
        for option, names in stage.inputs.items():
            members = [_members(n, families, expanded, stage, option, path) for n in names]
            if multiple[option].multiple:
                variants = [(s, c, {**i, option: [m for group in members for m in group]}) for s, c, i in variants]
            else:  # one value: a family read here makes a family of this stage
                if len(members) != 1:
                    raise PixgenError(f"{path}: stage {stage.name!r}: --{option} takes one stage's output, got {names!r}")
                (group,) = members
                variants = [(s + (m[len(names[0]):] if len(group) > 1 else ""), c, {**i, option: [m]}) for s, c, i in variants for m in group]
        families[stage.name] = []
        for suffix, chosen, inputs in variants:
            member = replace(stage, name=stage.name + suffix, options={**stage.options, **chosen}, inputs=inputs)
            if member.name in expanded or member.name in raw and suffix:
                raise PixgenError(f"{path}: the matrix of stage {stage.name!r} names {member.name!r} twice; rename a stage")
            expanded[member.name] = member
            families[stage.name].append(member.name)
    return expanded


def _members(name: str, families: dict, expanded: dict, stage: Stage, option: str, path: Path) -> list[str]:
    if name in families:
        return families[name]
    if name in expanded:
        return [name]
    raise PixgenError(f"{path}: stage {stage.name!r} reads --{option} from {name!r}, which is not a stage of this pipeline")


def _raw_order(raw: dict[str, tuple[Stage, dict]], path: Path) -> list[tuple[Stage, dict]]:
    """The written stages in dependency order (a reference to a matrix member counts as one to its
    stage), so that every family exists before a stage reads it."""
    def owner(name: str) -> str:
        while name and name not in raw:
            name = name.rpartition(".")[0]
        return name or "?"

    stages = {name: replace(stage, inputs={o: [owner(n) for n in ns] for o, ns in stage.inputs.items()}) for name, (stage, _) in raw.items()}
    for stage in stages.values():
        for option, names in stage.inputs.items():
            missing = [n for n, m in zip(raw[stage.name][0].inputs[option], names) if m == "?"]
            if missing:
                raise PixgenError(f"{path}: stage {stage.name!r} reads --{option} from {missing[0]!r}, which is not a stage of this pipeline")
    return [raw[s.name] for s in _order(stages, path)]


def _check_options(stage: Stage, stages: dict[str, Stage], path: Path) -> None:
    """Parse the stage's command line as its command would (types, ranges, choices), so a bad
    option stops the pipeline before its first stage runs, not when that stage's turn comes."""
    args = argv(stage, stages, Path("."), force=False)
    try:
        STAGES[stage.command].command.make_context(stage.command, args[1:])
    except click.ClickException as exc:
        raise PixgenError(f"{path}: stage {stage.name!r}: {exc.format_message()}") from None


def _order(stages: dict[str, Stage], path: Path) -> list[Stage]:
    """Topological order, ties in file order; a cycle is an error naming its stages."""
    ordered, done = [], set()
    while len(ordered) < len(stages):
        ready = [s for n, s in stages.items() if n not in done and all(d in done for ds in s.inputs.values() for d in ds)]
        if not ready:
            raise PixgenError(f"{path}: the stages {', '.join(sorted(set(stages) - done))} depend on each other in a cycle")
        ordered.append(ready[0])
        done.add(ready[0].name)
    return ordered


def _keyed(stages: list[Stage]) -> list[Stage]:
    keys, keyed = {}, []
    for stage in stages:
        deps = {option: [keys[d] for d in names] for option, names in stage.inputs.items()}
        key = config_hash({"run": stage.command, "with": stage.options, "from": deps})
        keys[stage.name] = key
        keyed.append(replace(stage, key=key))
    return keyed


def argv(stage: Stage, stages: dict[str, Stage], root: Path, force: bool) -> list[str]:
    command = _commands()[stage.command]
    known = _option_names(command)
    args = [stage.command]
    for option, value in stage.options.items():
        if known[option].is_flag:
            args += [f"--{option}"] if value else []
        else:
            args += [a for v in _as_list(value) for a in (f"--{option}", str(v))]
    for option, names in stage.inputs.items():
        args += [a for n in names for a in (f"--{option}", str(stages[n].output(root)))]
    args += ["--out", str(stage.output(root))]
    if force and "force" in known:
        args.append("--force")
    return args


def read_state(root: Path) -> dict:
    try:
        return json.loads((root / STATE).read_text())
    except FileNotFoundError:
        return {"stages": {}}
    except (OSError, ValueError) as exc:
        raise PixgenError(f"{root / STATE} cannot be read ({exc}); remove it to rerun every stage") from None


def write_state(root: Path, state: dict) -> None:
    # Replaced by rename, so a kill leaves the old record or the new one, never half of one.
    tmp = root / f".{STATE}.tmp"
    tmp.write_text(json.dumps(state, indent=1, sort_keys=True))
    os.replace(tmp, root / STATE)


_LOG = threading.Lock()


def log(message: str) -> None:
    # One line per call, whole, even when parallel stages log at once (print writes the text and
    # the newline apart).
    with _LOG:
        sys.stderr.write(message + "\n")
        sys.stderr.flush()


def run(path: str | Path, root: str | Path, main: Callable[[list[str]], None], data_root: str | None = None, dry_run: bool = False, jobs: int | None = None, scheduler: str | None = None) -> Path:
    """Run every stage whose key is not recorded as finished, up to `jobs` at a time (each as soon
    as the stages it reads are done); return the root. `main` is the CLI's entry point, which a
    stage's process runs on the stage's command line (handed in: the pipeline never imports the
    CLI, which imports it). With `scheduler` (a Dask distributed scheduler's address) each stage's
    process runs on a worker of that cluster, `jobs` defaulting to its thread count; the workers must see this machine's paths. A failure lets the running stages
    finish, starts no other, and is reported; a rerun continues from there, whatever `jobs` or the
    scheduler was."""
    if jobs is not None and jobs < 1:
        raise PixgenError(f"--jobs must be at least 1, got {jobs}")
    stages = load(path)
    by_name = {s.name: s for s in stages}
    # A worker may run in another folder: every path it is given is absolute.
    root = Path(root).absolute() if scheduler else Path(root)
    state = read_state(root)
    recorded = state["stages"]
    # A stage reads raw data where this run would: from --data-root, else this run's
    # PIXGEN_DATA_ROOT, whatever the environment of the cluster worker it lands on.
    data_root = data_root or os.environ.get("PIXGEN_DATA_ROOT")
    env = {"PIXGEN_DATA_ROOT": str(Path(data_root).absolute())} if data_root else {}
    # And with this run's thread counts (None: unset, as here): Dask sets OMP_NUM_THREADS=1 in its
    # workers, and torch rounds differently with other thread counts, so the bytes would differ.
    env |= {name: os.environ.get(name) for name in THREAD_VARIABLES}
    started = time.perf_counter()
    heads = {s.name: f"[{i}/{len(stages)}] {s.name} ({s.command})" for i, s in enumerate(stages, 1)}
    done, todo = set(), []
    for stage in stages:
        if recorded.get(stage.name, {}).get("key") == stage.key and stage.output(root).exists():
            log(f"{heads[stage.name]}: cached ({recorded[stage.name].get('seconds', 0):.1f} s when run)")
            done.add(stage.name)
        elif dry_run:
            log(f"{heads[stage.name]}: would run  pixgen {' '.join(argv(stage, by_name, root, force=stage.name in recorded))}")
        else:
            todo.append(stage)
    if dry_run:
        return root
    client = _connect(scheduler) if scheduler else None
    root.mkdir(parents=True, exist_ok=True)
    record = threading.Lock()
    if jobs is None:
        jobs = sum(client.nthreads().values()) if client else 1

    def execute(stage: Stage) -> float:
        # Only a stage whose recorded key differs replaces its output; a stage never finished
        # resumes whatever its command left half-written.
        args = argv(stage, by_name, root, force=stage.name in recorded)
        log(f"{heads[stage.name]}: running  pixgen {' '.join(args)}  (elapsed {_clock(time.perf_counter() - started)})")
        t0 = time.perf_counter()
        if client is None:
            code = _fork_stage(main, args, env)
        else:
            try:
                code = client.submit(run_stage, args, env, key=f"pixgen-{stage.name}-{stage.key}", pure=False).result()
            except Exception as exc:  # the worker died or the cluster went away: the stage did not finish
                raise PixgenError(f"stage {stage.name!r} (pixgen {stage.command}) was lost on the cluster at {scheduler} ({type(exc).__name__}: {exc}); rerun to continue from this stage") from None
        seconds = time.perf_counter() - t0
        if code != 0:
            raise PixgenError(f"stage {stage.name!r} (pixgen {stage.command}) failed with exit code {code} after {seconds:.1f} s; fix it and rerun to continue from this stage")
        with record:
            recorded[stage.name] = {"key": stage.key, "command": stage.command, "seconds": round(seconds, 1), "finished": datetime.datetime.now().isoformat(timespec="seconds")}
            write_state(root, state)
        log(f"{heads[stage.name]}: done in {_clock(seconds)}")
        return seconds

    failure = None
    with ThreadPoolExecutor(max_workers=jobs) as pool, client or contextlib.nullcontext():
        running = {}
        while todo or running:
            ready = [s for s in todo if all(d in done for names in s.inputs.values() for d in names)]
            for stage in ready[: jobs - len(running)] if failure is None else []:
                todo.remove(stage)
                running[pool.submit(execute, stage)] = stage
            if not running:
                break  # a failure left stages that can no longer start
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                stage = running.pop(future)
                if future.exception() is None:
                    done.add(stage.name)
                elif failure is None:
                    failure = future.exception()
    if failure is not None:
        raise failure
    log(f"pipeline {Path(path).name}: {len(stages)} stages, {_clock(time.perf_counter() - started)} this run; recorded stage times:")
    for stage in stages:
        log(f"  {stage.name:<24} {_clock(recorded[stage.name]['seconds'])}")
    return root


def run_stage(args: list[str], env: dict[str, str | None]) -> int:
    """One stage's command as a fresh process on a cluster worker (with that worker's environment,
    updated by `env`); its exit code."""
    return subprocess.run([sys.executable, "-m", "pixgen", *args], env=_environment(env), preexec_fn=die_with_parent).returncode


def _fork_stage(main: Callable[[list[str]], None], args: list[str], env: dict[str, str | None]) -> int:
    """`main(args)` in a process forked from the stage server, with this process's environment
    updated by `env`; its exit code, negative for a signal as subprocess gives it."""
    process = _stage_server(main).Process(target=_stage_process, args=(main, args, _environment(env)), name=f"pixgen {args[0]}")
    with _POLLING:
        process.start()
    multiprocessing.connection.wait([process.sentinel])
    with _POLLING:
        process.join()
    return process.exitcode


def _stage_server(main: Callable[[list[str]], None]) -> multiprocessing.context.BaseContext:
    # A forkserver, not a fork of this process, which runs threads (the stage pool) whose locks a
    # fork would copy; the server's only other threads are numpy's and scipy's OpenBLAS pools, which
    # OpenBLAS shuts down before a fork and restarts after. One per process, started by its first
    # stage with this process's environment: what is read at import (OpenMP's and OpenBLAS's thread
    # counts) is read then.
    server = multiprocessing.get_context("forkserver")
    server.set_forkserver_preload([main.__module__, *STAGE_SERVER_PRELOAD])
    return server


def _stage_process(main: Callable[[list[str]], None], args: list[str], environ: dict[str, str]) -> None:
    die_with_starter()
    os.environ.clear()
    os.environ.update(environ)
    sys.argv = ["pixgen", *args]
    main(args)


def _environment(env: dict[str, str | None]) -> dict[str, str]:
    """This process's environment updated by `env`, where None removes a variable."""
    return {k: v for k, v in {**os.environ, **env}.items() if v is not None}


def _connect(address: str):
    from distributed import Client

    try:
        return Client(address, timeout=10)
    except (OSError, TimeoutError, ValueError) as exc:
        raise PixgenError(f"cannot reach the Dask scheduler at {address!r} ({type(exc).__name__}: {exc}); start one (dask scheduler, then dask worker ADDRESS on machines that see the same files) or drop --scheduler") from None


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}"
