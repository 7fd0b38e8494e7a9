"""Predictors that fail on purpose (imported by Ray's workers): one kills its own actor process once,
mid-run; one raises."""

from __future__ import annotations

import os
import signal
from pathlib import Path

from twotower.integrations.ray import TwoTowerPredictor


class KillOnce(TwoTowerPredictor):
    """SIGKILLs its process at the start of its second call unless `marker` exists (it writes the
    marker first, so the restarted actor carries on)."""

    marker = ""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.calls = 0

    def __call__(self, batch):
        self.calls += 1
        marker = Path(self.marker)
        if self.calls == 2 and not marker.exists():
            marker.write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)
        return super().__call__(batch)


def kill_once(marker: Path) -> type:
    """A KillOnce whose marker is `marker` (a new class: Ray ships it to the actors by value)."""
    return type("KillOnceAt", (KillOnce,), {"marker": str(marker)})


class Broken(TwoTowerPredictor):
    """Raises in every call, as a model error would."""

    def __call__(self, batch):
        raise RuntimeError("the model broke")
