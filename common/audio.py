"""Audio decoding (PyAV, which carries its own FFmpeg): any common format to 16 kHz mono."""

from __future__ import annotations

import logging
import os
from typing import BinaryIO

import av
import numpy as np

log = logging.getLogger(__name__)

SAMPLE_RATE = 16_000
PCM_BYTES_PER_SECOND = SAMPLE_RATE * 2  # signed 16-bit mono


class UndecodableAudio(ValueError):
    """The bytes are not audio this service can decode."""


class AudioTooLong(ValueError):
    pass


# What a recording can be. Anything outside is refused before decoding: a crafted header with a
# 1 Hz sample rate would otherwise be resampled 16,000-fold in memory.
MIN_SAMPLE_RATE, MAX_SAMPLE_RATE = 8_000, 192_000
MAX_CHANNELS = 8
# Only containers of audio (and video with sound) and no other data: demuxers that open further
# files or URLs (HLS playlists, concat lists, image sequences...) are not on the list, and no
# protocol but local files may be opened.
AUDIO_DEMUXERS = ("wav,w64,mp3,aac,mov,ogg,matroska,flac,aiff,caf,amr,au,asf,wv,ape,tta,ac3,eac3,dts,"
                  "truehd,mpeg,mpegts,avi,flv,gsm,voc,mp2")
OPEN_OPTIONS = {"format_whitelist": AUDIO_DEMUXERS, "protocol_whitelist": "file,pipe"}
# The accepted containers as a user knows them (by their files' extensions), for the refusal of
# any other.
ACCEPTED_CONTAINERS = ("wav, w64, mp3, mp2, aac (ADTS), mp4/m4a/mov, ogg/opus, mkv/webm/mka, flac, aiff, caf, amr, "
                       "au, wma/asf, wv, ape, tta, ac3, eac3, dts, truehd, mpeg-ps, mpeg-ts, avi, flv, gsm, voc")
# Demuxers of bare streams, whose length no header gives: FFmpeg estimates it from the first
# frames' bit rate, which past a quiet start (coded at a low rate) makes a 15-minute AAC 8 hours.
LENGTH_ESTIMATED_DEMUXERS = frozenset({"aac", "mp3", "ac3", "eac3", "dts", "truehd", "amr", "gsm"})


def _open(source: str | BinaryIO):
    try:
        return av.open(source, mode="r", metadata_errors="ignore", options=OPEN_OPTIONS)
    except av.error.ArgumentError as exc:
        # What FFmpeg answers (EINVAL) when the container it finds is not on the list; of those on
        # it, only a damaged TTA header was seen to answer the same, and is told the same.
        refusal = f"its container format is not one accepted here (accepted: {ACCEPTED_CONTAINERS})"
        raise UndecodableAudio(refusal) from exc


def _undecodable(source: str | BinaryIO, exc: Exception) -> UndecodableAudio:
    try:
        if isinstance(source, str):
            empty = os.path.getsize(source) == 0
        else:
            empty = source.seek(0, os.SEEK_END) == 0
    except (OSError, ValueError):
        empty = False
    return UndecodableAudio("the file is empty" if empty else f"not decodable audio ({type(exc).__name__})")


def _not_about_the_content(exc: Exception) -> bool:
    """An error that says nothing of the bytes: FFmpeg out of memory (ENOMEM), or an OSError of
    Python's own reading the source (a spool on a failing or full disk), which PyAV raises as it
    was. FFmpeg's own errors (its OSError subclasses included: EIO, EINVAL...) are about the
    container it reads. Raised as they are, these are retried like any error, not taken for a file
    that is not audio (or, past the first frames, for a truncated one whose end is dropped)."""
    return isinstance(exc, av.error.MemoryError) or (
        isinstance(exc, OSError) and not isinstance(exc, av.error.FFmpegError))


def _audio_stream(container):
    """The first audio stream, if its format is one a recording can have."""
    if not container.streams.audio:
        raise UndecodableAudio("the file has no audio stream")
    stream = container.streams.audio[0]
    if stream.codec_context is None:  # PyAV gives none to a codec FFmpeg has no decoder for
        raise UndecodableAudio("its audio codec cannot be decoded here")
    rate, channels = stream.codec_context.sample_rate, stream.codec_context.channels
    if not MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE:
        raise UndecodableAudio(f"unsupported sample rate {rate} Hz (8-192 kHz accepted)")
    if channels > MAX_CHANNELS:
        raise UndecodableAudio(f"{channels} channels (at most {MAX_CHANNELS} accepted)")
    return stream


# Packets that do not decode (a damaged spot) are skipped, as players skip them, up to this many
# in a row: past them the rest is not audio. Counted over the whole file, a long recording with a
# glitch now and then was cut short at its 101st.
MAX_BAD_PACKETS = 100


def _frames(container, stream):
    """The stream's decoded frames, packet by packet, past packets that do not decode."""
    bad_in_a_row = 0
    for packet in container.demux(stream):
        try:
            frames = packet.decode()
        except av.error.InvalidDataError:
            bad_in_a_row += 1
            if bad_in_a_row > MAX_BAD_PACKETS:
                raise
            continue
        bad_in_a_row = 0
        yield from frames


def _too_long(max_seconds: float, channels: int = 1) -> AudioTooLong:
    if channels > 1:
        return AudioTooLong(f"the audio is longer than the limit of {max_seconds / 3600:g} h, its {channels}"
                            f" channels kept apart counting one after another")
    return AudioTooLong(f"the audio is longer than the limit of {max_seconds / 3600:g} h")


def _header_seconds(container, stream) -> float | None:
    """How long the header says the stream lasts, or None where it says nothing. Matroska/WebM and
    FLV give no stream a length, only the whole file (Matroska's Segment Duration, FLV's metadata
    or last timestamp): FFmpeg leaves the stream's unset and sets the container's. Where it
    estimates one from the bit rate instead, it sets the stream's, so the container's alone is the
    file's own word."""
    if stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
    if stream.duration is None and container.duration and container.duration > 0:
        return container.duration / av.time_base
    return None


def _check_header_length(container, stream, max_seconds: float | None, channels: int) -> None:
    """AudioTooLong when the header says the stream lasts past `max_seconds`, its `channels`
    counted one after another. A length FFmpeg only estimated is not held against the file: the
    decoded samples are counted against the limit all the same."""
    if set(container.format.name.split(",")) & LENGTH_ESTIMATED_DEMUXERS:
        return
    seconds = _header_seconds(container, stream) if max_seconds else None
    if seconds is not None and seconds * channels > max_seconds:
        raise _too_long(max_seconds, channels)


def _mixed_evenly_by_ffmpeg(layout) -> bool:
    """Whether FFmpeg's own mix to mono weighs every channel of `layout` alike. It mixes by
    position: a channel it takes for LFE (the 4th of a 6-, 7- or 8-channel file without a channel
    mask, read as 5.1 or 7.1; the 3rd of 3, read as 2.1) comes out silent, a centre louder than the
    others, and it refuses some layouts outright. One channel, or two side by side, it averages
    (kept so: what stereo decodes to stays as it was)."""
    return len(layout.channels) == 1 or layout.name in ("stereo", "2 channels", "downmix")


def _channels_averaged(interleaved: np.ndarray) -> np.ndarray:
    """One row of 16-bit samples, the average of float `interleaved`'s columns (its channels):
    every microphone of a recording heard alike, whatever position FFmpeg gives its channel."""
    mixed = interleaved.mean(axis=1, dtype=np.float32)
    mixed *= np.float32(32768)
    np.rint(mixed, out=mixed)
    np.clip(mixed, -32768, 32767, out=mixed)
    return mixed.astype(np.int16)[None, :]


def decode_audio(source: str | BinaryIO, max_seconds: float | None = None, *,
                 separate_channels: bool = False) -> np.ndarray:
    """Decode the first audio stream to float32 mono at 16 kHz in [-1, 1] (with
    `separate_channels`, one row per channel: shape (channels, samples); without, every channel
    counts alike in the mix). The length limit is checked on the header's duration (where the
    container has one: not on FFmpeg's estimate) and on the decoded input, before resampling;
    channels kept apart count one after another, as they are diarized and held in memory."""
    pieces: list[np.ndarray] = []
    decoded_s = 0.0
    try:
        with _open(source) as container:
            stream = _audio_stream(container)
            channels = max(1, stream.codec_context.channels) if separate_channels else 1
            layout = stream.codec_context.layout.name if channels > 1 else "mono"
            limit_s = max_seconds / channels if max_seconds else None
            _check_header_length(container, stream, max_seconds, channels)

            def resampled(frame) -> None:
                # Interleaved samples, one row per channel after the reshape (planar output of 8
                # channels crashed PyAV).
                for out in resampler.resample(frame):
                    if averaged:
                        pieces.append(_channels_averaged(out.to_ndarray().reshape(-1, len(out.layout.channels))))
                    else:
                        pieces.append(out.to_ndarray().reshape(-1, channels).T)

            resampler, setup, averaged = None, None, False
            for frame in _frames(container, stream):
                decoded_s += frame.samples / (frame.sample_rate or SAMPLE_RATE)
                if limit_s and decoded_s > limit_s:
                    raise _too_long(max_seconds, channels)
                frame.pts = None  # let the resampler ignore gaps in timestamps
                # A stream may change its rate or layout midway (files joined end to end): a
                # resampler takes one kind of input.
                if (frame.format.name, frame.layout.name, frame.sample_rate) != setup:
                    if resampler is not None:
                        resampled(None)
                    averaged = channels == 1 and not _mixed_evenly_by_ffmpeg(frame.layout)
                    if averaged:  # resampled as it is, its channels averaged here
                        resampler = av.AudioResampler(format="flt", layout=frame.layout, rate=SAMPLE_RATE)
                    else:
                        resampler = av.AudioResampler(format="s16", layout=layout, rate=SAMPLE_RATE)
                    setup = (frame.format.name, frame.layout.name, frame.sample_rate)
                resampled(frame)
            if resampler is not None:
                resampled(None)
    except (UndecodableAudio, AudioTooLong):
        raise
    except (av.error.FFmpegError, ValueError, IndexError, OSError) as exc:
        if _not_about_the_content(exc):
            raise
        if not pieces:
            raise _undecodable(source, exc) from exc
        # A truncated file: keep what decoded, as players do.
        log.warning("the audio does not decode past %.1f s (%s: %s); what decoded before is kept", decoded_s,
                    type(exc).__name__, exc)
    if not pieces:
        raise UndecodableAudio("the file contains no audio samples")
    # 6 bytes a sample at the peak (a 4-hour file: 1.4 GB), not the 14 of copies made in turn.
    samples = np.concatenate(pieces, axis=1)
    pieces.clear()
    audio = samples.astype(np.float32)
    del samples
    audio *= np.float32(1 / 32768)
    return audio if separate_channels else audio[0]


def probe_audio(source: BinaryIO, max_seconds: float | None = None, *, separate_channels: bool = False) -> None:
    """Cheap check that `source` is decodable audio of an accepted format: opens it and decodes
    the first frames, past damaged packets as decode_audio does. Raises UndecodableAudio with a
    message a user understands, or AudioTooLong when the header's duration is past `max_seconds`
    (counted as decode_audio counts it, which checks it again: a header may understate it)."""
    try:
        with _open(source) as container:
            stream = _audio_stream(container)
            _check_header_length(container, stream, max_seconds,
                                 max(1, stream.codec_context.channels) if separate_channels else 1)
            for index, frame in enumerate(_frames(container, stream)):
                if frame.samples > 0:
                    return
                if index > 50:
                    break
    except (UndecodableAudio, AudioTooLong):
        raise
    except (av.error.FFmpegError, ValueError, IndexError, OSError) as exc:
        if _not_about_the_content(exc):
            raise
        raise _undecodable(source, exc) from exc
    raise UndecodableAudio("the file contains no audio samples")


def float_to_pcm16(audio: np.ndarray, block: int = 1 << 20) -> bytes:
    """16-bit little-endian samples, converted a block at a time: 4 bytes a sample beside the input
    (the samples and their bytes), where whole-array steps took 16. Scaled by 32768 and rounded,
    the inverse of decoding's (and pcm16_to_float's) 1/32768: 16-bit samples decoded and stored
    again come back as they were (scaled by 32767 and truncated, each lost a step, and ±1 became 0)."""
    flat = audio.reshape(-1)
    out = np.empty(flat.shape, dtype="<i2")
    for first in range(0, len(flat), block):
        scaled = flat[first:first + block] * np.float32(32768)
        np.rint(scaled, out=scaled)
        np.clip(scaled, -32768, 32767, out=scaled)
        out[first:first + block] = scaled
    return out.tobytes()


def pcm16_to_float(data: bytes | np.ndarray) -> np.ndarray:
    """float32 samples in [-1, 1] of 16-bit PCM (its bytes, or its samples), in a new array: a
    slice of a larger read does not keep the rest of it in memory. Scaled in place, without a
    second copy."""
    samples = data if isinstance(data, np.ndarray) else np.frombuffer(data, dtype="<i2")
    audio = samples.astype(np.float32)
    audio *= np.float32(1 / 32768)
    return audio
