"""A camera's ONVIF metadata stream (analytics over RTP, `application` media) is recorded: the real GStreamer
RTSP server sends one XML document per RTP packet beside the video; the recorder, reached through a tap that
keeps what the server sent, stores every payload byte for byte in the segment its time falls in (a text track
tagged as data: FFmpeg's Matroska muxer holds no data track), consecutive segments hold consecutive
documents, and the probe that writes the manifest's `media` lists the track as data."""

from __future__ import annotations

from pathlib import Path

import av
import pytest

from drivers.rtsp import StreamStats
from edge_agent.ingest.stage import probe_media
from tests.peers.mosquitto import free_port
from tests.peers.rtsp_server import RtspServer
from tests.test_cameras_first_picture import recording_through_tap


def stored_documents(path: Path) -> tuple[list[bytes], list[float], float]:
    """A segment's metadata payloads, their times (s from the segment's start) and the video's end (s)."""
    with av.open(str(path)) as container:
        track = next(s for s in container.streams if s.metadata.get("ORIGINAL_KIND") == "data")
        video = container.streams.video[0]
        payloads, times, video_end = [], [], 0.0
        for packet in container.demux():
            if packet.stream == track and packet.size:
                payloads.append(bytes(packet))
                times.append(float(packet.pts * track.time_base))
            elif packet.stream == video and packet.pts is not None:
                video_end = max(video_end, float((packet.pts + (packet.duration or 0)) * video.time_base))
    return payloads, times, video_end


# With audio too (the metadata is then the third stream) in scripts/test_extended.sh.
@pytest.mark.parametrize("audio", ["none", pytest.param("pcmu", marks=pytest.mark.extended)])
def test_an_onvif_metadata_stream_is_recorded_as_sent(tmp_path: Path, audio: str) -> None:
    server = RtspServer(free_port(), keyint=10, metadata=True, audio=audio, log=tmp_path / "rtsp.log").start()
    kinds = ["video", "data"] if audio == "none" else ["video", "audio", "data"]
    with recording_through_tap(server, tmp_path) as (tap, heard, recorder):
        stats: StreamStats = recorder.stats
        assert [t["kind"] for t in stats.tracks] == kinds and stats.dropped == []
    # the last SETUP: interleaved channels 2-3 (second stream) or 4-5 (third)
    sent = [rtp[12:] for rtp in tap.rtp(0, channel=2 * (len(kinds) - 1))]
    assert len(sent) >= 5 and all(doc.startswith(b"<?xml") for doc in sent)

    stored: list[bytes] = []
    for segment in heard.segments[:2]:
        payloads, times, video_end = stored_documents(segment.path)
        assert payloads, f"no metadata in {segment.path.name}"
        # each document in the segment its time falls in (one document interval of slack at the end: the
        # segment before a cut takes what starts before the cut)
        assert all(0 <= t < video_end + 0.2 for t in times)
        stored += payloads
        tracks = probe_media(segment.path)["tracks"]
        assert [t["kind"] for t in tracks] == kinds
        assert tracks[-1] == {"kind": "data", "codec": None, "stored_as": "srt"}
    # byte for byte as sent, in order, none left out between the first and the last stored
    start = sent.index(stored[0])
    assert stored == sent[start:start + len(stored)]
