"""Checkpoints with orbax `CheckpointManager`: train state + data-iterator position.

Each step directory holds two items:
  state  the `TrainState` (params, optimizer state, step, RNG), restored straight into
         the shardings of the current mesh;
  data   the grain iterator state (JSON), so the data stream resumes exactly.
A checkpoint that cannot be read raises `CheckpointError` and is left on disk.
"""

from __future__ import annotations

import pathlib
from typing import Any

import jax
import orbax.checkpoint as ocp


class CheckpointError(RuntimeError):
  """A checkpoint exists but cannot be restored; nothing was deleted."""


class Checkpointer:
  """Saves when told (the trainer decides which steps), keeps the newest `max_to_keep`."""

  def __init__(self, directory: str | pathlib.Path, max_to_keep: int, use_async: bool = True):
    self.directory = pathlib.Path(directory).expanduser().resolve()
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep,
        enable_async_checkpointing=use_async,
        create=True,
    )
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=("state", "data"))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state: Any, data_state: dict[str, Any] | None) -> None:
    """Starts saving `step` (in the background when async); arrays are copied first."""
    args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                              data=ocp.args.JsonSave(data_state or {}))
    self._manager.save(step, args=args, force=True)

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
          f"({type(e).__name__}: {str(e)[:300]}). It was left untouched: move that step "
          "directory aside to resume from an earlier step, or use a fresh --workdir."
      ) from e
    return restored.state, dict(restored.data or {})

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()
