"""The redacted recording (README "Redaction") written over the real S3 protocol: a call recorded
one party per channel keeps its channels apart, and only the redacted time goes silent. The
whole path (a job asking for redaction, its recording replaced) runs in test_cli."""

from __future__ import annotations

import io
import uuid
import wave

import numpy as np

from common.audio import SAMPLE_RATE
from common.storage import upload_bytes
from services.ingest.redacted_audio import MARGIN_S, write_redacted


def test_each_channel_keeps_its_own_audio_and_loses_only_the_redacted_time(stack):
    settings = stack.settings()
    s3 = stack.s3()
    seconds = 70  # more than one piece of PIECE_SAMPLES
    left = np.full(seconds * SAMPLE_RATE, 1000, dtype="<i2")
    right = np.full(seconds * SAMPLE_RATE, -2000, dtype="<i2")
    name = uuid.uuid4().hex
    pcm, recording = f"pcm/test-{name}.s16le", f"uploads/test-{name}"
    upload_bytes(s3, settings.audio_bucket, pcm, left.tobytes() + right.tobytes())

    try:
        write_redacted(s3, settings.audio_bucket, recording, pcm, 2, [(10.0, 11.5), (59.9, 60.3)])
        with wave.open(io.BytesIO(s3.get_object(settings.audio_bucket, recording).read())) as stored:
            assert (stored.getnchannels(), stored.getframerate(), stored.getnframes()) == (2, SAMPLE_RATE, left.size)
            frames = np.frombuffer(stored.readframes(stored.getnframes()), dtype="<i2").reshape(-1, 2)
    finally:
        for key in (pcm, recording):
            s3.remove_object(settings.audio_bucket, key)
    silent = np.zeros(left.size, dtype=bool)
    for start, end in [(10.0, 11.5), (59.9, 60.3)]:
        silent[round((start - MARGIN_S) * SAMPLE_RATE):round((end + MARGIN_S) * SAMPLE_RATE)] = True
    assert (frames[silent] == 0).all()
    assert (frames[~silent, 0] == 1000).all() and (frames[~silent, 1] == -2000).all()
