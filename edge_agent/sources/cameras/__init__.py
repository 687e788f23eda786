"""Cameras: continuous recording of every configured camera, with a ledger of every gap (R2, R3, R10).

`CameraService` (service.py, a daemon component) runs one `CameraWorker` thread per camera (worker.py)
and one `SegmentIntake` thread (intake.py) that turns finished segments into catalog files. A worker asks
ONVIF (when configured) who the camera is and where its stream is, and runs the camera's `RtspRecorder`,
which writes Matroska segments under `data_dir/spool/<camera>/`. The intake discovers each segment as a
`camera` file on the camera lane, with its manifest's extra keys on the row (the camera, its location and
the gaps that ended where the segment begins), copies, hashes and seals it and deletes the spool file.
After a crash the segments left in the spool, including the one cut mid-write, are taken in first.

Every interruption is a row in `gaps` (gaps.py, `GapLedger`; its SQL is `edge_agent.catalog.gaps`),
opened when recording stops and closed when the first keyframe arrives again, and an event on the
`events` topic at both ends. `was_recording(catalog, camera, at_ms)` answers the custodian's question
"was this camera recording at 14:03?".

Workers share nothing but the catalog, the ledger and the intake queue: one bad camera never holds up
another.
"""

from edge_agent.catalog.gaps import Gap
from edge_agent.sources.cameras.gaps import GapLedger, gaps, was_recording
from edge_agent.sources.cameras.intake import Queued, SegmentIntake, spool_dir
from edge_agent.sources.cameras.service import CameraService
from edge_agent.sources.cameras.worker import CameraHealth, CameraWorker

__all__ = ["CameraHealth", "CameraService", "CameraWorker", "Gap", "GapLedger", "Queued", "SegmentIntake",
           "gaps", "spool_dir", "was_recording"]
