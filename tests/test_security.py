"""Access control, secrets, and the API against its own OpenAPI schema."""

from __future__ import annotations

import asyncio
import logging
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
from litestar.testing import TestClient

from services.ingest.app import create_app
from tests.conftest import ROOT, SECRETS, Stack

ALICE, BOB = "key-alice-3c1f", "key-bob-88e0"


@pytest.fixture(scope="module")
def keyed_api(stack: Stack):
    """Ingest with API_KEYS set, in this process, on the real broker, database and store."""
    app = create_app(stack.settings(api_keys=f"{ALICE}, {BOB}"))
    with TestClient(app, timeout=60) as client:
        yield client


def upload(client: TestClient, fixtures_dir: Path, headers: dict) -> httpx.Response:
    with (fixtures_dir / "jfk.flac").open("rb") as f:
        return client.post("/recognize", files={"file": ("jfk.flac", f)}, headers=headers)


def test_without_a_key_only_health_answers(keyed_api, fixtures_dir):
    assert keyed_api.get("/healthz").status_code == 200
    assert keyed_api.get("/readyz").status_code == 200
    for response in (upload(keyed_api, fixtures_dir, {}), keyed_api.get("/status/1"),
                     keyed_api.get("/docs/openapi.json")):
        assert response.status_code == 401, response.text
        assert "API key is required" in response.json()["detail"]
        assert response.headers["www-authenticate"].startswith("Bearer")


def test_a_wrong_key_is_403(keyed_api, fixtures_dir):
    response = upload(keyed_api, fixtures_dir, {"Authorization": "Bearer not-a-key"})
    assert response.status_code == 403 and "not valid" in response.json()["detail"]
    assert keyed_api.get("/status/1", headers={"X-API-Key": "nope"}).status_code == 403


def test_the_openai_sdk_hears_a_wrong_key_as_openai_says_it(keyed_api, fixtures_dir):
    client = openai.OpenAI(base_url="http://testserver.local/v1", api_key="not-a-key", http_client=keyed_api,
                           max_retries=0)
    with (fixtures_dir / "jfk.flac").open("rb") as f, pytest.raises(openai.AuthenticationError) as refused:
        client.audio.transcriptions.create(model="whisper-1", file=f)
    assert refused.value.code == "invalid_api_key" and "not valid" in refused.value.message


def test_a_job_is_visible_only_to_the_key_that_created_it(keyed_api, fixtures_dir, stack):
    response = upload(keyed_api, fixtures_dir, {"Authorization": f"Bearer {ALICE}"})
    assert response.status_code == 202, response.text
    job_id = response.json()["id"]
    assert keyed_api.get(f"/status/{job_id}", headers={"Authorization": f"Bearer {ALICE}"}).status_code == 200
    assert keyed_api.get(f"/status/{job_id}", headers={"X-API-Key": ALICE}).status_code == 200
    other = keyed_api.get(f"/status/{job_id}", headers={"Authorization": f"Bearer {BOB}"})
    assert other.status_code == 404  # as if it did not exist: ids reveal nothing
    owner = stack.value("SELECT owner FROM transcripts WHERE id = $1", job_id)
    assert owner and ALICE not in owner  # a hash of the key, never the key


def test_an_idempotency_key_is_the_key_owners_own(keyed_api, fixtures_dir, stack):
    """Bob sending Alice's Idempotency-Key gets a job of his own, not hers (nor a 422 naming it)."""
    alice = upload(keyed_api, fixtures_dir, {"X-API-Key": ALICE, "Idempotency-Key": "weekly-call"})
    bob = upload(keyed_api, fixtures_dir, {"X-API-Key": BOB, "Idempotency-Key": "weekly-call"})
    assert alice.status_code == bob.status_code == 202, bob.text
    assert alice.json()["id"] != bob.json()["id"] and "idempotent-replayed" not in bob.headers
    again = upload(keyed_api, fixtures_dir, {"X-API-Key": ALICE, "Idempotency-Key": "weekly-call"})
    assert again.json()["id"] == alice.json()["id"] and again.headers["idempotent-replayed"] == "true"


def test_object_keys_never_contain_client_text(stack, fixtures_dir):
    hostile = "../../etc/passwd/../evil name.flac"
    response = stack.submit(fixtures_dir / "jfk.flac", name=hostile)
    assert response.status_code == 202 and response.json()["filename"] == hostile
    job_id = response.json()["id"]
    keys = [o.object_name for o in stack.s3().list_objects("audio", recursive=True)]
    assert f"uploads/{job_id}" in keys
    assert not [k for k in keys if "passwd" in k or "evil" in k or ".." in k]


def test_no_secret_in_any_log_line_or_error_response(stack, fixtures_dir, keyed_api, caplog):
    # The keyed ingest runs in this process: its lines go to this test's log capture, not to the
    # stack's log files.
    caplog.set_level(logging.DEBUG)
    assert upload(keyed_api, fixtures_dir, {"Authorization": f"Bearer {ALICE}"}).status_code == 202
    # Provoke error paths first: each answer must not echo a secret either.
    answers = [
        httpx.post(f"{stack.api}/recognize", files={"file": ("x.mp3", b"not audio")}).text,
        httpx.post(f"{stack.api}/recognize", files={"file": ("x.wav", b"")}).text,
        httpx.get(f"{stack.api}/status/424242").text,
        httpx.get(f"{stack.api}/readyz").text,
        keyed_api.get("/status/1", headers={"X-API-Key": "wrong-key-5d2a"}).text,
        keyed_api.get("/status/1", headers={"Authorization": f"Bearer {BOB}"}).text,
    ]
    secrets = [*SECRETS.values(), ALICE, BOB, "wrong-key-5d2a"]
    logs = {p.name: p.read_text(errors="replace") for p in stack.log_dir.glob("*.log")}
    assert "/recognize" in caplog.text  # the keyed ingest's own lines were captured
    logs["keyed ingest (this process)"] = caplog.text
    assert set(logs) >= {"ingest.log", "diarizer.log", "transcriber.log", "embedder.log", "persister.log"}
    assert "pyannote unusable" in logs["diarizer.log"]  # the token was really in play
    leaks = [(where, s) for s in secrets for where, text in [*logs.items(), *enumerate(answers)] if s in text]
    assert leaks == []


def test_openapi_schema_holds_under_generated_requests(stack):
    """schemathesis: no 5xx, every response as documented (bounded number of examples)."""
    result = subprocess.run(
        [str(Path(sys.executable).parent / "schemathesis"), "run", f"{stack.api}/docs/openapi.json",
         "--checks", "not_a_server_error,response_schema_conformance,status_code_conformance",
         "--max-examples", "25", "--generation-deterministic", "--no-color",
         # event streams stay open while jobs run (GET /events never ends): tests/test_live.py
         "--exclude-path-regex", "/events$"],
        capture_output=True, text=True, cwd=ROOT, timeout=600,
    )
    print(result.stdout[-3000:])
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]


@pytest.mark.parametrize("service", ["ingest", "persister"])
def test_a_service_refusing_its_settings_says_why_without_printing_any_secret(service):
    """ADMIN_API_KEY not among API_KEYS: pydantic's message listed every setting it was given,
    API keys, the broker and database passwords included, into the service's log."""
    secrets = {"API_KEYS": "alpha-secret-key-1,beta-secret-key-2", "ADMIN_API_KEY": "gamma-secret-key-3",
               "AMQP_URL": "amqp://stt:broker-password-4@127.0.0.1:5672/",
               "DATABASE_URL": "postgresql://stt:database-password-5@127.0.0.1:5432/stt"}
    env = {"PATH": "/usr/bin:/bin", "HOME": str(ROOT), **secrets}
    started = subprocess.run([sys.executable, "-m", f"services.{service}"], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=120)
    said = started.stdout + started.stderr
    assert started.returncode != 0 and "ADMIN_API_KEY must be one of API_KEYS" in said, said
    for leaked in ("alpha-secret", "beta-secret", "gamma-secret", "broker-password", "database-password"):
        assert leaked not in said, said


async def test_a_url_that_stops_sending_gives_up_its_upload_place(monkeypatch):
    """A URL submission holds a place among MAX_CONCURRENT_UPLOADS while it downloads; a server
    that sent its headers and then nothing held it for all of AUDIO_URL_TIMEOUT_S (600 s by
    default), a few of them every upload's place."""
    from aiohttp import web
    from litestar.exceptions import HTTPException

    from common.settings import Settings
    from services.ingest import fetch

    released = asyncio.Event()

    async def stalls(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Length": str(2**20)})
        await response.prepare(request)
        await response.write(b"RIFF" + bytes(1000))
        await released.wait()
        return response

    app = web.Application()
    app.router.add_get("/meeting.wav", stalls)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    monkeypatch.setattr(fetch, "READ_IDLE_S", 0.5)
    started = time.monotonic()
    try:
        with pytest.raises(HTTPException) as refused:
            await fetch.fetch_recording(f"http://127.0.0.1:{port}/meeting.wav",
                                        Settings(audio_url_allow_private=True, audio_url_timeout_s=10))
    finally:
        released.set()
        await runner.cleanup()
    assert time.monotonic() - started < 5
    assert refused.value.status_code == 400
    assert refused.value.detail == "could not fetch the audio URL: 127.0.0.1 sent nothing for 0.5 s"


async def test_name_lookups_given_up_leave_the_default_executor_free(monkeypatch):
    """A lookup given up at its limit goes on in its thread; on the loop's default executor, a
    few dozen submissions naming hosts whose name server does not answer held every thread the
    object store's calls (asyncio.to_thread) wait for."""
    from common.outbound import target_problem

    released = threading.Event()

    def no_answer(*args, **kwargs):
        released.wait(30)
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")

    monkeypatch.setattr(socket, "getaddrinfo", no_answer)
    try:
        problems = await asyncio.gather(*(target_problem(f"https://host{n}.example/hook", False, resolve_timeout_s=0.2)
                                          for n in range(40)))
        assert problems == [f"host{n}.example did not resolve within 0.2 s" for n in range(40)]
        assert await asyncio.wait_for(asyncio.to_thread(lambda: "answered"), 2) == "answered"
    finally:
        released.set()


def test_api_answers_say_no_store_and_the_recording_and_page_keep_their_own(stack, made_job):
    """A shared cache keeps a 200 that says nothing when the request has no Authorization or
    Cookie header: one key's transcript, asked for with X-API-Key, would be served to anyone."""
    job_id = made_job("call.wav", b"RIFF the recording", segment=True)
    for path, params in ((f"/status/{job_id}", {}), (f"/transcripts/{job_id}", {"format": "srt"}),
                         (f"/transcripts/{job_id}", {}), ("/transcripts", {}), (f"/transcripts/{job_id}/speakers", {}),
                         ("/status/999999999", {})):
        response = httpx.get(f"{stack.api}{path}", params=params, timeout=30)
        assert response.status_code == (404 if "999999999" in path else 200), (path, response.text)
        assert response.headers.get_list("cache-control") == ["no-store"], (path, params)
    for path, own in ((f"/transcripts/{job_id}/audio", "private, no-cache"), ("/", "no-cache"),
                      ("/ui/app.js", "no-cache")):
        response = httpx.get(f"{stack.api}{path}", timeout=30)
        assert response.status_code == 200 and response.headers.get_list("cache-control") == [own], path



def test_every_store_client_trusts_the_same_certificates_over_tls(tmp_path, monkeypatch):
    """MINIO_SECURE=true against a store whose certificate an internal CA signed: ingest's main
    client trusted SSL_CERT_FILE or certifi's bundle, the timeout clients (s3_quick, the /readyz
    probe, the workers' worker_client) the system's store (OpenSSL's default paths, here
    SSL_CERT_DIR standing in for it). With the CA there only, /readyz was green and the workers
    read audio while every upload failed TLS. Now all go through with the CA in SSL_CERT_FILE,
    and none without it."""
    import datetime
    import http.server
    import ipaddress
    import ssl

    import urllib3
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    from common import storage
    from common.settings import Settings
    from services.ingest.readiness import CHECK_TIMEOUT_S

    now = datetime.datetime.now(datetime.UTC)
    ca_key, server_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "stt test internal CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    server = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "store")]))
              .issuer_name(ca_name).public_key(server_key.public_key()).serial_number(x509.random_serial_number())
              .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=1))
              .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                             critical=False)
              .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
              .sign(ca_key, hashes.SHA256()))
    ca_file, cert_file, key_file = tmp_path / "ca.pem", tmp_path / "store.pem", tmp_path / "store.key"
    ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_file.write_bytes(server.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(server_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                  serialization.NoEncryption()))
    system_store = tmp_path / "system-store"  # a directory OpenSSL looks up by subject hash
    system_store.mkdir()
    subject_hash = subprocess.run(["openssl", "x509", "-hash", "-noout", "-in", str(ca_file)], check=True,
                                  capture_output=True, text=True).stdout.strip()
    (system_store / f"{subject_hash}.0").write_bytes(ca_file.read_bytes())

    class Store(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self):  # bucket_exists: the bucket is there
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Store)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_file, key_file)
    httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    settings = Settings(_env_file=None, minio_endpoint=f"127.0.0.1:{httpd.server_address[1]}", minio_secure=True,
                        minio_region="us-east-1")  # no location lookup: HEAD only

    def answers() -> list[str]:
        clients = [storage.make_client(settings),  # ingest's state.s3
                   storage.make_client(settings, timeout_s=storage.QUICK_CLIENT_TIMEOUT_S, connections=8),  # s3_quick
                   storage.make_client(settings, timeout_s=CHECK_TIMEOUT_S),  # the /readyz probe
                   storage.worker_client(settings)]  # the diarizer's and transcriber's
        said = []
        for client in clients:
            try:
                said.append("exists" if client.bucket_exists("audio") else "missing")
            except urllib3.exceptions.HTTPError as exc:
                said.append("untrusted" if "CERTIFICATE_VERIFY_FAILED" in str(exc) else repr(exc))
        return said

    try:
        monkeypatch.delenv("SSL_CERT_FILE", raising=False)
        monkeypatch.setenv("SSL_CERT_DIR", str(system_store))  # the CA in the "system's store" only
        assert answers() == ["untrusted"] * 4
        monkeypatch.setenv("SSL_CERT_FILE", str(ca_file))
        assert answers() == ["exists"] * 4
    finally:
        httpd.shutdown()
        httpd.server_close()
