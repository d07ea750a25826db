"""The runner every recipe goes through: it owns the shell around a recipe's maths and its outer loop.

A recipe (:class:`Recipe`) says what to build, what one unit of work is (an epoch, an optimizer step,
a whole sampling job), what its training state holds and what it exports. :func:`run` does the rest,
the same way for every recipe:

1. **check before writing** — :meth:`Recipe.check` and the output folder's ownership are checked and the
   state to resume from is read before anything is written; a run that fails while being built leaves no
   folder behind (or only what was there);
2. **set-up** — ``torchrun`` process group and device (:func:`~.config.resolve_device`), seeding by the
   recipe, the folder claimed and locked by rank 0;
3. **resume** — the state's settings are compared with this config: differences are listed and refused
   unless ``allow_changes`` (:class:`RunConfig`); the recipe may say what a change does
   (:meth:`Recipe.resume_note`);
4. **the loop** — one header line, one progress bar over the optimizer steps, one metrics record per unit
   (``metrics.jsonl``), the training state (``last.pt``, the kit's one format) whenever the recipe says it
   is due; after each unit the loss, and before each save the weights, are checked for NaN/Inf, and a
   stop names what went non-finite, its cause (non-finite data vs divergence) and only files that exist;
5. **Ctrl-C** — the first interrupt finishes the current unit (epoch or step; on every rank), saves the
   state and says how to continue; a second one stops at once;
6. **finish** — :meth:`Recipe.export`, ``summary.json``, one closing line; the folder is released and
   the process group left, also on error.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.distributed as dist
from torch import nn

from .._files import RunDir, atomic_write, check_output_dir, check_run_dir_free, claim_run_dir
from .config import RUN_FIELDS, ConfigError, RunConfig, config_dict
from .distributed import DistContext, all_gather_objects, all_reduce_sum, cleanup_distributed, init_distributed
from .loop import nonfinite_parameters
from .metrics import append_metrics, json_safe, read_metrics, truncate_metrics
from .state import STATE_FORMAT, capture_rng, load_state, restore_rank_rng, save_state, training_state

__all__ = ["Progress", "Recipe", "RunInterrupted", "run"]


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped the run; ``str()`` says what was saved and how to continue."""


class Progress:
    """The one progress bar of a run (rank 0, ``config.progress``): counts optimizer steps.

    Recipes call :meth:`update` after each optimizer step and :meth:`write` for a log line (which the bar
    keeps below itself); :attr:`stop_requested` turns true on the first Ctrl-C, and a recipe whose unit
    spans many steps checks it to stop at the next step boundary.
    """

    def __init__(self, total: int, initial: int, desc: str, enabled: bool, quiet: bool) -> None:
        self.quiet = quiet
        self.stop_requested = False
        self._bar = None
        if enabled:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, file=sys.stderr, leave=False)

    def update(self, n: int = 1, **postfix: Any) -> None:
        """Advance by ``n`` optimizer steps; ``postfix`` (e.g. ``loss=0.12``) is shown beside the bar."""
        if self._bar is not None:
            self._bar.update(n)
            if postfix:
                self._bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in postfix.items()})

    def write(self, line: str) -> None:
        """Print a log line (not under ``quiet``) without breaking the bar."""
        if self.quiet:
            return
        if self._bar is not None:
            self._bar.write(line, file=sys.stdout)
        else:
            print(line, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


class Recipe:
    """The contract between a recipe and :func:`run`.

    A subclass sets the class attributes, takes its config (a :class:`RunConfig` subclass) in
    ``__init__`` and implements :meth:`build`, :meth:`run_unit` and, for training, :meth:`state_dict` /
    :meth:`load_state_dict`. Everything else has a default.

    Class attributes:
        command: the task's name in messages and the progress bar (the command that runs it).
        stateful: it keeps a training state (``last.pt``, the kit's one format, marked with ``command``)
            and can resume; a job (sampling, extraction, generation) does not.
        unit: what :meth:`run_unit` does once: ``"epoch"``, ``"step"`` or ``"job"``. A record's
            ``record[unit]`` is the epoch index (0-based) or the steps done, which on resume drops the
            records written after the state (:meth:`metrics_position`).
        loss_key: the record entry that is the unit's loss; it, ``"loss"`` and every ``*_loss`` entry of a
            record (a validation loss too) are checked for NaN/Inf after every unit.
        free_fields: config fields that may change between the invocations of one run without changing its
            numbers (limits of one invocation, logging), beyond :data:`~.config.RUN_FIELDS`.
        resume_files: the state files ``resume="auto"`` looks for in the output folder, in order (a recipe
            adds the names older versions wrote).
        writes_folder: the job's product is a run folder (claimed, locked, with ``summary.json``); ``False``
            for a job that writes one file named by its config (no folder is claimed or written).
        run_files: files (or folders) whose presence marks the output folder as holding this task's run.
    """

    command: ClassVar[str] = "run"
    stateful: ClassVar[bool] = False
    unit: ClassVar[str] = "job"
    loss_key: ClassVar[str] = "loss"
    free_fields: ClassVar[frozenset[str]] = frozenset()
    resume_files: ClassVar[tuple[str, ...]] = ("last.pt",)
    writes_folder: ClassVar[bool] = True
    run_files: ClassVar[tuple[str, ...]] = ("last.pt", "metrics.jsonl", "summary.json")

    def __init__(self, config: RunConfig) -> None:
        self.config = config
        self.ctx = DistContext()
        self.out = Path(config.output_dir)

    # ------------------------------------------------------------------ before anything is written
    def check(self) -> None:
        """Reject settings that cannot run (:class:`ConfigError` naming the field); writes nothing."""

    def upgrade_state(self, state: dict[str, Any]) -> dict[str, Any]:
        """A state read for resuming, in today's layout: a recipe upgrades what its older versions wrote
        (the kit's :func:`~.state.load_state` already renamed the shared legacy keys)."""
        return state

    def check_state(self, state: dict[str, Any], path: Path) -> None:
        """Reject a state this config cannot continue (another model, another task): ``ValueError``."""

    def resume_note(self, changed: dict[str, tuple[Any, Any]]) -> str | None:
        """What the accepted ``changed`` settings ``{field: (saved, now)}`` do (e.g. to the learning-rate
        schedule), said after the state is loaded; ``None``: nothing to add."""
        return None

    # ------------------------------------------------------------------ the work
    def build(self, ctx: DistContext) -> None:
        """Data, model, optimizer, schedule (seeded as the recipe's seeding rule says)."""
        raise NotImplementedError

    def num_units(self) -> int:
        """Units of the whole run (epochs, steps; ``1`` for a job)."""
        return 1

    def steps_per_unit(self) -> int:
        """Optimizer steps (progress-bar ticks) per unit."""
        return 1

    def header(self) -> str:
        """The run's one header line (model, data, size of the run, device)."""
        return f"{self.command}: {self.ctx.world_size} process(es) on {self.ctx.device.type}"

    def run_unit(self, index: int, progress: Progress) -> dict[str, Any] | None:
        """Do unit ``index`` (0-based); return its metrics record (``None``: nothing to log).

        The record's losses (:attr:`loss_key`, ``*_loss``) are checked for NaN/Inf by the runner.
        """
        raise NotImplementedError

    def metrics_position(self, index: int) -> int:
        """``record[unit]`` of the record written after unit ``index``: the epoch index, or steps done."""
        return index if self.unit == "epoch" else index + 1

    def save_due(self, index: int, last: bool) -> bool:
        """Whether the training state is written after unit ``index`` (``last``: the final unit of this
        invocation). Default: after every epoch and at the end."""
        return last or self.unit == "epoch"

    def after_save(self, index: int) -> None:
        """Rank 0, after the state of unit ``index`` and its metrics record were written: files that
        follow from them (``best.pt``, plots)."""

    def stop_early(self, index: int, first: int) -> str | None:
        """A reason to stop after unit ``index`` (a time limit; ``first``: this invocation's first unit),
        said in the closing line; ``None``: go on."""
        return None

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """The recipe's part of the training state: ``model``, ``optimizer``, ``scheduler``, ``scaler``,
        ``ema`` and any extra entries (see :mod:`.state`)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved (the runner restores the RNG and the unit counter)."""

    def rng_generator(self) -> torch.Generator | None:
        """A generator (e.g. the data loader's) whose state the training state carries with the global RNGs."""
        return None

    def checked_modules(self) -> dict[str, nn.Module]:
        """Modules whose parameters must stay finite (checked before every save and after the last unit: one
        device sync per tensor)."""
        return {}

    def nonfinite_cause(self) -> str:
        """Why the loss or weights went non-finite: e.g. non-finite values found in the data, else divergence."""
        return "the training diverged (the data were finite)"

    # ------------------------------------------------------------------ the end
    def export(self, out: Path, finished: bool) -> dict[str, Any]:
        """Write the run's products (weights, samples) to ``out`` on rank 0; return summary entries.
        ``finished``: every unit is done (``False`` after :meth:`stop_early` stopped the run)."""
        return {}

    def closing(self, summary: dict[str, Any]) -> str:
        """The run's one closing line."""
        return f"{self.command}: done; outputs in {self.out}"


# ---------------------------------------------------------------------------------------------- helpers


def _resume_path(recipe: Recipe) -> Path | None:
    resume = recipe.config.resume
    if not resume or not recipe.stateful:
        return None
    if resume == "auto":
        found = [recipe.out / name for name in recipe.resume_files if (recipe.out / name).is_file()]
        return found[0] if found else None
    path = Path(resume)
    if not path.is_file():
        raise ConfigError("resume", f"names no checkpoint: {path} does not exist")
    return path


def _changed(saved: dict[str, Any], now: dict[str, Any], free: frozenset[str]) -> dict[str, tuple[Any, Any]]:
    skip = RUN_FIELDS | free
    return {k: (saved[k], v) for k, v in now.items() if k not in skip and k in saved and json_safe(saved[k]) != v}


def _listing(changed: dict[str, tuple[Any, Any]]) -> str:
    return "; ".join(f"{k}: {a!r} → {b!r}" for k, (a, b) in sorted(changed.items()))


def _check_resume(recipe: Recipe, state: dict[str, Any], path: Path) -> dict[str, tuple[Any, Any]]:
    """Refuse a state of another task or with changed settings (unless allowed); the accepted changes."""
    if state.get("format") != STATE_FORMAT or state.get("command", recipe.command) != recipe.command:
        holds = f"`gspn {state['command']}`" if state.get("command") else "another"
        model = f" of {state['model_name']!r}" if state.get("model_name") else ""
        raise ConfigError(
            "resume", f"{path} is not a `gspn {recipe.command}` training state (it holds {holds} state{model})"
        )
    recipe.check_state(state, path)
    saved = state.get("config") or {}
    changed = _changed(saved, config_dict(recipe.config), recipe.free_fields)
    if not changed:
        return changed
    listing = _listing(changed)
    if not recipe.config.allow_changes:
        raise ConfigError(
            "resume",
            f"cannot continue {path} with other settings than its own ({listing}): run with the saved "
            "settings, or set `allow_changes` to continue with these",
        )
    return changed


def _any_rank(flag: bool, ctx: DistContext) -> bool:
    """``flag`` is true on some rank (every rank stops at the same unit)."""
    return all_reduce_sum([float(flag)], ctx)[0] > 0 if ctx.distributed else flag


def _nonfinite(recipe: Recipe, record: dict[str, Any] | None, weights: bool = True) -> str | None:
    """What went NaN/Inf: the weights first (the cause when they did; checked only where ``weights``, as
    each tensor costs a device sync), then the record's loss."""
    for name, module in recipe.checked_modules().items() if weights else ():
        bad = nonfinite_parameters(module)
        if bad:
            return f"{name} ({len(bad)} tensors, e.g. {bad[0]})"
    for key, value in (record or {}).items():
        is_loss = key in (recipe.loss_key, "loss") or key.endswith("_loss")
        if is_loss and isinstance(value, (int, float)) and not math.isfinite(value):
            return f"{key} ({value})"
    return None


@contextmanager
def _graceful_interrupt(progress: Progress, unit: str) -> Iterator[None]:
    """First Ctrl-C: ask the loop to stop at the next step boundary; the second: stop now."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    pid = os.getpid()

    def handler(signum: int, frame: Any) -> None:
        if os.getpid() != pid:  # a forked DataLoader worker: the main process stops the run
            return
        if progress.stop_requested:
            raise KeyboardInterrupt
        progress.stop_requested = True
        print(f"\ninterrupt: stopping after this {unit} to save the state (Ctrl-C again to stop now)", file=sys.stderr)

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


class _Shell:
    """The folder, the state file and the log of one run (rank 0 writes; every rank joins the gathers)."""

    def __init__(self, recipe: Recipe, ctx: DistContext) -> None:
        self.recipe = recipe
        self.ctx = ctx
        self.out = recipe.out
        self.saved_unit: int | None = None
        self.started = False

    def save(self, unit: int) -> None:
        recipe = self.recipe
        rngs = all_gather_objects(capture_rng(recipe.rng_generator()), self.ctx)
        if self.ctx.is_main:
            entries = {"epoch": unit if recipe.unit == "epoch" else None, **recipe.state_dict()}
            entries.update(rng=rngs, config=config_dict(recipe.config), command=recipe.command, unit=unit)
            save_state(self.out / "last.pt", training_state(**entries))
        self.saved_unit = unit

    def log(self, record: dict[str, Any]) -> None:
        if self.ctx.is_main and self.recipe.stateful:
            append_metrics(self.out / "metrics.jsonl", record)

    def resume_log(self, state: dict[str, Any], start: int) -> None:
        """Drop the records written after the state; add the state's own record if a kill lost it."""
        recipe, path = self.recipe, self.out / "metrics.jsonl"
        position = recipe.metrics_position(start - 1)
        truncate_metrics(path, position, key=recipe.unit)
        record = state.get("record")
        if record and not any(r.get(recipe.unit) == position for r in read_metrics(path)):
            append_metrics(path, record)

    def nonfinite_message(self, unit: int, what: str) -> str:
        recipe = self.recipe
        kept = (
            f"{self.out / 'last.pt'} keeps the state after {recipe.unit} {self.saved_unit + 1}"
            if self.saved_unit is not None
            else "no training state was saved yet"
        )
        return (
            f"non-finite {what} in {recipe.unit} {unit + 1}: {recipe.nonfinite_cause()}; stopped before "
            f"writing it: {kept}"
        )


def _existing(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()} if folder.is_dir() else set()


def _forget_new_folder(folder: Path, before: set[str] | None, only: set[str] | None = None) -> None:
    """Remove what a run that failed before writing any state added to its folder (``before``: the
    folder's entries before the run, ``None`` if the run created it; ``only``: just these names), so that
    the corrected command is not refused as "already holds a run"; a created folder left empty goes too."""
    if not folder.is_dir():
        return
    for p in folder.iterdir():
        if (before is None or p.name not in before) and (only is None or p.name in only):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    if before is None and not any(folder.iterdir()):
        folder.rmdir()


def _first_unit(recipe: Recipe, state: dict[str, Any] | None) -> int:
    if state is None:
        return 0
    unit = state.get("unit")
    if unit is None:  # states written before the runner: the epoch, or the step count of a step recipe
        unit = state["epoch"] if recipe.unit == "epoch" else state["step"] - 1
    return int(unit) + 1


def _restore_rng(recipe: Recipe, state: dict[str, Any], ctx: DistContext) -> None:
    if state.get("rng") is not None:
        restore_rank_rng(state["rng"], ctx.rank, ctx.world_size, recipe.rng_generator(), warn=False)


# ---------------------------------------------------------------------------------------------- run


def run(recipe: Recipe) -> dict[str, Any]:
    """Run ``recipe`` as the module docstring says; return its summary (also ``summary.json``).

    Raises:
        ConfigError: a setting the recipe cannot run with, or a resume with changed settings.
        RunDirError: the output folder holds another run (and neither ``resume`` nor ``overwrite`` is set)
            or is in use.
        FloatingPointError: the loss or the weights went non-finite (the message names the cause and the
            state that was kept).
        RunInterrupted: Ctrl-C (the state was saved when a step had finished; the message says how to
            continue).
    """
    cfg = recipe.config
    if cfg.resume and cfg.overwrite:
        raise ConfigError("resume", "and `overwrite` exclude each other")
    if cfg.threads < 0:
        raise ConfigError("threads", f"must be >= 0, got {cfg.threads}")
    recipe.check()
    out = check_output_dir(recipe.out) if recipe.writes_folder else recipe.out
    resume_path = _resume_path(recipe)
    state = recipe.upgrade_state(load_state(resume_path)) if resume_path is not None else None
    changed = _check_resume(recipe, state, resume_path) if state is not None else {}
    if recipe.writes_folder:
        check_run_dir_free(out, recipe.run_files, resume=bool(cfg.resume), overwrite=cfg.overwrite)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)

    ctx = init_distributed(cfg.device, getattr(cfg, "dist_backend", None))
    recipe.ctx = ctx
    before = _existing(out) if out.is_dir() else None
    note: str | None = None
    run_dir: RunDir | None = None
    shell = _Shell(recipe, ctx)
    ok = False
    try:
        recipe.build(ctx)
        if ctx.is_main and recipe.writes_folder:
            run_dir = claim_run_dir(out, recipe.run_files, resume=state is not None, overwrite=cfg.overwrite)
        start = _first_unit(recipe, state)
        if state is not None:
            shell.saved_unit = start - 1
            if ctx.is_main:
                shell.resume_log(state, start)
            recipe.load_state_dict(state)
            _restore_rng(recipe, state, ctx)
            if changed:
                said = recipe.resume_note(changed)
                note = f"continuing with changed settings: {_listing(changed)}" + (f"; {said}" if said else "")
            del state
        summary = _loop(recipe, shell, start, resume_path, note)
        ok = True
        return summary
    except BaseException:
        # a run that saved nothing leaves nothing (a job: nothing, if it failed before its work began)
        unsaved = shell.saved_unit is None if recipe.stateful else not shell.started
        if ctx.is_main and recipe.writes_folder:
            if run_dir is not None:
                run_dir.release()
                run_dir = None
            if unsaved:
                _forget_new_folder(out, before)
            else:  # keep what the run wrote, not its lock (nor a folder that holds nothing else)
                _forget_new_folder(out, before, only={".gspn.lock"})
        raise
    finally:
        if run_dir is not None:
            run_dir.release()
        cleanup_distributed(ok)


def _loop(recipe: Recipe, shell: _Shell, start: int, resume_path: Path | None, note: str | None) -> dict[str, Any]:
    cfg, ctx = recipe.config, shell.ctx
    total = end = recipe.num_units()
    main = ctx.is_main and not cfg.quiet
    if main:
        print(recipe.header(), flush=True)
        if resume_path is not None and start >= total:
            print(f"{resume_path} holds the finished run ({recipe.unit} {total}/{total}): nothing to do", flush=True)
        elif resume_path is not None:
            print(f"resumed from {resume_path} at {recipe.unit} {start + 1}/{total}", flush=True)
        if note:
            print(note, flush=True)
    if resume_path is not None and start >= total and (recipe.out / "summary.json").is_file():
        return json.loads((recipe.out / "summary.json").read_text())  # its products are written already
    per = recipe.steps_per_unit()
    progress = Progress(total * per, start * per, recipe.command, cfg.progress and ctx.is_main, not main)
    t0 = time.perf_counter()
    stopped: str | None = None
    unit = start - 1
    try:
        with _graceful_interrupt(progress, recipe.unit):
            for unit in range(start, end):
                shell.started = True
                record = recipe.run_unit(unit, progress)
                last = unit == end - 1
                stopped = recipe.stop_early(unit, start)
                if _any_rank(progress.stop_requested, ctx):
                    stopped = "interrupted"
                saved = recipe.stateful and (recipe.save_due(unit, last) or bool(stopped))
                bad = _nonfinite(recipe, record, weights=saved or last)
                if bad is not None:
                    raise FloatingPointError(shell.nonfinite_message(unit, bad))
                if saved:
                    shell.save(unit)
                if record is not None:
                    shell.log(record)
                if saved and ctx.is_main:
                    recipe.after_save(unit)
                if ctx.distributed:
                    dist.barrier()
                if stopped:
                    break
    except KeyboardInterrupt:
        progress.close()
        raise RunInterrupted(_interrupted_message(recipe, shell)) from None
    finally:
        progress.close()
    if stopped == "interrupted":
        raise RunInterrupted(_interrupted_message(recipe, shell))
    finished = unit == total - 1
    summary: dict[str, Any] = {
        "command": recipe.command,
        recipe.unit + "s": unit + 1,
        "finished": finished,
        "elapsed_s": time.perf_counter() - t0,
        **({"output_dir": str(recipe.out)} if recipe.writes_folder else {}),
    }
    if stopped:
        summary["stopped"] = stopped
    summary.update(recipe.export(recipe.out, finished))
    if ctx.is_main and recipe.writes_folder:
        text = json.dumps(json_safe(summary), indent=2).encode()
        atomic_write(recipe.out / "summary.json", lambda f: f.write(text))
    if main:
        print(recipe.closing(summary), flush=True)
    return summary


def _interrupted_message(recipe: Recipe, shell: _Shell) -> str:
    if not recipe.stateful:
        return f"interrupted; {recipe.out} may hold partial outputs"
    if shell.saved_unit is None:
        return f"interrupted before the first {recipe.unit} finished; nothing was saved"
    return (
        f"interrupted; {recipe.out / 'last.pt'} holds the state after {recipe.unit} {shell.saved_unit + 1}: "
        "continue it with `resume` and the same settings"
    )
