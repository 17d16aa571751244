"""The serve and generate jobs: a long-lived OpenAI app, and offline batch inference.

Serve writes ``serve_config.yaml`` (deployable with ``serve deploy``), deploys it through
the Serve REST API so the app outlives this process, waits until it is RUNNING and
records the endpoint. Generate runs ``ray.data.llm`` over a dataset and writes
``predictions/`` (and ``quarantine/`` for rows the engine failed on).
"""

from __future__ import annotations

import dataclasses
import json
import logging

from raylm import storage
from raylm.config import ConfigError, resolve_path
from raylm.job import Job, Result
from raylm.outputs import ServiceOutput
from raylm.serve.config import ServeJobConfig
from raylm.serve.config_generate import GenerateJobConfig

log = logging.getLogger(__name__)


def with_adapters_template(cfg: ServeJobConfig) -> ServeJobConfig:
    """Serve named adapters with the chat template they were trained with (``lora``'s
    ``adapters_chat_template``) unless ``engine.extra.chat_template`` says otherwise."""
    from raylm.serve.lora import adapters_chat_template

    if not cfg.lora.adapters or "chat_template" in cfg.engine.extra:
        return cfg
    template = adapters_chat_template(cfg.model.path, cfg.lora.adapters)
    if template is None:
        return cfg
    log.info(
        "serving with the chat template lora.adapters %s were trained with",
        sorted(cfg.lora.adapters),
    )
    extra = {**cfg.engine.extra, "chat_template": template}
    return dataclasses.replace(cfg, engine=dataclasses.replace(cfg.engine, extra=extra))


class ServeJob(Job[ServeJobConfig]):
    name = "serve"
    config = ServeJobConfig
    uses_ray = False  # it talks to the Serve REST API; the app runs in the cluster
    remote_outputs = True  # serve_config.yaml and the manifest go through raylm.storage

    def setup(self, cfg: ServeJobConfig) -> ServeJobConfig:
        """Relative paths mean the workspace (URIs stay); the model dir and named adapters
        must exist now, locally or in a bucket, before anything is written or deployed."""
        from raylm.serve.app import check_model_dir, lora_locations
        from raylm.serve.versions import version_model

        adapters = {name: resolve_path(p) for name, p in cfg.lora.adapters.items()}
        adapters_dir = resolve_path(cfg.lora.adapters_dir) if cfg.lora.adapters_dir else None
        lora = dataclasses.replace(cfg.lora, adapters=adapters, adapters_dir=adapters_dir)
        model = dataclasses.replace(cfg.model, path=resolve_path(cfg.model.path))
        versions = {n: version_model(n, p) for n, p in cfg.versions.items()}
        cfg = dataclasses.replace(cfg, model=model, lora=lora, versions=versions)
        for path in [cfg.model.path, *versions.values()]:
            check_model_dir(path)
            if not cfg.resources.use_gpu:  # CPU vLLM runs some quantized formats in bf16 only
                from raylm.export.llmc import cpu_serving_refusal

                refusal = cpu_serving_refusal(path, cfg.engine.dtype)
                if refusal:
                    raise ConfigError(refusal)
        lora_locations(cfg)
        return with_adapters_template(cfg)

    def inputs(self, cfg: ServeJobConfig) -> list[str]:
        return [cfg.model.path, *cfg.versions.values(), *cfg.lora.adapters.values()]

    def recorded(self, cfg: ServeJobConfig) -> ServeJobConfig:
        """API keys replaced, so no file holds a secret."""
        hidden = ["<redacted>"] * len(cfg.auth.api_keys)
        return dataclasses.replace(cfg, auth=dataclasses.replace(cfg.auth, api_keys=hidden))

    def run(self, cfg: ServeJobConfig, out_dir: str) -> Result:
        import yaml

        from raylm.serve.app import api_key_hashes, serve_config, without_credentials
        from raylm.serve.deploy import choose_port, deploy, wait_running
        from raylm.serve.versions import weights_of

        port = choose_port(cfg.http.port, cfg.dashboard_address)
        config = serve_config(cfg, api_key_hashes(cfg), port)
        config_path = storage.join(out_dir, "serve_config.yaml")
        written = without_credentials(config)
        storage.write_text(config_path, yaml.safe_dump(written, sort_keys=False))
        deploy(config, cfg.dashboard_address)
        url = f"http://{cfg.http.host}:{port}{cfg.route_prefix.rstrip('/')}/v1"
        print(f"serve: deployed app {cfg.app_name!r} ({config_path}); waiting for it to be RUNNING")
        state = {}
        if cfg.wait_ready_s:
            state = wait_running(cfg.app_name, cfg.wait_ready_s, cfg.dashboard_address)
        status = state.get("status", "DEPLOYING")
        print(f"serve: {cfg.app_name} {status} at {url}")
        service = ServiceOutput(url, cfg.app_name, cfg.model.path, dict(cfg.lora.adapters))
        if cfg.versions:
            service.versions = {cfg.model.version: cfg.model.path, **cfg.versions}
            service.traffic = weights_of(cfg.model.version, cfg.versions, cfg.traffic)
        return Result(
            {"serve_config": config_path, "url": url},
            {"status": status, "port": port},
            service,
        )


class GenerateJob(Job[GenerateJobConfig]):
    name = "generate"
    config = GenerateJobConfig
    remote_outputs = True  # predictions/, quarantine/ and the manifest go through raylm.storage

    def setup(self, cfg: GenerateJobConfig) -> GenerateJobConfig:
        """Relative paths mean the workspace (URIs stay); every input must exist now,
        locally or in a bucket, so a wrong path fails before Ray or vLLM start."""
        from raylm.serve.batch import check_inputs

        lora_path = resolve_path(cfg.lora_path) if cfg.lora_path else None
        inp = dataclasses.replace(cfg.input, path=resolve_path(cfg.input.path))
        cfg = dataclasses.replace(
            cfg, model=resolve_path(cfg.model), lora_path=lora_path, input=inp
        )
        check_inputs(cfg)
        if cfg.input.datasets:  # names missing from the registry fail here, not in Ray
            from raylm.data.sources import registry_sources
            from raylm.serve.predict import registry

            registry_sources(registry(cfg), list(cfg.input.datasets))
        elif cfg.input.template:
            raise ConfigError(
                "input.template renders input.datasets' conversations; prompts from a "
                "file use the tokenizer's own template (input.chat=true)"
            )
        return cfg

    def inputs(self, cfg: GenerateJobConfig) -> list[str]:
        paths = [cfg.model, cfg.input.path, cfg.lora_path]
        return [resolve_path(p) for p in paths if p]

    def run(self, cfg: GenerateJobConfig, out_dir: str) -> Result:
        import time

        from raylm.serve.batch import run_generate
        from raylm.serve.predict import PREDICTIONS, RESULTS, prepare, write_results

        started, labels = time.time(), None
        if cfg.input.datasets:  # LLaMA-Factory's do_predict
            cfg, labels = prepare(cfg, out_dir)
        stats = run_generate(cfg, out_dir)
        predictions = storage.join(out_dir, "predictions")
        print(
            f"generate: {stats['rows_out']}/{stats['rows_in']} rows completed "
            f"({stats['rows_failed']} failed -> quarantine/), "
            f"{stats['completion_tokens']} tokens generated: {predictions}"
        )
        outputs = {"predictions": predictions}
        if stats["rows_failed"]:
            outputs["quarantine"] = storage.join(out_dir, "quarantine")
        if labels is not None:
            stats |= write_results(out_dir, labels, started)
            outputs |= {"predictions_jsonl": storage.join(out_dir, PREDICTIONS),
                        "predict_results": storage.join(out_dir, RESULTS)}  # fmt: skip
            print(f"generate: {json.dumps({k: v for k, v in stats.items() if 'predict_' in k})}")
        return Result(outputs, stats, exit_code=0 if stats["rows_failed"] == 0 else 1)
