"""Decoding every common format to 16 kHz mono, and choosing the diarization backend."""

from __future__ import annotations

import errno
import io
import struct

import av
import numpy as np
import pytest

from common.audio import (
    MAX_BAD_PACKETS,
    SAMPLE_RATE,
    AudioTooLong,
    UndecodableAudio,
    decode_audio,
    float_to_pcm16,
    pcm16_to_float,
    probe_audio,
)
from common.messages import JobOptions
from common.settings import Settings
from services.diarizer.pipeline import make_diarizer
from tests.audio_files import encode, wav_header


@pytest.mark.parametrize("container, codec, rate", [
    ("ipod", "aac", 44_100),   # .m4a
    ("ogg", "vorbis", 44_100),
    ("ogg", "libopus", 48_000),
    ("flac", "flac", 22_050),
    ("wav", "pcm_s16le", 8_000),  # telephone audio
])
def test_common_formats_decode_to_16k_mono_of_the_right_length(fixtures_dir, container, codec, rate):
    original = decode_audio(str(fixtures_dir / "jfk.flac"))
    data = encode(original, container, codec, rate)
    probe_audio(io.BytesIO(data))
    decoded = decode_audio(io.BytesIO(data))
    assert decoded.dtype == np.float32
    assert abs(decoded.size / SAMPLE_RATE - 11.0) < 0.2
    assert 0.05 < float(np.abs(decoded).max()) <= 1.0


def test_stereo_is_mixed_to_mono(fixtures_dir):
    decoded = decode_audio(str(fixtures_dir / "stereo_diarization.wav"))
    assert decoded.ndim == 1 and abs(decoded.size / SAMPLE_RATE - 5.0) < 0.05


def test_channels_can_be_kept_apart(fixtures_dir):
    apart = decode_audio(str(fixtures_dir / "stereo_diarization.wav"), separate_channels=True)
    mixed = decode_audio(str(fixtures_dir / "stereo_diarization.wav"))
    assert apart.shape == (2, mixed.size) and np.abs(apart.mean(axis=0) - mixed).max() < 1e-3
    # One speaker per channel: each is loud where the other is, not a copy of it.
    assert np.corrcoef(apart[0], apart[1])[0, 1] < 0.5
    assert decode_audio(str(fixtures_dir / "en_dialogue.wav"), separate_channels=True).shape[0] == 1


def test_too_long_audio_is_refused_while_decoding(fixtures_dir):
    with pytest.raises(AudioTooLong, match="longer than the limit"):
        decode_audio(str(fixtures_dir / "jfk.flac"), max_seconds=5)


@pytest.mark.parametrize("channels", [3, 4, 6, 7, 8])
def test_every_channel_is_heard_alike_when_mixed_to_mono(channels):
    """A recorder's WAV of one microphone a channel, without a channel mask: FFmpeg took 3 channels
    for 2.1 and 6, 7 or 8 for 5.1 or 7.1, and its mix to mono gave the channel it took for LFE
    (the 3rd of 3, the 4th of 6 to 8) nothing: whoever spoke on it was never transcribed."""
    tone = (np.sin(2 * np.pi * 440 * np.arange(SAMPLE_RATE) / SAMPLE_RATE) * 8000).astype("<i2")
    levels = []
    for speaking in range(channels):
        samples = np.zeros((SAMPLE_RATE, channels), dtype="<i2")
        samples[:, speaking] = tone
        data = wav_header(samples.nbytes, channels=channels) + samples.tobytes()
        mixed = decode_audio(io.BytesIO(data))
        assert mixed.size == SAMPLE_RATE
        levels.append(float(np.sqrt(np.mean(mixed ** 2))) * 32768)
    alone = 8000 / np.sqrt(2) / channels  # each channel an equal part of the mix
    assert all(abs(level - alone) < 0.02 * alone for level in levels), levels


def test_stereo_mixes_both_channels_alike():
    """FFmpeg's own mix of two channels is already their average: stereo is left to it, and
    decodes as it did."""
    tone = (np.sin(2 * np.pi * 440 * np.arange(SAMPLE_RATE) / SAMPLE_RATE) * 8000).astype("<i2")
    for speaking in range(2):
        samples = np.zeros((SAMPLE_RATE, 2), dtype="<i2")
        samples[:, speaking] = tone
        mixed = decode_audio(io.BytesIO(wav_header(samples.nbytes, channels=2) + samples.tobytes()))
        assert abs(float(np.sqrt(np.mean(mixed ** 2))) * 32768 - 8000 / np.sqrt(2) / 2) < 20


def test_a_length_ffmpeg_only_estimates_is_not_held_against_the_file():
    """Raw MP3 (without a Xing header that fits it) and ADTS AAC say nothing of their length:
    FFmpeg estimates it from the first frames' bit rate, and past a quiet start coded at a low
    rate a 15-minute recording was refused as longer than 6 hours, at submission and in the job.
    The decoded samples still hold it to the limit."""
    rng = np.random.default_rng(0)
    quiet = np.zeros(3 * SAMPLE_RATE, dtype=np.float32)
    loud = (rng.standard_normal(27 * SAMPLE_RATE) * 0.2).astype(np.float32)
    mp3 = (encode(quiet, "mp3", "mp3", 44_100, channels=1, bit_rate=32_000) +
           encode(loud, "mp3", "mp3", 44_100, channels=1, bit_rate=320_000))
    aac = encode(np.concatenate([quiet, quiet, loud]), "adts", "aac", 44_100, channels=1)
    for recording, seconds in ((mp3, 30), (aac, 33)):
        with av.open(io.BytesIO(recording)) as container:
            stream = container.streams.audio[0]
            assert float(stream.duration * stream.time_base) > 120  # what the header is taken to say
        probe_audio(io.BytesIO(recording), 60)
        probe_audio(io.BytesIO(recording), 40, separate_channels=True)
        assert abs(decode_audio(io.BytesIO(recording), 60).size / SAMPLE_RATE - seconds) < 0.2
        with pytest.raises(AudioTooLong, match="longer than the limit"):
            decode_audio(io.BytesIO(recording), 20)


@pytest.mark.parametrize("container, codec", [("nut", "pcm_s16le"), ("sox", "pcm_s32le")])
def test_a_container_not_accepted_is_said_to_be_one(container, codec):
    """Audio in a container off the list was refused as "not decodable audio (ArgumentError)":
    the submitter learns what was wrong and what to send instead."""
    data = encode(np.zeros(SAMPLE_RATE, dtype=np.float32), container, codec, SAMPLE_RATE, channels=1)
    for attempt in (probe_audio, decode_audio):
        with pytest.raises(UndecodableAudio) as refused:
            attempt(io.BytesIO(data))
        assert "its container format is not one accepted here" in str(refused.value)
        assert all(name in str(refused.value) for name in ("wav", "mp3", "mp4/m4a", "ogg", "flac", "webm"))


def test_channels_kept_apart_count_one_after_another_against_the_length_limit(fixtures_dir):
    """Each channel is held and diarized on its own: 8 channels of 6 hours held 11 GB, past the
    diarizer's memory, though the file was within MAX_AUDIO_HOURS."""
    stereo = str(fixtures_dir / "stereo_diarization.wav")
    seconds = decode_audio(stereo).size / SAMPLE_RATE
    assert decode_audio(stereo, max_seconds=1.5 * seconds).size == seconds * SAMPLE_RATE  # mixed: one length
    with pytest.raises(AudioTooLong, match="2 channels"):
        decode_audio(stereo, max_seconds=1.5 * seconds, separate_channels=True)
    assert decode_audio(stereo, max_seconds=2.1 * seconds, separate_channels=True).shape[0] == 2


def test_damage_here_and_there_loses_only_the_damaged_packets():
    """Damaged packets are skipped as players skip them; counted over the whole file, the 101st
    of them anywhere ended the recording there, silently: a long file with a glitch now and then
    came back cut short."""
    rng = np.random.default_rng(0)
    original = (rng.standard_normal(SAMPLE_RATE * 120) * 0.1).astype(np.float32)
    data = bytearray(encode(original, "flac", "flac", SAMPLE_RATE, channels=1))
    with av.open(io.BytesIO(bytes(data))) as container:
        packets = [(p.pos, p.size) for p in container.demux(container.streams.audio[0]) if p.size]
    damaged = 0
    for number, (position, size) in enumerate(packets[:len(packets) // 2]):  # the first minute
        if number % 3 == 1:
            data[position + size // 2:position + size // 2 + 8] = bytes(8)
            damaged += 1
    decoded = decode_audio(io.BytesIO(bytes(data)))
    assert damaged > 2 * MAX_BAD_PACKETS
    # The undamaged second minute is all there, sample for sample.
    tail = SAMPLE_RATE * 55
    assert len(decoded) > tail and np.abs(decoded[-tail:] - original[-tail:]).max() < 1e-4


def test_a_codec_without_a_decoder_is_undecodable_audio():
    """WAV format tag 0x1234 (or MPEG-H in MP4): PyAV opens the stream without a codec context,
    and its AttributeError answered a submission 500 and was retried by the diarizer."""
    header = wav_header(32_000)
    crafted = header[:20] + struct.pack("<H", 0x1234) + header[22:] + bytes(32_000)
    for attempt in (probe_audio, decode_audio):
        with pytest.raises(UndecodableAudio, match="its audio codec cannot be decoded here"):
            attempt(io.BytesIO(crafted))


def test_a_damaged_first_frame_is_skipped_by_the_probe_as_by_decoding(fixtures_dir):
    """The probe decoded without skipping damaged packets: a FLAC whose first frame is damaged
    was refused at submission, though it decodes."""
    data = bytearray((fixtures_dir / "jfk.flac").read_bytes())
    first_frame = 4
    while not data[first_frame] & 0x80:  # metadata blocks up to the last one
        first_frame += 4 + int.from_bytes(data[first_frame + 1:first_frame + 4], "big")
    first_frame += 4 + int.from_bytes(data[first_frame + 1:first_frame + 4], "big")
    data[first_frame:first_frame + 8] = bytes(8)
    probe_audio(io.BytesIO(bytes(data)))
    assert decode_audio(io.BytesIO(bytes(data))).size > 10 * SAMPLE_RATE


def test_the_probe_refuses_a_header_past_the_length_limit_as_decoding_does():
    """MAX_AUDIO_HOURS was only checked by the diarizer: a recording whose header says it is too
    long was taken, stored and queued, and failed there. Channels kept apart count one after
    another, as the diarizer counts them."""
    minute = encode(np.zeros(60 * 8000, dtype=np.float32), "flac", "flac", 8000, channels=2, sample_rate=8000)
    for limit, separate in ((30, False), (90, True)):
        with pytest.raises(AudioTooLong) as probed:
            probe_audio(io.BytesIO(minute), limit, separate_channels=separate)
        with pytest.raises(AudioTooLong) as decoded:
            decode_audio(io.BytesIO(minute), limit, separate_channels=separate)
        assert str(probed.value) == str(decoded.value)  # the job's reason, said at submission
    probe_audio(io.BytesIO(minute), 90)
    probe_audio(io.BytesIO(minute), 121, separate_channels=True)



@pytest.mark.parametrize("container, codec, rate", [
    ("webm", "libopus", 48_000),
    ("matroska", "aac", 44_100),  # .mka
    ("flv", "aac", 44_100),
])
def test_a_length_only_the_container_gives_is_held_against_the_file(container, codec, rate):
    """Matroska/WebM and FLV give the length of the whole file, none of its stream: only the
    stream's was read, so a 7-hour .webm, .mka or .flv was taken at submission, stored, and failed
    in the diarizer after decoding 6 hours of it."""
    seconds = 2
    stereo = encode(np.zeros(seconds * 8000, dtype=np.float32), container, codec, rate, sample_rate=8000)
    with av.open(io.BytesIO(stereo)) as opened:
        assert opened.streams.audio[0].duration is None and opened.duration / av.time_base >= seconds
    for limit, separate in ((1, False), (3, True)):
        with pytest.raises(AudioTooLong) as probed:
            probe_audio(io.BytesIO(stereo), limit, separate_channels=separate)
        with pytest.raises(AudioTooLong) as decoded:
            decode_audio(io.BytesIO(stereo), limit, separate_channels=separate)
        assert str(probed.value) == str(decoded.value)
    probe_audio(io.BytesIO(stereo), 3)
    probe_audio(io.BytesIO(stereo), 5, separate_channels=True)


def test_16_bit_samples_decoded_and_stored_again_come_back_as_they_were():
    """What the diarizer stores for the transcriber (float_to_pcm16 of the decoded audio) was
    scaled by 32767 and truncated where decoding scales by 1/32768: every sample lost a step, and
    a quiet recording's ±1 became 0."""
    every = np.arange(-32768, 32768, dtype=np.int16)
    assert np.frombuffer(float_to_pcm16(pcm16_to_float(every), block=1000), dtype="<i2").tolist() == every.tolist()
    assert np.frombuffer(float_to_pcm16(pcm16_to_float(every.tobytes())), dtype="<i2").tolist() == every.tolist()
    samples = np.random.default_rng(3).integers(-32768, 32768, SAMPLE_RATE, dtype=np.int16)
    samples[:6] = [1, -1, 2, -2, 32767, -32768]
    decoded = decode_audio(io.BytesIO(wav_header(samples.nbytes) + samples.tobytes()))
    assert float_to_pcm16(decoded) == samples.astype("<i2").tobytes()
    assert np.frombuffer(float_to_pcm16(np.array([1.5, -1.5, 1.0, -1.0], dtype=np.float32)), dtype="<i2").tolist() \
        == [32767, -32768, 32767, -32768]  # clipped, as ever


def test_png_is_not_audio():
    png = b"\x89PNG\r\n\x1a\n" + b"\0" * 64
    with pytest.raises(UndecodableAudio, match="its container format is not one accepted here"):
        probe_audio(io.BytesIO(png))
    with pytest.raises(UndecodableAudio, match="not decodable audio"):  # detected as no format at all
        probe_audio(io.BytesIO(bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8))))


def test_an_empty_file_is_said_to_be_empty(tmp_path):
    # A zero-byte bucket drop fails its job with this reason, not a decoder's error name.
    (tmp_path / "call.wav").write_bytes(b"")
    with pytest.raises(UndecodableAudio, match="the file is empty"):
        decode_audio(str(tmp_path / "call.wav"))
    with pytest.raises(UndecodableAudio, match="the file is empty"):
        decode_audio(io.BytesIO(b""))


def test_auto_backend_without_usable_pyannote_falls_back_to_offline():
    # pyannote.audio is an optional extra, not installed in the test environment.
    diarize, backend = make_diarizer(Settings(diarization_backend="auto", hf_token="hf_x"))
    assert backend == "offline"
    assert diarize(np.zeros(SAMPLE_RATE, dtype=np.float32), JobOptions()).turns == []  # silence
    _, backend = make_diarizer(Settings(diarization_backend="auto"))
    assert backend == "offline"


def test_explicit_pyannote_backend_refuses_to_start_when_unusable():
    with pytest.raises(SystemExit, match="cannot load the pyannote pipeline"):
        make_diarizer(Settings(diarization_backend="pyannote", hf_token="hf_x"))


def test_diarizer_device_is_checked_at_start_up():
    """DIARIZER_DEVICE=cuda on a machine without a GPU (CI's, with the CPU build of torch) refuses
    to start rather than running on the CPU unnoticed; `auto` runs on the CPU there."""
    import torch

    with pytest.raises(SystemExit, match="DIARIZER_DEVICE must be auto, cpu or cuda, not 'gpu'"):
        make_diarizer(Settings(diarization_backend="offline", diarizer_device="gpu"))
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="DIARIZER_DEVICE=cuda, but torch sees no CUDA device"):
            make_diarizer(Settings(diarization_backend="offline", diarizer_device="cuda"))
    else:  # a GPU here: cuda is taken at its word and diarizes on it
        on_gpu, _ = make_diarizer(Settings(diarization_backend="offline", diarizer_device="cuda"))
        assert on_gpu(np.zeros(SAMPLE_RATE, dtype=np.float32), JobOptions()).turns == []
    diarize, _ = make_diarizer(Settings(diarization_backend="offline", diarizer_device="auto"))
    assert diarize(np.zeros(SAMPLE_RATE, dtype=np.float32), JobOptions()).turns == []


@pytest.mark.parametrize(("rate", "channels", "says"), [
    (1, 1, "sample rate 1 Hz"), (7_000, 1, "sample rate 7000 Hz"), (16_000, 9, "9 channels")])
def test_formats_no_recording_has_are_refused_before_decoding(rate, channels, says):
    crafted = wav_header(200_000, rate=rate, channels=channels) + bytes(200_000)
    for attempt in (probe_audio, decode_audio):
        with pytest.raises(UndecodableAudio, match=says):
            attempt(io.BytesIO(crafted))


def test_a_list_of_other_files_is_not_audio(tmp_path, monkeypatch, fixtures_dir):
    """FFmpeg's concat demuxer would read a file named in the upload from the server's disk."""
    (tmp_path / "secret.flac").write_bytes((fixtures_dir / "jfk.flac").read_bytes())
    monkeypatch.chdir(tmp_path)
    playlist = b"ffconcat version 1.0\nfile 'secret.flac'\n"
    with pytest.raises(UndecodableAudio):
        probe_audio(io.BytesIO(playlist))
    with pytest.raises(UndecodableAudio):
        decode_audio(io.BytesIO(playlist))


def test_the_length_limit_is_checked_on_the_input():
    flac = encode(np.zeros(20 * 8000, dtype=np.float32), "flac", "flac", 8000, channels=1, sample_rate=8000)
    with pytest.raises(AudioTooLong, match="longer than the limit"):
        decode_audio(io.BytesIO(flac), max_seconds=10)
    assert decode_audio(io.BytesIO(flac), max_seconds=30).size == 20 * SAMPLE_RATE


def test_eight_channels_kept_apart_each_come_back_in_their_place(tmp_path):
    """An 8-track recorder's file: each channel its own row, in order. (Run apart: PyAV's planar
    output of 8 channels once crashed the whole process.)"""
    import subprocess
    import sys

    import av

    frames = np.stack([np.full(SAMPLE_RATE, (k + 1) * 1000, dtype=np.int16) for k in range(8)], axis=1)
    path = tmp_path / "eight.wav"
    with av.open(str(path), mode="w", format="wav") as out:
        stream = out.add_stream("pcm_s16le", rate=SAMPLE_RATE, layout="7.1")
        frame = av.AudioFrame.from_ndarray(frames.reshape(1, -1), format="s16", layout="7.1")
        frame.sample_rate = SAMPLE_RATE
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            out.mux(packet)
    code = ("import sys; from common.audio import decode_audio; a = decode_audio(sys.argv[1], separate_channels=True);"
            " print(a.shape[0], [round(float(row[len(row) // 2]) * 32768) for row in a])")
    result = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-500:]
    assert result.stdout.split(" ", 1) == ["8", f"{[(k + 1) * 1000 for k in range(8)]}\n"]


def test_files_joined_end_to_end_at_different_rates_decode_whole():
    """Two MP3s of different sample rates (and channel counts) laid end to end, as recorders and
    tools that append do: all of it, not only the first part."""
    tone = np.sin(np.linspace(0, 2 * np.pi * 440 * 3, 3 * SAMPLE_RATE)).astype(np.float32) * 0.3
    joined = encode(tone, "mp3", "mp3", 44_100, channels=1) + encode(tone, "mp3", "mp3", 22_050, channels=2)
    assert 5.8 < decode_audio(io.BytesIO(joined)).size / SAMPLE_RATE < 6.3


class FailingRead(io.RawIOBase):
    """A recording whose reading fails `after` bytes in, as a spool on a failing or full disk
    does: the bytes are real, the error is the one the disk would give."""

    def __init__(self, data: bytes, after: int, error: Exception):
        self._data, self._after, self._error = io.BytesIO(data), after, error

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self._data.seek(offset, whence)

    def tell(self) -> int:
        return self._data.tell()

    def readinto(self, buffer) -> int:
        if self._data.tell() >= self._after:
            raise self._error
        return self._data.readinto(buffer)


@pytest.mark.parametrize("error", [OSError(errno.EIO, "Input/output error"),
                                   av.error.MemoryError(errno.ENOMEM, "Cannot allocate memory")],
                         ids=["local I/O error", "FFmpeg out of memory"])
def test_an_error_reading_the_recording_is_not_taken_for_bad_audio(fixtures_dir, error):
    """A local I/O error reading the spool, or FFmpeg out of memory, failed the job at once as
    "not decodable audio" (at the start), or silently cut the recording where it came (past the
    first frames, as a truncated file is). Raised as it is, it is retried like any error."""
    flac = (fixtures_dir / "jfk.flac").read_bytes()
    for after in (0, len(flac) // 2):
        with pytest.raises(type(error)) as raised:
            decode_audio(FailingRead(flac, after, error))
        assert not isinstance(raised.value, UndecodableAudio)
    with pytest.raises(type(error)):
        probe_audio(FailingRead(flac, 0, error))
    # What was always bad input still is.
    with pytest.raises(UndecodableAudio, match="its container format is not one accepted here"):
        decode_audio(io.BytesIO(b"\x89PNG\r\n\x1a\n" + b"\0" * 64))
