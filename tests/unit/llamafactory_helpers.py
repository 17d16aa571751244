"""What the LLaMA-Factory tests share: the copied assets and YAML builders.
(The assets make relative paths resolve as in a LLaMA-Factory checkout.)
(Imported by name: pytest puts tests/unit on sys.path for its test modules; the
integration tier loads it by path. The ``workspace`` fixture is in tests/unit/conftest.py.)"""

from __future__ import annotations

import contextlib
import hashlib
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
import yaml

ASSETS = Path(__file__).resolve().parents[1] / "assets"
LF = ASSETS / "llamafactory"

# Example YAML (under examples/) -> None if it loads, else the keys it is refused for.
# (tests/unit/test_llamafactory.py loads each; tests/integration/test_llamafactory_train.py
# trains each that loads.) "serve" / "generate" / "export": an inference, do_predict or
# merge YAML, which loads as that job (tests/unit/test_llamafactory_infer.py,
# test_llamafactory_export.py) and which train refuses naming the job.
PARTITION: dict[str, tuple[str, ...] | str | None] = {
    "extras/adam_mini/qwen2_full_sft.yaml": None,
    "extras/apollo/llama3_full_sft.yaml": None,
    "extras/asft/llama2_full_asft.yaml": None,
    "extras/asft/qwen2_full_asft.yaml": None,
    "extras/badam/llama3_full_sft.yaml": None,
    "extras/dft/qwen2_full_sft.yaml": None,
    "extras/eaft/qwen25_05b_eaft_full.yaml": None,
    "extras/fp8/llama3_fp8_deepspeed_sft.yaml": ("fp8",),
    "extras/fp8/llama3_fp8_fsdp_sft.yaml": ("fp8", "fsdp", "fsdp_transformer_layer_cls_to_wrap"),
    "extras/fsdp_qlora/llama3_lora_sft.yaml": None,
    "extras/galore/llama3_full_sft.yaml": None,
    "extras/llama_pro/llama3_freeze_sft.yaml": None,
    "extras/loraplus/llama3_lora_sft.yaml": None,
    "extras/mod/llama3_full_sft.yaml": None,
    "extras/muon/qwen2_full_sft.yaml": None,
    "extras/nlg_eval/llama3_lora_predict.yaml": "generate",  # raylm generate FILE
    "extras/oft/llama3_oft_sft.yaml": None,
    "extras/pissa/llama3_lora_sft.yaml": None,
    # Plain OFT on pre-quantized hub checkpoints, as train_qlora's gptq/awq below; bnb_npu
    # quantizes the base with bitsandbytes (CUDA kernels, Ascend NPU builds) for OFT.
    "extras/qoft/llama3_oft_sft_awq.yaml": None,
    "extras/qoft/llama3_oft_sft_bnb_npu.yaml": ("quantization_bit",),
    "extras/qoft/llama3_oft_sft_gptq.yaml": None,
    "inference/qwen3.yaml": "serve",  # raylm serve FILE
    "inference/qwen3_full_sft.yaml": "serve",
    "inference/qwen3_lora_sft.yaml": "serve",
    "merge_lora/qwen3_full_sft.yaml": "export",  # raylm export FILE
    "merge_lora/qwen3_gptq.yaml": "export",  # quantize.method=gptq (llmcompressor)
    "merge_lora/qwen3_lora_sft.yaml": "export",
    "train_full/qwen3_full_sft.yaml": None,
    "train_lora/qwen3_lora_dpo.yaml": None,
    "train_lora/qwen3_lora_kto.yaml": None,
    "train_lora/qwen3_lora_pretrain.yaml": None,
    "train_lora/qwen3_lora_reward.yaml": None,
    "train_lora/qwen3_lora_sft.yaml": None,
    "train_lora/qwen3_lora_sft_ds3.yaml": None,
    "train_lora/qwen3_lora_sft_ray.yaml": None,  # REMOTE: through helpers.demo_hub
    "train_lora/qwen3_preprocess.yaml": None,
    # Pre-quantized hub checkpoints: the YAML is plain LoRA; a local checkpoint whose
    # config.json declares gptq/awq/aqlm is refused (test_prequantized_checkpoint_...).
    "train_qlora/llama3_lora_sft_aqlm.yaml": None,
    "train_qlora/llama3_lora_sft_awq.yaml": None,
    "train_qlora/llama3_lora_sft_gptq.yaml": None,
    "train_qlora/qwen3_lora_sft_bnb_npu.yaml": None,
    "train_qlora/qwen3_lora_sft_otfq.yaml": None,
}
QLORA = {
    "extras/fsdp_qlora/llama3_lora_sft.yaml",
    "train_qlora/qwen3_lora_sft_bnb_npu.yaml",
    "train_qlora/qwen3_lora_sft_otfq.yaml",
}


USER_DATA = {
    "extras/asft/llama2_full_asft.yaml": "alpaca_en_demo",  # names med, the user's own
    "extras/asft/qwen2_full_asft.yaml": "alpaca_en_demo",  # names math, the user's own
}
"""Examples that name datasets LLaMA-Factory's registry lacks (the user registers
them), and the demo dataset they are loaded with here instead."""


def example(rel: str, tmp_path: Path, model: Path | str, **extra: object) -> Path:
    """The example with the model replaced by ``model`` and output_dir by a tmp dir."""
    data = yaml.safe_load((LF / "examples" / rel).read_text())
    data["model_name_or_path"] = str(model)
    if rel in USER_DATA:  # a dataset LLaMA-Factory's dataset_info.json does not register
        data["dataset"] = USER_DATA[rel]
    if "output_dir" in data:
        data["output_dir"] = str(tmp_path / "saves" / "run")
    if "tokenized_path" in data:  # relative: it would be made in the assets
        data["tokenized_path"] = str(tmp_path / "saves" / "tokenized")
    path = tmp_path / Path(rel).name
    path.write_text(yaml.safe_dump(data | extra))
    return path


def lf(tmp_path: Path, **extra: object) -> Path:
    base: dict[str, object] = {"model_name_or_path": "/m", "stage": "sft", "dataset": "d"}
    path = tmp_path / "lf.yaml"
    path.write_text(yaml.safe_dump(base | extra))
    return path


TOOLS_TEMPLATE = (  # a Qwen2.5-style template that renders tools, tool calls and results
    "{%- if tools %}<|im_start|>system\n<tools>{% for t in tools %}\n{{ t | tojson }}"
    "{% endfor %}\n</tools><|im_end|>\n{% endif %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'assistant' and m.tool_calls is defined and m.tool_calls %}"
    "<|im_start|>assistant\n{{ m.content }}{% for c in m.tool_calls %}<tool_call>\n"
    "{{ {'name': c.function.name, 'arguments': c.function.arguments} | tojson }}\n"
    "</tool_call>{% endfor %}<|im_end|>\n"
    "{%- elif m.role == 'tool' %}<|im_start|>user\n<tool_response>\n{{ m.content }}\n"
    "</tool_response><|im_end|>\n"
    "{%- else %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{%- endif %}"
    "{%- endfor %}{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}"
)


class HubMirror:
    """A local stand-in for the Hugging Face Hub, for ``dataset_dir: REMOTE:...`` runs
    with no network: dataset repos (repo id -> a local dir, at one commit each) served
    over the part of the Hub's HTTP API that huggingface_hub's ``hf_hub_download`` and
    ``list_repo_tree`` speak (``HEAD/GET /datasets/<repo>/resolve/<rev>/<file>``, ``GET
    /api/datasets/<repo>/tree/<rev>``). Pointing HF_ENDPOINT at it is what a user with
    a Hub mirror does, so the code under test is the real download path, cache and all.
    ``requests`` records the paths asked for."""

    def __init__(self, repos: dict[str, Path]) -> None:
        self.repos = repos
        self.requests: list[str] = []
        self.commits = {repo: _commit_of(path) for repo, path in repos.items()}

    def __enter__(self) -> str:
        mirror = self

        class Handler(_HubHandler):
            hub = mirror

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def _commit_of(root: Path) -> str:
    digest = hashlib.sha1()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            digest.update(str(p.relative_to(root)).encode() + p.read_bytes())
    return digest.hexdigest()


class _HubHandler(BaseHTTPRequestHandler):
    hub: HubMirror

    def log_message(self, *args: object) -> None:  # quiet test output
        pass

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def do_GET(self) -> None:
        self._serve(body=True)

    def _fail(self, code: str) -> None:
        self.send_response(404)
        self.send_header("X-Error-Code", code)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _serve(self, body: bool) -> None:
        path = unquote(urlsplit(self.path).path).strip("/")
        self.hub.requests.append(path)
        api = path.startswith("api/datasets/")
        parts = path.removeprefix("api/").split("/")
        if len(parts) < 5 or parts[0] != "datasets" or parts[3] not in ("resolve", "tree"):
            return self._fail("RepoNotFound")
        repo, rev, rel = f"{parts[1]}/{parts[2]}", parts[4], "/".join(parts[5:])
        if repo not in self.hub.repos:
            return self._fail("RepoNotFound")
        root, commit = self.hub.repos[repo], self.hub.commits[repo]
        if rev not in ("main", commit):
            return self._fail("RevisionNotFound")
        if api and parts[3] == "tree":
            base = root / rel if rel else root
            files = sorted(p for p in base.rglob("*") if p.is_file())
            listing = [{"type": "file", "path": str(p.relative_to(root)), "size": p.stat().st_size,
                        "oid": hashlib.sha1(p.read_bytes()).hexdigest()} for p in files]  # fmt: skip
            return self._send(json.dumps(listing).encode(), commit, body, "application/json")
        file = root / rel
        if parts[3] != "resolve" or not file.is_file():
            return self._fail("EntryNotFound")
        return self._send(file.read_bytes(), commit, body, "application/octet-stream")

    def _send(self, data: bytes, commit: str, body: bool, kind: str) -> None:
        self.send_response(200)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("X-Repo-Commit", commit)
        self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
        self.end_headers()
        if body:
            self.wfile.write(data)


DEMO_REPO = "llamafactory/demo_data"
"""The Hub dataset repo of ``dataset_dir: REMOTE:llamafactory/demo_data``."""


@contextlib.contextmanager
def demo_hub(monkeypatch: pytest.MonkeyPatch, cache: Path) -> Iterator[HubMirror]:
    """LLaMA-Factory's demo data (its data/ dir: dataset_info.json and the files it
    names) served as the Hub dataset repo DEMO_REPO by a HubMirror, HF_ENDPOINT on it
    and an empty cache at ``cache``."""
    mirror = HubMirror({DEMO_REPO: LF / "data"})
    with mirror as endpoint:
        hub_env(monkeypatch, endpoint, cache)
        yield mirror


def hub_env(
    monkeypatch: pytest.MonkeyPatch, endpoint: str | None, cache: Path, offline: bool = False
) -> None:
    """huggingface_hub's settings for one test: the mirror (None: an endpoint nothing
    listens on), a private cache, and offline mode."""
    monkeypatch.setenv("HF_ENDPOINT", endpoint or "http://127.0.0.1:9")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1" if offline else "0")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
