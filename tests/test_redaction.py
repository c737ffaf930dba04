"""Redaction (README "Redaction"): what is found when things to redact are said one right after
another, and the redacted recording written over the real S3 protocol: a call recorded one party
per channel keeps its channels apart, and only the redacted time goes silent. The whole path (a
job asking for redaction, its recording replaced) runs in test_cli."""

from __future__ import annotations

import asyncio
import io
import re
import time
import uuid
import wave

import httpx
import numpy as np
import pytest

from common.audio import SAMPLE_RATE
from common.messages import Segment, Word
from common.storage import upload_bytes
from services.ingest.redacted_audio import MARGIN_S, write_redacted
from services.transcriber.redaction import redact, redact_text

# One of each kind (a card said plainly and said hesitantly), and what Whisper writes between two
# things said one after the other: a sentence's end, a pause, a hesitation, a list.
SAID = {"card": "4111 1111 1111 1111", "card said hesitantly": "4111 – 1111 – 1111 – 1111",
        "phone": "555-123-4567", "email": "anna@example.com"}
KINDS = ["email", "card", "phone"]
BETWEEN = [". ", "... ", " – ", ", "]
LEFT_IN_CLEAR = re.compile(r"\d|@")


def _segment(text: str, start: float, index: int = 0) -> Segment:
    """One speaker's segment of `text`, a word for each space-separated part, 0.4 s apart."""
    words = [Word(word=f" {part}", start=round(start + 0.4 * n, 3), end=round(start + 0.4 * n + 0.3, 3),
                  probability=0.9) for n, part in enumerate(text.split())]
    return Segment(index=index, speaker="spk_0", start_ts=words[0].start, end_ts=words[-1].end, text=text, words=words)


@pytest.mark.parametrize("said, stored", [
    (" 4111 1111 1111 1111. 555-123-4567.", " [CARD]. [PHONE]."),
    (" 555-123-4567. 4111 1111 1111 1111.", " [PHONE]. [CARD]."),
    ("Call 555-123-4567. 4111 1111 1111 1111.", "Call [PHONE]. [CARD]."),
    ("Call 4111 1111 1111 1111. 555-123-4567.", "Call [CARD]. [PHONE]."),
])
def test_a_phone_number_said_right_before_or_after_a_card_is_redacted_too(said, stored):
    """A phone number read with the card next to it into one match overlapped the card and was
    dropped, and left in clear, with it."""
    assert redact_text(said, ["card", "phone"]) == stored


@pytest.mark.parametrize("between", BETWEEN)
@pytest.mark.parametrize("first, second", [(a, b) for a in SAID for b in SAID if a != b])
def test_two_things_to_redact_said_one_after_the_other_leave_nothing_in_clear(first, second, between):
    """Neither in the text nor in the words, whose labelled ones are silenced in the recording:
    each word that held a digit or the address is inside a labelled word's time. A card said
    hesitantly after a phone number and a comma ("555-123-4567, 4111 – 1111 – 1111 – 1111") kept
    twelve of its digits in clear: only the match of the first four with the phone number was
    replaced."""
    said = f"It's {SAID[first]}{between}{SAID[second]}."
    assert not LEFT_IN_CLEAR.search(redact_text(said, KINDS)), said
    segment = _segment(said, 0)
    [redacted] = redact([segment], KINDS)
    assert not LEFT_IN_CLEAR.search(redacted.text), said
    labelled = [(w.start, w.end) for w in redacted.words if re.search(r"\[(CARD|PHONE|EMAIL)\]", w.word)]
    assert all(any(start <= w.start and w.end <= end for start, end in labelled)
               for w in segment.words if LEFT_IN_CLEAR.search(w.word)), said


@pytest.mark.parametrize("said, stored", [
    ("Wir haben uns am 12.05.2024 getroffen.", "Wir haben uns am 12.05.2024 getroffen."),
    ("Мы встретились 1.5.2024 и 03.06.24.", "Мы встретились 1.5.2024 и 03.06.24."),
    ("From 2024-05-12 to 2024-06-13.", "From 2024-05-12 to 2024-06-13."),
    ("On 12/25/2024 and 25/12/2024.", "On 12/25/2024 and 25/12/2024."),
    ("Am 12.05.2024 555-123-4567 anrufen.", "Am 12.05.2024 [PHONE] anrufen."),
    ("On 2024-05-12, 555.123.4567.", "On 2024-05-12, [PHONE]."),
    # Phone numbers with dots or dashes stay phone numbers, even where some of their digits
    # would be a date on their own.
    ("Call 555.123.4567 or 030-1234-5678.", "Call [PHONE] or [PHONE]."),
    ("Call +49 30 12345678, 1-800-555-0199 or 8-800-555-35-35.", "Call [PHONE], [PHONE] or [PHONE]."),
    ("Appelez 06.12.34.56.78 ou 555.12.05.2024.", "Appelez [PHONE] ou [PHONE]."),
    # ...or after an area code or a country code.
    ("Ruf an: 0171 12.05.1990 oder +7 912 10.10.10.", "Ruf an: [PHONE] oder [PHONE]."),
    ("Tel. (030) 12.05.2024, Tel. 030 / 12.05.2024, 555 2012-12-12.", "Tel. [PHONE], Tel. [PHONE], [PHONE]."),
    # Not a date: no month 13, no day 32.
    ("Code 2024-13-45 or 32.05.2024.", "Code [PHONE] or [PHONE]."),
])
def test_a_date_written_with_dots_dashes_or_slashes_is_no_phone_number(said, stored):
    """Whisper writes German and Russian dates with dots: "am 12.05.2024" was stored as "am
    [PHONE]", and an ISO date "2024-05-12" as "[PHONE]", so the date was gone from the transcript."""
    assert redact_text(said, ["phone"]) == stored
    [redacted] = redact([_segment(said, 0)], ["phone"])
    assert redacted.text == stored


def test_a_phone_number_in_the_next_segment_after_a_card_is_redacted():
    """One speaker's segments 1.3 s apart are searched as one text: the card in the first and the
    phone number in the second made one match, and the phone number was left in clear."""
    card = _segment("Card 4111 1111 1111 1111.", 0)
    phone = _segment("555 123 4567.", card.end_ts + 1.3, index=1)
    redacted = redact([card, phone], ["card", "phone"])
    assert [s.text for s in redacted] == ["Card [CARD].", "[PHONE]."]
    assert [(w.word, w.start, w.end) for w in redacted[1].words] == [(" [PHONE].", phone.start_ts, phone.end_ts)]


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


async def test_a_recording_the_store_refuses_to_redact_keeps_what_redaction_reads(stack, fixtures_dir):
    """The redacted copy cannot be written (here the store answers it is full, as MinIO's 507
    XMinioStorageFull does; every other call is real): the decoded audio must stay for the retry,
    or the recording would stay unredacted for good."""
    from minio import Minio
    from minio.error import S3Error

    from common.audio import decode_audio
    from common.db import create_pool
    from common.messages import TranscriptCompleted
    from common.storage import make_client, pcm_key
    from services.ingest.inbox import Inbox

    settings = stack.settings()
    s3 = make_client(settings)

    class FullStore(Minio):
        def put_object(self, bucket_name, object_name, *args, **kwargs):
            if object_name.startswith("uploads/"):
                raise S3Error(None, "XMinioStorageFull", "Storage backend has reached its minimum free drive threshold",
                              f"/{bucket_name}/{object_name}", None, None, bucket_name, object_name)
            return super().put_object(bucket_name, object_name, *args, **kwargs)

    full = FullStore(settings.minio_endpoint, access_key=settings.minio_access_key,
                     secret_key=settings.minio_secret_key.get_secret_value(), secure=settings.minio_secure,
                     region=settings.minio_region)
    job_id = stack.submit_job(fixtures_dir / "jfk.flac", data={"redact": "card"})
    assert stack.wait_finished(job_id)["status"] == "done"
    pool = await create_pool(settings)
    try:
        deadline = time.monotonic() + 60
        while not await pool.fetchval("SELECT audio_redacted_at IS NOT NULL FROM transcripts WHERE id = $1", job_id):
            assert time.monotonic() < deadline, "never redacted"
            await asyncio.sleep(0.3)
        # As the job stood when it ended: not yet redacted, its decoded audio stored.
        audio = decode_audio(str(fixtures_dir / "jfk.flac"))
        upload_bytes(s3, settings.audio_bucket, pcm_key(job_id), (audio * 32767).astype("<i2").tobytes())
        await pool.execute("UPDATE transcripts SET audio_redacted_at = NULL WHERE id = $1", job_id)
        ended = TranscriptCompleted(job_id=job_id, transcript_id=job_id, filename="jfk.flac", segment_count=1)

        with pytest.raises(S3Error):
            await Inbox(settings, pool, full, asyncio.Event()).on_job_ended(ended)
        assert s3.stat_object(settings.audio_bucket, pcm_key(job_id)).size == audio.size * 2  # kept
        await Inbox(settings, pool, s3, asyncio.Event()).on_job_ended(ended)  # the retry
        assert await pool.fetchval("SELECT audio_redacted_at IS NOT NULL FROM transcripts WHERE id = $1", job_id)
        with pytest.raises(S3Error):
            s3.stat_object(settings.audio_bucket, pcm_key(job_id))
    finally:
        await pool.close()
        httpx.delete(f"{stack.api}/transcripts/{job_id}", timeout=30)
