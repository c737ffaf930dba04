"""Speaker recognition on the fixtures whose people recur across files: `python -m bench.speakers`.

Pairs: ami_dev00/ami_dev01 (MEE009, MEE012), ami_trn07/ami_trn08 (the same four people),
ami_trn06/ami_trn09 (FEE083), and each synthetic dialogue cut in two halves (the same two voices).
Every file is transcribed once through the running stack (offline diarizer). Then, for each pair
in both directions, every speaker of the first file is enrolled through the API from its transcript
speaker (`POST /speakers {name, transcript_id, label}`, named after the reference speaker it
mostly is); the second file's speakers are renamed by recognition (the enrolment re-matches the
owner's recordings, as it does for a new job), read back as RTTM with names, and scored against
the reference; then the enrolled speakers are forgotten (`DELETE /speakers/{id}`) before the next
direction.

Scores, as shares of the second file's reference speech time (10 ms frames, overlap included):
- accuracy: time of each recurring person (in both files' references, enrolled or not) that
  carries their name; a person whose enrolment was refused or whom the first file's diarization
  lost counts against it. The accuracy over the people enrolled from the first file alone is
  printed beside it, as a secondary figure;
- false accepts: speech time under a name that is not one of the people talking then (a wrong
  person, or a person never enrolled given someone's name).

The threshold is the configured SPEAKER_MATCH_THRESHOLD. A sweep over the stored voices (no
audio again) prints how accuracy and false accepts move with it, and a leave-one-pair-out choice
(pick on the other pairs, score on the one left out) shows what a threshold fitted elsewhere gives.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import httpx
import numpy as np
from scipy.optimize import linear_sum_assignment

from bench.common import DEFAULT_FIXTURES, SAMPLE_RATE, fmt, quiet_logs, read_rttm, table, verdict, write_wav
from common.audio import decode_audio
from common.speakers import Profile, RecordingSpeaker, match_speakers, most_alike

AMI_PAIRS = [("ami_dev00", "ami_dev01"), ("ami_trn07", "ami_trn08"), ("ami_trn06", "ami_trn09")]
DIALOGUES = ["en_dialogue", "ru_dialogue"]
ACCURACY_TARGET = 0.85
FALSE_ACCEPT_TARGET = 0.02
FRAME_S = 0.01
SWEEP = [0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7]

Turns = list[tuple[str, float, float]]


def prepare_files(fixtures: Path, workdir: Path) -> dict[str, tuple[Path, Turns]]:
    """name -> (audio, reference turns): the AMI clips as they are, the dialogues in two halves
    (cut between the second and third utterance), their speakers named per dialogue."""
    files: dict[str, tuple[Path, Turns]] = {}
    for first, second in AMI_PAIRS:
        for stem in (first, second):
            files[stem] = (fixtures / f"{stem}.wav", read_rttm(fixtures / f"{stem}.rttm"))
    for stem in DIALOGUES:
        utterances = json.loads((fixtures / f"{stem}.json").read_text())
        cut = (utterances[1]["end"] + utterances[2]["start"]) / 2
        audio, rate = decode_audio(str(fixtures / f"{stem}.wav")), SAMPLE_RATE
        reference = [(f"{stem[:2]}:{s}", a, b) for s, a, b in read_rttm(fixtures / f"{stem}.rttm")]
        for half, (lo, hi) in enumerate([(0.0, cut), (cut, len(audio) / rate)], start=1):
            path = workdir / f"{stem}_{half}.wav"
            write_wav(path, audio[int(lo * rate):int(hi * rate)])
            files[f"{stem}_{half}"] = (path, [(s, max(a, lo) - lo, min(b, hi) - lo)
                                             for s, a, b in reference if min(b, hi) > max(a, lo)])
    return files


def pairs() -> list[tuple[str, str, str]]:
    """(group, enrolled from, scored on), both directions."""
    out = []
    for first, second in AMI_PAIRS + [(f"{d}_1", f"{d}_2") for d in DIALOGUES]:
        group = "ami" if first.startswith("ami") else "synthetic"
        out += [(group, first, second), (group, second, first)]
    return out


def _mask(turns: Turns, frames: int) -> np.ndarray:
    mask = np.zeros(frames, dtype=bool)
    for _, a, b in turns:
        mask[int(round(a / FRAME_S)):int(round(b / FRAME_S))] = True
    return mask


def score(reference: Turns, named: Turns, enrolled: set[str], recurring: set[str]) -> dict[str, float]:
    """Frame counts: `recurring` (speech of the people of both files, enrolled or not: a person
    the enrolment file's diarization lost or whose enrolment was refused counts here),
    `correct_recurring` (of it, under their name); `target` / `correct`: the same over the people
    enrolled only; `speech` (all reference speech), `wrong` (speech under a name of nobody talking then);
    `strangers` / `strangers_named`: speech where only people never enrolled talk, and of it what
    went under a name (false accepts of strangers alone)."""
    frames = int(np.ceil(max([b for _, _, b in reference + named] + [0]) / FRAME_S)) + 1
    people = {s for s, _, _ in reference}
    recurring = people & recurring
    nobody = np.zeros(frames, dtype=bool)
    talking = {p: _mask([t for t in reference if t[0] == p], frames) for p in people}
    names = {n for n, _, _ in named}
    given = {n: _mask([t for t in named if t[0] == n], frames) for n in names}
    speech = np.any(list(talking.values()), axis=0) if talking else nobody
    target = sum(int(talking[p].sum()) for p in people & enrolled)
    correct = sum(int((talking[p] & given[p]).sum()) for p in people & enrolled & names)
    wrong = nobody.copy()
    for name, mask in given.items():
        wrong |= mask & ~talking.get(name, nobody)
    known_talk = np.any([talking[p] for p in people & enrolled], axis=0) if people & enrolled else nobody
    strangers = speech & ~known_talk
    named_any = np.any(list(given.values()), axis=0) if given else nobody
    return {"target": target, "correct": correct, "speech": int(speech.sum()), "wrong": int((wrong & speech).sum()),
            "recurring": sum(int(talking[p].sum()) for p in recurring),
            "correct_recurring": sum(int((talking[p] & given[p]).sum()) for p in recurring & names),
            "strangers": int(strangers.sum()), "strangers_named": int((strangers & named_any).sum())}


def speech_in_common(reference: Turns, turns: Turns, label: str) -> dict[str, float]:
    """Seconds each reference person talks under a hypothesis speaker's turns."""
    overlap: dict[str, float] = {}
    for _, a, b in (t for t in turns if t[0] == label):
        for person, c, d in reference:
            overlap[person] = overlap.get(person, 0.0) + max(0.0, min(b, d) - max(a, c))
    return overlap


def majority_person(reference: Turns, turns: Turns, label: str) -> str | None:
    """The reference person a hypothesis speaker overlaps most."""
    overlap = speech_in_common(reference, turns, label)
    best = max(overlap, key=overlap.get, default=None)
    return best if best is not None and overlap[best] > 0 else None


class Api:
    def __init__(self, stack) -> None:
        self.stack = stack
        self.client = httpx.Client(base_url=stack.api, timeout=120)

    def turns(self, job_id: int) -> Turns:
        """The job's diarization as RTTM: names where speakers have one, labels otherwise."""
        response = self.client.get(f"/transcripts/{job_id}", params={"format": "rttm"})
        response.raise_for_status()
        rows = [line.split() for line in response.text.splitlines() if line.strip()]
        return [(r[7], float(r[3]), float(r[3]) + float(r[4])) for r in rows]

    def voices(self, job_id: int) -> list[RecordingSpeaker]:
        rows = self.stack.query("SELECT speaker, embedding::real[] AS embedding, speech_s FROM transcript_speakers"
                                " WHERE transcript_id = $1 AND embedding IS NOT NULL ORDER BY speaker", job_id)
        return [RecordingSpeaker(r["speaker"], np.asarray(r["embedding"]), r["speech_s"]) for r in rows]


def enrolled_direction(api: Api, jobs: dict[str, int], labelled: dict[str, Turns], files, source: str,
                       scored_on: str) -> dict[str, float]:
    """Enrol every speaker of `source` through the API, read `scored_on` back named, forget them."""
    reference = files[source][1]
    speaker_ids, people = set(), set()
    for label in sorted({s for s, _, _ in labelled[source]}):
        person = majority_person(reference, labelled[source], label)
        if person is None:
            continue
        response = api.client.post("/speakers", json={"name": person, "transcript_id": jobs[source], "label": label})
        # 400: no voice embedding for this label; 422: less speech than SPEAKER_MIN_SPEECH_S; 409:
        # the voice sounds like another person enrolled from this file (a label mixing two people),
        # which a user told so would not force.
        if response.status_code in (400, 409, 422):
            continue
        response.raise_for_status()
        speaker_ids.add(response.json()["id"])
        people.add(person)
    named = [t for t in api.turns(jobs[scored_on]) if not t[0].startswith("spk_")]
    result = score(files[scored_on][1], named, people, recurring_people(files, source, scored_on))
    for speaker_id in speaker_ids:
        api.client.delete(f"/speakers/{speaker_id}").raise_for_status()
    left = {n for n, _, _ in api.turns(jobs[scored_on]) if not n.startswith("spk_")}
    if left:
        raise SystemExit(f"forgetting the enrolled speakers left names behind in {scored_on}: {left}")
    return result


def recurring_people(files, source: str, scored_on: str) -> set[str]:
    """The reference people of both files."""
    return {p for p, _, _ in files[source][1]} & {p for p, _, _ in files[scored_on][1]}


def enrolled_profiles(voices: dict[str, list[RecordingSpeaker]], labelled: dict[str, Turns], files,
                      names, threshold: float, min_speech_s: float) -> dict[str, Profile]:
    """person -> profile: each recording speaker of the `names` files, label by label as
    `enrolled_direction` sends them, enrolled as the reference person it mostly is (a person found
    in several files gets a voiceprint from each), where POST /speakers would enrol it: with
    `min_speech_s` of speech (422), and not at least `threshold` alike to another person already
    enrolled (409)."""
    profiles: dict[str, Profile] = {}
    for name in names:
        for voice in sorted(voices[name], key=lambda v: v.label):
            person = majority_person(files[name][1], labelled[name], voice.label)
            if person is None or voice.speech_s < min_speech_s:
                continue
            others = [profile for profile in profiles.values() if profile.name != person]
            if most_alike(voice.embedding, others, threshold) is not None:
                continue
            profiles.setdefault(person, Profile(len(profiles), person, [])).voiceprints.append(voice.embedding)
    return profiles


def recognised(voices: dict[str, list[RecordingSpeaker]], labelled: dict[str, Turns], files, source: str,
               scored_on: str, candidates: list[Profile], people: set[str], threshold: float,
               min_speech_s: float) -> dict[str, float]:
    """`scored_on`'s speakers named by matching against `candidates`, scored for `people` (enrolled
    from `source`) and for everyone `source` and `scored_on` share."""
    matches = match_speakers(voices[scored_on], candidates, threshold, min_speech_s)
    named = [(matches[s].name, a, b) for s, a, b in labelled[scored_on] if s in matches]
    return score(files[scored_on][1], named, people, recurring_people(files, source, scored_on))


def offline_direction(voices: dict[str, list[RecordingSpeaker]], labelled: dict[str, Turns], files, source: str,
                      scored_on: str, threshold: float, min_speech_s: float) -> dict[str, float]:
    """The same as `enrolled_direction` from the stored voices, at any threshold."""
    profiles = enrolled_profiles(voices, labelled, files, [source], threshold, min_speech_s)
    return recognised(voices, labelled, files, source, scored_on, list(profiles.values()), set(profiles), threshold,
                      min_speech_s)


def roster_direction(voices: dict[str, list[RecordingSpeaker]], labelled: dict[str, Turns], files, source: str,
                     scored_on: str, threshold: float, min_speech_s: float, expected: bool) -> dict[str, float]:
    """`offline_direction` with everyone of every other file enrolled too (a team's whole roster,
    each person's voiceprints from every file they are in but `scored_on`); with `expected`, the
    job lists the people enrolled from `source` as its expected_speakers, so only they are candidates."""
    roster = enrolled_profiles(voices, labelled, files, [n for n in files if n != scored_on], threshold,
                               min_speech_s)
    people = set(enrolled_profiles(voices, labelled, files, [source], threshold, min_speech_s))
    candidates = [p for p in roster.values() if not expected or p.name in people]
    return recognised(voices, labelled, files, source, scored_on, candidates, people, threshold, min_speech_s)


def diarization_ceiling(voices, labelled: dict[str, Turns], files, source: str, scored_on: str,
                        threshold: float, min_speech_s: float) -> dict[str, float]:
    """The scores if recognition never erred on this diarization: the people enrolled from
    `source` given to `scored_on`'s speakers (those with `min_speech_s` of speech, as recognition
    requires) one to one, by the most speech in common (two speakers of one recording never get
    one name, as in recognition). Speech the diarization missed or gave to another speaker stays lost."""
    people = sorted(enrolled_profiles(voices, labelled, files, [source], threshold, min_speech_s))
    reference = files[scored_on][1]
    labels = sorted(v.label for v in voices[scored_on] if v.speech_s >= min_speech_s)
    overlaps = [speech_in_common(reference, labelled[scored_on], label) for label in labels]
    common = np.array([[overlap.get(person, 0.0) for person in people] for overlap in overlaps]).reshape(
        len(labels), len(people))
    rows, columns = linear_sum_assignment(common, maximize=True) if common.size else ([], [])
    name_of = {labels[i]: people[j] for i, j in zip(rows, columns) if common[i, j] > 0}
    named = [(name_of[label], a, b) for label, a, b in labelled[scored_on] if label in name_of]
    return score(reference, named, set(people), recurring_people(files, source, scored_on))


def rates(counts: list[dict[str, float]]) -> tuple[float | None, float | None]:
    """Accuracy over every recurring person (the targets' figure), and false accepts."""
    recurring = sum(c["recurring"] for c in counts)
    speech = sum(c["speech"] for c in counts)
    return (sum(c["correct_recurring"] for c in counts) / recurring if recurring else None,
            sum(c["wrong"] for c in counts) / speech if speech else None)


def secondary_rates(counts: list[dict[str, float]]) -> tuple[float | None, float | None]:
    """Accuracy over the people enrolled from the first file only, and the share of strangers'
    speech named."""
    target = sum(c["target"] for c in counts)
    strangers = sum(c["strangers"] for c in counts)
    return (sum(c["correct"] for c in counts) / target if target else None,
            sum(c["strangers_named"] for c in counts) / strangers if strangers else None)


def held_out_threshold(scores: dict[float, tuple[float | None, float | None]]) -> tuple[float, list[float]]:
    """The threshold to score a held-out pair at, from `scores` (threshold -> (accuracy, false
    accepts) on the other pairs): false accepts at most FALSE_ACCEPT_TARGET, then the best accuracy;
    and every threshold tied for that best. Among tied thresholds (the other pairs' scores are often
    flat over a range) it takes the median, the upper of the two middle ones when their count is
    even, so always one of them: neither end of the range, the most permissive or the strictest."""
    def rank(value: float) -> tuple[bool, float]:
        accuracy, false_accepts = scores[value]
        return false_accepts is not None and false_accepts <= FALSE_ACCEPT_TARGET, accuracy or 0.0

    top = max(rank(value) for value in scores)
    tied = sorted(value for value in scores if rank(value) == top)
    return tied[len(tied) // 2], tied


def thresholds_text(values: list[float]) -> str:
    """Thresholds as printed: a run of consecutive SWEEP values as its range ("0.30-0.50")."""
    runs: list[list[float]] = []
    for value in sorted(values):
        if runs and value in SWEEP and runs[-1][-1] in SWEEP and SWEEP.index(value) == SWEEP.index(runs[-1][-1]) + 1:
            runs[-1].append(value)
        else:
            runs.append([value])
    return ", ".join(f"{run[0]:.2f}" if len(run) == 1 else f"{run[0]:.2f}-{run[-1]:.2f}" for run in runs)


def target_rows(by_group: dict[str, list[dict[str, float]]], held_out_ami: list[dict[str, float]]) -> list[list[str]]:
    """The issue's targets, accuracy over the recurring people's talk time: [target, value, verdict]."""
    rows = []
    for group, counts, how in (("AMI", by_group["ami"], ""), ("synthetic", by_group["synthetic"], ""),
                               ("AMI", held_out_ami, ", threshold held out")):
        accuracy, false_accepts = rates(counts)
        rows += [[f"{group} accuracy >= {100 * ACCURACY_TARGET:.0f} % of recurring people's talk time{how}",
                  fmt(accuracy),
                  verdict(None if accuracy is None else accuracy >= ACCURACY_TARGET)],
                 [f"{group} false accepts <= {100 * FALSE_ACCEPT_TARGET:.0f} %{how}", fmt(false_accepts),
                  verdict(None if false_accepts is None else false_accepts <= FALSE_ACCEPT_TARGET)]]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fixtures", type=Path, default=DEFAULT_FIXTURES)
    args = parser.parse_args()
    quiet_logs()
    needed = ([f"{stem}{suffix}" for pair in AMI_PAIRS for stem in pair for suffix in (".wav", ".rttm")]
              + [f"{stem}{suffix}" for stem in DIALOGUES for suffix in (".wav", ".rttm", ".json")])
    missing = [name for name in needed if not (args.fixtures / name).is_file()]
    if missing:  # said before minutes of starting the stack, not as a traceback after them
        raise SystemExit(f"fixtures missing in {args.fixtures}: {', '.join(missing)}")
    from bench.stack import running_stack

    with tempfile.TemporaryDirectory() as workdir, running_stack() as stack:
        # The stack's own settings (not .env's or this shell's, which the stack does not read).
        settings = stack.settings()
        threshold, min_speech_s = settings.speaker_match_threshold, settings.speaker_min_speech_s
        files = prepare_files(args.fixtures, Path(workdir))
        jobs = {name: stack.submit_job(path) for name, (path, _) in files.items()}
        finished = stack.wait_done(list(jobs.values()), timeout=3600)
        failed = [name for name, job in jobs.items() if finished[job][1]["status"] != "done"]
        if failed:
            raise SystemExit(f"jobs did not finish: {failed}")
        api = Api(stack)
        labelled = {name: api.turns(job) for name, job in jobs.items()}
        voices = {name: api.voices(job) for name, job in jobs.items()}
        rows, by_group = [], {"ami": [], "synthetic": []}
        for group, source, scored_on in pairs():
            counts = enrolled_direction(api, jobs, labelled, files, source, scored_on)
            by_group[group].append(counts)
            accuracy, false_accepts = rates([counts])
            rows.append([f"{source} -> {scored_on}", fmt(accuracy), fmt(false_accepts),
                         fmt(counts["recurring"] * FRAME_S, "s"), fmt(counts["target"] * FRAME_S, "s")])

    def sweep_at(value: float, directions) -> tuple[float | None, float | None]:
        return rates([offline_direction(voices, labelled, files, s, t, value, min_speech_s) for _, s, t in directions])

    sweep_rows = []
    for value in SWEEP:
        ami = sweep_at(value, [d for d in pairs() if d[0] == "ami"])
        synthetic = sweep_at(value, [d for d in pairs() if d[0] == "synthetic"])
        sweep_rows.append([f"{value:.2f}", fmt(ami[0]), fmt(ami[1]), fmt(synthetic[0]), fmt(synthetic[1])])
    ceiling = {group: rates([diarization_ceiling(voices, labelled, files, s, t, threshold, min_speech_s)
                             for g, s, t in pairs() if g == group]) for group in ("ami", "synthetic")}
    roster_rows = []
    for group in ("ami", "synthetic"):
        directions = [d for d in pairs() if d[0] == group]
        for expected, candidates in ((False, "every enrolled person"), (True, "the meeting's, as expected_speakers")):
            accuracy, false_accepts = rates([roster_direction(voices, labelled, files, s, t, threshold, min_speech_s,
                                                              expected) for _, s, t in directions])
            roster_rows.append([f"{group}: {candidates}", fmt(accuracy), fmt(false_accepts)])
    roster = enrolled_profiles(voices, labelled, files, files, threshold, min_speech_s)
    # The threshold above was chosen on these very files; here each pair is scored at a threshold
    # chosen on the other pairs of its group only, which is what a new recording would get.
    held_out_rows, held_out = [], {"ami": [], "synthetic": []}
    groups = AMI_PAIRS + [(f"{d}_1", f"{d}_2") for d in DIALOGUES]
    for first, second in groups:
        group = "ami" if first.startswith("ami") else "synthetic"
        kept = [d for d in pairs() if d[0] == group and {d[1], d[2]} != {first, second}]
        best, tied = held_out_threshold({value: sweep_at(value, kept) for value in SWEEP})
        counts = [offline_direction(voices, labelled, files, s, t, best, min_speech_s)
                  for _, s, t in pairs() if {s, t} == {first, second}]
        held_out[group] += counts
        accuracy, false_accepts = rates(counts)
        held_out_rows.append([f"{first} / {second}", f"{best:.2f}", thresholds_text(tied), fmt(accuracy),
                              fmt(false_accepts)])
    for group in ("ami", "synthetic"):
        accuracy, false_accepts = rates(held_out[group])
        held_out_rows.append([f"{group}, pooled", "", "", fmt(accuracy), fmt(false_accepts)])

    ami_accuracy, ami_false = rates(by_group["ami"])
    synthetic_accuracy, synthetic_false = rates(by_group["synthetic"])
    print(f"# bench.speakers: threshold {threshold:g} (SPEAKER_MATCH_THRESHOLD), speakers need"
          f" {min_speech_s:g} s of speech\n")
    print("accuracy: share of the recurring people's talk time (every person of both files, enrolled or not)"
          " under their name; false accepts: share of all speech under a wrong name\n")
    print(table(["enrolled from -> scored on", "accuracy % of recurring people's talk time", "false accepts %",
                 "recurring people's talk time s", "of it enrolled s"], rows))
    print()
    ami_enrolled_only, ami_strangers = secondary_rates(by_group["ami"])
    print(table(["pooled", "accuracy % of recurring people's talk time", "false accepts %"],
                [["AMI pairs", fmt(ami_accuracy), fmt(ami_false)],
                 ["  over the people enrolled only / of strangers' speech", fmt(ami_enrolled_only),
                  fmt(ami_strangers)],
                 ["  with perfect recognition (the diarization's ceiling)", fmt(ceiling["ami"][0]),
                  fmt(ceiling["ami"][1])],
                 ["synthetic dialogues", fmt(synthetic_accuracy), fmt(synthetic_false)],
                 ["  with perfect recognition", fmt(ceiling["synthetic"][0]), fmt(ceiling["synthetic"][1])]]))
    print("\n## threshold sweep (stored voices, same scoring)\n")
    print(table(["threshold", "AMI acc %", "AMI FA %", "synthetic acc %", "synthetic FA %"], sweep_rows))
    print(f"\n## everyone of the other files enrolled (a roster of up to {len(roster)} people)\n")
    print(table(["candidates", "accuracy %", "false accepts %"], roster_rows))
    print("\n## leave one pair out: threshold chosen on the other pairs of its group (FA <= 2 %, then best"
          " accuracy; of the thresholds tied for it, the median)\n")
    print(table(["held out", "threshold", "tied best on the other pairs", "accuracy %", "false accepts %"],
                held_out_rows))
    print("\n## targets\n")
    print(table(["target", "value", "verdict"], target_rows(by_group, held_out["ami"])))


if __name__ == "__main__":
    main()
