"""The whole pipeline on the tiny model: notebook run, re-run with a quantized export,
re-run with a failing gate.

The tests share one pipeline run (the notebook's), in order: re-running it must skip
the unchanged stages; added export stages serve the gated quantized model; a stricter
gate must block deployment.

A pipeline preempted in its train stage resumes training when re-run, from these parts:
the stage has no record, so it runs again (tests/integration/test_pipeline_skip.py);
its run is the same ``storage_path``/``run_name`` every time (tests/unit/
test_pipeline_plan.py); and a train job killed and started again under that name
continues exactly from its newest checkpoint in a bucket
(tests/integration/test_train_resume.py).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from raylm import cli
from raylm.cluster import ClusterInfo
from raylm.manifest import hash_path

ROOT = Path(__file__).resolve().parents[2]
RUN = "e2e-quickstart"
RUN_DIR = ROOT / "outputs" / "pipelines" / RUN


@pytest.fixture(scope="module")
def notebook_run(ray_cluster: ClusterInfo) -> dict:
    """Execute notebooks/quickstart.ipynb top to bottom (it runs the demo pipeline)."""
    import shutil

    import nbformat
    from nbclient import NotebookClient

    from raylm.models.tiny import build

    build(ROOT / "outputs" / "models" / "tiny")
    shutil.rmtree(RUN_DIR, ignore_errors=True)
    os.environ["RAYLM_QUICKSTART_NAME"] = RUN
    nb = nbformat.read(ROOT / "notebooks" / "quickstart.ipynb", as_version=4)
    NotebookClient(
        nb, timeout=1200, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}
    ).execute()
    return nb


def _outputs(nb: dict) -> str:
    texts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            texts.append(
                out.get("text", "") or json.dumps(out.get("data", {}).get("text/plain", ""))
            )
    return "\n".join(texts)


@pytest.mark.timeout(1500)
def test_notebook_runs_the_pipeline_end_to_end(notebook_run: dict) -> None:
    text = _outputs(notebook_run)
    assert "completion:" in text and "CompletionUsage" in text
    assert "removed: True" in text  # the notebook cleans up the app it deployed
    stages = {p.stem: json.loads(p.read_text()) for p in (RUN_DIR / "stages").glob("*.json")}
    assert set(stages) == {"data", "train", "eval", "serve"}


@pytest.mark.timeout(300)
def test_lineage_links_served_model_to_raw_inputs(notebook_run: dict) -> None:
    lineage = json.loads((RUN_DIR / "lineage.json").read_text())
    final = lineage["training"]["checkpoint"]
    assert lineage["served"]["status"] == "succeeded"
    assert final in lineage["served"]["inputs"] and final in lineage["evaluation"]["inputs"]
    assert lineage["evaluation"]["gate"]["passed"] is True
    assert lineage["training"]["inputs"][str(RUN_DIR / "data")].startswith("sha256:")
    assert lineage["training"]["outputs"]["data_manifest"] == str(
        RUN_DIR / "data" / "manifest.json"
    )
    raw = lineage["data"]["input_files"]
    assert raw, "the data manifest names no input files"
    for path, digest in raw.items():
        assert hash_path(path) == digest, f"{path} changed or was recorded wrongly"
    assert "curated" in cli_lineage()


def cli_lineage() -> str:
    from raylm.pipeline.lineage import describe

    return describe(RUN_DIR)


@pytest.mark.timeout(1200)
def test_rerun_with_a_gated_gptq_export_serves_the_quantized_model(
    notebook_run: dict, capfd: pytest.CaptureFixture[str]
) -> None:
    """The notebook's run again with export (merge, check, GPTQ 4-bit) and export_eval
    (non-inferior to the merged model) added, as conf/pipeline/quantized.yaml has them:
    data, train and eval are skipped, and serve deploys the quantized copy (bfloat16 on
    this CPU), which the `openai` client talks to; the lineage shows each link. On a CPU
    whose vLLM build lacks the int4 kernel (its AVX2 build), the serve stage must refuse
    the copy by that kernel's name before deploying (the engine would die on a request)."""
    import openai

    from raylm.export.llmc import cpu_kernel_present
    from raylm.serve import deploy

    app = "quickstart-gptq"
    servable = cpu_kernel_present("cpu_gemm_wna16")
    try:
        code = cli.main(
            ["pipeline", "conf/pipeline/demo.yaml", f"name={RUN}",
             "export.config=conf/export/gptq.yaml", "export_eval.config=conf/eval/quantized.yaml",
             f"serve.overrides=[auth.required=false,app_name={app},route_prefix=/{app},http.port=0]"]
        )  # fmt: skip
        quant = json.loads((RUN_DIR / "export" / "export_check.json").read_text())["quantize"]
        assert quant["hf_model_dir"] and quant["perplexity"] <= quant["merged_perplexity"] * 1.05
        quantized = str(RUN_DIR / "export" / "quantized")
        config = json.loads((RUN_DIR / "export" / "quantized" / "config.json").read_text())
        assert config["quantization_config"]["format"] == "pack-quantized"  # GPTQ int4
        if not servable:
            assert code != 0 and "lacks" in capfd.readouterr().out.split("cpu_gemm_wna16")[1]
            assert app not in deploy.status()["applications"]
            return
        assert code == 0
        summary = json.loads((RUN_DIR / "manifest.json").read_text())["metrics"]
        assert summary["stages"] == {"data": "skipped", "train": "skipped", "eval": "skipped",
                                     "export": "ran", "export_eval": "ran", "serve": "ran"}  # fmt: skip

        served = json.loads((RUN_DIR / "serve" / "manifest.json").read_text())
        assert quantized in served["inputs"]
        client = openai.OpenAI(base_url=served["outputs"]["url"], api_key="x", max_retries=0)
        reply = client.completions.create(
            model="tiny", prompt="The capital of France is", max_tokens=4, temperature=0
        )
        assert reply.usage.completion_tokens >= 1

        lineage = json.loads((RUN_DIR / "lineage.json").read_text())
        assert lineage["export_evaluation"]["gate"]["passed"] is True
        assert quantized in lineage["export_evaluation"]["inputs"]
        assert lineage["training"]["checkpoint"] in lineage["export"]["inputs"]
        text = cli_lineage()
        assert "exported:" in text and "export gate: passed" in text
    finally:
        deploy.down(app)


@pytest.mark.timeout(900)
def test_rerun_skips_done_stages_and_gate_blocks_deploy(notebook_run: dict) -> None:
    from raylm.serve import deploy

    code = cli.main(
        ["pipeline", "conf/pipeline/demo.yaml", f"name={RUN}",
         "serve.overrides=[auth.required=false,app_name=quickstart,http.port=0]",
         "eval.overrides=[gate.max_perplexity=1.0]"]
    )  # fmt: skip
    assert code == 3  # GATE_BLOCKED
    summary = json.loads((RUN_DIR / "manifest.json").read_text())["metrics"]
    assert summary["stages"] == {
        "data": "skipped",
        "train": "skipped",
        "eval": "ran",
        "serve": "blocked",
    }
    assert summary["gate"]["passed"] is False
    assert any("perplexity" in r for r in summary["gate"]["reasons"])
    assert "quickstart" not in deploy.status()["applications"]
