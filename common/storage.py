"""Object store access with plain S3 calls (MinIO in production, any S3 works). The `minio`
client is synchronous: call these from a worker thread (asyncio.to_thread)."""

from __future__ import annotations

import asyncio
import io
import json
import os
import urllib.parse
from collections.abc import Callable
from typing import BinaryIO, TypeVar
from xml.etree import ElementTree

import certifi
import urllib3
from minio import Minio
from minio.error import S3Error, ServerError

from common.failures import MISSING_OBJECT
from common.settings import Settings

PART_SIZE = 10 * 1024 * 1024
# The object store is down, unreachable or too busy (no connection, or an answer that it cannot
# serve now: see store_unavailable_answer): what must happen once it is back is held until then
# (common.broker.consume's `wait_on`), answered 503 by the API, not retried a few times.
STORAGE_UNAVAILABLE: tuple[type[BaseException], ...] = (urllib3.exceptions.HTTPError, ServerError)


def store_unavailable_answer(status: int) -> bool:
    """An answer that says the store cannot serve the request now, whatever the request: SlowDown,
    ServiceUnavailable or a MinIO still starting (503), InternalError (500), a proxy's or load
    balancer's page (502, 503, 504), too many requests (429). Not 501: an S3 API the store lacks
    is lacking for good. Other 4xx are about the request (NoSuchKey, AccessDenied...)."""
    return status == 429 or (status >= 500 and status != 501)


class StoreAnswersChecked(urllib3.PoolManager):
    """The HTTP client under each store client: an answer that says the store is unavailable (after
    the retries the client's urllib3.Retry makes) is raised as minio's ServerError, one of
    STORAGE_UNAVAILABLE. minio raises ServerError itself only for an error answer with no body:
    S3's and MinIO's come with an XML error document (S3Error, which callers take for a refusal of
    the request) and a proxy's with a page (InvalidResponseError), so a store answering SlowDown
    for a few minutes failed steps that wait out its outages."""

    def urlopen(self, method, url, redirect=True, **kw):
        response = super().urlopen(method, url, redirect=redirect, **kw)
        if not store_unavailable_answer(response.status):
            return response
        try:
            body = response.data or b""  # read here when the caller streams (preload_content=False)
        finally:
            response.release_conn()
        raise ServerError(f"the object store answered {method} {urllib.parse.urlsplit(url).path}"
                          f" with {response.status} {_what_it_said(response.headers.get('content-type'), body)}",
                          response.status)


def _what_it_said(content_type: str | None, body: bytes) -> str:
    """The error document's code and message (SlowDown: Please reduce your request rate), or what
    kind of page it was."""
    if body and "xml" in (content_type or ""):
        try:
            document = ElementTree.fromstring(body)
        except ElementTree.ParseError:
            pass
        else:
            return f"{document.findtext('Code')}: {document.findtext('Message')}"
    return f"({content_type or 'no content type'}, {len(body)} bytes)"


PCM_PREFIX, PCM_SUFFIX = "pcm/", ".s16le"


def pcm_key(job_id: int) -> str:
    """The job's decoded audio (16 kHz mono s16le), written by the diarizer, read by transcribers."""
    return f"{PCM_PREFIX}{job_id}{PCM_SUFFIX}"


T = TypeVar("T")
# A store call made while a database transaction holds a row lock and a pooled connection: a store
# that does not answer (minio's client waits 5 minutes a try, and retries) must not hold them, and
# with them every request waiting for a connection, that long. Such calls use a client made with
# QUICK_CLIENT_TIMEOUT_S (no retries), so that the thread ends soon after too.
IN_TRANSACTION_S = 30.0
QUICK_CLIENT_TIMEOUT_S = 15.0


class StoreCallTimedOut(Exception):
    """A store call made inside a transaction took longer than IN_TRANSACTION_S. Not a
    TimeoutError: common.db counts that as the database being away, and the caller would wait for
    a database that is there (a consumer holding its message for ever, a scan given up whole)
    instead of failing this one step."""


async def call_in_transaction(fn: Callable[..., T], *args, **kwargs) -> T:
    """`fn(*args, **kwargs)` in a thread, given up (StoreCallTimedOut) after IN_TRANSACTION_S so that
    the caller's transaction ends. What the thread still does after that must be safe to do again."""
    deadline = asyncio.timeout(IN_TRANSACTION_S)
    try:
        async with deadline:
            return await asyncio.to_thread(fn, *args, **kwargs)
    except TimeoutError as exc:
        if not deadline.expired():
            raise  # the call's own (a socket's), not this wait's
        raise StoreCallTimedOut(f"the object store did not answer {getattr(fn, '__name__', 'a call')}"
                                f" within {IN_TRANSACTION_S:g} s") from exc


# The stage workers' client (worker_client). minio's own waits 5 minutes for each read and tries
# 6 times: a store that takes connections and never answers held a message for half an hour, past
# RabbitMQ's consumer timeout, and the broker took it back as a crash (the job failed hours later
# as one) instead of the worker waiting out an outage. A silent read is given up after a minute
# (the wait between two reads of a large file, not the whole transfer), tried three times.
WORKER_CLIENT_TIMEOUT_S = 60.0
WORKER_CLIENT_RETRIES = 2


def tls_trust() -> dict[str, str]:
    """The certificates every store client trusts with MINIO_SECURE=true: the file SSL_CERT_FILE
    names, else certifi's bundle, as minio's own client does. Each client takes them from here: the
    timeout clients gave urllib3 none, so it loaded the system's store, and with an internal CA in
    that store only /readyz and the workers' reads went through while every upload failed TLS.
    Certifi rather than the system's store: it is what the client writing uploads always trusted,
    and the same in every image whatever the base image's CA package holds."""
    return {"cert_reqs": "CERT_REQUIRED", "ca_certs": os.environ.get("SSL_CERT_FILE") or certifi.where()}


def make_client(settings: Settings, timeout_s: float | None = None, connections: int = 1, retries: int = 0) -> Minio:
    """The S3 client; with `timeout_s`, one whose calls give up after that long on a silent
    endpoint, retried `retries` times (none: health checks, calls made inside a database
    transaction; minio's default waits 5 minutes a try), keeping up to `connections` open."""
    if timeout_s is None:
        # minio's own client, as it makes it when given none.
        http_client = StoreAnswersChecked(
            timeout=urllib3.Timeout(connect=300, read=300), maxsize=10, **tls_trust(),
            retries=urllib3.Retry(total=5, backoff_factor=0.2, status_forcelist=[500, 502, 503, 504]))
    else:
        # The last answer of a store that stays busy is raised as ServerError (StoreAnswersChecked).
        retry = (urllib3.Retry(total=retries, backoff_factor=0.5, status_forcelist=[500, 502, 503, 504],
                               raise_on_status=False) if retries else urllib3.Retry(total=0))
        http_client = StoreAnswersChecked(timeout=urllib3.Timeout(connect=timeout_s, read=timeout_s),
                                          retries=retry, maxsize=connections, **tls_trust())
    return Minio(
        settings.minio_endpoint,
        access_key=settings.minio_access_key,
        secret_key=settings.minio_secret_key.get_secret_value(),
        secure=settings.minio_secure,
        region=settings.minio_region,
        http_client=http_client,
    )


def worker_client(settings: Settings) -> Minio:
    # As many connections as minio's own client keeps: a long recording's decoded audio goes up
    # in parts, three at a time.
    return make_client(settings, WORKER_CLIENT_TIMEOUT_S, connections=10, retries=WORKER_CLIENT_RETRIES)


def ensure_buckets(client: Minio, *buckets: str) -> None:
    """Create the buckets that do not exist yet. One that exists is left alone, so a key that may
    not create buckets works once they are made; one made meanwhile by another replica is fine."""
    for bucket in buckets:
        if client.bucket_exists(bucket):
            continue
        try:
            client.make_bucket(bucket)
        except S3Error as exc:
            if exc.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise


def upload_stream(client: Minio, bucket: str, key: str, stream: BinaryIO,
                  content_type: str = "application/octet-stream",
                  metadata: dict[str, str] | None = None) -> int:
    """Stream to the store in 10 MiB parts without holding the object in memory. One part in
    flight at a time: parallel parts each hold their buffer (measured: +40 MB RSS on 1 GB)."""
    result = client.put_object(bucket, key, stream, length=-1, part_size=PART_SIZE,
                               content_type=content_type, metadata=metadata, num_parallel_uploads=1)
    return client.stat_object(result.bucket_name, result.object_name).size or 0


def upload_bytes(client: Minio, bucket: str, key: str, data: bytes,
                 content_type: str = "application/octet-stream") -> None:
    client.put_object(bucket, key, io.BytesIO(data), length=len(data), content_type=content_type)


def upload_json(client: Minio, bucket: str, key: str, document: object) -> None:
    upload_bytes(client, bucket, key, json.dumps(document, ensure_ascii=False).encode(),
                 content_type="application/json")


def download_to(client: Minio, bucket: str, key: str, sink: BinaryIO) -> None:
    response = client.get_object(bucket, key)
    try:
        for part in response.stream(1024 * 1024):
            sink.write(part)
    finally:
        response.close()
        response.release_conn()
    sink.seek(0)


def read_range(client: Minio, bucket: str, key: str, offset: int, length: int,
               match_etag: str | None = None) -> bytes:
    """`length` bytes of the object from `offset` (fewer at its end). With `match_etag`, of that
    version only (If-Match): another one is an S3Error PreconditionFailed (412)."""
    response = client.get_object(bucket, key, offset=offset, length=length,
                                 request_headers={"If-Match": f'"{match_etag}"'} if match_etag else None)
    try:
        return response.read()
    finally:
        response.close()
        response.release_conn()


def is_missing(exc: S3Error) -> bool:
    """The store says there is no such object."""
    return exc.code in MISSING_OBJECT


def stored_size(client: Minio, bucket: str, key: str) -> int | None:
    """The object's size in bytes; None when there is no such object."""
    try:
        return client.stat_object(bucket, key).size
    except S3Error as exc:
        if is_missing(exc):
            return None
        raise


def object_exists(client: Minio, bucket: str, key: str) -> bool:
    return stored_size(client, bucket, key) is not None


def remove_objects(client: Minio, objects: list[tuple[str, str]]) -> None:
    """Remove each (bucket, key); one that is already gone is no error."""
    for bucket, key in objects:
        try:
            client.remove_object(bucket, key)
        except S3Error as exc:
            if not (is_missing(exc) or exc.code == "NoSuchBucket"):
                raise
