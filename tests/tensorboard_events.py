"""The scalars of a TensorBoard log directory as TensorBoard shows them.

Reads tensorboardX's event files (TFRecord framing: length, its CRC, the Event proto, its CRC) in
name order, as TensorBoard does, and applies TensorBoard's restart rule: an event carrying
``session_log.status == START`` at step s (tensorboardX's ``purge_step``) hides every earlier
event at a step >= s.
"""

from __future__ import annotations

import struct
from pathlib import Path

from tensorboardX.proto.event_pb2 import Event, SessionLog


def _events(path: Path):
    data, offset = path.read_bytes(), 0
    while offset < len(data):
        (length,) = struct.unpack_from("<Q", data, offset)
        event = Event()
        event.ParseFromString(data[offset + 12:offset + 12 + length])
        offset += 12 + length + 4
        yield event


def scalars(logdir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value), ...] in the order written, after restart purges."""
    files = sorted(Path(logdir).glob("events.out.tfevents.*"))  # TensorBoard reads them so
    shown: dict[str, list[tuple[int, float]]] = {}
    for path in files:
        for event in _events(path):
            if event.HasField("session_log") and event.session_log.status == SessionLog.START:
                shown = {tag: [(s, v) for s, v in points if s < event.step]
                         for tag, points in shown.items()}
            for value in event.summary.value:
                shown.setdefault(value.tag, []).append((event.step, value.simple_value))
    return shown
