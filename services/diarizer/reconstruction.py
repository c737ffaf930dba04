"""From per-window local activity and its speaker assignment to who spoke when over the file.

Windows overlap (each frame is seen by up to four), so the file-level picture is an average:
the number of people talking in a frame is the windows' mean local count, rounded; that many
speakers are active in the frame, the ones whose averaged activity is highest. Overlap survives:
a frame where two people talk gives two turns."""

from __future__ import annotations

import numpy as np

from common.messages import SpeakerTurn

# A pause this short inside one speaker's talk is part of the turn (the AMI references are
# annotated that way); bridging it also keeps words from being split between segments.
SAME_SPEAKER_GAP_S = 0.5
# A probe must prefer another speaker by this much cosine similarity to relabel a frame.
RECHECK_MARGIN = 0.1
# A change of speaker that only the probes found is moved into a pause near it when the audio
# there is this much quieter than the median around it: people mostly hand over at a pause, and
# the probes (1.5 s every 0.75 s) place a change only to within about a third of a second. At every
# such change in the AMI clips, pauses 13.7-26 dB deep each brought it 0.09-0.37 s nearer the
# reference's change; shallower dips (0-10 dB) would have helped as often as hurt. Any value from
# 10 to 13 dB gives the same turns on every fixture.
PAUSE_DIP_DB = 12.0


def frame_offsets(starts_s: np.ndarray, frame_step_s: float) -> np.ndarray:
    return np.rint(starts_s / frame_step_s).astype(np.int64)


def accumulate(activity: np.ndarray, clusters: np.ndarray, offsets: np.ndarray, num_frames: int,
               num_speakers: int) -> tuple[np.ndarray, np.ndarray]:
    """File-level speaker activations (frames, speakers) in [0, 1] and speaker count (frames,)
    from local `activity` (windows, window_frames, local) and `clusters` (windows, local): the
    global speaker of each local speaker, -1 for none."""
    window_frames = activity.shape[1]
    total = np.zeros((num_frames, num_speakers), dtype=np.float32)
    seen = np.zeros((num_frames, num_speakers), dtype=np.float32)
    count = np.zeros(num_frames, dtype=np.float32)
    covered = np.zeros(num_frames, dtype=np.float32)
    for w in range(len(activity)):
        a, b = offsets[w], min(num_frames, offsets[w] + window_frames)
        if b <= a:
            continue
        local = activity[w, : b - a].astype(np.float32)
        count[a:b] += local.sum(axis=1)
        covered[a:b] += 1
        for k in np.unique(clusters[w][clusters[w] >= 0]):
            total[a:b, k] += local[:, clusters[w] == k].max(axis=1)
            seen[a:b, k] += 1
    activations = np.where(seen > 0, total / np.maximum(seen, 1), 0.0)
    speakers_per_frame = np.rint(count / np.maximum(covered, 1)).astype(np.int64)
    return activations, speakers_per_frame


def binarize(activations: np.ndarray, speakers_per_frame: np.ndarray) -> np.ndarray:
    """(frames, speakers) 0/1: in each frame the `speakers_per_frame` most active speakers.
    The count also holds local speakers too short in a window for an embedding (no global
    speaker, no activation). A place they leave that no active speaker fills goes to the speaker
    heard nearest in time among those not already talking there (it was the first speaker of all
    those at 0, often one heard nowhere near); a speaker heard nowhere is never turned on."""
    frames, k = activations.shape
    binary = np.zeros((frames, k), dtype=bool)
    if k == 0:
        return binary
    order = np.argsort(-activations, axis=1, kind="stable")
    every = np.arange(frames)
    wanted = np.minimum(speakers_per_frame, k)
    # The frames with a place no active speaker fills (few: the count's last is at 0 there).
    short = np.flatnonzero((wanted > 0) & (activations[every, order[every, np.maximum(wanted - 1, 0)]] <= 0))
    distance = _distance_to_heard(activations, short)
    for rank in range(int(wanted.max(initial=0))):
        active = activations[every, order[:, rank]] > 0
        on = (wanted > rank) & active
        binary[np.flatnonzero(on), order[on, rank]] = True
        open_place = (wanted[short] > rank) & ~active[short]
        rows = short[open_place]
        if len(rows):
            nearest = np.where(binary[rows], np.inf, distance[open_place])
            found = np.isfinite(nearest.min(axis=1))
            binary[rows[found], np.argmin(nearest[found], axis=1)] = True
    return binary


def _distance_to_heard(activations: np.ndarray, frames: np.ndarray) -> np.ndarray:
    """(len(frames), speakers): how many frames from each of `frames` (sorted) the nearest one
    where that speaker has any activation is; inf for a speaker heard nowhere."""
    distance = np.full((len(frames), activations.shape[1]), np.inf)
    for speaker in range(activations.shape[1]):
        heard = np.flatnonzero(activations[:, speaker] > 0)
        if len(heard) == 0 or len(frames) == 0:
            continue
        after = np.minimum(np.searchsorted(heard, frames), len(heard) - 1)
        before = np.maximum(after - 1, 0)
        distance[:, speaker] = np.minimum(np.abs(heard[before] - frames), np.abs(heard[after] - frames))
    return distance


def recheck_single_speaker(binary: np.ndarray, speakers_per_frame: np.ndarray, probe_frames: np.ndarray,
                           probe_scores: np.ndarray) -> np.ndarray:
    """Where one person talks, give the frame to the speaker the short probes covering it match
    best (triangular weights around each probe's centre), when that beats the current speaker by
    RECHECK_MARGIN. `probe_frames` (probes, 2) are frame spans, `probe_scores` (probes, speakers)
    cosine similarities to the speakers' centroids."""
    frames, k = binary.shape
    if k < 2 or len(probe_frames) == 0:
        return binary
    score = np.zeros((frames, k), dtype=np.float32)
    weight = np.zeros(frames, dtype=np.float32)
    for (a, b), row in zip(probe_frames, probe_scores):
        b = min(b, frames)
        if b <= a:
            continue
        length = b - a
        triangle = 1.0 - np.abs((np.arange(length) + 0.5) / length * 2 - 1) + 0.05
        score[a:b] += triangle[:, None] * row[None, :]
        weight[a:b] += triangle
    single = np.flatnonzero((weight > 0) & (speakers_per_frame == 1) & (binary.sum(axis=1) == 1))
    if len(single) == 0:
        return binary
    mean = score[single] / weight[single, None]
    current = np.argmax(binary[single], axis=1)
    best = np.argmax(mean, axis=1)
    rows = np.arange(len(single))
    change = mean[rows, best] - mean[rows, current] > RECHECK_MARGIN
    out = binary.copy()
    out[single[change]] = False
    out[single[change], best[change]] = True
    return out


def _lone_speaker(binary: np.ndarray) -> np.ndarray:
    """The speaker talking alone in each frame, -1 where nobody or several do."""
    return np.where(binary.sum(axis=1) == 1, np.argmax(binary, axis=1), -1)


def changes_at_pauses(rechecked: np.ndarray, segmented: np.ndarray, loudness: np.ndarray, reach: int) -> np.ndarray:
    """`rechecked` with each change between two lone speakers that only the probes found (in
    `segmented`, the activity before their recheck, one voice goes on across it) moved to the
    quietest frame within `reach` frames of it, when that frame is PAUSE_DIP_DB below the median
    of the frames looked at. `loudness` (frames,) is the audio's mean square around each frame."""
    frames = len(rechecked)
    now, before = _lone_speaker(rechecked), _lone_speaker(segmented)
    probe_made = ((now[1:] != now[:-1]) & (now[1:] >= 0) & (now[:-1] >= 0)
                  & (before[1:] == before[:-1]) & (before[1:] >= 0))
    out = rechecked.copy()
    for change in np.flatnonzero(probe_made) + 1:
        left, right, voice = now[change - 1], now[change], before[change]
        # A short stretch between two changes is shared: each looks only in its own half of it
        # (so no run needs following further than twice the reach).
        start = change - 1
        while start > max(0, change - 2 * reach) and now[start - 1] == left and before[start - 1] == voice:
            start -= 1
        end = change
        while end + 1 < min(frames, change + 2 * reach + 2) and now[end + 1] == right and before[end + 1] == voice:
            end += 1
        first = max(change - reach, (start + change) // 2)
        last = min(change + reach, (change + end + 1) // 2 - 1)
        looked_at = loudness[first:last + 1]
        quietest = int(np.argmin(looked_at))
        if looked_at[quietest] * 10 ** (PAUSE_DIP_DB / 10) > np.median(looked_at):
            continue
        out[first:last + 1] = False
        out[first:first + quietest, left] = True
        out[first + quietest:last + 1, right] = True
    return out


def probe_owners(binary: np.ndarray, speakers_per_frame: np.ndarray, probe_frames: np.ndarray,
                 share: float = 0.8) -> np.ndarray:
    """The speaker each probe listened to, -1 unless one speaker talks alone under at least
    `share` of its frames."""
    owners = np.full(len(probe_frames), -1, dtype=np.int64)
    speaker = np.where(speakers_per_frame == 1, _lone_speaker(binary), -1)
    for i, (a, b) in enumerate(probe_frames):
        b = min(b, len(binary))
        if b <= a:
            continue
        who = speaker[a:b][speaker[a:b] >= 0]
        if len(who) == 0:
            continue
        values, counts = np.unique(who, return_counts=True)
        if counts.max() >= share * (b - a):
            owners[i] = values[np.argmax(counts)]
    return owners


def turns_from_binary(binary: np.ndarray, frame_step_s: float, frame_duration_s: float,
                      duration: float, labels: list[str]) -> list[SpeakerTurn]:
    """Turns per speaker (frame middles as boundaries), short same-speaker pauses bridged;
    sorted by start. Turns of different speakers may overlap."""
    turns: list[SpeakerTurn] = []
    middle = frame_duration_s / 2
    for k in range(binary.shape[1]):
        column = np.concatenate([[False], binary[:, k], [False]])
        edges = np.flatnonzero(np.diff(column.astype(np.int8)))
        spans: list[list[float]] = []
        for on, off in zip(edges[::2], edges[1::2]):
            start = on * frame_step_s + middle
            end = min(duration, off * frame_step_s + middle)
            if spans and start - spans[-1][1] < SAME_SPEAKER_GAP_S:
                spans[-1][1] = end
            else:
                spans.append([start, end])
        for start, end in spans:
            if end > start:
                turns.append(SpeakerTurn(speaker=labels[k], start=round(max(0.0, start), 3),
                                         end=round(end, 3)))
    return sorted(turns, key=lambda t: (t.start, t.end, t.speaker))
