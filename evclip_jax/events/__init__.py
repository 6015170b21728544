"""Event streams: file I/O and event-to-frame representations."""

from evclip_jax.events.frames import event_counts, event_frame
from evclip_jax.events.io import (
    EVENT_DTYPE,
    EventFileError,
    iter_event_windows,
    read_events,
    read_sensor_size,
    write_events,
)

__all__ = [
    "EVENT_DTYPE",
    "EventFileError",
    "event_counts",
    "event_frame",
    "iter_event_windows",
    "read_events",
    "read_sensor_size",
    "write_events",
]
