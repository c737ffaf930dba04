"""Enrolled speakers on the real stack (offline diarizer, CAM++ voices, PostgreSQL, RabbitMQ): a
voice enrolled from one recording is named in the next, everywhere a speaker shows; other voices
and other keys are not; forgetting takes the names away."""

from __future__ import annotations

import asyncio
import contextlib
import time
import urllib.parse
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import TYPE_CHECKING

import aio_pika
import httpx
import numpy as np
import pytest

from common.speakers import Profile, RecordingSpeaker, match_speakers
from services.ingest.auth import owner_of
from tests.audio_files import en_dialogue_voices
from tests.conftest import events_queue, job_events, through_another_ingest

if TYPE_CHECKING:
    import asyncpg

OWNER, OTHER = "speakers-key-owner-0001", "speakers-key-other-0002"
# The keyed ingest's sessions in pg_stat_activity (its DATABASE_URL's application_name): the
# enrolments the lock tests hold back, told from any other service's sessions.
KEYED_INGEST = "ingest-speakers-keys"


def _voices_scoring(scores: list[list[float]], alike: list[list[float]], people: list[list[float]]) -> np.ndarray:
    """Unit vectors, the people's first and then the speakers', whose cosines are `people` (the
    people's among themselves), `scores` (speaker by person) and `alike` (the speakers' among
    themselves): rows of the Cholesky factor of their Gram matrix."""
    scores = np.asarray(scores)
    gram = np.block([[np.asarray(people), scores.T], [scores, np.asarray(alike)]])
    return np.linalg.cholesky(gram)


def test_names_are_one_to_one_and_never_trade_a_clear_match_for_two_marginal_ones():
    # spk_0 scores 0.90 Anna / 0.75 Boris, spk_1 0.76 Anna / 0.30 Boris. The pairing with the
    # largest sum of margins over 0.6 named spk_0 Boris and spk_1 Anna (0.15 + 0.16 > 0.30):
    # Anna's clear match given up for two marginal ones.
    anna, boris, spk_0, spk_1 = _voices_scoring([[0.90, 0.75], [0.76, 0.30]], [[1.0, 0.7], [0.7, 1.0]],
                                                [[1.0, 0.6], [0.6, 1.0]])
    profiles = [Profile(1, "Anna", [anna]), Profile(2, "Boris", [boris])]
    recording = [RecordingSpeaker("spk_0", spk_0, 10.0), RecordingSpeaker("spk_1", spk_1, 10.0)]
    matches = match_speakers(recording, profiles, threshold=0.6, min_speech_s=2.0)
    assert {label: (m.name, m.confidence) for label, m in matches.items()} == {"spk_0": ("Anna", 0.9)}
    # A speaker never gets a person another speaker sounds more like: spk_0 sounds most like Anna
    # (0.8), spk_1 like Anna only (0.75); Anna is spk_0's, and spk_1 is left unnamed rather than
    # named for a person another speaker matched better. No two speakers share a person.
    anna, boris = np.array([1.0, 0.0, 0.0]), np.array([0.0, 1.0, 0.0])
    profiles = [Profile(1, "Anna", [anna]), Profile(2, "Boris", [boris])]
    recording = [RecordingSpeaker("spk_0", np.array([0.8, 0.6, 0.0]), 10.0),
                 RecordingSpeaker("spk_1", np.array([0.75, 0.0, 0.66]), 10.0),
                 RecordingSpeaker("spk_2", np.array([0.0, 0.0, 1.0]), 10.0)]
    matches = match_speakers(recording, profiles, threshold=0.5, min_speech_s=2.0)
    assert {label: m.name for label, m in matches.items()} == {"spk_0": "Anna"}
    # With a third person spk_1 sounds like (0.66), spk_1 gets them, its second choice; but not
    # when spk_2 sounds more like her (1.0): then spk_2 is Carla and spk_1 still nobody.
    with_carla = [*profiles, Profile(3, "Carla", [np.array([0.0, 0.0, 1.0])])]
    matches = match_speakers(recording[:2], with_carla, threshold=0.5, min_speech_s=2.0)
    assert {label: m.name for label, m in matches.items()} == {"spk_0": "Anna", "spk_1": "Carla"}
    assert matches["spk_1"].confidence == pytest.approx(0.66 / np.linalg.norm([0.75, 0, 0.66]), abs=1e-3)
    matches = match_speakers(recording, with_carla, threshold=0.5, min_speech_s=2.0)
    assert {label: m.name for label, m in matches.items()} == {"spk_0": "Anna", "spk_2": "Carla"}
    # Two people over the threshold for one speaker: the more alike one, the other left free.
    clear = [RecordingSpeaker("spk_0", np.array([0.9, 0.55, 0.0]), 10.0),
             RecordingSpeaker("spk_1", np.array([0.55, 0.0, 0.83]), 10.0)]
    matches = match_speakers(clear, profiles, threshold=0.5, min_speech_s=2.0)
    assert {label: m.name for label, m in matches.items()} == {"spk_0": "Anna"}
    # Too little speech to judge, or nobody close enough: no name.
    brief = [RecordingSpeaker("spk_0", anna, 1.0)]
    assert match_speakers(brief, profiles, threshold=0.5, min_speech_s=2.0) == {}
    assert match_speakers(recording[2:], profiles, threshold=0.5, min_speech_s=2.0) == {}


@pytest.fixture(scope="module")
def voices(tmp_path_factory, fixtures_dir):
    """en_dialogue's voices in other recordings; its two halves as files to submit."""
    made = en_dialogue_voices(fixtures_dir)
    folder = tmp_path_factory.mktemp("voices")
    for half in ("first_half", "second_half"):
        (folder / f"{half}.wav").write_bytes(made[half])
    return {**made, "first_half": folder / "first_half.wav", "second_half": folder / "second_half.wav"}


def _with_application_name(url: str, name: str) -> str:
    """The database URL `url` with `application_name` (asyncpg passes it on as a server setting)."""
    parts = urllib.parse.urlsplit(url)
    query = urllib.parse.urlencode([*urllib.parse.parse_qsl(parts.query), ("application_name", name)])
    return urllib.parse.urlunsplit(parts._replace(query=query))


def _jobs_of(client: httpx.Client) -> list[int]:
    """The ids of every job of the client's key."""
    ids: list[int] = []
    cursor = None
    while True:
        page = client.get("/transcripts", params={"limit": 100, **({"cursor": cursor} if cursor else {})}).json()
        ids += [job["id"] for job in page["items"]]
        cursor = page.get("next_cursor")
        if cursor is None:
            return ids


def _discard_jobs(client: httpx.Client, keep: int | None = None) -> None:
    """Every job of the client's key but `keep` deleted, once ended (stopped when still running):
    the stack is shared, and a job left would be matched again by every later enrolment."""
    for job_id in _jobs_of(client):
        if job_id == keep:
            continue
        client.post(f"/transcripts/{job_id}/cancel")
        deadline = time.monotonic() + 60
        while client.delete(f"/transcripts/{job_id}").status_code not in (204, 404):
            assert time.monotonic() < deadline, f"job {job_id} could not be deleted"
            time.sleep(0.5)


@pytest.fixture(scope="module")
def enrolled(stack, voices):
    """The stack through an ingest with API keys; OWNER's transcript of en_dialogue's first half
    done (`source`, the recording voices are enrolled from: none of its audio is in
    `second_half`, the next recording they are recognised in). Every job of both keys is
    deleted after the module."""
    with through_another_ingest(stack, KEYED_INGEST, API_KEYS=f"{OWNER},{OTHER}",
                                DATABASE_URL=_with_application_name(stack.database_url, KEYED_INGEST)) as stack:
        owner = httpx.Client(base_url=stack.api, headers={"X-API-Key": OWNER}, timeout=120)
        other = httpx.Client(base_url=stack.api, headers={"X-API-Key": OTHER}, timeout=120)
        try:
            source = stack.submit_job(voices["first_half"], client=owner)
            assert stack.wait_finished(source, 300, owner)["status"] == "done"
            yield stack, owner, other, source
        finally:
            for client in (owner, other):
                _discard_jobs(client)
                client.close()


@pytest.fixture(autouse=True)
def no_speakers_left(request):
    """After each test of the stack, both keys' speakers are forgotten and the jobs it made
    deleted (all but OWNER's `source` transcript), passed or failed: one left would name voices,
    or be named, in the tests after it."""
    yield
    if "enrolled" not in request.fixturenames:
        return
    _, owner, other, source = request.getfixturevalue("enrolled")
    for client in (owner, other):
        for speaker in client.get("/speakers").json()["items"]:
            client.delete(f"/speakers/{speaker['id']}")
        _discard_jobs(client, keep=source)


def _speaker_at(document: dict, seconds: float) -> dict:
    return min(document["segments"], key=lambda s: abs((s["start_ts"] + s["end_ts"]) / 2 - seconds))


def _lines_of(document: dict, name: str) -> list[str]:
    """The lower-cased text of the document's segments that carry `name`."""
    return [s["text"].lower() for s in document["segments"] if s.get("speaker_name") == name]


def _is_bs_second_half(lines: list[str]) -> bool:
    """`second_half`'s lines of voice B ("That is great news, what was the main reason for the
    growth?"), none of A's ("Yes, sales grew by twelve percent..."), and at least one."""
    return (bool(lines) and any("growth" in line or "news" in line for line in lines)
            and not any("sales" in line or "twelve" in line for line in lines))


async def test_a_voice_enrolled_from_a_transcript_is_named_in_the_next_recording(enrolled, voices, fixtures_dir):
    stack, owner, other, source = enrolled
    first = stack.status(source, owner)
    anna_label = _speaker_at(first, 2.0)["speaker"]  # en_dialogue's first utterance: voice A
    response = owner.post("/speakers", json={"name": "Anna", "transcript_id": source, "label": anna_label})
    assert response.status_code == 201, response.text
    anna = response.json()
    assert anna["name"] == "Anna" and anna["voiceprint_count"] == 1 and anna["relabelled"] == [source]
    assert anna["voiceprints"][0]["source"] == "transcript"
    segments = stack.status(source, owner)["segments"]
    assert {s["speaker_name"] for s in segments if s["speaker"] == anna_label} == {"Anna"}
    # The same recording speaker is not enrolled twice: sent again for her, it adds nothing (a retry
    # after a timeout); for another name, it is refused.
    again = owner.post("/speakers", json={"name": "anna", "transcript_id": source, "label": anna_label})
    assert again.status_code == 201 and again.json()["voiceprint_count"] == 1, again.text
    other_name = owner.post("/speakers", json={"name": "Anne", "transcript_id": source, "label": anna_label})
    assert other_name.status_code == 409 and "already a voiceprint of 'Anna'" in other_name.json()["detail"]
    assert [(s["name"], s["voiceprint_count"]) for s in owner.get("/speakers").json()["items"]] == [("Anna", 1)]
    # A label no recording speaker can have is refused as such, not looked up.
    odd = owner.post("/speakers", json={"name": "Odd", "transcript_id": source, "label": "spk_0\x00"})
    assert odd.status_code == 400 and "label" in odd.json()["detail"], odd.text

    connection = await aio_pika.connect(stack.amqp_url)
    try:
        queue = await events_queue(await connection.channel(), "segment.created", "transcript.completed",
                                   "transcript.speakers_updated")
        job = stack.submit_job(voices["second_half"], client=owner)
        document = stack.wait_finished(job, 300, owner)
        assert document["status"] == "done"
        events = await job_events(queue, job, lambda bodies: any("segment_count" in b for b in bodies), 60)
        # The job's first utterance is A's ("Yes, sales grew..."), its second B's.
        named = [s for s in document["segments"] if s.get("speaker_name") == "Anna"]
        assert named and all("sales" in s["text"].lower() or "twelve" in s["text"].lower() for s in named), document
        assert all(0 < s["speaker_confidence"] <= 1 for s in named)
        assert not any(s.get("speaker_name") for s in document["segments"] if s not in named)
        created = [b for b in events if "index" in b]
        # Names are there from the first segment.created on: every event has its segment's name.
        final = {(s["chunk_index"], s["index"]): s.get("speaker_name") for s in document["segments"]}
        assert {(b["chunk_index"], b["index"]) for b in created} == set(final)
        assert all(b.get("speaker_name") == final[b["chunk_index"], b["index"]] for b in created), created
        srt = owner.get(f"/transcripts/{job}", params={"format": "srt"}).text
        assert "Anna: " in srt and "spk_" in srt

        # Another key's recording of the same voice is not named from OWNER's profile.
        theirs = stack.wait_finished(stack.submit_job(voices["second_half"], client=other), 300, other)
        assert theirs["status"] == "done" and theirs["segments"]
        assert not any(s.get("speaker_name") for s in theirs["segments"])
        # Nor can another key enrol a voice from OWNER's transcript: to it, that job does not exist.
        taken = other.post("/speakers", json={"name": "Anna", "transcript_id": source, "label": anna_label})
        assert taken.status_code == 404, taken.text
        assert other.get("/speakers").json()["items"] == []
        assert other.get(f"/speakers/{anna['id']}").status_code == 404

        # Voices nobody enrolled get no name.
        stranger = stack.wait_finished(stack.submit_job(fixtures_dir / "ru_dialogue.wav", client=owner), 300, owner)
        assert stranger["status"] == "done" and stranger["segments"]
        assert not any(s.get("speaker_name") for s in stranger["segments"])

        # Forgetting Anna takes every name she gave away, and says so.
        assert owner.delete(f"/speakers/{anna['id']}").status_code == 204
        assert owner.get("/speakers").json()["items"] == []
        for transcript in (source, job):
            assert not any(s.get("speaker_name") for s in stack.status(transcript, owner)["segments"])
        updated = await job_events(queue, job, lambda bodies: any("speakers" in b for b in bodies), 30)
        assert all(n["name"] is None for b in updated if "speakers" in b for n in b["speakers"].values())
        assert stack.value("SELECT count(*) FROM voiceprints JOIN speakers ON speakers.id = voiceprints.speaker_id"
                           " WHERE speakers.owner = $1", owner_of(OWNER)) == 0

        # B's voice, enrolled from `source` too, names B's lines of the next recording: the voice
        # least like itself across the two (~0.71), so a threshold set too strict shows here.
        boris_label = _speaker_at(first, 5.5)["speaker"]
        boris = owner.post("/speakers", json={"name": "Boris", "transcript_id": source, "label": boris_label})
        assert boris.status_code == 201 and job in boris.json()["relabelled"], boris.text
        said_by_boris = _lines_of(stack.status(job, owner), "Boris")
        assert _is_bs_second_half(said_by_boris), said_by_boris
    finally:
        await connection.close()


async def test_enrolling_from_a_sample_names_past_recordings_and_refuses_unfit_samples(enrolled, voices):
    stack, owner, other, source = enrolled
    past = stack.submit_job(voices["second_half"], client=other)
    assert stack.wait_finished(past, 300, other)["status"] == "done"

    def enrol(name: str, sample: bytes) -> httpx.Response:
        return other.post("/speakers", data={"name": name}, files={"file": ("sample.wav", sample)})

    refused = enrol("Both", voices["both"])
    assert refused.status_code == 422 and "voices" in refused.json()["detail"], refused.text
    silent = enrol("Nobody", voices["silence"])
    assert silent.status_code == 422 and "speech" in silent.json()["detail"], silent.text
    assert other.get("/speakers").json()["items"] == []

    connection = await aio_pika.connect(stack.amqp_url)
    try:
        queue = await events_queue(await connection.channel(), "transcript.speakers_updated")
        response = enrol("Anya", voices["a_alone"])
        assert response.status_code == 201, response.text
        assert past in response.json()["relabelled"]
        [event] = await job_events(queue, past, lambda bodies: len(bodies) >= 1, 30)
        assert sorted(n["name"] for n in event["speakers"].values() if n["name"]) == ["Anya"]
        named = [s for s in stack.status(past, other)["segments"] if s.get("speaker_name") == "Anya"]
        assert named and all("sales" in s["text"].lower() or "twelve" in s["text"].lower() for s in named)
        # The same sample again (a client retrying after a timeout) adds no second voiceprint.
        again = enrol("Anya", voices["a_alone"])
        assert again.status_code == 201 and again.json()["voiceprint_count"] == 1, again.text
        assert again.json()["relabelled"] == []
        # Under another name it would be two people with one voice.
        twice = enrol("Boris", voices["a_alone"])
        assert twice.status_code == 409 and "already a voiceprint of 'Anya'" in twice.json()["detail"], twice.text

        # A wrong recognition is taken back by hand: the speaker stays unnamed, announced...
        label = named[0]["speaker"]
        cleared = other.patch(f"/transcripts/{past}/speakers", json={label: None})
        assert cleared.status_code == 200 and cleared.json()["speakers"][label] is None, cleared.text
        [unnamed] = await job_events(queue, past, lambda bodies: len(bodies) >= 1, 30)
        assert unnamed["speakers"][label] == {"name": None, "source": "manual", "confidence": None}
        assert not any(s.get("speaker_name") for s in stack.status(past, other)["segments"])
        assert other.get(f"/transcripts/{past}/speakers").json()["speakers"][label]["source"] == "manual"
        # Sent again (a retry), it stays so, and is not announced again...
        again = other.patch(f"/transcripts/{past}/speakers", json={label: None})
        assert again.status_code == 200 and again.json()["speakers"][label] is None, again.text
        # ...and a name given by hand, then removed, gives the speaker back to recognition.
        assert other.patch(f"/transcripts/{past}/speakers", json={label: "Someone"}).status_code == 200
        reopened = other.patch(f"/transcripts/{past}/speakers", json={label: None})
        assert reopened.status_code == 200 and reopened.json()["speakers"][label] == "Anya", reopened.text
        told = await job_events(queue, past, lambda bodies: len(bodies) >= 2, 30)
        # (events go out in the order they were queued: the retry's would be the first)
        assert [e["speakers"][label]["name"] for e in told] == ["Someone", "Anya"], told

        # A name given by hand wins over recognition, and the change is announced.
        assert other.patch(f"/transcripts/{past}/speakers", json={label: "Anna K."}).status_code == 200
        [manual] = await job_events(queue, past, lambda bodies: len(bodies) >= 1, 30)
        assert manual["speakers"][label] == {"name": "Anna K.", "source": "manual", "confidence": None}
        # The owner's transcripts never heard of OTHER's speaker.
        assert not any(s.get("speaker_name") for s in stack.status(source, owner)["segments"])
    finally:
        await connection.close()


def test_a_job_names_only_the_speakers_it_expects(enrolled, voices):
    stack, owner, other, source = enrolled
    first = stack.status(source, owner)
    voice_a, voice_b = _speaker_at(first, 2.0)["speaker"], _speaker_at(first, 5.5)["speaker"]  # en_dialogue's A, B
    assert voice_a != voice_b
    boris = owner.post("/speakers", json={"name": "Boris", "transcript_id": source, "label": voice_b})
    assert boris.status_code == 201, boris.text

    # A name nobody is enrolled under is refused (a typo would otherwise quietly name nobody).
    typo = stack.submit(voices["second_half"], {"expected_speakers": "Boris, Anja"}, client=owner)
    assert typo.status_code == 400 and "'Anja'" in typo.json()["detail"], typo.text
    # Another key's speakers are not this key's to expect.
    theirs = other.post("/speakers", data={"name": "Anya"}, files={"file": ("anya.wav", voices["a_alone"])})
    assert theirs.status_code == 201, theirs.text
    foreign = stack.submit(voices["second_half"], {"expected_speakers": "Anya"}, client=owner)
    assert foreign.status_code == 400 and "'Anya'" in foreign.json()["detail"], foreign.text

    job = stack.submit_job(voices["second_half"], {"expected_speakers": "boris"}, client=owner)
    document = stack.wait_finished(job, 300, owner)
    assert document["status"] == "done"
    # The speaker it expects is named, in B's lines (enrolled from `source`, none of the same audio).
    assert _is_bs_second_half(_lines_of(document, "Boris")), document["segments"]
    # Anna is enrolled after the job ran; re-matching the key's recordings names her in the
    # recording she came from, but not in the job that expects Boris only.
    anna = owner.post("/speakers", json={"name": "Anna", "transcript_id": source, "label": voice_a})
    assert anna.status_code == 201, anna.text
    assert source in anna.json()["relabelled"] and job not in anna.json()["relabelled"]
    names = {s["speaker"]: s.get("speaker_name") for s in stack.status(job, owner)["segments"]}
    assert "Anna" not in names.values(), names
    # Without the option the same recording names her (so it was the option that kept her out).
    unrestricted = stack.wait_finished(stack.submit_job(voices["second_half"], client=owner), 300, owner)
    assert _is_bs_second_half(_lines_of(unrestricted, "Boris")), unrestricted["segments"]
    said_by_anna = _lines_of(unrestricted, "Anna")
    assert said_by_anna and all("sales" in line or "twelve" in line for line in said_by_anna), said_by_anna
    assert owner.post(f"/transcripts/{job}/rerun", json={"expected_speakers": ["Borys"]}).status_code == 400

    # Renaming a speaker keeps the jobs that expect them expecting them.
    assert owner.patch(f"/speakers/{boris.json()['id']}", json={"name": "Boris K."}).status_code == 200
    assert owner.get(f"/transcripts/{job}").json()["options"]["expected_speakers"] == ["Boris K."]
    for speaker in (anna, boris):
        assert owner.delete(f"/speakers/{speaker.json()['id']}").status_code == 204


def test_the_openai_endpoint_takes_the_names_of_enrolled_voices(enrolled, voices):
    """OpenAI's `known_speaker_names[]` (its SDK sends a list in `extra_body` so): names of the
    key's enrolled speakers, who become the job's expected speakers and name its diarized
    segments. A name nobody is enrolled under, and reference clips (a voice is enrolled once, not
    sent with each request), are refused with the reason, in OpenAI's error shape."""
    import json

    import openai

    stack, owner, _, source = enrolled
    voice_a = _speaker_at(stack.status(source, owner), 2.0)["speaker"]
    anna = owner.post("/speakers", json={"name": "Anna", "transcript_id": source, "label": voice_a})
    assert anna.status_code == 201, anna.text
    client = openai.OpenAI(base_url=f"{stack.api}/v1", api_key=OWNER, max_retries=0)
    recording = ("second_half.wav", voices["second_half"].read_bytes())
    try:
        diarized = client.audio.transcriptions.create(model="gpt-4o-transcribe-diarize", file=recording,
                                                      response_format="diarized_json",
                                                      extra_body={"known_speaker_names": ["Anna"]})
        assert "Anna" in {s.speaker for s in diarized.segments}
        [job] = stack.query("SELECT options FROM transcripts WHERE filename = 'second_half.wav' AND owner IS NOT NULL"
                            " ORDER BY id DESC LIMIT 1")
        assert json.loads(job["options"])["expected_speakers"] == ["Anna"]

        with pytest.raises(openai.BadRequestError, match="known_speaker_names: no enrolled speaker is called 'Anja'"):
            client.audio.transcriptions.create(model="whisper-1", file=recording,
                                               extra_body={"known_speaker_names": ["Anna", "Anja"]})
        with pytest.raises(openai.BadRequestError, match="enrol each voice once"):
            client.audio.transcriptions.create(model="whisper-1", file=recording, extra_body={
                "known_speaker_names": ["Anna"], "known_speaker_references": ["data:audio/wav;base64,UklGRg=="]})
    finally:
        assert owner.delete(f"/speakers/{anna.json()['id']}").status_code == 204


def test_a_speaker_who_barely_talks_is_no_voiceprint(enrolled):
    stack, owner, _, source = enrolled
    voice_b = _speaker_at(stack.status(source, owner), 5.5)["speaker"]
    # Recognition does not name anyone from under SPEAKER_MIN_SPEECH_S of speech; nor is it a voiceprint.
    talked = stack.value("SELECT speech_s FROM transcript_speakers WHERE transcript_id = $1 AND speaker = $2",
                         source, voice_b)
    stack.value("UPDATE transcript_speakers SET speech_s = 0.5 WHERE transcript_id = $1 AND speaker = $2",
                source, voice_b)
    try:
        brief = owner.post("/speakers", json={"name": "Brief", "transcript_id": source, "label": voice_b})
        assert brief.status_code == 422 and "SPEAKER_MIN_SPEECH_S" in brief.json()["detail"], brief.text
        assert owner.get("/speakers").json()["items"] == []
    finally:
        stack.value("UPDATE transcript_speakers SET speech_s = $3 WHERE transcript_id = $1 AND speaker = $2",
                    source, voice_b, talked)


async def test_another_keys_job_is_unknown_at_once_and_media_types_are_read_in_any_case(enrolled, voices):
    """Media types are case-insensitive (RFC 9110 8.3.1): proxies and some clients capitalise them.
    Another key's job is unknown without waiting on its row's lock, as everywhere else."""
    import asyncpg

    stack, owner, other, source = enrolled
    holding = await asyncpg.connect(stack.database_url)
    try:
        transaction = holding.transaction()
        await transaction.start()
        await holding.execute("SELECT 1 FROM transcripts WHERE id = $1 FOR UPDATE", source)
        started = time.monotonic()
        body = f'{{"name": "Nobody", "transcript_id": {source}, "label": "spk_0"}}'
        answer = await asyncio.to_thread(other.post, "/speakers", content=body,
                                         headers={"Content-Type": "Application/JSON"})
        assert answer.status_code == 404, answer.text
        assert time.monotonic() - started < 5
        await transaction.rollback()
    finally:
        await holding.close()

    request = other.build_request("POST", "/speakers", data={"name": "Nobody"},
                                  files={"file": ("silence.wav", voices["silence"])})
    request.headers["Content-Type"] = request.headers["Content-Type"].replace("multipart/form-data",
                                                                              "Multipart/Form-Data")
    silent = other.send(request)
    assert silent.status_code == 422 and "speech" in silent.json()["detail"], silent.text


async def test_names_in_any_script_are_known_whatever_their_case(enrolled):
    """PostgreSQL's lower() decides, as for the unique names: Python's differs on "İ"."""
    import asyncpg

    from common import speakerstore

    stack, *_ = enrolled
    conn = await asyncpg.connect(stack.database_url)
    try:
        async with conn.transaction():
            await conn.execute("INSERT INTO speakers (owner, name) VALUES ('names-test', 'İlker'),"
                               " ('names-test', 'Анна')")
            unknown = await speakerstore.unknown_names(conn, "names-test", ["İlker", "анна", "Nobody", "АННА"])
            # Matching picks the people a job expects, and leaves out those named by hand, the same way.
            await conn.execute("INSERT INTO voiceprints (speaker_id, embedding, embedding_model, speech_s, source)"
                               " SELECT id, '[1, 0, 0]', 'test-model', 10, 'sample' FROM speakers"
                               " WHERE owner = 'names-test'")
            expected = await speakerstore.owner_profiles(conn, "names-test", "test-model", only=["İLKER", "анна"],
                                                         leaving_out=["АННА"])
            await conn.execute("DELETE FROM speakers WHERE owner = 'names-test'")
    finally:
        await conn.close()
    assert unknown == ["Nobody"]
    assert [p.name for p in expected] == ["İlker"]


async def _speakers_updated(queue: aio_pika.abc.AbstractQueue, transcript_id: int, client: httpx.Client,
                            quiet_s: float = 3.0) -> dict[int, list[dict]]:
    """The transcript.speakers_updated events on `queue` of the transcripts of the client's key (the
    stack is shared: other tests' transcripts are not this test's to count), their `speakers` by
    transcript, once one of `transcript_id` came and then none of the key's for `quiet_s` seconds."""
    own = set(_jobs_of(client))
    last = {"count": 0, "at": time.monotonic()}

    def then_quiet(bodies: list[dict]) -> bool:
        count = sum(b["transcript_id"] in own for b in bodies)
        if count != last["count"]:
            last.update(count=count, at=time.monotonic())
        return (any(b["transcript_id"] == transcript_id for b in bodies)
                and time.monotonic() - last["at"] >= quiet_s)

    events: dict[int, list[dict]] = {}
    for body in await job_events(queue, None, then_quiet, 30 + quiet_s):
        if body["transcript_id"] in own:
            events.setdefault(body["transcript_id"], []).append(body["speakers"])
    return events


def _told_once_each_with_no_name_twice(events: dict[int, list[dict]]) -> None:
    for transcript_id, told in events.items():
        assert len(told) == 1, f"job {transcript_id} was told its names {len(told)} times: {told}"
        names = [n["name"].lower() for n in told[0].values() if n["name"]]
        assert len(names) == len(set(names)), f"job {transcript_id} was told of one name on two speakers: {told}"


async def test_renaming_a_person_to_a_name_given_by_hand_leaves_it_on_one_speaker(enrolled):
    """The name never shows on two speakers of a recording, not even between two steps of the
    rename: each transcript it changes is told its names once, as they end."""
    stack, owner, _, source = enrolled
    first = stack.status(source, owner)
    voice_a, voice_b = _speaker_at(first, 2.0)["speaker"], _speaker_at(first, 5.5)["speaker"]
    anna = owner.post("/speakers", json={"name": "Anna", "transcript_id": source, "label": voice_a})
    assert anna.status_code == 201, anna.text
    connection = await aio_pika.connect(stack.amqp_url)
    try:
        assert owner.patch(f"/transcripts/{source}/speakers", json={voice_b: "Boris"}).status_code == 200
        queue = await events_queue(await connection.channel(), "transcript.speakers_updated")
        assert owner.patch(f"/speakers/{anna.json()['id']}", json={"name": "Boris"}).status_code == 200
        names = owner.get(f"/transcripts/{source}/speakers").json()["speakers"]
        assert ({label: names[label].get("name") for label in (voice_a, voice_b)}
                == {voice_a: None, voice_b: "Boris"}), names
        events = await _speakers_updated(queue, source, owner)
        _told_once_each_with_no_name_twice(events)
        assert (events[source][0][voice_a]["name"], events[source][0][voice_b]["name"]) == (None, "Boris")
        # Named Anna again, the person is no longer the one given by hand: her voice is hers again.
        assert owner.patch(f"/speakers/{anna.json()['id']}", json={"name": "Anna"}).status_code == 200
        names = owner.get(f"/transcripts/{source}/speakers").json()["speakers"]
        assert ({label: names[label].get("name") for label in (voice_a, voice_b)}
                == {voice_a: "Anna", voice_b: "Boris"}), names
        events = await _speakers_updated(queue, source, owner)
        _told_once_each_with_no_name_twice(events)
        assert (events[source][0][voice_a]["name"], events[source][0][voice_b]["name"]) == ("Anna", "Boris")
    finally:
        await connection.close()
        assert owner.delete(f"/speakers/{anna.json()['id']}").status_code == 204
        assert owner.patch(f"/transcripts/{source}/speakers", json={voice_b: None}).status_code == 200


async def test_forgetting_a_person_tells_each_recording_the_name_went_and_who_took_the_voice(enrolled, voices):
    """The transcript is told its names once, by the matching after the commit that takes the
    forgotten person's: their name gone and the next best profile in its place, and no other."""
    stack, owner, _, source = enrolled
    voice_a = _speaker_at(stack.status(source, owner), 2.0)["speaker"]
    anna = owner.post("/speakers", json={"name": "Anna", "transcript_id": source, "label": voice_a})
    assert anna.status_code == 201, anna.text
    # (the same voice as Anna's: enrolled only when the request insists)
    anne = owner.post("/speakers", data={"name": "Anne", "force": "true"},
                      files={"file": ("anne.wav", voices["a_alone"])})
    assert anne.status_code == 201, anne.text
    assert owner.get(f"/transcripts/{source}/speakers").json()["speakers"][voice_a]["name"] == "Anna"
    connection = await aio_pika.connect(stack.amqp_url)
    try:
        queue = await events_queue(await connection.channel(), "transcript.speakers_updated")
        assert owner.delete(f"/speakers/{anna.json()['id']}").status_code == 204
        events = await _speakers_updated(queue, source, owner)
        assert list(events) == [source], events
        assert [told[voice_a]["name"] for told in events[source]] == ["Anne"], events[source]
        assert all(told[label]["name"] is None for told in events[source] for label in told if label != voice_a)
        assert owner.get(f"/transcripts/{source}/speakers").json()["speakers"][voice_a]["name"] == "Anne"
    finally:
        await connection.close()


async def _let_go_once_two_wait(holding: asyncpg.Connection, held: asyncpg.transaction.Transaction) -> bool:
    """Rolls `held` back once two of the keyed ingest's requests wait on a lock (or after 30 s):
    whether both waited, that is whether the race was set up."""
    both_waited = False
    for _ in range(300):
        # (the second may wait for the first's turn at the key's people: an advisory lock)
        if await holding.fetchval("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                                  " AND application_name = $1 AND wait_event_type = 'Lock'", KEYED_INGEST) >= 2:
            both_waited = True
            break
        await asyncio.sleep(0.1)
    await held.rollback()  # let go either way, so the requests end
    return both_waited


async def test_two_renames_at_once_leave_the_jobs_expecting_the_name_the_person_ends_with(enrolled):
    """Both renames read the old name before either has renamed; the second to run must carry the
    name the first gave on to the jobs that expect the person, not look for the old one."""
    import asyncpg

    stack, owner, _, source = enrolled
    voice_a = _speaker_at(stack.status(source, owner), 2.0)["speaker"]
    anna = owner.post("/speakers", json={"name": "Anna", "transcript_id": source, "label": voice_a})
    assert anna.status_code == 201, anna.text
    options = stack.value("SELECT options::text FROM transcripts WHERE id = $1", source)
    stack.value("UPDATE transcripts SET options = options || '{\"expected_speakers\": [\"Anna\"]}' WHERE id = $1",
                source)
    holding = await asyncpg.connect(stack.database_url)
    try:
        # The job held, both renames read "Anna" and wait for it; let go, they run one after the other.
        held = holding.transaction()
        await held.start()
        await holding.execute("SELECT id FROM transcripts WHERE id = $1 FOR UPDATE", source)

        async with httpx.AsyncClient(base_url=stack.api, headers={"X-API-Key": OWNER}, timeout=120) as client:
            where = f"/speakers/{anna.json()['id']}"
            *answers, both_waited = await asyncio.gather(client.patch(where, json={"name": "Boris"}),
                                                         client.patch(where, json={"name": "Carl"}),
                                                         _let_go_once_two_wait(holding, held))
        assert both_waited, "the two renames never both waited on the held job: the race was not set up"
        assert [a.status_code for a in answers] == [200, 200], [a.text for a in answers]
        final = owner.get(where).json()["name"]
        assert final in ("Boris", "Carl")
        expected = owner.get(f"/transcripts/{source}").json()["options"]["expected_speakers"]
        assert expected == [final], (expected, final)
    finally:
        await holding.close()
        stack.value("UPDATE transcripts SET options = $2::text::jsonb WHERE id = $1", source, options)


def test_a_name_given_by_hand_to_a_label_without_a_voice_is_not_recognised_in_a_second_speaker(enrolled):
    """Lines moved to a new label (no voice of its own) and that label named by hand: recognition
    no longer gives the name to the speaker it had named."""
    stack, owner, _, source = enrolled
    first = stack.status(source, owner)
    segment = _speaker_at(first, 2.0)
    voice_a = segment["speaker"]
    anna = owner.post("/speakers", json={"name": "Anna", "transcript_id": source, "label": voice_a})
    assert anna.status_code == 201, anna.text
    where = f"/transcripts/{source}/segments/{segment['chunk_index']}/{segment['index']}"
    try:
        assert owner.get(f"/transcripts/{source}/speakers").json()["speakers"][voice_a]["name"] == "Anna"
        assert owner.patch(where, json={"speaker": "spk_9"}).status_code == 200
        assert owner.patch(f"/transcripts/{source}/speakers", json={"spk_9": "anna"}).status_code == 200
        names = owner.get(f"/transcripts/{source}/speakers").json()["speakers"]
        assert (names[voice_a].get("name"), names["spk_9"].get("name")) == (None, "anna"), names
        txt = owner.get(f"/transcripts/{source}", params={"format": "txt"}).text
        assert "Anna:" not in txt and "anna:" in txt, txt
    finally:
        assert owner.patch(where, json={"speaker": voice_a}).status_code == 200
        assert owner.patch(f"/transcripts/{source}/speakers", json={"spk_9": None}).status_code == 200
        assert owner.delete(f"/speakers/{anna.json()['id']}").status_code == 204


def test_a_name_with_a_comma_is_refused_as_it_could_never_be_expected(enrolled):
    """`expected_speakers` is one text of comma-separated names (form, CLI, bucket drops)."""
    stack, owner, _, source = enrolled
    voice = _speaker_at(stack.status(source, owner), 2.0)["speaker"]
    refused = owner.post("/speakers", json={"name": "Smith, John", "transcript_id": source, "label": voice})
    assert refused.status_code == 400 and "comma" in refused.text, refused.text
    john = owner.post("/speakers", json={"name": "John Smith", "transcript_id": source, "label": voice})
    assert john.status_code == 201, john.text
    try:
        renamed = owner.patch(f"/speakers/{john.json()['id']}", json={"name": "Smith, John"})
        assert renamed.status_code == 400 and "comma" in renamed.text, renamed.text
        assert owner.get(f"/speakers/{john.json()['id']}").json()["name"] == "John Smith"
    finally:
        assert owner.delete(f"/speakers/{john.json()['id']}").status_code == 204


async def test_a_voice_named_after_a_person_while_they_are_forgotten_loses_the_name(enrolled):
    """A matching (a job's chunk, another enrolment) names a voice after Zoe while she is being
    forgotten: its transaction holds the deletion back until it commits, and the deletion's
    cascade clears only the link to her. The name must go too."""
    import asyncpg

    from common import speakerstore

    stack, owner, _, source = enrolled
    voice = _speaker_at(stack.status(source, owner), 5.5)["speaker"]
    matching, forgetting = await asyncpg.connect(stack.database_url), await asyncpg.connect(stack.database_url)
    try:
        zoe = await forgetting.fetchval("INSERT INTO speakers (owner, name) SELECT owner, 'Zoe' FROM transcripts"
                                        " WHERE id = $1 RETURNING id", source)
        naming = matching.transaction()
        await naming.start()
        await matching.execute("UPDATE transcript_speakers SET name = 'Zoe', name_source = 'auto',"
                               " matched_speaker_id = $3, confidence = 0.9 WHERE transcript_id = $1 AND speaker = $2",
                               source, voice, zoe)

        async def forget() -> list[int]:
            async with forgetting.transaction():
                return await speakerstore.delete_speaker(forgetting, zoe)

        forgot = asyncio.create_task(forget())
        await asyncio.sleep(1.0)
        assert not forgot.done()  # waits for the matching
        await naming.commit()
        assert await forgot == [source]
        left = await forgetting.fetchrow("SELECT name, name_source, matched_speaker_id FROM transcript_speakers"
                                         " WHERE transcript_id = $1 AND speaker = $2", source, voice)
        assert tuple(left) == (None, None, None)
        # Due a matching that tells it the name went (no request here runs it).
        assert await forgetting.fetchval("SELECT announce FROM speaker_matching_due WHERE transcript_id = $1",
                                         source) is True
    finally:
        # Not left for an ingest's sweep to announce in the middle of a later test.
        await forgetting.execute("DELETE FROM speaker_matching_due WHERE transcript_id = $1", source)
        await matching.close()
        await forgetting.close()


def test_a_rerun_of_an_enrolled_recording_cannot_enrol_the_same_voice_under_another_name(enrolled):
    """A rerun gives the same voice under another job; enrolled under a second name, both profiles
    scored alike on it everywhere and the matching picked between them by chance."""
    stack, owner, _, source = enrolled
    rerun = owner.post(f"/transcripts/{source}/rerun", json={})
    assert rerun.status_code in (200, 201, 202), rerun.text
    again = rerun.json()["id"]
    assert stack.wait_finished(again, 300, owner)["status"] == "done"
    first_label = _speaker_at(stack.status(source, owner), 2.0)["speaker"]
    rerun_label = _speaker_at(stack.status(again, owner), 2.0)["speaker"]
    anna = owner.post("/speakers", json={"name": "Anna", "transcript_id": source, "label": first_label})
    assert anna.status_code == 201, anna.text
    twice = owner.post("/speakers", json={"name": "Boris", "transcript_id": again, "label": rerun_label})
    assert twice.status_code == 409 and "already a voiceprint of 'Anna'" in twice.json()["detail"], twice.text
    assert [s["name"] for s in owner.get("/speakers").json()["items"]] == ["Anna"]
    assert owner.delete(f"/transcripts/{again}").status_code == 204  # not matched again by the tests after


async def test_one_voice_enrolled_under_two_names_at_once_is_refused_for_the_second(enrolled):
    """Two enrolments of one voice under two names at the same time (two recordings' speakers of
    one voice, as a rerun gives; the same sample sent twice is alike): each read the key's
    voiceprints before the other committed, and both were enrolled, one voice as two people. The
    second to run must find the first's voiceprint and answer 409."""
    import asyncpg

    stack, owner, _, source = enrolled
    voice_a = _speaker_at(stack.status(source, owner), 2.0)["speaker"]
    key_owner = stack.value("SELECT owner FROM transcripts WHERE id = $1", source)
    holding = await asyncpg.connect(stack.database_url)
    copy = None
    try:
        # A second finished recording with voice A's stored voice, without running a rerun.
        copy = await holding.fetchval("INSERT INTO transcripts (filename, owner, status) VALUES ('copy.wav', $1,"
                                      " 'done') RETURNING id", key_owner)
        await holding.execute("INSERT INTO transcript_speakers (transcript_id, speaker, embedding, embedding_model,"
                              " speech_s) SELECT $1, 'spk_0', embedding, embedding_model, speech_s"
                              " FROM transcript_speakers WHERE transcript_id = $2 AND speaker = $3",
                              copy, source, voice_a)
        # `source` held due a matching: an enrolment past its checks waits to record it (the first
        # recording its voice can name someone in) until both enrolments wait, on it or each other.
        held = holding.transaction()
        await held.start()
        await holding.execute("INSERT INTO speaker_matching_due AS d (transcript_id) VALUES ($1)"
                              " ON CONFLICT (transcript_id) DO UPDATE SET changes = d.changes", source)

        async with httpx.AsyncClient(base_url=stack.api, headers={"X-API-Key": OWNER}, timeout=120) as client:
            *answers, both_waited = await asyncio.gather(
                client.post("/speakers", json={"name": "Anna", "transcript_id": source, "label": voice_a}),
                client.post("/speakers", json={"name": "Boris", "transcript_id": copy, "label": "spk_0"}),
                _let_go_once_two_wait(holding, held))
        assert both_waited, "the two enrolments never both waited: the race was not set up"
        assert sorted(a.status_code for a in answers) == [201, 409], [a.text for a in answers]
        [enrolled_as] = [a.json()["name"] for a in answers if a.status_code == 201]
        [refused] = [a.json()["detail"] for a in answers if a.status_code == 409]
        assert f"already a voiceprint of {enrolled_as!r}" in refused, refused
        people = [(s["name"], s["voiceprint_count"]) for s in owner.get("/speakers").json()["items"]]
        assert people == [(enrolled_as, 1)], people
    finally:
        if copy is not None:
            await holding.execute("DELETE FROM speaker_matching_due WHERE transcript_id = $1", copy)
            await holding.execute("DELETE FROM transcripts WHERE id = $1", copy)
        await holding.close()


async def test_a_voiceprint_that_only_changes_how_sure_a_name_is_is_announced(enrolled, voices):
    """The event and /speakers tell each speaker's confidence: a second voiceprint of a person
    that matches their voice in a recording better changes it there, and says so."""
    stack, owner, _, source = enrolled
    voice_a = _speaker_at(stack.status(source, owner), 2.0)["speaker"]
    anna = owner.post("/speakers", data={"name": "Anna"}, files={"file": ("anna.wav", voices["a_alone"])})
    assert anna.status_code == 201, anna.text
    named = owner.get(f"/transcripts/{source}/speakers").json()["speakers"][voice_a]
    assert named["name"] == "Anna" and named["confidence"] < 1.0, named
    connection = await aio_pika.connect(stack.amqp_url)
    try:
        queue = await events_queue(await connection.channel(), "transcript.speakers_updated")
        again = owner.post("/speakers", json={"name": "Anna", "transcript_id": source, "label": voice_a})
        assert again.status_code == 201 and again.json()["voiceprint_count"] == 2, again.text
        assert source in again.json()["relabelled"], again.json()
        events = await _speakers_updated(queue, source, owner)
        _told_once_each_with_no_name_twice(events)
        assert events[source][0][voice_a] == {"name": "Anna", "source": "auto", "confidence": 1.0}, events[source]
        assert owner.get(f"/transcripts/{source}/speakers").json()["speakers"][voice_a]["confidence"] == 1.0
    finally:
        await connection.close()


async def test_a_job_expects_its_people_as_they_are_when_it_is_stored(enrolled, voices):
    """A job's expected speakers are checked before its recording is stored, which can take
    minutes; a person renamed meanwhile is expected (and named) by the new name, and one
    forgotten meanwhile is refused as an unknown name, leaving nothing behind. A bucket drop
    fails instead; a rerun keeps its original job's names as they are."""
    from litestar.exceptions import HTTPException

    from common.db import create_pool
    from common.messages import JobOptions
    from common.storage import object_exists, upload_bytes
    from services.ingest.jobs import create_job

    stack, owner, _, source = enrolled
    voice_a = _speaker_at(stack.status(source, owner), 2.0)["speaker"]
    anna = owner.post("/speakers", json={"name": "Anna", "transcript_id": source, "label": voice_a})
    assert anna.status_code == 201, anna.text
    key_owner = stack.value("SELECT owner FROM transcripts WHERE id = $1", source)
    settings, s3 = stack.settings(), stack.s3()
    recording = voices["second_half"].read_bytes()
    stored: list[str] = []

    def person(name: str) -> int:
        """A speaker without a voice, to be forgotten."""
        return stack.value("INSERT INTO speakers (owner, name) VALUES ($1, $2) RETURNING id", key_owner, name)

    pool = await create_pool(settings)

    async def submit(meanwhile, names: list[str], **kwargs) -> int | None:
        """A job of `recording` expecting `names`; `meanwhile()` runs while its recording is stored."""
        def put_audio(key: str) -> None:
            upload_bytes(s3, settings.audio_bucket, key, recording)
            stored.append(key)
            answer = meanwhile()
            assert answer.status_code in (200, 204), answer.text

        return await create_job(pool, s3, settings.audio_bucket, put_audio, filename="second_half.wav",
                                options=JobOptions(expected_speakers=names), owner=key_owner,
                                outbox_wake=asyncio.Event(), **kwargs)

    jobs = []
    try:
        renamed = await submit(lambda: owner.patch(f"/speakers/{anna.json()['id']}", json={"name": "Anna K."}),
                               ["anna"])
        jobs.append(renamed)
        assert owner.get(f"/transcripts/{renamed}").json()["options"]["expected_speakers"] == ["Anna K."]
        document = stack.wait_finished(renamed, 300, owner)
        assert document["status"] == "done"
        assert "Anna K." in {s.get("speaker_name") for s in document["segments"]}, document["segments"]

        zoe = person("Zoe")
        with pytest.raises(HTTPException) as refused:
            await submit(lambda: owner.delete(f"/speakers/{zoe}"), ["Anna K.", "Zoe"])
        assert refused.value.status_code == 400 and "'Zoe'" in refused.value.detail, refused.value.detail
        assert "'Anna K.'" not in refused.value.detail
        left = int(stored[-1].rsplit("/", 1)[1])
        assert stack.value("SELECT count(*) FROM transcripts WHERE id = $1", left) == 0
        assert not object_exists(s3, settings.audio_bucket, stored[-1])

        # The OpenAI-compatible endpoint calls them known_speaker_names: its 400 says so.
        wen = person("Wen")
        with pytest.raises(HTTPException) as refused:
            await submit(lambda: owner.delete(f"/speakers/{wen}"), ["Wen"], speakers_field="known_speaker_names")
        assert refused.value.status_code == 400, refused.value.detail
        assert refused.value.detail.startswith("known_speaker_names: ") and "'Wen'" in refused.value.detail

        yan = person("Yan")
        failed = await submit(lambda: owner.delete(f"/speakers/{yan}"), ["Yan"],
                              refuse_unknown_speakers=lambda names: f"nobody is called {', '.join(names)}")
        jobs.append(failed)
        assert stack.wait_finished(failed, 60, owner)["error"] == "nobody is called Yan"

        xia = person("Xia")
        kept = await submit(lambda: owner.delete(f"/speakers/{xia}"), ["Xia", "anna k."], keep_unknown_speakers=True)
        jobs.append(kept)
        assert owner.get(f"/transcripts/{kept}").json()["options"]["expected_speakers"] == ["Xia", "anna k."]
        assert stack.wait_finished(kept, 300, owner)["status"] == "done"
    finally:
        await pool.close()
        for job in jobs:
            owner.delete(f"/transcripts/{job}")


async def _waits_on_a_lock(conn, ingest: str = KEYED_INGEST, timeout: float = 30) -> None:
    """Until a session of the keyed ingest (`ingest`, its application_name: the enrolment) waits
    for a lock that `conn` holds (`timeout` s at most): no other service's session waiting on
    anything else will do."""
    for _ in range(round(timeout * 10)):
        if await conn.fetchval("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                               " AND application_name = $1 AND wait_event_type = 'Lock'"
                               " AND pg_backend_pid() = ANY(pg_blocking_pids(pid))", ingest) >= 1:
            return
        await asyncio.sleep(0.1)
    raise AssertionError("the enrolment never waited on the held lock: the race was not set up")


async def test_an_enrolment_from_a_sample_holds_no_upload_place_once_the_sample_is_read(stack, voices,
                                                                                         fixtures_dir):
    """A sample enrolment held a place among MAX_CONCURRENT_UPLOADS for its whole request: the
    wait for the speaker models, embedding the sample and the re-matching of every past recording
    of its key. With room for one upload, a recording sent while an enrolment waits past its
    sample (here on the lock of the key's people, which the test holds) must be accepted."""
    import asyncpg

    key, ingest = "speakers-key-uploads-0003", "ingest-speakers-one-upload"
    with through_another_ingest(stack, ingest, API_KEYS=key, MAX_CONCURRENT_UPLOADS="1",
                                DATABASE_URL=_with_application_name(stack.database_url, ingest)) as bounded:
        holding = await asyncpg.connect(stack.database_url)
        client = httpx.AsyncClient(base_url=bounded.api, headers={"X-API-Key": key}, timeout=300)
        try:
            held = holding.transaction()
            await held.start()
            # The lock every change of the key's people takes (one_change_of_the_owners_people_at_a_time).
            await holding.execute("SELECT pg_advisory_xact_lock(hashtextextended('stt.speakers:' || $1, 0))",
                                  owner_of(key))
            enrolling = asyncio.create_task(client.post("/speakers", data={"name": "Anya"},
                                                        files={"file": ("sample.wav", voices["a_alone"])}))
            try:
                await _waits_on_a_lock(holding, ingest, timeout=180)  # the models load on first use
                recording = await client.post("/recognize", files={
                    "file": ("jfk.flac", (fixtures_dir / "jfk.flac").read_bytes())})
                assert recording.status_code == 202, recording.text
            finally:
                await held.rollback()
                answer = await enrolling
            assert answer.status_code == 201 and answer.json()["name"] == "Anya", answer.text
        finally:
            await holding.close()
            await client.aclose()
            with httpx.Client(base_url=bounded.api, headers={"X-API-Key": key}, timeout=120) as cleaning:
                for speaker in cleaning.get("/speakers").json()["items"]:
                    cleaning.delete(f"/speakers/{speaker['id']}")
                _discard_jobs(cleaning)


# What ingest logs when a matching gave way in a deadlock (services.ingest.speakers._in_transaction_retried).
GAVE_WAY = "gave way in a deadlock with a matching of voices"


async def test_an_enrolment_whose_rematching_gives_way_in_a_deadlock_tries_it_again(enrolled):
    """The voiceprint is committed, then the key's recordings are matched again; a deadlock that
    matching is the victim of is tried again (as a rename's or a forgetting's is), not a 500."""
    import asyncpg

    stack, owner, _, source = enrolled
    first = stack.status(source, owner)
    voice_a, voice_b = _speaker_at(first, 2.0)["speaker"], _speaker_at(first, 5.5)["speaker"]
    boris = owner.post("/speakers", json={"name": "Boris", "transcript_id": source, "label": voice_b})
    assert boris.status_code == 201, boris.text
    holding = await asyncpg.connect(stack.database_url)
    try:
        # Boris held: the re-matching of `source` (the first recording it matches again) locks the
        # job and then waits to read Boris; the test then waits for the job. A session looks for a
        # deadlock once, deadlock_timeout after it began to wait, and gives way if it finds one: the
        # re-matching looks after 1 s (the server's default), the test's session after 30 s. The
        # test waits as soon as it sees the re-matching wait, well within that 1 s (waiting after
        # it, the re-matching would find no deadlock, and the test's session give way at 30 s).
        await holding.execute("SET deadlock_timeout = '30s'")
        held = holding.transaction()
        await held.start()
        await holding.execute("SELECT id FROM speakers WHERE id = $1 FOR UPDATE", boris.json()["id"])
        gave_way_before = stack.log_text(KEYED_INGEST).count(GAVE_WAY)
        async with httpx.AsyncClient(base_url=stack.api, headers={"X-API-Key": OWNER}, timeout=120) as client:
            enrolling = asyncio.create_task(client.post("/speakers", json={"name": "Anna", "transcript_id": source,
                                                                           "label": voice_a}))
            await _waits_on_a_lock(holding)
            try:
                await holding.execute("SELECT id FROM transcripts WHERE id = $1 FOR UPDATE", source)
                gave_way = "the enrolment"
            except asyncpg.exceptions.DeadlockDetectedError:
                # The enrolment may give way first and, tried again at once, lock the job before
                # this statement, woken, does: a second deadlock, which either may lose.
                gave_way = ("the enrolment" if stack.log_text(KEYED_INGEST).count(GAVE_WAY) > gave_way_before
                            else "the test")
            await held.rollback()
            answer = await enrolling
        assert gave_way == "the enrolment", "the test gave way in the deadlock: the race was not set up"
        assert answer.status_code == 201, answer.text
        assert answer.json()["name"] == "Anna" and source in answer.json()["relabelled"], answer.json()
        assert owner.get(f"/transcripts/{source}/speakers").json()["speakers"][voice_a]["name"] == "Anna"
    finally:
        await holding.close()


async def test_an_enrolment_answers_with_the_person_it_saved_though_forgotten_at_once(enrolled, voices):
    """DELETE /speakers/{id} while the enrolment matches the recordings again: the enrolment
    happened, and its answer is the profile it saved, not a 404."""
    import asyncpg

    stack, owner, _, source = enrolled
    key_owner = stack.value("SELECT owner FROM transcripts WHERE id = $1", source)
    holding = await asyncpg.connect(stack.database_url)
    try:
        # `source` held: the re-matching (its first recording) waits for it, after the commit.
        held = holding.transaction()
        await held.start()
        await holding.execute("SELECT id FROM transcripts WHERE id = $1 FOR UPDATE", source)
        async with httpx.AsyncClient(base_url=stack.api, headers={"X-API-Key": OWNER}, timeout=120) as client:
            enrolling = asyncio.create_task(client.post("/speakers", data={"name": "Anna"},
                                                        files={"file": ("anna.wav", voices["a_alone"])}))
            await _waits_on_a_lock(holding)
            anna = await holding.fetchval("SELECT id FROM speakers WHERE owner = $1 AND name = 'Anna'", key_owner)
            assert anna is not None
            forgotten = await client.delete(f"/speakers/{anna}")
            assert forgotten.status_code == 204, forgotten.text
            await held.rollback()
            answer = await enrolling
        assert answer.status_code == 201, answer.text
        assert (answer.json()["id"], answer.json()["name"], answer.json()["voiceprint_count"]) == (anna, "Anna", 1)
        assert owner.get(f"/speakers/{anna}").status_code == 404
        names = owner.get(f"/transcripts/{source}/speakers").json()["speakers"]
        assert "Anna" not in {n.get("name") for n in names.values()}, names
    finally:
        await holding.close()


def test_a_voice_that_sounds_like_another_person_is_enrolled_only_with_force(enrolled, voices):
    """A sample picked by mistake (Anna's voice enrolled as Boris) would give Anna's lines in
    every recording to Boris: refused, naming Anna, unless the request insists."""
    stack, owner, _, source = enrolled
    first = stack.status(source, owner)
    voice_a, voice_b = _speaker_at(first, 2.0)["speaker"], _speaker_at(first, 5.5)["speaker"]
    # Two people of one recording are each their own.
    anna = owner.post("/speakers", json={"name": "Anna", "transcript_id": source, "label": voice_a})
    assert anna.status_code == 201, anna.text
    boris = owner.post("/speakers", json={"name": "Boris", "transcript_id": source, "label": voice_b})
    assert boris.status_code == 201, boris.text

    def enrol(fields: dict) -> httpx.Response:
        return owner.post("/speakers", data=fields, files={"file": ("sample.wav", voices["a_alone"])})

    for name in ("boris", "Anne"):  # one more voiceprint of Boris, or a new person
        mistaken = enrol({"name": name})
        assert mistaken.status_code == 409, mistaken.text
        assert "sounds like 'Anna'" in mistaken.json()["detail"] and "force" in mistaken.json()["detail"], mistaken.text
    assert [(s["name"], s["voiceprint_count"]) for s in owner.get("/speakers").json()["items"]] == [
        ("Anna", 1), ("Boris", 1)]
    assert enrol({"name": "boris", "force": "maybe"}).status_code == 400
    forced = enrol({"name": "boris", "force": "true"})
    assert forced.status_code == 201 and forced.json()["voiceprint_count"] == 2, forced.text


# Voices made up for recordings written straight into the database (no audio, no diarizer): a
# model of their own, so that no real recording's voice is compared with them.
MADE_UP_MODEL = "speakers-test-made-up-voices"


async def _enrolled_in_the_database(conn, owner: str, voices: dict[str, str]) -> dict[str, int]:
    """Speakers of `owner`, each with one voiceprint of MADE_UP_MODEL: name -> '[x, y, z]'."""
    ids = {}
    for name, voice in voices.items():
        ids[name] = await conn.fetchval("INSERT INTO speakers (owner, name) VALUES ($1, $2) RETURNING id", owner, name)
        await conn.execute("INSERT INTO voiceprints (speaker_id, embedding, embedding_model, speech_s, source)"
                           " VALUES ($1, $2::vector, $3, 10, 'sample')", ids[name], voice, MADE_UP_MODEL)
    return ids


async def _recordings_in_the_database(conn, owner: str, count: int, anna: int) -> list[int]:
    """`count` finished jobs of `owner` written into the database, in id order: each has spk_0,
    a voice ([1, 0, 0]) recognised as Anna (speaker `anna`), and spk_1 ([0, 0, 1]), nobody's."""
    ids = [r["id"] for r in await conn.fetch(
        "INSERT INTO transcripts (filename, owner, status) SELECT 'made-up-' || i || '.wav', $1, 'done'"
        " FROM generate_series(1, $2) i RETURNING id", owner, count)]
    await conn.execute(
        "INSERT INTO transcript_speakers (transcript_id, speaker, embedding, embedding_model, speech_s, name,"
        " name_source, matched_speaker_id, confidence)"
        " SELECT id, 'spk_0', '[1, 0, 0]'::vector, $2, 10, 'Anna', 'auto', $3::bigint, 1.0 FROM unnest($1::bigint[]) id"
        " UNION ALL SELECT id, 'spk_1', '[0, 0, 1]'::vector, $2, 10, NULL, NULL, NULL::bigint, NULL"
        " FROM unnest($1::bigint[]) id", ids, MADE_UP_MODEL, anna)
    await conn.execute("INSERT INTO speaker_turns (transcript_id, chunk_index, index, speaker, start_ts, end_ts)"
                       " SELECT id, 0, i, 'spk_' || i, i * 10, i * 10 + 9"
                       " FROM unnest($1::bigint[]) id, generate_series(0, 1) i", ids)
    return sorted(ids)


# Scores 0.8 on Anna's voice ([1, 0, 0]): second to her, and above SPEAKER_MATCH_THRESHOLD.
BORIS_SOUNDING_LIKE_ANNA = "[0.8, 0.6, 0]"


@contextlib.asynccontextmanager
async def _anna_and_boris_in_recordings(enrolled, count: int,
                                       boris: str = BORIS_SOUNDING_LIKE_ANNA) -> AsyncIterator[SimpleNamespace]:
    """Anna and Boris (his voice `boris`) enrolled for the key, `count` made-up recordings where
    Anna was recognised, a queue of their transcript.speakers_updated, and a second connection
    (`holding`) to hold locks with; the recordings removed after."""
    import asyncpg

    stack, _, _, source = enrolled
    key_owner = stack.value("SELECT owner FROM transcripts WHERE id = $1", source)
    conn, holding = await asyncpg.connect(stack.database_url), await asyncpg.connect(stack.database_url)
    connection = await aio_pika.connect(stack.amqp_url)
    jobs: list[int] = []
    try:
        people = await _enrolled_in_the_database(conn, key_owner, {"Anna": "[1, 0, 0]", "Boris": boris})
        jobs = await _recordings_in_the_database(conn, key_owner, count, people["Anna"])
        queue = await events_queue(await connection.channel(), "transcript.speakers_updated")
        yield SimpleNamespace(conn=conn, holding=holding, people=people, jobs=jobs, queue=queue)
    finally:
        await connection.close()
        await holding.close()
        await conn.execute("DELETE FROM transcripts WHERE id = ANY($1::bigint[])", jobs)
        await conn.close()


async def _names_in(conn, jobs: list[int]) -> dict[int, dict[str, tuple]]:
    """job -> label -> (name, source) of those jobs' recording speakers."""
    names: dict[int, dict[str, tuple]] = {}
    for r in await conn.fetch("SELECT transcript_id, speaker, name, name_source FROM transcript_speakers"
                              " WHERE transcript_id = ANY($1::bigint[])", jobs):
        names.setdefault(r["transcript_id"], {})[r["speaker"]] = (r["name"], r["name_source"])
    return names


async def _no_name_on_two_speakers(conn, jobs: list[int]) -> None:
    twice = await conn.fetch("SELECT transcript_id, lower(name) FROM transcript_speakers WHERE name IS NOT NULL"
                             " AND transcript_id = ANY($1::bigint[]) GROUP BY 1, 2 HAVING count(*) > 1", jobs)
    assert not twice, f"one name on two speakers of a recording: {twice}"


async def _outbox_sent(conn, jobs: list[int]) -> None:
    """Until the outbox holds no event of these jobs (published; 30 s at most)."""
    for _ in range(300):
        if not await conn.fetchval("SELECT count(*) FROM outbox WHERE body->>'transcript_id' = ANY($1::text[])",
                                   [str(job) for job in jobs]):
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"events of jobs {jobs} still in the outbox after 30 s")


async def _free(conn, job: int) -> bool:
    """Whether no transaction holds the job's row (a chunk store of it would not wait)."""
    import asyncpg

    try:
        await conn.fetchval("SELECT id FROM transcripts WHERE id = $1 FOR UPDATE NOWAIT", job)
        return True
    except asyncpg.exceptions.LockNotAvailableError:
        return False


async def test_a_rename_matches_its_recordings_again_a_batch_at_a_time(enrolled):
    """A person recognised in hundreds of recordings is renamed: the name is committed first and
    the recordings are matched again a batch of jobs at a time. While a later batch waits for a
    job another transaction holds (a chunk being stored), the key's other people can be renamed
    and the jobs already matched are free. No recording shows one name on two speakers meanwhile,
    and the end is what one transaction left: the new name wherever the person was recognised,
    a name given by hand winning, each transcript told its names once."""
    from services.ingest.speakers import MATCHED_AGAIN_PER_TRANSACTION as BATCH

    stack, owner, _, _ = enrolled
    async with _anna_and_boris_in_recordings(enrolled, 3 * BATCH, boris="[0, 1, 0]") as made:
        conn, holding, people, jobs, queue = made.conn, made.holding, made.people, made.jobs, made.queue
        # Given the new name by hand, spk_1 keeps it: recognition names nobody else so there.
        new_by_hand = jobs[0::10]
        await conn.execute("UPDATE transcript_speakers SET name = 'Anna K.', name_source = 'manual'"
                           " WHERE transcript_id = ANY($1::bigint[]) AND speaker = 'spk_1'", new_by_hand)
        # Given the old name by hand, spk_1 kept Anna from her voice; renamed, the voice is hers.
        old_by_hand = jobs[5::10]
        await conn.execute("UPDATE transcript_speakers SET name = CASE speaker WHEN 'spk_1' THEN 'Anna' END,"
                           " name_source = CASE speaker WHEN 'spk_1' THEN 'manual' END, matched_speaker_id = NULL,"
                           " confidence = NULL WHERE transcript_id = ANY($1::bigint[])", old_by_hand)
        held = holding.transaction()
        await held.start()
        await holding.execute("SELECT id FROM transcripts WHERE id = $1 FOR UPDATE", jobs[2 * BATCH])
        async with httpx.AsyncClient(base_url=stack.api, headers={"X-API-Key": OWNER}, timeout=120) as client:
            renaming = asyncio.create_task(client.patch(f"/speakers/{people['Anna']}", json={"name": "Anna K."}))
            try:
                await _waits_on_a_lock(holding)  # the third batch's first job
                other = await asyncio.wait_for(client.patch(f"/speakers/{people['Boris']}",
                                                            json={"name": "Boris K."}), 20)
                assert other.status_code == 200, other.text
                assert await _free(conn, jobs[0]) and await _free(conn, jobs[2 * BATCH - 1])
                meanwhile = await _names_in(conn, jobs)
                assert meanwhile[jobs[1]]["spk_0"] == ("Anna K.", "auto")  # matched, committed
                assert meanwhile[jobs[2 * BATCH + 1]]["spk_0"] == ("Anna", "auto")  # not reached yet
                await _no_name_on_two_speakers(conn, jobs)
                assert not renaming.done()
            finally:
                await held.rollback()
                await asyncio.wait([renaming], timeout=60)
            answer = renaming.result()
        assert answer.status_code == 200 and answer.json()["name"] == "Anna K.", answer.text

        names = await _names_in(conn, jobs)
        for job in jobs:
            spk_0 = (None, None) if job in new_by_hand else ("Anna K.", "auto")
            spk_1 = ("Anna K.", "manual") if job in new_by_hand else ("Anna", "manual") if job in old_by_hand \
                else (None, None)
            assert names[job] == {"spk_0": spk_0, "spk_1": spk_1}, (job, names[job])
        events = await _speakers_updated(queue, jobs[-1], owner)
        assert set(events) == set(jobs), sorted(set(jobs) - set(events))
        _told_once_each_with_no_name_twice(events)
        for job in jobs:
            assert {label: (n["name"], n["source"]) for label, n in events[job][0].items()} == names[job]


async def test_forgetting_a_person_takes_their_names_at_once_and_matches_the_recordings_a_batch_at_a_time(enrolled):
    """A person recognised in hundreds of recordings is forgotten: every name they gave goes in
    the first commit, with them; the voices are then matched again a batch of jobs at a time (a
    second person, who sounds like them, takes each). While a later batch waits for a recording
    speaker another transaction holds, that second person can be renamed and the jobs already
    matched are free. Each recording is told its names by its batch; those not reached yet are
    due, with their announcement, from the first commit on: a matching cut off there (a restart)
    is finished by the sweep, and leaves no subscriber with the forgotten name
    (test_a_forgetting_cut_off_after_its_commit_is_finished_by_the_sweep). The DELETE answers
    once every recording is matched, each told once by the forgetting."""
    from services.ingest.speakers import MATCHED_AGAIN_PER_TRANSACTION as BATCH

    stack, owner, _, _ = enrolled
    async with _anna_and_boris_in_recordings(enrolled, 3 * BATCH) as made:
        conn, holding, people, jobs, queue = made.conn, made.holding, made.people, made.jobs, made.queue
        held = holding.transaction()
        await held.start()
        # The third batch's first job: a speaker of it that Anna never named.
        await holding.execute("SELECT 1 FROM transcript_speakers WHERE transcript_id = $1 AND speaker = 'spk_1'"
                              " FOR UPDATE", jobs[2 * BATCH])
        async with httpx.AsyncClient(base_url=stack.api, headers={"X-API-Key": OWNER}, timeout=120) as client:
            forgetting = asyncio.create_task(client.delete(f"/speakers/{people['Anna']}"))
            try:
                await _waits_on_a_lock(holding)

                def two_batches_told(bodies: list[dict]) -> bool:
                    return set(jobs[:2 * BATCH]) <= {b["transcript_id"] for b in bodies}

                told_meanwhile = [b for b in await job_events(queue, None, two_batches_told, 30)
                                  if b["transcript_id"] in jobs]
                assert {b["speakers"]["spk_0"]["name"] for b in told_meanwhile} == {"Boris"}, told_meanwhile
                # Not reached yet: due, to be told, as the commit that took the names left them.
                assert [tuple(r) for r in await conn.fetch(
                    "SELECT transcript_id, announce FROM speaker_matching_due WHERE transcript_id = ANY($1::bigint[])"
                    " ORDER BY transcript_id", jobs)] == [(job, True) for job in jobs[2 * BATCH:]]
                other = await asyncio.wait_for(client.patch(f"/speakers/{people['Boris']}",
                                                            json={"name": "Boris K."}), 20)
                assert other.status_code == 200, other.text
                assert await _free(conn, jobs[0]) and await _free(conn, jobs[2 * BATCH - 1])
                assert await conn.fetchval("SELECT count(*) FROM transcript_speakers WHERE lower(name) = 'anna'"
                                           " AND transcript_id = ANY($1::bigint[])", jobs) == 0
                meanwhile = await _names_in(conn, jobs)
                # Matched again (Boris took the voice), then renamed with him; not reached yet: unnamed.
                assert meanwhile[jobs[1]]["spk_0"] == ("Boris K.", "auto")
                assert meanwhile[jobs[2 * BATCH + 1]]["spk_0"] == (None, None)
                assert not forgetting.done()
            finally:
                await held.rollback()
                await asyncio.wait([forgetting], timeout=60)
            answer = forgetting.result()
        assert answer.status_code == 204, answer.text

        names = await _names_in(conn, jobs)
        assert all(names[job] == {"spk_0": ("Boris K.", "auto"), "spk_1": (None, None)} for job in jobs), names
        assert await conn.fetchval("SELECT count(*) FROM speakers WHERE id = $1", people["Anna"]) == 0
        events: dict[int, list[dict]] = {}
        for body in told_meanwhile:
            events.setdefault(body["transcript_id"], []).append(body["speakers"])
        for job, told in (await _speakers_updated(queue, jobs[-1], owner)).items():
            events.setdefault(job, []).extend(told)
        assert set(events) == set(jobs), sorted(set(jobs) - set(events))
        # Those matched before the rename were told of Boris and then of Boris K., the rest of
        # Boris K.: every one that Anna went.
        for job in jobs:
            expected = ["Boris", "Boris K."] if job in jobs[:2 * BATCH] else ["Boris K."]
            assert [told["spk_0"]["name"] for told in events[job]] == expected, (job, events[job])
            assert {label: (n["name"], n["source"]) for label, n in events[job][-1].items()} == names[job]


async def test_a_rename_sent_again_finishes_the_matching_of_one_cut_off(enrolled):
    """The name is committed before the recordings are matched again: a rename cut off on the way
    (a 500, a lost connection) left some with the old name. The same rename sent again renames
    them, and tells them."""
    import asyncpg

    stack, owner, _, source = enrolled
    key_owner = stack.value("SELECT owner FROM transcripts WHERE id = $1", source)
    conn = await asyncpg.connect(stack.database_url)
    connection = await aio_pika.connect(stack.amqp_url)
    jobs: list[int] = []
    try:
        people = await _enrolled_in_the_database(conn, key_owner, {"Anna": "[1, 0, 0]"})
        jobs = await _recordings_in_the_database(conn, key_owner, 3, people["Anna"])
        assert owner.patch(f"/speakers/{people['Anna']}", json={"name": "Anna K."}).status_code == 200
        # Its events are in the outbox when it answers, published after: bound before they are
        # gone, the queue would take them for the second rename's.
        await _outbox_sent(conn, jobs)
        # As if the batch of jobs[1] had never run.
        await conn.execute("UPDATE transcript_speakers SET name = 'Anna' WHERE transcript_id = $1"
                           " AND speaker = 'spk_0'", jobs[1])
        queue = await events_queue(await connection.channel(), "transcript.speakers_updated")
        again = owner.patch(f"/speakers/{people['Anna']}", json={"name": "Anna K."})
        assert again.status_code == 200 and again.json()["name"] == "Anna K.", again.text
        assert {job: names["spk_0"] for job, names in (await _names_in(conn, jobs)).items()} == {
            job: ("Anna K.", "auto") for job in jobs}
        events = await _speakers_updated(queue, jobs[1], owner)
        assert list(events) == [jobs[1]] and events[jobs[1]][0]["spk_0"]["name"] == "Anna K.", events
    finally:
        await connection.close()
        await conn.execute("DELETE FROM transcripts WHERE id = ANY($1::bigint[])", jobs)
        await conn.close()


async def test_a_rename_sent_again_matches_the_recordings_its_cut_off_commit_left_due(enrolled):
    """The rename committed (here through the store) and its matching never ran: a recording where
    another speaker was given the old name by hand had left her voice unnamed, and the rename
    recorded it due. Sent again, the rename found only the recordings where the person still had
    another name, and left this one to the sweep a minute later, though its answer comes when all
    are matched: it matches the key's recordings still due as well."""
    import asyncpg

    from common import speakerstore

    stack, owner, _, source = enrolled
    key_owner = stack.value("SELECT owner FROM transcripts WHERE id = $1", source)
    conn = await asyncpg.connect(stack.database_url)
    jobs: list[int] = []
    try:
        people = await _enrolled_in_the_database(conn, key_owner, {"Anna": "[1, 0, 0]"})
        jobs = await _recordings_in_the_database(conn, key_owner, 1, people["Anna"])
        # spk_1 given her old name by hand, spk_0 (her voice) unnamed: the name was taken.
        await conn.execute("UPDATE transcript_speakers SET name = CASE speaker WHEN 'spk_1' THEN 'Anna' END,"
                           " name_source = CASE speaker WHEN 'spk_1' THEN 'manual' END, matched_speaker_id = NULL,"
                           " confidence = NULL WHERE transcript_id = $1", jobs[0])
        async with conn.transaction():
            assert await speakerstore.rename_speaker(conn, key_owner, people["Anna"], "Anna K.") == jobs
        assert await _due(conn, jobs) == [(jobs[0], False)]
        again = owner.patch(f"/speakers/{people['Anna']}", json={"name": "Anna K."})
        assert again.status_code == 200 and again.json()["name"] == "Anna K.", again.text
        assert (await _names_in(conn, jobs))[jobs[0]] == {"spk_0": ("Anna K.", "auto"), "spk_1": ("Anna", "manual")}
        assert await _due(conn, jobs) == []
    finally:
        await conn.execute("DELETE FROM transcripts WHERE id = ANY($1::bigint[])", jobs)
        await conn.close()


@contextlib.asynccontextmanager
async def _sweeping(stack) -> AsyncIterator[SimpleNamespace]:
    """What ingest's sweep of matchings left due works with (the database pool, the settings, the
    outbox's wake-up), in this process on the stack's database; the stack's ingest publishes
    what it announces."""
    from common.db import create_pool

    settings = stack.settings()
    pool = await create_pool(settings, max_size=2)
    try:
        yield SimpleNamespace(pool=pool, settings=settings, outbox_wake=asyncio.Event())
    finally:
        await pool.close()


async def _due(conn, jobs: list[int]) -> list[tuple[int, bool]]:
    """(job, announce) of those of `jobs` due a matching, in id order."""
    return [tuple(r) for r in await conn.fetch("SELECT transcript_id, announce FROM speaker_matching_due"
                                                " WHERE transcript_id = ANY($1::bigint[]) ORDER BY 1", jobs)]


async def test_a_forgetting_cut_off_after_its_commit_is_finished_by_the_sweep(enrolled):
    """The process dies right after the commit that forgets Anna (here: that commit made through
    the store, and no matching after it): nothing matched her recordings again, and a DELETE sent
    again finds nobody to forget. The commit left them due, each to be announced: the sweep, once
    they have been due PENDING_MATCHING_GRACE_S (and not before: a live request is matching
    them), gives the voices to Boris, who sounds like her, and tells every transcript its names,
    one where nobody takes the voice too, a batch at a time."""
    import asyncpg

    from common import speakerstore
    from services.ingest.speakers import MATCHED_AGAIN_PER_TRANSACTION as BATCH
    from services.ingest.speakers import finish_left_matchings

    stack, owner, _, source = enrolled
    key_owner = stack.value("SELECT owner FROM transcripts WHERE id = $1", source)
    conn = await asyncpg.connect(stack.database_url)
    connection = await aio_pika.connect(stack.amqp_url)
    jobs: list[int] = []
    try:
        people = await _enrolled_in_the_database(conn, key_owner, {"Anna": "[1, 0, 0]", "Boris": "[0.8, 0.6, 0]"})
        jobs = await _recordings_in_the_database(conn, key_owner, BATCH + 2, people["Anna"])
        # The last one's Anna is a voice nothing like Boris's (similarity 0): nobody takes it.
        await conn.execute("UPDATE transcript_speakers SET embedding = '[0.6, -0.8, 0]' WHERE transcript_id = $1"
                           " AND speaker = 'spk_0'", jobs[-1])
        queue = await events_queue(await connection.channel(), "transcript.speakers_updated")
        async with conn.transaction():
            assert await speakerstore.delete_speaker(conn, people["Anna"]) == jobs
        assert owner.delete(f"/speakers/{people['Anna']}").status_code == 404
        assert {job: names["spk_0"] for job, names in (await _names_in(conn, jobs)).items()} == {
            job: (None, None) for job in jobs}
        assert await _due(conn, jobs) == [(job, True) for job in jobs]
        async with _sweeping(stack) as state:
            assert not set(await finish_left_matchings(state)) & set(jobs)  # due for less than the grace
            assert [job for job in await finish_left_matchings(state, grace_s=0) if job in jobs] == jobs
            assert state.outbox_wake.is_set()
        assert await _due(conn, jobs) == []

        names = await _names_in(conn, jobs)
        assert all(names[job] == {"spk_0": ("Boris", "auto"), "spk_1": (None, None)} for job in jobs[:-1]), names
        assert names[jobs[-1]] == {"spk_0": (None, None), "spk_1": (None, None)}
        events = await _speakers_updated(queue, jobs[-1], owner)
        assert set(events) == set(jobs), sorted(set(jobs) - set(events))
        _told_once_each_with_no_name_twice(events)
        for job in jobs:
            assert {label: (n["name"], n["source"]) for label, n in events[job][0].items()} == names[job]
    finally:
        await connection.close()
        await conn.execute("DELETE FROM transcripts WHERE id = ANY($1::bigint[])", jobs)
        await conn.close()


async def test_a_recording_told_its_names_after_a_forgetting_is_not_told_them_again_by_its_matching(enrolled):
    """A forgetting records its recordings due a matching that announces them. One matched and
    announced first by another change of it (its speakers named by hand here; a chunk stored
    does the same) was announced a second time, with the same names, by the forgetting's
    matching: each transcript is told once."""
    import asyncpg

    from common import speakerstore
    from services.ingest.speakers import finish_left_matchings

    stack, owner, _, source = enrolled
    key_owner = stack.value("SELECT owner FROM transcripts WHERE id = $1", source)
    conn = await asyncpg.connect(stack.database_url)
    connection = await aio_pika.connect(stack.amqp_url)
    jobs: list[int] = []
    try:
        people = await _enrolled_in_the_database(conn, key_owner, {"Anna": "[1, 0, 0]"})
        jobs = await _recordings_in_the_database(conn, key_owner, 1, people["Anna"])
        queue = await events_queue(await connection.channel(), "transcript.speakers_updated")
        # The forgetting committed; its matching not run yet (cut off, or not at this job yet).
        async with conn.transaction():
            assert await speakerstore.delete_speaker(conn, people["Anna"]) == jobs
        assert await _due(conn, jobs) == [(jobs[0], True)]
        named = owner.patch(f"/transcripts/{jobs[0]}/speakers", json={"spk_1": "Carl"})
        assert named.status_code == 200, named.text
        async with _sweeping(stack) as state:
            assert jobs[0] in await finish_left_matchings(state, grace_s=0)
        assert await _due(conn, jobs) == []
        events = await _speakers_updated(queue, jobs[0], owner)
        assert list(events) == jobs, events
        _told_once_each_with_no_name_twice(events)
        assert {label: (n["name"], n["source"]) for label, n in events[jobs[0]][0].items()} == {
            "spk_0": (None, None), "spk_1": ("Carl", "manual")}
    finally:
        await connection.close()
        await conn.execute("DELETE FROM transcripts WHERE id = ANY($1::bigint[])", jobs)
        await conn.close()


async def test_a_batch_matched_before_a_forgetting_was_cut_off_is_not_matched_again(enrolled):
    """The DELETE's matching loses its database connection in its second batch (as in a restart,
    or PostgreSQL failing over): the first batch's recordings are matched, told and no longer
    due, the second's still due. The sweep finishes those, and only those: each transcript is
    told its names once."""
    from services.ingest.speakers import MATCHED_AGAIN_PER_TRANSACTION as BATCH
    from services.ingest.speakers import finish_left_matchings

    stack, owner, _, _ = enrolled
    async with _anna_and_boris_in_recordings(enrolled, 2 * BATCH) as made:
        conn, holding, people, jobs, queue = made.conn, made.holding, made.people, made.jobs, made.queue
        held = holding.transaction()
        await held.start()
        # The second batch's first job: a speaker of it that Anna never named.
        await holding.execute("SELECT 1 FROM transcript_speakers WHERE transcript_id = $1 AND speaker = 'spk_1'"
                              " FOR UPDATE", jobs[BATCH])
        async with httpx.AsyncClient(base_url=stack.api, headers={"X-API-Key": OWNER}, timeout=120) as client:
            forgetting = asyncio.create_task(client.delete(f"/speakers/{people['Anna']}"))
            try:
                await _waits_on_a_lock(holding)
                assert await holding.fetchval(
                    "SELECT bool_and(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = $1"
                    " AND pg_backend_pid() = ANY(pg_blocking_pids(pid))", KEYED_INGEST)
            finally:
                await held.rollback()
            answer = await asyncio.wait_for(forgetting, 60)
        assert answer.status_code in (500, 503), answer.text
        assert owner.delete(f"/speakers/{people['Anna']}").status_code == 404
        names = await _names_in(conn, jobs)
        assert [names[job]["spk_0"] for job in jobs] == [("Boris", "auto")] * BATCH + [(None, None)] * BATCH
        assert await _due(conn, jobs) == [(job, True) for job in jobs[BATCH:]]

        async with _sweeping(stack) as state:
            assert [job for job in await finish_left_matchings(state, grace_s=0) if job in jobs] == jobs[BATCH:]
        assert await _due(conn, jobs) == []
        names = await _names_in(conn, jobs)
        assert all(names[job] == {"spk_0": ("Boris", "auto"), "spk_1": (None, None)} for job in jobs), names
        events = await _speakers_updated(queue, jobs[-1], owner)
        assert set(events) == set(jobs), sorted(set(jobs) - set(events))
        _told_once_each_with_no_name_twice(events)
        for job in jobs:
            assert {label: (n["name"], n["source"]) for label, n in events[job][0].items()} == names[job]


def test_a_request_sent_again_after_its_expected_person_was_renamed_gets_the_job_it_made(enrolled, voices):
    """A client that lost the answer sends the same request again with its Idempotency-Key: the
    job the first one made, though a person it expects was renamed meanwhile (the name it gives
    now names nobody). It was a 400 (the names were checked before the key was looked up), on
    /recognize and the OpenAI-compatible endpoint alike."""
    stack, owner, _, source = enrolled
    voice_a = _speaker_at(stack.status(source, owner), 2.0)["speaker"]
    anna = owner.post("/speakers", json={"name": "Anna", "transcript_id": source, "label": voice_a})
    assert anna.status_code == 201, anna.text
    recording = voices["second_half"].read_bytes()
    recognize_key, openai_key = f"rename-{time.time_ns()}", f"rename-openai-{time.time_ns()}"

    def recognize() -> httpx.Response:
        return owner.post("/recognize", files={"file": ("second_half.wav", recording)},
                          data={"expected_speakers": "Anna"}, headers={"Idempotency-Key": recognize_key})

    def transcribe() -> httpx.Response:
        return owner.post("/v1/audio/transcriptions", files={"file": ("second_half.wav", recording)},
                          data={"model": "whisper-1", "known_speaker_names": "Anna"},
                          headers={"Idempotency-Key": openai_key}, timeout=600)

    first, first_text = recognize(), transcribe()
    assert first.status_code == 202, first.text
    assert first_text.status_code == 200, first_text.text
    assert owner.patch(f"/speakers/{anna.json()['id']}", json={"name": "Anna K."}).status_code == 200
    again, again_text = recognize(), transcribe()
    assert again.status_code == 202 and again.json()["id"] == first.json()["id"], again.text
    assert again.headers.get("idempotent-replayed") == "true"
    assert again_text.status_code == 200 and again_text.json() == first_text.json(), again_text.text
    assert stack.value("SELECT count(*) FROM transcripts WHERE idempotency_key = $1", openai_key) == 1
    # A new request naming the old name is refused, as before.
    renamed_away = owner.post("/recognize", files={"file": ("second_half.wav", recording)},
                              data={"expected_speakers": "Anna"})
    assert renamed_away.status_code == 400 and "'Anna'" in renamed_away.json()["detail"], renamed_away.text


async def test_the_sweep_passes_over_a_batch_that_fails_and_finishes_the_rest(enrolled, monkeypatch):
    """A batch of the sweep that fails on its own (not the database away) stopped the sweep there,
    in every replica and every round: the recordings due after it, other keys' forgettings among
    them, were never matched nor told. Now that batch waits for the next sweep and the rest go."""
    from services.ingest import speakers
    from services.ingest.speakers import MATCHED_AGAIN_PER_TRANSACTION as BATCH
    from services.ingest.speakers import finish_left_matchings

    stack = enrolled[0]
    matching, failed = speakers._match_in_one_transaction, []

    async def the_first_batch_fails(state, owner, transcript_ids, **options):
        if not failed:
            failed.extend(transcript_ids)
            raise RuntimeError("this batch's own failure")
        return await matching(state, owner, transcript_ids, **options)

    monkeypatch.setattr(speakers, "_match_in_one_transaction", the_first_batch_fails)
    async with _anna_and_boris_in_recordings(enrolled, BATCH + 2) as made:
        # Due now (ingest's own sweep waits a minute for them), as a cut-off forgetting leaves them.
        await made.conn.execute("INSERT INTO speaker_matching_due (transcript_id, announce)"
                                " SELECT unnest($1::bigint[]), true", made.jobs)
        async with _sweeping(stack) as state:
            matched = await finish_left_matchings(state, grace_s=0)
        left = {r["transcript_id"] for r in await made.conn.fetch(
            "SELECT transcript_id FROM speaker_matching_due WHERE transcript_id = ANY($1::bigint[])", made.jobs)}
    assert failed and set(matched) & set(made.jobs) == set(made.jobs) - set(failed), (failed, matched)
    assert left == set(made.jobs) & set(failed)  # due still, for the next sweep
