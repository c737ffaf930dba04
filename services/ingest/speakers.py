"""Enrolled speakers: /speakers (enrol, list, show, rename, forget). A speaker is a name and a set of
voiceprints, owned by the API key like jobs. Every change re-names the owner's recordings it can
change from their stored voices (no audio is processed again) and announces each transcript
whose names changed (after a forgetting, each that lost a name) with
`transcript.speakers_updated`; what a request cut off leaves undone, a sweep finishes."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Annotated, NamedTuple, TypeVar

import asyncpg
import numpy as np
from litestar import Request, delete, get, patch, post
from litestar._multipart import parse_content_header
from litestar.datastructures import State, UploadFile
from litestar.exceptions import HTTPException, NotFoundException
from litestar.params import Parameter
from litestar.types import Scope
from pydantic import BaseModel, Field, ValidationError

from common import jobstore, speakerstore
from common.audio import SAMPLE_RATE, AudioTooLong, UndecodableAudio, decode_audio
from common.db import DATABASE_UNAVAILABLE
from common.logs import job_logged
from common.messages import (
    SPEAKER_NAME_MAX_CHARS,
    SpeakerEmbedding,
    person_name,
)
from common.settings import Settings
from common.speakers import most_alike
from services.ingest.admission import SMALL_BODY_BYTES, checked_size, release_upload
from services.ingest.auth import request_owner
from services.ingest.errors import MAX_ID, error_responses, invalid
from services.ingest.segments import LABEL

log = logging.getLogger(__name__)
# The 409 of a voice that sounds like another enrolled person: the one that `force` overrides.
SOUNDS_LIKE_ANOTHER = "sounds_like_another"

SAMPLE_MIN_S = 5.0
SAMPLE_MAX_S = 60.0
SAMPLE_MAX_MB = 50  # a minute of uncompressed 48 kHz stereo float is 23 MB
DEADLOCK_TRIES = 3
# A rename or forgetting matches the recordings it changes again this many jobs a transaction,
# after the person's change committed: a chunk store, an upload that expects the owner's people or
# a change of another of them waits for one such transaction at most, not for all of them.
MATCHED_AGAIN_PER_TRANSACTION = 100
# The recordings a change leaves to match again are recorded in its commit
# (speakerstore.matching_due), each deleted by the batch that matches it: a request cut off before
# its last batch leaves the rest due, and run_matching_sweep, in every replica, finishes what has
# been due this long (a live request's batches usually get there first).
PENDING_MATCHING_GRACE_S = 60.0
MATCHING_SWEEP_INTERVAL_S = 30.0
T = TypeVar("T")
# Embedding a sample runs the speaker models in this process: one at a time.
_embedding_slot = asyncio.Semaphore(1)

SpeakerId = Annotated[int, Parameter(ge=1, le=MAX_ID, description="An enrolled speaker's id")]


class Voiceprint(BaseModel):
    id: int
    embedding_model: str
    speech_s: float
    # "sample" (an uploaded recording, not kept) or "transcript" (a finished job's speaker)
    source: str
    transcript_id: int | None = None
    label: str | None = None
    created_at: datetime


class Speaker(BaseModel):
    id: int
    name: str
    voiceprint_count: int
    created_at: datetime


class SpeakerProfile(Speaker):
    voiceprints: list[Voiceprint]


class Enrolled(SpeakerProfile):
    # Transcripts whose speaker names changed because of this enrolment.
    relabelled: list[int] = Field(default_factory=list)


class SpeakerList(BaseModel):
    items: list[Speaker]


class FromTranscript(BaseModel):
    name: str
    transcript_id: int = Field(ge=1, le=MAX_ID)
    label: str = Field(pattern=LABEL.pattern)
    # Enrol the voice even when it sounds like another enrolled person (see `enrol`).
    force: bool = False


def _form_flag(value: object, field: str) -> bool:
    """A multipart form's true/false field; absent or blank is false."""
    text = str(value or "").strip().lower()
    if text in ("", "false", "0", "no", "off"):
        return False
    if text in ("true", "1", "yes", "on"):
        return True
    raise HTTPException(status_code=400, detail=f"{field}: true or false")


class Rename(BaseModel):
    name: str


def clean_name(name: object, which: str = "") -> str:
    """A person's name with blanks collapsed and unprintable characters blanked; 400 when empty or long."""
    cleaned = person_name(str(name or ""))
    if not 0 < len(cleaned) <= SPEAKER_NAME_MAX_CHARS:
        raise HTTPException(status_code=400, detail=f"a speaker's name is 1-{SPEAKER_NAME_MAX_CHARS} printable"
                                                    f" characters{which}")
    return cleaned


def enrolled_name(name: object) -> str:
    """An enrolled person's name: as `clean_name`, without commas, which separate the names of a
    job's expected_speakers (the form, the CLI and bucket-drop metadata send them as one text)."""
    cleaned = clean_name(name)
    if "," in cleaned:
        raise HTTPException(status_code=400, detail=f"a speaker's name cannot hold a comma ({cleaned!r}): lists of"
                                                    " expected speakers are separated by commas")
    return cleaned


async def require_enrolled(db: jobstore.Db, owner: str | None, names: list[str],
                           field: str = "expected_speakers") -> None:
    """400 unless every one of a job's `expected_speakers` is an enrolled speaker of the owner: a misspelt
    name would otherwise quietly name nobody. `field` is what the request called them."""
    if unknown := await speakerstore.unknown_names(db, owner, names):
        raise HTTPException(status_code=400, detail=unenrolled(unknown, field))


def unenrolled(names: list[str], field: str = "expected_speakers") -> str:
    return f"{field}: no enrolled speaker is called {', '.join(map(repr, names))} (GET /speakers lists them)"


# ---- announcing and re-naming -----------------------------------------------------------------


class Matched(NamedTuple):
    done: list[int]  # matched and no longer due (one a change wrote to meanwhile stays due: not here)
    changed: list[int]  # whose names, or recognised speakers' confidences, changed
    announced: list[int]


async def _match_batch(conn: asyncpg.Connection, settings: Settings, owner: str | None, transcript_ids: list[int],
                       skip_locked: bool = False) -> Matched:
    """One batch of a matching after a change of the owner's people, in the caller's transaction:
    these recordings' jobs locked in id order (`skip_locked`: those another transaction holds
    passed over), and those of them still due a matching (speakerstore.matching_due) matched
    against the owner's people again; their rows deleted, and each transcript told its names
    where they (or a recognised speaker's confidence) changed or its row asks for it (a
    forgetting's). Committed, the batch is done for good; cut off, it is still due. A recording
    no longer due (matched by another request's batch or the sweep meanwhile) is not matched
    again."""
    due = await speakerstore.matchings_due(conn, await speakerstore.lock_jobs(conn, transcript_ids, skip_locked))
    changed = []
    # Read once for them all: the caller's transaction holds the owner's people as they are.
    profiles: speakerstore.OwnerProfiles = {}
    for transcript_id in due:
        if await speakerstore.name_recording_speakers(conn, transcript_id, owner, settings.speaker_match_threshold,
                                                      settings.speaker_min_speech_s, profiles,
                                                      counting_confidence=True):
            changed.append(transcript_id)
    # The rows are locked only now, after the people were read: a change of them (a rename holds
    # the person it renames) writes its rows after that, and waiting for its rows here while it
    # waits for the people this batch read would deadlock.
    done = await speakerstore.matchings_done(conn, due) if due else {}
    announced = sorted({transcript_id for transcript_id, announce in done.items() if announce}.union(changed))
    for transcript_id in announced:
        await speakerstore.announce_speaker_names(conn, transcript_id)
    return Matched(sorted(done), changed, announced)


def _log_renamed(transcript_ids: list[int]) -> None:
    for transcript_id in transcript_ids:
        with job_logged(transcript_id):
            log.info("speaker names changed after a change of the enrolled speakers")


async def _match_in_one_transaction(state: State, owner: str | None, transcript_ids: list[int],
                                    skip_locked: bool = False) -> Matched:
    """_match_batch in a transaction of its own, run again when it gives way in a deadlock; the
    outbox woken for what it announced."""

    async def batch(conn: asyncpg.Connection) -> Matched:
        return await _match_batch(conn, state.settings, owner, transcript_ids, skip_locked)

    matched = await _in_transaction_retried(state.pool, batch)
    if matched.announced:
        state.outbox_wake.set()
    _log_renamed(matched.changed)
    return matched


async def match_recordings_again(state: State, owner: str | None, transcript_ids: list[int]) -> list[int]:
    """After an enrolment, a rename or a forgetting committed, and recorded in that commit the
    recordings it leaves due a matching (speakerstore.matching_due): these recordings of the
    owner (the callers pass only those their change can rename: a key with thousands of
    transcripts is not matched again whole on every enrolment) matched again,
    MATCHED_AGAIN_PER_TRANSACTION jobs a transaction (_match_batch), each batch's jobs locked in
    id order and then the owner's people (as every matching locks them), and run again when it
    gives way in a deadlock. The transcripts whose names changed (in these batches: one the sweep
    got to first is not counted).

    Nothing is held between batches. A recording not reached yet shows what the committed change
    left it until its batch: a rename's old name, a forgotten person's voice unnamed; its batch
    tells it its names. A matching of it meanwhile (a chunk stored, an enrolment, a name given by
    hand) reads the owner's people as they are now, as its batch then does, and what it changed
    the batch finds done. Cut off before the last batch (a restart, a lost database), the rest
    stays due and run_matching_sweep finishes it after PENDING_MATCHING_GRACE_S."""
    changed = []
    for start in range(0, len(transcript_ids), MATCHED_AGAIN_PER_TRANSACTION):
        batch = transcript_ids[start:start + MATCHED_AGAIN_PER_TRANSACTION]
        changed += (await _match_in_one_transaction(state, owner, batch)).changed
    return changed


async def finish_left_matchings(state: State, grace_s: float = PENDING_MATCHING_GRACE_S) -> list[int]:
    """The recordings due a matching for longer than `grace_s` (the request of the change that
    left them was cut off, or is still on its way through thousands) matched again, in id order,
    MATCHED_AGAIN_PER_TRANSACTION jobs a transaction, each batch one owner's, as the request's
    batches are (_match_batch): a forgetting's recordings are told their names there. A job
    another transaction holds (a request's batch, another replica's sweep, a chunk being stored)
    is passed over, left for the next sweep, and a recording matched meanwhile is not matched
    again. The recordings matched (each once, whoever else sweeps at the same time)."""
    dropped = await speakerstore.forget_matchings_of_deleted_jobs(state.pool)
    if dropped:
        log.info("%d recordings due a matching of voices were deleted meanwhile", dropped)
    matched, after = [], 0
    while rows := await speakerstore.matchings_left(state.pool, grace_s, after, MATCHED_AGAIN_PER_TRANSACTION):
        after = rows[-1]["transcript_id"]
        of_owner: dict[str | None, list[int]] = {}
        for row in rows:
            of_owner.setdefault(row["owner"], []).append(row["transcript_id"])
        for owner, transcript_ids in of_owner.items():
            try:
                matched += (await _match_in_one_transaction(state, owner, transcript_ids, skip_locked=True)).done
            except Exception as exc:
                if isinstance(exc, DATABASE_UNAVAILABLE):
                    raise  # no batch would go: the next sweep tries again
                # This batch's own failure: the rows after it (other owners' forgettings) still go.
                log.exception("could not match recordings %s again; passed over until the next sweep",
                              ", ".join(map(str, transcript_ids)))
    return matched


async def run_matching_sweep(state: State) -> None:
    """Every MATCHING_SWEEP_INTERVAL_S, finish_left_matchings: what a change of someone's people
    left due when its request was cut off (a restart, a crash, a lost database) is matched, and
    a forgetting's transcripts are told the name went, though the DELETE cannot be sent again.
    Every ingest replica sweeps: each batch takes its recordings by locking their jobs, so no
    recording is matched twice at once."""
    while True:
        try:
            if matched := await finish_left_matchings(state):
                log.warning("matched %d recordings again that a change of enrolled speakers left due for over %g s"
                            " (its request was cut off, or is still on its way through many)", len(matched),
                            PENDING_MATCHING_GRACE_S)
        except Exception:
            log.exception("finishing the matchings of voices left unfinished failed; will try again")
        await asyncio.sleep(MATCHING_SWEEP_INTERVAL_S)


async def _in_transaction_retried(pool: asyncpg.Pool, work: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
    """`work` in a transaction, run again when PostgreSQL ends it as a deadlock's victim. A forget
    updates the recording speakers a speaker named, while a matching (the persister's, a name
    given by hand, an enrolment's, or the one after a rename or forget) holds some of them and
    waits for its shared lock on the speaker: one of the two must give way, and the other's work
    is whole again on a second run."""
    for attempt in range(1, DEADLOCK_TRIES + 1):
        try:
            async with pool.acquire() as conn, conn.transaction():
                return await work(conn)
        except asyncpg.exceptions.DeadlockDetectedError:
            if attempt == DEADLOCK_TRIES:
                raise
            log.warning("gave way in a deadlock with a matching of voices (try %d); trying again", attempt)
    raise AssertionError("unreachable")


async def _profile(db: jobstore.Db, owner: str | None, speaker_id: int) -> SpeakerProfile:
    row = await speakerstore.get_speaker(db, owner, speaker_id)
    if row is None:
        raise NotFoundException(detail=f"no speaker with id {speaker_id}")
    prints = [Voiceprint(id=v["id"], embedding_model=v["embedding_model"], speech_s=round(v["speech_s"], 3),
                         source=v["source"], transcript_id=v["source_transcript_id"], label=v["source_label"],
                         created_at=v["created_at"])
              for v in await speakerstore.speaker_voiceprints(db, speaker_id)]
    return SpeakerProfile(id=row["id"], name=row["name"], voiceprint_count=row["voiceprints"],
                          created_at=row["created_at"], voiceprints=prints)


# ---- voiceprints from the two sources ---------------------------------------------------------


def _no_speaker_models() -> HTTPException:
    return HTTPException(status_code=501, detail="enrolment from audio needs the speaker models here: install the"
                                                 " diarizer extra (pip install '.[diarizer]'), or enrol from a"
                                                 " transcript's speaker")


async def _voice_of_sample(upload: UploadFile, settings: Settings, scope: Scope) -> SpeakerEmbedding:
    """The voice of an enrolment sample. Once it is decoded (its spooled file closed), the request
    gives up its place among MAX_CONCURRENT_UPLOADS: the wait for the speaker models, embedding
    the sample and the re-matching of the key's past recordings after it hold none, or a few
    enrolments would have every recording upload refused (503) for all that time."""
    stream = upload.file
    checked_size(stream, min(settings.max_upload_bytes, SAMPLE_MAX_MB * 1024 * 1024), empty="the sample is empty",
                 too_big=f"a sample is at most {min(settings.max_upload_mb, SAMPLE_MAX_MB)} MB")
    try:
        from services.diarizer.voiceprint import NotOneVoice, voiceprint_of_sample
    except ImportError as exc:
        raise _no_speaker_models() from exc
    try:
        waveform = await asyncio.to_thread(decode_audio, stream, SAMPLE_MAX_S + 1)
    except AudioTooLong as exc:
        raise HTTPException(status_code=400, detail=f"a sample is {SAMPLE_MIN_S:g}-{SAMPLE_MAX_S:g} s long") from exc
    except UndecodableAudio as exc:
        raise HTTPException(status_code=415, detail=f"the sample is not audio this service can decode: {exc}") from exc
    finally:
        stream.close()  # a sample is never kept: its spooled file goes now, not with the request
        release_upload(scope)
    seconds = len(waveform) / SAMPLE_RATE
    if not SAMPLE_MIN_S <= seconds <= SAMPLE_MAX_S:
        raise HTTPException(status_code=400, detail=f"a sample is {SAMPLE_MIN_S:g}-{SAMPLE_MAX_S:g} s long;"
                                                    f" this one is {seconds:.1f} s")
    async with _embedding_slot:
        try:
            return await asyncio.to_thread(voiceprint_of_sample, waveform, settings.speaker_match_threshold)
        except NotOneVoice as exc:
            raise HTTPException(status_code=422, detail=str(exc)) from exc
        except ImportError as exc:  # the models' packages are imported when they first run
            raise _no_speaker_models() from exc


async def _voice_of_transcript_speaker(conn: asyncpg.Connection, owner: str | None, reference: FromTranscript,
                                       min_speech_s: float) -> SpeakerEmbedding:
    # Another key's job is unknown at once, without waiting on its lock (the wait would tell that
    # it exists, and hold up its owner's persister). Its owner never changes.
    job = await jobstore.job(conn, reference.transcript_id)
    if job is None or job["owner"] != owner:
        raise NotFoundException(detail=f"no job with id {reference.transcript_id}")
    # The job's row locked: two enrolments of one recording speaker at once wait for each other,
    # so the second finds the first's voiceprint below.
    job = await jobstore.lock_processing_job(conn, reference.transcript_id)
    if job is None:
        raise NotFoundException(detail=f"no job with id {reference.transcript_id}")
    if job["status"] != "done":
        raise HTTPException(status_code=409, detail=f"job {reference.transcript_id} is not done")
    voice = await jobstore.speaker_voice(conn, reference.transcript_id, reference.label)
    if voice is None:
        raise HTTPException(status_code=400, detail=f"job {reference.transcript_id} has no speaker"
                                                    f" {reference.label[:20]!r} with a voice embedding")
    if voice.speech_s < min_speech_s:
        # What recognition would not trust to name anyone (SPEAKER_MIN_SPEECH_S) is no voiceprint either.
        raise HTTPException(status_code=422, detail=f"{reference.label} of job {reference.transcript_id} talks for"
                                                    f" {voice.speech_s:.1f} s, too little to recognise them by (at"
                                                    f" least {min_speech_s:g} s: SPEAKER_MIN_SPEECH_S)")
    return voice


# ---- routes -------------------------------------------------------------------------------------


@post("/speakers", status_code=201, summary="Enrol a speaker (or add a voiceprint to one)",
      request_max_body_size=(SAMPLE_MAX_MB + 1) * 1024 * 1024,
      responses=error_responses(400, 401, 403, 404, 408, 409, 411, 413, 415, 422, 501, 503,
                                e501="The speaker models are not installed here (the diarizer extra)",
                                e404="No such job (for this key) to take the voice from",
                                e422="The sample holds no speech or several voices, or the job's speaker talks"
                                     " too little to be recognised by",
                                e409="The job to take the voice from is not done, or that job's speaker (or"
                                     " the sample) is already a voiceprint of another speaker, or the voice"
                                     " sounds like another enrolled speaker (named in the answer; `force`"
                                     " enrols it all the same)"))
async def enrol(request: Request, state: State) -> Enrolled:
    """Either multipart/form-data with `name` and `file` (5-60 s of one person talking; refused
    with 422 and the reason when it holds no speech or several voices), or JSON
    `{"name": "Anna", "transcript_id": 12, "label": "spk_1"}` (a finished job's speaker). A name
    the key already enrolled gets one more voiceprint. The key's recordings are then matched
    again: `relabelled` lists those whose names changed.

    A voice that sounds like another of the key's enrolled speakers (at least
    SPEAKER_MATCH_THRESHOLD alike to one of their voiceprints, as recognition scores it) is
    refused with 409 naming them: enrolled, it could take that person's name from their
    recordings (a sample picked by mistake). `force`: `true` (a form field, or in the JSON)
    enrols it all the same, for a voice that is the named person's after all."""
    owner = request_owner(request)
    media_type = parse_content_header(request.headers.get("content-type", ""))[0]  # lower case
    reference = None
    if media_type == "multipart/form-data":
        form = await request.form()
        name, upload = enrolled_name(form.get("name")), form.get("file")
        force = _form_flag(form.get("force"), "force")
        if not isinstance(upload, UploadFile):
            raise HTTPException(status_code=400, detail="a multipart enrolment needs a `name` and a `file`"
                                                        " (the sample)")
        voice = await _voice_of_sample(upload, state.settings, request.scope)
    elif media_type == "application/json":
        try:
            reference = FromTranscript.model_validate_json(await request.body())
        except ValidationError as exc:
            raise invalid(exc, whole="body") from exc
        name, force = enrolled_name(reference.name), reference.force
    else:
        raise HTTPException(status_code=400, detail="send multipart/form-data (name, file) or JSON (name,"
                                                    " transcript_id, label)")
    async with state.pool.acquire() as conn, conn.transaction():
        # One enrolment of the owner's people at a time, taken before any row as a rename, a
        # forgetting and a job's insert take it: two enrolments of one voice under two names at
        # once (the same sample, or two recordings' speakers of one voice) each read the owner's
        # voiceprints without the other's, and both committed: one voice, two people. The second
        # waits here and finds the first's voiceprint below (409).
        await speakerstore.one_change_of_the_owners_people_at_a_time(conn, owner)
        if reference is not None:
            voice = await _voice_of_transcript_speaker(conn, owner, reference, state.settings.speaker_min_speech_s)
        # The person of that name, made if new; their row locked until the commit.
        speaker_id = await speakerstore.create_speaker(conn, owner, name)
        # The same voice twice would count double in its profile, or (under two names) leave the
        # matching to pick between two people with one voice. Sent again for the same person (a
        # retry after a timeout, or after the matching below was cut off), it adds nothing and
        # the matching runs again.
        if reference is not None:
            enrolled_as = await speakerstore.speaker_enrolled_from(conn, owner, reference.transcript_id,
                                                                   reference.label)
            already = f"{reference.label} of job {reference.transcript_id} is"
        else:
            enrolled_as, already = None, "this sample is"
        if enrolled_as is None:  # the same voice: the same sample, or a rerun of an enrolled recording
            enrolled_as = await speakerstore.voice_enrolled_as(conn, owner, voice.embedding, voice.model)
            if reference is not None:
                already = f"the voice of {already}"
        if enrolled_as is not None and enrolled_as["id"] != speaker_id:
            raise HTTPException(status_code=409, detail=f"{already} already a voiceprint of {enrolled_as['name']!r}")
        if enrolled_as is None and not force:
            # A voice that recognition would give another person's name: their lines in every
            # recording could become this person's.
            threshold = state.settings.speaker_match_threshold
            alike = most_alike(np.asarray(voice.embedding), await speakerstore.other_people_of_voice(
                conn, owner, speaker_id, voice.model), threshold)
            if alike is not None:
                other, similarity = alike
                voice_of = (f"the voice of {reference.label} of job {reference.transcript_id}" if reference
                            else "the sample's voice")
                raise HTTPException(status_code=409, detail=(
                    f"{voice_of} sounds like {other.name!r} (similarity {similarity:g}, at least"
                    f" SPEAKER_MATCH_THRESHOLD {threshold:g}): enrolled as {name!r} it could take their name in"
                    f" their recordings. If it is {name!r}'s voice all the same, send it again with force=true"),
                    extra={"code": SOUNDS_LIKE_ANOTHER})
        with job_logged(reference.transcript_id if reference else None):
            if enrolled_as is not None:
                log.info("speaker %d already has this voiceprint: nothing added", speaker_id)
            else:
                await speakerstore.add_voiceprint(
                    conn, speaker_id, voice.embedding, voice.model, voice.speech_s,
                    source="transcript" if reference else "sample",
                    transcript_id=reference.transcript_id if reference else None,
                    label=reference.label if reference else None)
                log.info("enrolled a voiceprint for speaker %d (%.1f s of speech)", speaker_id, voice.speech_s)
        # The recordings the voice can name someone in, due a matching from this commit on: cut
        # off before the end of the matching below, the sweep finishes it (run_matching_sweep).
        near = await speakerstore.transcripts_near_voice(conn, owner, voice.embedding, voice.model,
                                                         state.settings.speaker_match_threshold)
        await speakerstore.matching_due(conn, near)
        # What the enrolment made, read before it commits: the person may be renamed or forgotten
        # (DELETE /speakers/{id}) while the recordings below are matched again, and the voiceprint
        # was saved all the same.
        profile = await _profile(conn, owner, speaker_id)
    relabelled = await match_recordings_again(state, owner, near)
    return Enrolled(**profile.model_dump(), relabelled=relabelled)


@get("/speakers", summary="The enrolled speakers", responses=error_responses(401, 403, 503))
async def list_speakers(request: Request, state: State) -> SpeakerList:
    rows = await speakerstore.list_speakers(state.pool, request_owner(request))
    return SpeakerList(items=[Speaker(id=r["id"], name=r["name"], voiceprint_count=r["voiceprints"],
                                      created_at=r["created_at"]) for r in rows])


@get("/speakers/{speaker_id:int}", summary="An enrolled speaker and their voiceprints",
     responses=error_responses(400, 401, 403, 404, 503, e404="No such speaker (for this key)"))
async def show_speaker(speaker_id: SpeakerId, request: Request, state: State) -> SpeakerProfile:
    return await _profile(state.pool, request_owner(request), speaker_id)


@patch("/speakers/{speaker_id:int}", summary="Rename an enrolled speaker", request_max_body_size=SMALL_BODY_BYTES,
       responses=error_responses(400, 401, 403, 404, 409, 413, 503, e404="No such speaker (for this key)",
                                 e413="The JSON body is over 1 MiB",
                                 e409="Another speaker of this key has that name"))
async def rename(speaker_id: SpeakerId, data: Rename, request: Request, state: State) -> SpeakerProfile:
    owner = request_owner(request)
    name = enrolled_name(data.name)

    async def renamed(conn: asyncpg.Connection) -> list[int]:
        if await speakerstore.get_speaker(conn, owner, speaker_id) is None:
            raise NotFoundException(detail=f"no speaker with id {speaker_id}")
        try:
            return await speakerstore.rename_speaker(conn, owner, speaker_id, name)
        except speakerstore.NameTaken as exc:
            raise HTTPException(status_code=409, detail=f"another speaker is already called {name!r}") from exc

    renamed_in = await _in_transaction_retried(state.pool, renamed)
    # Under its new name the person may be one a recording named by hand already (matched again,
    # the recording keeps that name on one speaker only), or one a job expects; and a recording
    # where the old name was given by hand to one speaker may now give the person to another. The
    # matching writes the new name where the person was recognised, in the same step: no one sees,
    # or is told of, the name on two speakers. Answered when every recording is matched.
    await match_recordings_again(state, owner, renamed_in)
    return await _profile(state.pool, owner, speaker_id)


@delete("/speakers/{speaker_id:int}", status_code=204, summary="Forget a speaker",
        responses=error_responses(400, 401, 403, 404, 503, e404="No such speaker (for this key)"))
async def forget(speaker_id: SpeakerId, request: Request, state: State) -> None:
    """Deletes every voiceprint of the speaker and every name recognition gave from them (names
    given by hand stay); each transcript that loses a name is matched again (another person may
    take the voice) and announced once, with its names as they end."""
    owner = request_owner(request)

    async def forgotten(conn: asyncpg.Connection) -> list[int]:
        if await speakerstore.get_speaker(conn, owner, speaker_id) is None:
            raise NotFoundException(detail=f"no speaker with id {speaker_id}")
        return await speakerstore.delete_speaker(conn, speaker_id)

    # The names go with the person, in one commit, which records each transcript that lost one as
    # due a matching that announces it (speakerstore.delete_speaker): one row a transcript, not an
    # event, so the commit stays short for a person recognised in thousands of recordings. Another
    # profile may now be the best match for the voices they named; elsewhere the assignment stands
    # (a profile no speaker was given takes nothing from the best pairing when it goes). Each
    # batch below tells its transcripts their names. A forgetting is asked for privacy, and the
    # matching can be cut off (a restart, a lost database, a deadlock lost on every try) while a
    # DELETE sent again finds nobody to forget: what it leaves stays due, and the sweep
    # (run_matching_sweep) matches and announces it. Answered when every recording is matched.
    named = await _in_transaction_retried(state.pool, forgotten)
    log.info("forgot speaker %d: %d transcripts lose the name", speaker_id, len(named))
    _log_renamed(named)
    await match_recordings_again(state, owner, named)


SPEAKER_ROUTES = [enrol, list_speakers, show_speaker, rename, forget]
