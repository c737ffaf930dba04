"""Re-embedding stored transcripts after the embedding model changed (`stt reindex`,
/admin/reindex), on the real stack."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx

from tests.conftest import running_stack

ADMIN, USER = "reindex-admin-key-01", "reindex-user-key-02"
USE = "universal-sentence-encoder-multilingual-3"


def test_a_new_embedding_model_reembeds_every_stored_segment(tmp_path_factory, fixtures_dir):
    with running_stack(tmp_path_factory, API_KEYS=f"{ADMIN},{USER}", ADMIN_API_KEY=ADMIN) as stack:
        user = httpx.Client(headers={"X-API-Key": USER}, timeout=60)
        jobs = [stack.submit_job(fixtures_dir / name, client=user) for name in ("en_dialogue.wav", "jfk.flac")]
        assert {stack.wait_finished(job, 300, user)["status"] for job in jobs} == {"done"}
        models = {r["embedding_model"] for r in stack.query("SELECT embedding_model FROM segments")}
        assert models == {"all-minilm"}

        # The operator switches the embedder (and so ingest's query embedding) to another model.
        stack.env["EMBEDDING_BACKEND"] = "local"
        stack.stop("ingest")
        stack.start_service("ingest")
        stack.wait_ready(timeout=120)
        assert user.post(f"{stack.api}/admin/reindex").status_code == 403
        assert user.get(f"{stack.api}/search", params={"q": "sales", "mode": "semantic"}).json()["items"] == []

        env = {**os.environ, "STT_API_URL": stack.api, "STT_API_KEY": ADMIN}
        stt = str(Path(sys.executable).parent / "stt")
        result = subprocess.run([stt, "reindex"], env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stdout + result.stderr
        segments = stack.value("SELECT count(*) FROM segments")
        assert result.stdout.strip() == f"{segments} segments embedded with {USE}, 0 to do (done)"
        rows = stack.query("SELECT embedding_model, vector_dims(embedding) AS dims FROM segments")
        assert {(r["embedding_model"], r["dims"]) for r in rows} == {(USE, 512)}
        hits = user.get(f"{stack.api}/search", params={"q": "sales figures", "mode": "semantic"}).json()
        assert hits["embedding_model"] == USE and hits["items"][0]["transcript_id"] == jobs[0]
        again = subprocess.run([stt, "reindex"], env=env, capture_output=True, text=True, timeout=300)
        assert again.stdout.strip() == f"{segments} segments embedded with {USE}, 0 to do (done)"
        user.close()
