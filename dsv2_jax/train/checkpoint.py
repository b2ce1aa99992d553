"""Checkpoints with orbax `CheckpointManager`: train state + data-iterator position.

Each step directory holds two items:
  state  the `TrainState` (params, optimizer state, step, RNG, skip counters),
         restored straight into the shardings of the current mesh;
  data   the grain iterator state (JSON), so the data stream resumes exactly.

Failure handling (nothing here ever deletes a checkpoint it could not read):
  - `restore_latest` walks back from the newest step to the newest one that restores,
    warning about each step it skips; `CheckpointError` if none restores.
  - `set_aside` moves an unreadable step out of orbax's directory (to
    `<workdir>/unreadable_checkpoints/`), so that training can write that step number
    again and orbax's `max_to_keep` never counts it in place of a good step.
  - A save that fails (read-only or full disk, ...) raises `CheckpointError` naming the
    step and the newest step that is still intact; orbax writes each step to a temporary
    directory and renames it only when complete, so earlier steps are never touched.
"""

from __future__ import annotations

import logging
import pathlib
import shutil
from typing import Any

import jax
import orbax.checkpoint as ocp


class CheckpointError(RuntimeError):
  """A checkpoint cannot be restored or written; nothing was deleted."""


def _short(e: BaseException) -> str:
  return f"{type(e).__name__}: {str(e).splitlines()[0][:240] if str(e) else ''}"


class Checkpointer:
  """Saves when told (the trainer decides which steps), keeps the newest `max_to_keep`."""

  def __init__(self, directory: str | pathlib.Path, max_to_keep: int, use_async: bool = True):
    self.directory = pathlib.Path(directory).expanduser().resolve()
    self._max_to_keep, self._use_async = max_to_keep, use_async
    self._pending_step: int | None = None  # Step of a save that may still be in flight.
    self._manager = self._open()

  def _open(self) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=self._max_to_keep,
        enable_async_checkpointing=self._use_async,
        create=False,  # The trainer creates the directory; eval must not.
    )
    return ocp.CheckpointManager(self.directory, options=options,
                                 item_names=("state", "data"))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def save(self, step: int, state: Any, data_state: dict[str, Any] | None) -> None:
    """Starts saving `step` (in the background when async); arrays are copied first.

    Raises:
      CheckpointError: this save, or the previous one still in flight, failed.
    """
    self.wait()  # Surfaces a failure of the previous async save before starting another.
    self.directory.mkdir(parents=True, exist_ok=True)
    args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                              data=ocp.args.JsonSave(data_state or {}))
    self._pending_step = step
    try:
      self._manager.save(step, args=args, force=True)
    except Exception as e:  # orbax and the OS raise many types.
      self._pending_step = None
      raise self._save_error(step, e) from e
    if not self._use_async:
      self._pending_step = None

  def _save_error(self, step: int, e: BaseException) -> CheckpointError:
    intact = [s for s in self._safe_steps() if s != step]
    kept = f"step {intact[-1]} is intact" if intact else "no earlier checkpoint exists"
    return CheckpointError(
        f"could not write checkpoint step {step} under {self.directory} ({_short(e)}); "
        f"{kept}. Check free space and write permission there, then rerun to resume.")

  def _safe_steps(self) -> list[int]:
    try:
      return sorted(ocp.utils.checkpoint_steps(self.directory))
    except Exception:  # pylint: disable=broad-except
      return []

  def restore(self, step: int, target_shardings: Any, abstract: Any
              ) -> tuple[Any, dict[str, Any]]:
    """Restores `step` into `target_shardings` (same tree as `abstract`).

    Returns:
      (state, data_state).
    """
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract, target_shardings)
    args = ocp.args.Composite(state=ocp.args.StandardRestore(target),
                              data=ocp.args.JsonRestore())
    try:
      restored = self._manager.restore(step, args=args)
    except Exception as e:  # orbax raises many types for unreadable or foreign files.
      raise CheckpointError(
          f"checkpoint step {step} under {self.directory} cannot be restored "
          f"({_short(e)}). It was left untouched.") from e
    return restored.state, dict(restored.data or {})

  def restore_params(self, step: int, abstract_params: Any, param_shardings: Any,
                     key: str = "params") -> Any:
    """Only the parameters of `step` (a partial restore: no optimizer state is read),
    cast to `abstract_params`' dtypes and placed in `param_shardings`. `key` names them
    in the saved state: 'params' (TrainState) or 'policy' (a PPO / DPO run's RLState)."""
    restore_args = jax.tree.map(
        lambda a, s: ocp.ArrayRestoreArgs(sharding=s, dtype=a.dtype, global_shape=a.shape),
        abstract_params, param_shardings)
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract_params, param_shardings)
    args = ocp.args.PyTreeRestore(item={key: target}, restore_args={key: restore_args},
                                  partial_restore=True)
    try:
      with ocp.PyTreeCheckpointer() as checkpointer:
        return checkpointer.restore(self.directory / str(step) / "state", args=args)[key]
    except Exception as e:  # orbax raises many types for unreadable or foreign files.
      raise CheckpointError(
          f"parameters of checkpoint step {step} under {self.directory} cannot be restored "
          f"({_short(e)}). It was left untouched.") from e

  def restore_latest(self, target_shardings: Any, abstract: Any
                     ) -> tuple[int, Any, dict[str, Any], list[int]]:
    """The newest step that restores, walking back past unreadable ones.

    Returns:
      (step, state, data_state, unreadable steps newer than `step`).

    Raises:
      CheckpointError: no step restores (all are left in place).
    """
    unreadable = []
    for step in reversed(self.all_steps()):
      try:
        state, data_state = self.restore(step, target_shardings, abstract)
      except CheckpointError as e:
        unreadable.append(step)
        logging.warning("%s Trying the previous step.", e)
        continue
      if unreadable:
        logging.warning("Checkpoint steps %s under %s cannot be restored; using step %d.",
                        unreadable, self.directory, step)
      return step, state, data_state, unreadable
    raise CheckpointError(
        f"no checkpoint under {self.directory} can be restored (steps {unreadable}, all "
        "left in place). Use a fresh --workdir, or move the checkpoints directory aside to "
        "start this run over.")

  def set_aside(self, step: int, destination: str | pathlib.Path) -> pathlib.Path:
    """Moves step `step`'s directory to `destination/<step>` (never deletes it)."""
    self.wait()
    target = pathlib.Path(destination) / str(step)
    suffix = 1
    while target.exists():  # Never overwrite an earlier set-aside copy.
      target = pathlib.Path(destination) / f"{step}.{suffix}"
      suffix += 1
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(self.directory / str(step)), str(target))
    self._manager.close()
    self._manager = self._open()  # Re-reads the step list.
    return target

  def wait(self) -> None:
    """Blocks until the save in flight is complete; CheckpointError if it failed."""
    step, self._pending_step = self._pending_step, None
    try:
      self._manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      raise self._save_error(step if step is not None else -1, e) from e

  def close(self) -> None:
    """Waits for the last save (raising if it failed) and releases the manager."""
    try:
      self.wait()
    finally:
      self._manager.close()
