"""Preemption notices: SIGTERM (a pod's notice before it takes the hosts) or SIGINT asks a run
to finish its step, save a checkpoint and exit 0; a second signal exits at once."""

import os
import signal
import threading

import jax
import numpy as np
from jax.experimental import multihost_utils

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preemption:
  """The handlers, installed while the training loop runs (signals reach the main thread only)."""

  def __init__(self):
    self.received: str | None = None
    self._previous = {}

  def install(self) -> "Preemption":
    if threading.current_thread() is threading.main_thread():
      self._previous = {s: signal.signal(s, self._on_signal) for s in SIGNALS}
    return self

  def uninstall(self) -> None:
    for s, handler in self._previous.items():
      signal.signal(s, handler)
    self._previous = {}

  def _on_signal(self, signum, frame):
    del frame
    if self.received is not None:  # the second notice: stop now, as with no handler
      signal.signal(signum, signal.SIG_DFL)
      os.kill(os.getpid(), signum)
      return
    self.received = signal.Signals(signum).name
    print(f"\n{self.received}: finishing this step, saving a checkpoint, then exiting "
          "(send it again to exit at once)", flush=True)

  def requested(self) -> bool:
    """Whether any host has had a notice. Hosts agree, so all save the same step together."""
    stop = self.received is not None
    if jax.process_count() > 1:
      stop = bool(multihost_utils.process_allgather(np.array(stop)).any())
    return stop
