"""Enrolled speakers in PostgreSQL: every statement over `speakers` and `voiceprints`, and the
automatic naming of recording speakers in `transcript_speakers` (ingest and the persister alike).
Plain async functions over an asyncpg connection or pool; the callers own the transactions."""

from __future__ import annotations

import asyncpg
import numpy as np

from common.jobstore import Db, job_speaker_labels, speaker_names
from common.messages import SegmentCreated, SegmentUpdated, SpeakerName, TranscriptSpeakersUpdated
from common.outbox import add_to_outbox
from common.speakers import Match, Profile, RecordingSpeaker, match_speakers

# A job's `expected_speakers` option (JobOptions): the enrolled people who may be in it.
_EXPECTED = "options->'expected_speakers'"


def _owned_by(owner: str | None, param: str = "$1", column: str = "owner") -> str:
    """SQL: `column` is `owner`, which the statement is given as `param`. `IS NOT DISTINCT FROM`
    would say so for a key and for none alike, but no index serves it (transcripts_owner_idx, on
    `owner` itself). Not for `speakers`, whose index is on coalesce(owner, ''): _speaker_owned_by."""
    if owner is not None:
        return f"{column} = {param}"
    # The parameter stays in the statement: the ones after it keep their numbers.
    return f"({column} IS NULL AND {param}::text IS NULL)"


def _speaker_owned_by(param: str = "$1", column: str = "owner") -> str:
    """SQL: `column` of `speakers` is the owner the statement is given as `param` (a key or none),
    as speakers_owner_name_idx, on (coalesce(owner, ''), lower(name)), reads it: `owner = $1`
    could not use it, and every look-up of an owner's people read the whole table."""
    return f"coalesce({column}, '') = coalesce({param}::text, '')"


def _expects(name_param: str) -> str:
    """SQL: the job's `expected_speakers` hold the name in `name_param` ("$3"), in any case."""
    return (f"(jsonb_typeof({_EXPECTED}) = 'array' AND EXISTS (SELECT 1 FROM jsonb_array_elements_text({_EXPECTED})"
            f" n WHERE lower(n) = lower({name_param})))")


_SPEAKER_COLUMNS = ("s.id, s.name, s.created_at, (SELECT count(*) FROM voiceprints v WHERE v.speaker_id = s.id)"
                    " AS voiceprints")


class NameTaken(Exception):
    pass


async def create_speaker(conn: asyncpg.Connection, owner: str | None, name: str) -> int:
    """The owner's speaker of that name (names are unique per owner, case-insensitively), created if new."""
    # One statement, so two enrolments of a new name at once make one speaker, not a unique violation.
    return await conn.fetchval(
        "INSERT INTO speakers (owner, name) VALUES ($1, $2) ON CONFLICT (coalesce(owner, ''), lower(name))"
        " DO UPDATE SET name = speakers.name RETURNING id", owner, name)


async def add_voiceprint(conn: asyncpg.Connection, speaker_id: int, embedding: list[float], model: str,
                         speech_s: float, source: str, transcript_id: int | None = None,
                         label: str | None = None) -> int:
    return await conn.fetchval(
        "INSERT INTO voiceprints (speaker_id, embedding, embedding_model, speech_s, source,"
        " source_transcript_id, source_label) VALUES ($1, $2::real[]::vector, $3, $4, $5, $6, $7) RETURNING id",
        speaker_id, embedding, model, speech_s, source, transcript_id, label)


async def speaker_enrolled_from(db: Db, owner: str | None, transcript_id: int, label: str) -> asyncpg.Record | None:
    """The owner's speaker (`id`, `name`) that already has a voiceprint from this transcript's speaker."""
    return await db.fetchrow(
        "SELECT s.id, s.name FROM speakers s JOIN voiceprints v ON v.speaker_id = s.id"
        f" WHERE {_speaker_owned_by(column='s.owner')}"
        " AND v.source_transcript_id = $2 AND v.source_label = $3 LIMIT 1", owner, transcript_id, label)


async def voice_enrolled_as(db: Db, owner: str | None, embedding: list[float], model: str) -> asyncpg.Record | None:
    """The owner's speaker that already has this very voiceprint (the same sample), with `id` and `name`."""
    return await db.fetchrow(
        "SELECT s.id, s.name FROM speakers s JOIN voiceprints v ON v.speaker_id = s.id"
        f" WHERE {_speaker_owned_by(column='s.owner')}"
        " AND v.embedding_model = $2 AND v.embedding <=> $3::real[]::vector < 1e-5 ORDER BY s.id LIMIT 1",
        owner, model, embedding)


async def list_speakers(db: Db, owner: str | None) -> list[asyncpg.Record]:
    return await db.fetch(f"SELECT {_SPEAKER_COLUMNS} FROM speakers s WHERE {_speaker_owned_by(column='s.owner')}"
                          " ORDER BY lower(s.name), s.id", owner)


async def get_speaker(db: Db, owner: str | None, speaker_id: int) -> asyncpg.Record | None:
    return await db.fetchrow(f"SELECT {_SPEAKER_COLUMNS} FROM speakers s WHERE {_speaker_owned_by(column='s.owner')}"
                             " AND s.id = $2", owner, speaker_id)


async def speaker_voiceprints(db: Db, speaker_id: int) -> list[asyncpg.Record]:
    return await db.fetch(
        "SELECT id, embedding_model, speech_s, source, source_transcript_id, source_label, created_at"
        " FROM voiceprints WHERE speaker_id = $1 ORDER BY id", speaker_id)


def _lock_jobs(where: str) -> str:
    """SQL: lock the jobs (transcripts `t`) `where` holds, in id order, and give their ids."""
    return f"SELECT id FROM transcripts t WHERE {where} ORDER BY id FOR UPDATE"


_NAMED_BY = "SELECT transcript_id FROM transcript_speakers WHERE matched_speaker_id = $1 AND name_source = 'auto'"


def _naming(name_param: str) -> str:
    """SQL: the transcript `t` has a speaker called the name in `name_param` by hand, or expects
    a person of that name (`expected_speakers`)."""
    return (f"(EXISTS (SELECT 1 FROM transcript_speakers ts WHERE ts.transcript_id = t.id AND ts.name_source = 'manual'"
            f" AND lower(ts.name) = lower({name_param})) OR {_expects(name_param)})")


async def lock_jobs(conn: asyncpg.Connection, transcript_ids: list[int], skip_locked: bool = False) -> list[int]:
    """Lock these jobs, in id order, until the transaction ends; those not deleted. `skip_locked`:
    those another transaction holds are left out, not waited for."""
    return [r["id"] for r in await conn.fetch(_lock_jobs("id = ANY($1::bigint[])") + " SKIP LOCKED" * skip_locked,
                                              transcript_ids)]


# ---- recordings due a matching after a change of their owner's people ------------------------


async def matching_due(conn: asyncpg.Connection, transcript_ids: list[int], announce: bool = False) -> None:
    """Record, in the transaction that changes the owner's people, that these recordings are to be
    matched again once it commits (speaker_matching_due): the commit that makes the change makes
    the work it leaves, and a matching cut off before its end leaves it to the sweep
    (services.ingest.speakers.finish_left_matchings). `announce`: each is told its names by that
    matching even where it changes none. In id order, as matchings_done locks them: a matching
    that holds some of them waits for this transaction, never the other way round as well."""
    if not transcript_ids:
        return
    await conn.execute(
        "INSERT INTO speaker_matching_due AS d (transcript_id, announce, pending_since)"
        " SELECT id, $2, clock_timestamp() FROM unnest($1::bigint[]) id ORDER BY id"
        " ON CONFLICT (transcript_id) DO UPDATE SET announce = d.announce OR excluded.announce,"
        " changes = d.changes + 1", sorted(set(transcript_ids)), announce)


async def matchings_due(db: Db, transcript_ids: list[int]) -> dict[int, int]:
    """Those of these recordings still due a matching, in id order, each with its row's `changes`
    as read now (no lock taken: a change may add to it meanwhile, see matchings_done)."""
    rows = await db.fetch("SELECT transcript_id, changes FROM speaker_matching_due"
                          " WHERE transcript_id = ANY($1::bigint[]) ORDER BY transcript_id", transcript_ids)
    return {r["transcript_id"]: r["changes"] for r in rows}


async def matchings_done(conn: asyncpg.Connection, due: dict[int, int]) -> dict[int, bool]:
    """These recordings, as matchings_due read them, matched again in the caller's transaction:
    their rows deleted, but a row a change wrote to since it was read (its `changes` grew: that
    change may have committed after the matching read the people) stays due. Those deleted, each
    with whether it asks to be announced whatever the matching changed."""
    # Locked in id order first, as matching_due writes them; the delete then waits for nobody.
    await conn.fetch("SELECT 1 FROM speaker_matching_due WHERE transcript_id = ANY($1::bigint[])"
                     " ORDER BY transcript_id FOR UPDATE", list(due))
    rows = await conn.fetch(
        "DELETE FROM speaker_matching_due d USING unnest($1::bigint[], $2::integer[]) AS seen(id, changes)"
        " WHERE d.transcript_id = seen.id AND d.changes = seen.changes RETURNING d.transcript_id, d.announce",
        list(due), list(due.values()))
    return {r["transcript_id"]: r["announce"] for r in rows}


async def matchings_left(db: Db, older_than_s: float, after: int, limit: int) -> list[asyncpg.Record]:
    """Up to `limit` recordings (`transcript_id`, `owner`) due a matching for at least
    `older_than_s` seconds, after transcript `after`, in id order."""
    return await db.fetch(
        "SELECT d.transcript_id, t.owner FROM speaker_matching_due d JOIN transcripts t ON t.id = d.transcript_id"
        " WHERE d.transcript_id > $1 AND d.pending_since <= clock_timestamp() - make_interval(secs => $2)"
        " ORDER BY d.transcript_id LIMIT $3", after, older_than_s, limit)


async def forget_matchings_of_deleted_jobs(db: Db) -> int:
    """Drop the rows of recordings whose job was deleted (nothing left to match); how many."""
    return int((await db.execute(
        "DELETE FROM speaker_matching_due d WHERE NOT EXISTS (SELECT 1 FROM transcripts t"
        " WHERE t.id = d.transcript_id)")).split()[-1])


async def _jobs_of_rename(conn: asyncpg.Connection, owner: str | None, speaker_id: int, old: str,
                          new: str) -> list[int]:
    """The jobs a rename from `old` to `new` can change the names of: those with a speaker the
    person named automatically, and the owner's that call a speaker either name by hand (where
    the person may have to give way, or may come in) or expect either."""
    # One UNION, not an OR of the two: either side can then use its own index.
    rows = await conn.fetch(f"SELECT id FROM transcripts t WHERE id IN ({_NAMED_BY}"
                            f" UNION SELECT t.id FROM transcripts t WHERE {_owned_by(owner, '$2', 't.owner')}"
                            f" AND ({_naming('$3')} OR {_naming('$4')})) ORDER BY id", speaker_id, owner, old, new)
    return [r["id"] for r in rows]


async def one_change_of_the_owners_people_at_a_time(conn: asyncpg.Connection, owner: str | None) -> None:
    """For the rest of the transaction: one enrolment, rename or forgetting of the owner's people at
    a time, and none while a job that expects some of them is inserted (expected_names_now). The
    name a rename reads is then the one it renames from, an enrolment sees the voiceprint another
    made at the same time (one voice is not enrolled under two names), and a job being inserted
    reads its people before such a change or after it, whole. Held only while the person changes: the recordings
    are matched again after the commit, batch by batch, without it."""
    await conn.execute("SELECT pg_advisory_xact_lock(hashtextextended('stt.speakers:' || coalesce($1, ''), 0))",
                       owner)


async def rename_speaker(conn: asyncpg.Connection, owner: str | None, speaker_id: int, name: str) -> list[int]:
    """Rename, and carry the new name to the jobs that expect the person (`expected_speakers`).
    NameTaken when another of the owner's speakers has the name (the unique index on it says so).
    The transcripts the rename can change the names of, not locked, each recorded as due a
    matching (matching_due) in this transaction: the caller matches them again once this
    commits, and that matching writes the new name on the recording speakers the person named
    automatically (until then they keep the old one: a recording never shows the new name on a
    second speaker, one that has it by hand). Sent again with the name the person has (a rename
    whose matching was cut off), those where the person still has another name and the owner's
    still due a matching (the cut-off rename's among them); nothing when the person is gone."""
    await one_change_of_the_owners_people_at_a_time(conn, owner)
    old = await conn.fetchval("SELECT name FROM speakers WHERE id = $1", speaker_id)
    if old is None:
        return []
    if old == name:
        rows = await conn.fetch(f"{_NAMED_BY} AND name IS DISTINCT FROM $2", speaker_id, name)
        due = sorted({r["transcript_id"] for r in rows})
        await matching_due(conn, due)
        # And what the cut-off rename left due: the recordings that call either name by hand, or
        # expect the person, are not found from the name alone once it is the new one. Taken as
        # the owner's left due, whatever change left them: matched now, they are done sooner.
        left = await conn.fetch("SELECT d.transcript_id FROM speaker_matching_due d JOIN transcripts t"
                                f" ON t.id = d.transcript_id WHERE {_owned_by(owner, column='t.owner')}", owner)
        return sorted(set(due) | {r["transcript_id"] for r in left})
    # The jobs that expect the person are locked first, in id order, as the persister locks a job
    # before its speakers and an enrolment a job before the speaker: the other order deadlocked
    # with them.
    await conn.fetch(_lock_jobs(f"{_owned_by(owner, column='t.owner')} AND {_expects('$2')}"), owner, old)
    try:
        async with conn.transaction():  # a savepoint: the caller's transaction goes on
            await conn.execute("UPDATE speakers SET name = $2 WHERE id = $1", speaker_id, name)
    except asyncpg.UniqueViolationError as exc:
        raise NameTaken(name) from exc
    # Jobs that expect the person (`expected_speakers`) go on expecting them by the new name.
    await conn.execute(
        f"UPDATE transcripts SET options = jsonb_set(options, '{{expected_speakers}}', (SELECT jsonb_agg(CASE WHEN"
        f" lower(n) = lower($2) THEN $3 ELSE n END) FROM jsonb_array_elements_text({_EXPECTED}) n))"
        f" WHERE {_owned_by(owner)} AND {_expects('$2')}", owner, old, name)
    # The person is locked by the update: every matching that read them has committed (the voices
    # it gave them are found here), and one that reads them from now on waits for the commit and
    # reads the new name.
    due = await _jobs_of_rename(conn, owner, speaker_id, old, name)
    await matching_due(conn, due)
    return due


_UNNAME = "UPDATE transcript_speakers SET name = NULL, name_source = NULL, matched_speaker_id = NULL, confidence = NULL"


async def delete_speaker(conn: asyncpg.Connection, speaker_id: int) -> list[int]:
    """Forget a person: their voiceprints go (cascade) and so does every name matched to them.
    The transcripts that lost a name, each recorded in this transaction as due a matching that
    announces it (matching_due with `announce`): the caller matches them again once this commits
    (another person may be the best match for a voice now), and each batch of that matching tells
    its transcripts their names as they end, whether or not someone took the voice. A matching
    cut off before its end (a restart, a lost database) leaves the rest due, for the sweep: once
    this commits, every transcript that lost the name is told so, and the forgetting's own commit
    writes one row a transcript, not an event. The events of the owner's not sent yet lose the
    name in the same commit (_take_forgotten_names_out_of_unsent_events)."""
    owner = await conn.fetchval("SELECT owner FROM speakers WHERE id = $1", speaker_id)
    await one_change_of_the_owners_people_at_a_time(conn, owner)
    # Their jobs first, in id order, as every matching locks a job before its speakers.
    await conn.fetch(_lock_jobs(f"id IN ({_NAMED_BY})"), speaker_id)
    rows = await conn.fetch(f"{_UNNAME} WHERE matched_speaker_id = $1 AND name_source = 'auto'"
                            " RETURNING transcript_id, speaker", speaker_id)
    forgotten = await conn.fetchrow("DELETE FROM speakers WHERE id = $1 RETURNING owner, name", speaker_id)
    if forgotten is not None:
        # A matching that named a voice after them meanwhile (its transaction held the delete back
        # until it committed) left that name behind with matched_speaker_id cleared by the cascade.
        # Its job is not locked before the speaker: rare as that is, a deadlock it may end in is
        # the caller's to retry.
        rows += await conn.fetch(
            f"{_UNNAME} WHERE matched_speaker_id IS NULL AND name_source = 'auto' AND lower(name) = lower($2)"
            f" AND transcript_id IN (SELECT id FROM transcripts WHERE {_owned_by(forgotten['owner'])})"
            " RETURNING transcript_id, speaker",
            forgotten["owner"], forgotten["name"])
        await _take_forgotten_names_out_of_unsent_events(conn, forgotten["owner"], forgotten["name"],
                                                         [(r["transcript_id"], r["speaker"]) for r in rows])
    unnamed = sorted({r["transcript_id"] for r in rows})
    await matching_due(conn, unnamed, announce=True)
    return unnamed


# The events that tell a recording speaker's name: segment.created and segment.updated (the
# segment's speaker_name and speaker_confidence) and transcript.speakers_updated (a SpeakerName
# for each label). transcript.completed and the rest tell none.
_SEGMENT_EVENTS = f"('{SegmentCreated.ROUTING_KEY}', '{SegmentUpdated.ROUTING_KEY}')"
_NAMES_EVENT = TranscriptSpeakersUpdated.ROUTING_KEY
_NAMING_EVENTS = f"('{SegmentCreated.ROUTING_KEY}', '{SegmentUpdated.ROUTING_KEY}', '{_NAMES_EVENT}')"
_NO_NAME = SpeakerName().model_dump_json()
_NO_SEGMENT_NAME = '{"speaker_name": null, "speaker_confidence": null}'


def _forgets(job: str, label: str, told_name: str, told_source: str | None = None) -> str:
    """SQL: the name `told_name` that an event of transcript `job` tells for its speaker `label`
    goes with the forgetting: that label lost its name in it ($1, $2: the transcripts and labels
    that did), or it is the forgotten person's name ($3, compared as the unique index on names
    compares them), told as recognised where `told_source` says how it was given, and not the
    label's by hand now. A label may have lost the name before: taken back by hand, or taken by
    another person's voice, while its events waited."""
    recognised = f" AND {told_source} = 'auto'" if told_source else ""
    return (f"(EXISTS (SELECT 1 FROM unnest($1::bigint[], $2::text[]) lost(transcript_id, speaker)"
            f" WHERE lost.transcript_id = {job} AND lost.speaker = {label})"
            f" OR (lower({told_name}) = lower($3){recognised} AND NOT EXISTS (SELECT 1 FROM transcript_speakers ts"
            f" WHERE ts.transcript_id = {job} AND ts.speaker = {label} AND ts.name_source = 'manual'"
            " AND lower(ts.name) = lower($3))))")


def _told_forgotten(data: str, job: str) -> str:
    """SQL: of the labels of transcript.speakers_updated `data`, those whose name goes (_forgets)."""
    return (f"SELECT s.label FROM jsonb_each({data}->'speakers') s(label, told) WHERE s.told->'name' <> 'null'"
            " AND " + _forgets(job, "s.label", "s.told->>'name'", "s.told->>'source'"))


def _tells_a_forgotten_name(kind: str, data: str, job: str) -> str:
    """SQL: the event of routing key `kind` whose body is `data` (jsonb), of transcript `job`,
    tells a name that goes with the forgetting (_forgets)."""
    segment_forgets = _forgets(job, f"{data}->>'speaker'", f"{data}->>'speaker_name'")
    return (f"CASE WHEN {kind} IN {_SEGMENT_EVENTS} THEN ({data}->'speaker_name' <> 'null'"
            f" OR {data}->'speaker_confidence' <> 'null') AND {segment_forgets}"
            f" WHEN {kind} = '{_NAMES_EVENT}' THEN EXISTS ({_told_forgotten(data, job)}) ELSE false END")


def _forgotten_names_taken_out(kind: str, data: str, job: str) -> str:
    """SQL: that event's body told without the names that go (as if it were sent now)."""
    return (f"CASE WHEN {kind} = '{_NAMES_EVENT}' THEN jsonb_set({data}, '{{speakers}}', {data}->'speakers'"
            f" || coalesce((SELECT jsonb_object_agg(f.label, '{_NO_NAME}'::jsonb) FROM ({_told_forgotten(data, job)})"
            " f), '{}'::jsonb))"
            f" ELSE {data} || '{_NO_SEGMENT_NAME}'::jsonb END")


async def _take_forgotten_names_out_of_unsent_events(conn: asyncpg.Connection, owner: str | None, name: str,
                                                     lost: list[tuple[int, str]]) -> None:
    """In the forgetting's transaction: the owner's events not sent yet that tell the forgotten
    person's `name` (or any name of these (transcript, label) speakers, which lost theirs in it),
    rewritten without it. Those are the webhook deliveries still pending (an endpoint down holds a
    job's backlog for up to a day of retries) and the outbox rows not yet published: a name the
    user had forgotten was otherwise sent for the first time after the forgetting answered. Not
    only the labels that lose the name now: one taken back by hand (or by another person's voice)
    since its events were queued no longer has it, and its events still told it. A label that
    has the name by hand now keeps it. A delivery is signed at each attempt over its body as
    stored, so the rewritten one verifies. The job's transcript.speakers_updated, after them,
    tells the names as they end."""
    transcripts, labels = [transcript_id for transcript_id, _ in lost], [label for _, label in lost]
    payload_data = "(d.payload::jsonb->'data')"
    # Those of the owner's webhooks: a deleted job's included (its events still go out).
    await conn.execute(
        f"UPDATE webhook_deliveries d SET payload = jsonb_set(d.payload::jsonb, '{{data}}',"
        f" {_forgotten_names_taken_out('d.event_type', payload_data, 'd.job_id')})::text FROM webhooks w"
        f" WHERE w.id = d.webhook_id AND {_owned_by(owner, '$4', 'w.owner')} AND d.status = 'pending'"
        f" AND d.event_type IN {_NAMING_EVENTS}"
        f" AND {_tells_a_forgotten_name('d.event_type', payload_data, 'd.job_id')}",
        transcripts, labels, name, owner)
    # The rows of the owner's jobs (the body's job_id is a JSON number).
    await conn.execute(
        f"UPDATE outbox o SET body = {_forgotten_names_taken_out('o.routing_key', 'o.body', 't.id')} FROM transcripts t"
        f" WHERE o.body->'job_id' = to_jsonb(t.id) AND {_owned_by(owner, '$4', 't.owner')}"
        f" AND o.routing_key IN {_NAMING_EVENTS} AND {_tells_a_forgotten_name('o.routing_key', 'o.body', 't.id')}",
        transcripts, labels, name, owner)


# The owner's profiles by embedding model, each with its name as PostgreSQL lowers it.
OwnerProfiles = dict[str, list[tuple[str, Profile]]]


async def owner_profiles(db: Db, owner: str | None, model: str, only: list[str] | None = None,
                         leaving_out: list[str] = ()) -> list[Profile]:
    """The owner's profiles of voiceprints by `model`: with `only`, those whose name is one of
    them; never those named one of `leaving_out` (names compare as PostgreSQL lowers them)."""
    return [profile for _, profile in await _folded_profiles(db, owner, model, only, leaving_out)]


async def _folded_profiles(db: Db, owner: str | None, model: str, only: list[str] | None = None,
                           leaving_out: list[str] = ()) -> list[tuple[str, Profile]]:
    """As owner_profiles, each with its name as PostgreSQL lowers it."""
    # Shared locks on the speakers until the caller's transaction ends: forgetting or renaming one
    # waits for a matching that read it (which would otherwise write a name, or an id, that the
    # delete or rename has just done away with), and a matching that starts later reads the outcome.
    rows = await db.fetch(
        "SELECT s.id, s.name, lower(s.name) AS folded, v.embedding::real[] AS embedding FROM speakers s"
        f" JOIN voiceprints v ON v.speaker_id = s.id WHERE {_speaker_owned_by(column='s.owner')}"
        " AND v.embedding_model = $2"
        " AND ($3::text[] IS NULL OR lower(s.name) IN (SELECT lower(n) FROM unnest($3::text[]) n))"
        " AND lower(s.name) NOT IN (SELECT lower(n) FROM unnest($4::text[]) n)"
        " ORDER BY s.id, v.id FOR SHARE OF s", owner, model, only, list(leaving_out))
    profiles: dict[int, tuple[str, Profile]] = {}
    for r in rows:
        _, profile = profiles.setdefault(r["id"], (r["folded"], Profile(r["id"], r["name"], [])))
        profile.voiceprints.append(np.asarray(r["embedding"]))
    return list(profiles.values())


async def unknown_names(db: Db, owner: str | None, names: list[str]) -> list[str]:
    """Those of `names` that are none of the owner's speakers (names compare case-insensitively)."""
    if not names:
        return []
    # Both sides lowered by PostgreSQL: Python's lower() differs from it ("İ", or any non-ASCII
    # letter in a database whose collation is C).
    rows = await db.fetch(f"SELECT n FROM unnest($2::text[]) WITH ORDINALITY AS given(n, i) WHERE NOT EXISTS"
                          f" (SELECT 1 FROM speakers WHERE {_speaker_owned_by()} AND lower(name) = lower(n))"
                          " ORDER BY i", owner, names)
    return [r["n"] for r in rows]


async def enrolled_ids(db: Db, owner: str | None, names: list[str]) -> list[int | None]:
    """The owner's speaker of each of `names` (compared as PostgreSQL lowers them), None for a
    name nobody has: what expected_names_now finds them by again, renamed or not."""
    if not names:
        return []
    rows = await db.fetch(f"SELECT (SELECT id FROM speakers WHERE {_speaker_owned_by()}"
                          " AND lower(name) = lower(n)) AS id"
                          " FROM unnest($2::text[]) WITH ORDINALITY AS given(n, i) ORDER BY i", owner, names)
    return [r["id"] for r in rows]


async def expected_names_now(conn: asyncpg.Connection, owner: str | None, names: list[str],
                             ids: list[int | None]) -> list[str | None]:
    """In the transaction that inserts a job expecting `names` (their speakers `ids`, as
    enrolled_ids found them before the upload): each name as the job is to store it, None for
    one nobody has now. A rename or forgetting of the owner's people waits from here until the job commits, and
    then finds it (rename_speaker rewrites it); one that committed before is read here: a person
    renamed since is expected by their name now, one forgotten since is no name at all (unless
    someone has it now). A name kept as given when its person still has it in any case."""
    await one_change_of_the_owners_people_at_a_time(conn, owner)
    rows = await conn.fetch(
        "SELECT given.n, coalesce(CASE WHEN lower(s.name) = lower(given.n) THEN given.n ELSE s.name END,"
        f" (SELECT given.n FROM speakers WHERE {_speaker_owned_by()} AND lower(name) = lower(given.n) LIMIT 1)) AS now"
        " FROM unnest($2::text[], $3::bigint[]) WITH ORDINALITY AS given(n, id, i)"
        f" LEFT JOIN speakers s ON s.id = given.id AND {_speaker_owned_by(column='s.owner')} ORDER BY given.i",
        owner, names, ids)
    return [r["now"] for r in rows]


async def other_people_of_voice(db: Db, owner: str | None, speaker_id: int, model: str) -> list[Profile]:
    """The owner's profiles by `model` but speaker `speaker_id`'s, for an enrolment to tell whom
    else its voice sounds like (no locks: a check, not a matching)."""
    rows = await db.fetch(
        "SELECT s.id, s.name, v.embedding::real[] AS embedding FROM speakers s"
        f" JOIN voiceprints v ON v.speaker_id = s.id WHERE {_speaker_owned_by(column='s.owner')} AND s.id <> $2"
        " AND v.embedding_model = $3 ORDER BY s.id, v.id",
        owner, speaker_id, model)
    profiles: dict[int, Profile] = {}
    for r in rows:
        profiles.setdefault(r["id"], Profile(r["id"], r["name"], [])).voiceprints.append(np.asarray(r["embedding"]))
    return list(profiles.values())


async def transcripts_near_voice(db: Db, owner: str | None, embedding: list[float], model: str,
                                 threshold: float) -> list[int]:
    """The owner's transcripts with a speaker whose centroid is at least `threshold` alike (cosine)
    to the voice: the only ones a new voiceprint can name anyone in, since a profile scores a
    speaker by its best voiceprint."""
    # pgvector computes in single precision: the margin keeps a pair at the threshold in.
    rows = await db.fetch(
        "SELECT DISTINCT ts.transcript_id FROM transcript_speakers ts JOIN transcripts t ON t.id = ts.transcript_id"
        f" WHERE {_owned_by(owner, column='t.owner')} AND ts.embedding_model = $2"
        " AND 1 - (ts.embedding <=> $3::real[]::vector) >= $4"
        " ORDER BY ts.transcript_id", owner, model, embedding, threshold - 1e-4)
    return [r["transcript_id"] for r in rows]


async def name_recording_speakers(conn: asyncpg.Connection, transcript_id: int, owner: str | None,
                                  threshold: float, min_speech_s: float, profiles: OwnerProfiles | None = None,
                                  counting_confidence: bool = False) -> bool:
    """Match the transcript's speakers (by their stored centroids) against the owner's profiles and
    set, change or clear their automatic names; manual names are never touched. True when a name
    changed, or with `counting_confidence` a recognised speaker's confidence (what the
    transcript.speakers_updated event tells as well). `profiles`, from a caller that matches
    several recordings in one transaction where the owner's people cannot change: the profiles
    read for one recording are kept there for the next, in place of a read for each."""
    rows = await conn.fetch(
        "SELECT speaker, embedding::real[] AS embedding, embedding_model, speech_s, name, lower(name) AS folded,"
        " name_source, matched_speaker_id, confidence FROM transcript_speakers WHERE transcript_id = $1"
        " ORDER BY speaker FOR UPDATE", transcript_id)
    # A person named by hand in this recording is not given to a second speaker of it, also when
    # the one named has no voice of its own (a label made by moving segments to it).
    taken = [r for r in rows if r["name_source"] == "manual" and r["name"]]
    rows = [r for r in rows if r["embedding"] is not None]
    if not rows:
        return False
    manual = {r["speaker"] for r in rows if r["name_source"] == "manual"}
    # The job's `expected_speakers`: the enrolled people who may be in it (none: any of the owner's).
    expected = await conn.fetchrow(
        f"SELECT ARRAY(SELECT jsonb_array_elements_text({_EXPECTED})) AS names,"
        f" ARRAY(SELECT lower(n) FROM jsonb_array_elements_text({_EXPECTED}) n) AS folded FROM transcripts"
        f" WHERE id = $1 AND jsonb_typeof({_EXPECTED}) = 'array' AND jsonb_array_length({_EXPECTED}) > 0",
        transcript_id)
    matches: dict[str, Match] = {}
    for model in sorted({r["embedding_model"] for r in rows}):
        if profiles is None:
            candidates = await owner_profiles(conn, owner, model, only=expected and expected["names"],
                                              leaving_out=[r["name"] for r in taken])
        else:
            if model not in profiles:
                profiles[model] = await _folded_profiles(conn, owner, model)
            candidates = [profile for folded, profile in profiles[model]
                          if (expected is None or folded in expected["folded"])
                          and folded not in {r["folded"] for r in taken}]
        recording = [RecordingSpeaker(r["speaker"], np.asarray(r["embedding"]), r["speech_s"])
                     for r in rows if r["embedding_model"] == model and r["speaker"] not in manual]
        matches |= match_speakers(recording, candidates, threshold, min_speech_s)
    changed = False
    for r in rows:
        if r["speaker"] in manual:
            continue
        match = matches.get(r["speaker"])
        new = (match.name, "auto", match.speaker_id, match.confidence) if match else (None, None, None, None)
        if new != (r["name"], r["name_source"], r["matched_speaker_id"], r["confidence"]):
            changed |= new[0] != r["name"] or (counting_confidence and new[3] != r["confidence"])
            await conn.execute(
                "UPDATE transcript_speakers SET name = $3, name_source = $4, matched_speaker_id = $5,"
                " confidence = $6 WHERE transcript_id = $1 AND speaker = $2", transcript_id, r["speaker"], *new)
    return changed


async def announce_speaker_names(conn: asyncpg.Connection, transcript_id: int) -> None:
    """Queue transcript.speakers_updated with every speaker of the transcript and its name now.
    A matching still due that asks to announce it (a forgetting's) need not any more: this tells
    the names it would (the caller matched the recording against the people as they are, the
    job locked), and a forgetting announces each transcript once. Whatever that matching still
    changes, it announces as a change."""
    labels = await job_speaker_labels(conn, transcript_id)
    names = await speaker_names(conn, transcript_id)
    speakers = {label: names.get(label, SpeakerName()) for label in sorted(labels | set(names))}
    await add_to_outbox(conn, TranscriptSpeakersUpdated(job_id=transcript_id, transcript_id=transcript_id,
                                                        speakers=speakers))
    await conn.execute("UPDATE speaker_matching_due SET announce = false WHERE transcript_id = $1 AND announce",
                       transcript_id)
