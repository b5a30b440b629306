"""The OvSW callbacks: AGS (Eq. 14), SAD (Eq. 15-16) and the FlipMonitor."""

from lightning_ovsw.callbacks.ags import AGSCallback
from lightning_ovsw.callbacks.flip_monitor import FlipMonitor
from lightning_ovsw.callbacks.sad import SADCallback

__all__ = ["AGSCallback", "FlipMonitor", "SADCallback"]
