"""`raylm generate` end to end: ray.data.llm + vLLM over a small jsonl on the 2-CPU cluster,
with the model, the prompts and the output in a bucket.

One prompt is longer than the engine's max_model_len: it must land in quarantine with
the engine's error (and the job exit 1), while every other row gets a completion.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raylm import storage
from raylm.cluster import ClusterInfo
from raylm.serve.validation import chat_token_ids

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(420)
def test_generate_writes_parquet_and_quarantines_failures(
    ray_cluster: ClusterInfo, tiny_model: Path, s3_bucket: str
) -> None:
    """Model, prompts and output_dir all in the bucket: the job copies the model to its
    node (storage.local_dir), Ray Data reads the prompts from the bucket, and the
    predictions, the quarantine and the manifest are written there."""
    from transformers import AutoTokenizer

    base = storage.join(s3_bucket, "generate-e2e")
    model = storage.join(base, "tiny")
    storage.copy_dir(str(tiny_model), model)
    prompts = [f"Tell me about topic {i}" for i in range(5)] + ["word " * 800]
    src = storage.join(base, "prompts.jsonl")
    storage.write_text(
        src, "".join(json.dumps({"text": p, "id": i}) + "\n" for i, p in enumerate(prompts))
    )
    out = storage.join(base, "gen")
    cmd = [
        sys.executable,
        "-m",
        "raylm.cli",
        "generate",
        str(ROOT / "conf/generate/tiny.yaml"),
        f"model={model}",
        f"input.path={src}",
        "input.prompt_column=text",
        "input.chat=true",
        "sampling.max_tokens=12",
        "engine.max_model_len=256",
        f"output_dir={out}",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]  # one row failed

    table = _read(storage.join(out, "predictions")).sort_by("row_id").to_pylist()
    assert [r["prompt"] for r in table] == prompts[:5]
    tok = AutoTokenizer.from_pretrained(tiny_model)
    for row in table:
        chat = chat_token_ids(tok, [{"role": "user", "content": row["prompt"]}])
        assert row["prompt_tokens"] == len(chat)  # the chat template was applied
        assert 0 < row["completion_tokens"] <= 12 and row["completion"]

    failed = _read(storage.join(out, "quarantine")).to_pylist()
    assert len(failed) == 1 and failed[0]["row_id"] == 5
    assert failed[0]["__inference_error__"]

    manifest = json.loads(storage.read_text(storage.join(out, "manifest.json")))
    assert manifest["inputs"][model].startswith("listing:")
    assert manifest["metrics"]["rows_in"] == 6
    assert manifest["metrics"]["rows_out"] == 5 and manifest["metrics"]["rows_failed"] == 1
    assert manifest["metrics"]["completion_tokens"] == sum(r["completion_tokens"] for r in table)


def _read(uri: str) -> pa.Table:
    """Every Parquet file under a bucket prefix, as one table."""
    fs, path = storage.filesystem(uri)
    return pq.read_table(path, filesystem=fs)
