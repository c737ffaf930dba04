"""Speaker clustering of window-local speaker embeddings.

Agglomerative (average linkage) clustering of the cleanest embeddings, cut at a distance
threshold; clusters too small to be a voice are folded into the nearest large one; a speaker
count first lowers the size a voice needs to that of the count's smallest cluster at the threshold,
and only then moves the cut along the dendrogram. Every embedding (clean or not) is then assigned to a
centroid with the constraint that two local speakers of one window are two different people
(an assignment problem per window, not a greedy choice). At most MAX_CLUSTERED embeddings are
clustered (an even sample over the file): memory stays bounded on a 4-hour file, and the rest are
assigned to the centroids like everything else. Whether a sampled cluster is large enough to be a
voice is decided on the whole file: each embedding counts for the sampled one nearest it.

Window-local embeddings cannot separate two voices that the segmentation model kept under one
local label for whole windows: their embeddings are all mixtures. `split_mixed` checks each
speaker afterwards on the short probe embeddings of the stretches where it talks alone (and
where one of the two voices it finds is another speaker's, keeps only the other)."""

from __future__ import annotations

import numpy as np

# Average Euclidean distance between unit-length embeddings of two clusters (sqrt(2 - 2 cos) for
# one pair); chosen on all the fixtures together, not on one file: pooled AMI DER moved by less
# than half a point between 1.0 and 1.1. Average linkage was steadier than pyannote's centroid
# linkage on these embeddings (centroid: the speaker count jumped with small threshold changes).
THRESHOLD = 1.05
METHOD = "average"
# A cluster is a voice when it has this many embeddings, or 10 % of them on a short recording (a
# speaker of a 30 s clip is in only a few windows). pyannote uses 12 with windows every second,
# about 12 s of presence; with windows every 2.5 s that is 5. With 12, the 13 fixtures laid end
# to end (27 people in 6 minutes) came back as 4 speakers (DER 55 %); with 5, 16 (DER 20 %).
MIN_CLUSTER_SIZE = 5
MIN_CLUSTER_SHARE = 0.1
MAX_CLUSTERED = 3000
# A speaker is split in two when its lone-speech probes fall into two groups whose mean voices
# are less alike than this (cosine). Measured on every fixture and the long concatenations: two
# people merged into one speaker gave 0.27-0.29, halves of one person's probes 0.55-0.82.
SPLIT_BELOW = 0.4
# ...and each group holds this many probes (about 3.75 s of lone speech at a 0.75 s hop).
MIN_SPLIT_PROBES = 4
# A group whose mean voice is this alike (cosine) to another speaker's centroid is that speaker:
# the clustering's own level for one voice (THRESHOLD between two unit vectors). The speaker
# being checked was then a mixture of a known voice and a new one, and becomes the new one alone.
# Under faint noise (-80 dBFS) ami_dev00 and ami_dev01 otherwise came back with a third speaker
# in 3 of 6 runs, each split group resembling the other person at 0.48-0.55; real splits on the
# fixtures and the long concatenations resembled no other speaker above 0.37.
SAME_VOICE = 1 - THRESHOLD**2 / 2
# Average linkage cuts off the most distant probes first, so one odd probe (a cough, a probe
# across a change of speaker) can take the place of a real second voice; groups smaller than
# MIN_SPLIT_PROBES are set aside and the rest split again, at most this many times.
MAX_SET_ASIDE = 3
# At most this many probes of one speaker are compared (an even sample over the file): the split
# holds their distance matrix, which for one voice talking alone for 4 hours (19,200 probes)
# took 3 GB.
MAX_SPLIT_PROBES = 1000


def _normalize(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-8)


def _large_clusters(labels: np.ndarray, min_size: int, weights: np.ndarray) -> np.ndarray:
    """The clusters whose members stand for at least `min_size` embeddings (labels 0, 1, ...)."""
    return np.flatnonzero(np.bincount(labels, weights=weights) >= min_size)


def _represented(embeddings: np.ndarray, sample: np.ndarray, threshold: float, chunk: int = 2048) -> np.ndarray:
    """How many of the unit-length `embeddings` each row of `sample` stands for: each embedding
    counts for the sampled one nearest it, when that is within `threshold` (farther from every
    sampled one, it could join none of their clusters and counts for none). Chunked: memory is
    chunk x len(sample), whatever the number of embeddings."""
    weights = np.zeros(len(sample), dtype=np.float64)
    sample = sample.astype(np.float32)
    within = 1 - threshold**2 / 2  # the threshold's Euclidean distance as a cosine
    for first in range(0, len(embeddings), chunk):
        similarity = embeddings[first:first + chunk].astype(np.float32) @ sample.T
        nearest = np.argmax(similarity, axis=1)
        close = similarity[np.arange(len(nearest)), nearest] >= within
        weights += np.bincount(nearest[close], minlength=len(sample))
    return weights


def _size_for_count(linkage: np.ndarray, threshold: float, min_size: int, lo: int,
                    weights: np.ndarray) -> float:
    """The size a cluster needs to be a voice when at least `lo` (2 or more) are asked for:
    `min_size`, or, when the threshold's cut holds that many clusters but fewer large ones, and
    exactly `lo` as large as its lo-th largest, that size (at least 2; as pyannote does with a
    count). A person who says one sentence
    in a long recording has about four window voices, under MIN_CLUSTER_SIZE: looking further
    down the dendrogram for a second large cluster split the main speaker in two instead."""
    from scipy.cluster.hierarchy import fcluster

    if lo < 2:
        return min_size
    sizes = np.sort(np.bincount(fcluster(linkage, threshold, criterion="distance") - 1, weights=weights))[::-1]
    if np.sum(sizes >= min_size) >= lo or len(sizes) < lo:
        return min_size
    lowered = sizes[lo - 1]
    # Only where that makes exactly the count: clusters tied at the lowered size (a main voice's
    # stray pairs) would all become voices; the walk decides those, as before.
    return lowered if lowered >= 2 and np.sum(sizes >= lowered) == lo else min_size


def _cut_closest_to(linkage: np.ndarray, threshold: float, min_size: int, lo: int, hi: int,
                    weights: np.ndarray) -> np.ndarray:
    """The dendrogram cut nearest the threshold whose number of large clusters is within
    [lo, hi] (or as close to that range as the dendrogram allows); a leaf stands for `weights`
    of the file's embeddings. The cuts tried include the one below every merge (each embedding
    its own cluster): a recording of one window may hold two voices in two embeddings only,
    alike enough to merge at the threshold (a telephone call), and a count of two must then keep
    them apart."""
    from scipy.cluster.hierarchy import fcluster

    labels = fcluster(linkage, threshold, criterion="distance") - 1
    found = len(_large_clusters(labels, min_size, weights))
    if lo <= found <= hi:
        return labels
    target = lo if found < lo else hi
    # Cut by merge index instead of distance, trying the merges nearest the threshold first (a
    # cut at merge m applies merges 0..m; -1, no merge at all, comes right after merge 0).
    by_index = linkage.copy()
    by_index[:, 2] = np.arange(len(linkage))
    best, best_gap = labels, abs(found - target)
    order = np.argsort(np.abs(linkage[:, 2] - threshold), kind="stable").tolist()
    order.insert(order.index(0) + 1, -1)
    for merge in order:
        candidate = (np.arange(len(linkage) + 1) if merge < 0
                     else fcluster(by_index, merge, criterion="distance") - 1)
        gap = abs(len(_large_clusters(candidate, min_size, weights)) - target)
        if gap < best_gap:
            best, best_gap = candidate, gap
        if gap == 0:
            break
    return best


def cluster_centroids(embeddings: np.ndarray, lo: int = 1, hi: int | None = None,
                      threshold: float = THRESHOLD) -> np.ndarray:
    """Centroids (k, dim) of the speakers among unit-length `embeddings`; lo <= k <= hi when
    there are enough embeddings to make that many."""
    from scipy.cluster.hierarchy import linkage

    n = len(embeddings)
    if n == 0:
        return np.zeros((0, embeddings.shape[1]), dtype=np.float32)
    hi = n if hi is None else min(hi, n)
    lo = min(lo, hi)
    if n == 1 or hi == 1:
        return _normalize(embeddings.mean(axis=0, keepdims=True))
    min_size = min(MIN_CLUSTER_SIZE, max(1, round(MIN_CLUSTER_SHARE * n)))
    if n > MAX_CLUSTERED:
        # A voice is as large as it is in the whole file, not in the sample: a person with a dozen
        # window voices among 9,000 has about four in the sample, and the sample's own minimum
        # folded them into someone else (a speaker count then split a frequent speaker instead).
        sample = embeddings[np.linspace(0, n - 1, MAX_CLUSTERED).round().astype(int)]
        weights = _represented(embeddings, sample, threshold)
        embeddings = sample
    else:
        weights = np.ones(n)
    tree = linkage(embeddings.astype(np.float64), method=METHOD, metric="euclidean")
    min_size = _size_for_count(tree, threshold, min_size, lo, weights)
    labels = _cut_closest_to(tree, threshold, min_size, lo, hi, weights)
    large = _large_clusters(labels, min_size, weights)
    if len(large) == 0:
        return _normalize(embeddings.mean(axis=0, keepdims=True))
    centroids = _normalize(np.stack([embeddings[labels == k].mean(axis=0) for k in large]))
    # Small clusters join the large one nearest them.
    for k in np.setdiff1d(np.unique(labels), large):
        nearest = int(np.argmax(centroids @ _normalize(embeddings[labels == k].mean(axis=0))))
        labels[labels == k] = large[nearest]
    return _normalize(np.stack([embeddings[labels == k].mean(axis=0) for k in large]))


def assign(embeddings: np.ndarray, valid: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Global speaker of each window-local speaker: `embeddings` (windows, local, dim),
    `valid` (windows, local). Returns (windows, local) cluster indices, -1 where not valid.
    Within a window, local speakers get distinct clusters when there are enough clusters."""
    from scipy.optimize import linear_sum_assignment

    windows, local, _ = embeddings.shape
    out = np.full((windows, local), -1, dtype=np.int64)
    k = len(centroids)
    if k == 0:
        return out
    scores = np.einsum("wld,kd->wlk", np.nan_to_num(embeddings), centroids)
    for w in range(windows):
        speakers = np.flatnonzero(valid[w])
        if len(speakers) == 0:
            continue
        if k == 1:
            out[w, speakers] = 0
            continue
        rows, cols = linear_sum_assignment(scores[w, speakers], maximize=True)
        out[w, speakers[rows]] = cols
        # More local speakers than clusters: the rest go to their best cluster.
        rest = np.setdiff1d(speakers, speakers[rows])
        out[w, rest] = np.argmax(scores[w, rest], axis=1)
    return out


def _two_voices(probes: np.ndarray) -> np.ndarray | None:
    """The mean voices (2, dim) of the two groups unit-length `probes` fall into, each of at
    least MIN_SPLIT_PROBES; None when they do not make two such groups."""
    from scipy.cluster.hierarchy import fcluster, linkage

    for _ in range(MAX_SET_ASIDE + 1):
        if len(probes) < 2 * MIN_SPLIT_PROBES:
            return None
        halves = fcluster(linkage(probes.astype(np.float64), method="average", metric="cosine"), 2, "maxclust")
        groups = [probes[halves == h] for h in (1, 2)]
        if min(len(g) for g in groups) >= MIN_SPLIT_PROBES:
            return _normalize(np.stack([g.mean(axis=0) for g in groups]))
        probes = max(groups, key=len)
    return None


def split_mixed(centroids: np.ndarray, probes: np.ndarray, owners: np.ndarray) -> np.ndarray:
    """Centroids with each speaker whose lone-speech `probes` (owners[i] = its speaker, -1 for
    none) form two clearly different voices replaced by those two; or by the one of them that is
    not another speaker's voice, when the other is (SAME_VOICE)."""
    out = []
    for k, centroid in enumerate(centroids):
        mine = probes[owners == k]
        if len(mine) > MAX_SPLIT_PROBES:
            mine = mine[np.linspace(0, len(mine) - 1, MAX_SPLIT_PROBES).round().astype(int)]
        voices = _two_voices(_normalize(mine))
        if voices is None or float(voices[0] @ voices[1]) >= SPLIT_BELOW:
            out.append(centroid)
            continue
        others = np.delete(centroids, k, axis=0)
        known = (others @ voices.T).max(axis=0) >= SAME_VOICE if len(others) else np.zeros(2, dtype=bool)
        if not known.any():
            out.extend(voices)
        elif known.all():
            out.append(centroid)
        else:
            out.append(voices[~known][0])
    return np.stack(out).astype(centroids.dtype) if out else centroids
