"""Request checks and auth: every rejection names the field and what was expected."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from raylm.serve import lora
from raylm.serve.validation import (
    ApiError,
    check_auth,
    check_prompt,
    check_sampling,
    hash_key,
    parse_body,
)


def _err(fn, *args, **kwargs) -> ApiError:
    with pytest.raises(ApiError) as info:
        fn(*args, **kwargs)
    return info.value


def test_auth() -> None:
    keys = [hash_key("sk-a"), hash_key("sk-b")]
    check_auth("Bearer sk-b", keys)
    check_auth("bearer sk-a", keys)
    check_auth(None, [])  # no keys configured: open
    for header in (None, "", "Bearer ", "Basic sk-a", "sk-a"):
        err = _err(check_auth, header, keys)
        assert (err.status, err.code) == (401, "invalid_api_key")
        assert "Missing API key" in err.message
    wrong = _err(check_auth, "Bearer sk-c", keys)
    assert wrong.status == 401 and "Incorrect API key" in wrong.message
    assert "sk-c" not in json.dumps(wrong.body())


def test_body_parsing() -> None:
    assert parse_body(b'{"a": 1}', 100) == {"a": 1}
    assert _err(parse_body, b"{bad", 100).status == 400
    assert _err(parse_body, b"[1, 2]", 100).message.startswith("Request body must be a JSON object")
    big = _err(parse_body, b'{"a": "' + b"x" * 200 + b'"}', 100)
    assert big.status == 413 and "limits.max_request_bytes" in big.message


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("temperature", -0.1),
        ("temperature", 2.5),
        ("temperature", "hot"),
        ("top_p", 0),
        ("top_p", 1.2),
        ("top_k", -2),
        ("top_k", 1.5),
        ("presence_penalty", 3),
        ("frequency_penalty", -2.1),
        ("repetition_penalty", 0),
        ("n", 0),
        ("n", 9),
        ("max_tokens", 0),
        ("max_tokens", 513),
        ("max_tokens", True),
        ("max_completion_tokens", "10"),
        ("min_p", 1.5),
        ("stream", "yes"),
        ("stop", [1]),
    ],
)
def test_out_of_range_sampling_names_the_field(field: str, value: object) -> None:
    err = _err(check_sampling, {field: value}, max_model_len=512, max_n=8)
    assert err.status == 400 and err.param == field and field in err.message


def test_valid_sampling_passes() -> None:
    body = {
        "temperature": 0,
        "top_p": 1,
        "top_k": -1,
        "n": 8,
        "max_tokens": 512,
        "stop": ["\n"],
        "stream": True,
        "seed": 3,
        "presence_penalty": -2,
        "repetition_penalty": 1.1,
    }
    check_sampling(body, max_model_len=512, max_n=8)


def test_prompt_shapes() -> None:
    check_prompt({"prompt": "hi"}, chat=False)
    check_prompt({"prompt": ["a", "b"]}, chat=False)
    check_prompt({"prompt": [1, 2, 3]}, chat=False)
    check_prompt({"messages": [{"role": "user", "content": "x"}]}, chat=True)
    assert _err(check_prompt, {}, chat=False).param == "prompt"
    assert _err(check_prompt, {"prompt": ""}, chat=False).param == "prompt"
    assert _err(check_prompt, {"messages": []}, chat=True).param == "messages"
    assert _err(check_prompt, {"messages": [{"content": "x"}]}, chat=True).param == "messages[0]"


def test_adapter_lookup(tmp_path: Path) -> None:
    root = tmp_path / "adapters"
    for name in ("a1", "a2", ".hidden", "no-config"):
        (root / name).mkdir(parents=True)
    for name in ("a1", "a2", ".hidden"):
        (root / name / lora.ADAPTER_CONFIG).write_text("{}")
    extra = tmp_path / "final"
    extra.mkdir()
    (extra / lora.ADAPTER_CONFIG).write_text("{}")
    found = lora.list_adapters(str(root), {"sft": str(extra)})
    assert found == {"a1": str(root / "a1"), "a2": str(root / "a2"), "sft": str(extra)}
    assert lora.resolve_adapter("a2", str(root), {}) == str(root / "a2")
    assert lora.resolve_adapter("sft", None, {"sft": str(extra)}) == str(extra)
    for bad in ("no-config", "../adapters/a1", ".hidden", "missing", ""):
        assert lora.resolve_adapter(bad, str(root), {}) is None
    (root / "a3").mkdir()
    (root / "a3" / lora.ADAPTER_CONFIG).write_text("{}")  # added later: found on the next look
    assert "a3" in lora.list_adapters(str(root), {})


def test_adapters_in_a_bucket_are_listed_resolved_and_copied_once(
    s3_bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from raylm import storage

    monkeypatch.setenv(storage.CACHE_ENV, str(tmp_path / "home"))
    root = storage.join(s3_bucket, "lora-lookup")
    for name in ("a1", "a2", ".hidden"):
        storage.write_text(storage.join(root, name, lora.ADAPTER_CONFIG), '{"r": 8}')
    storage.write_text(storage.join(root, "no-config", "weights.bin"), "x")
    storage.write_text(storage.join(root, "a1", "nested", lora.ADAPTER_CONFIG), "{}")
    extra = storage.join(s3_bucket, "elsewhere", "final")
    storage.write_text(storage.join(extra, lora.ADAPTER_CONFIG), "{}")
    found = lora.list_adapters(root, {"sft": extra})
    assert found == {"a1": f"{root}/a1", "a2": f"{root}/a2", "sft": extra}
    assert lora.resolve_adapter("a2", root, {}) == f"{root}/a2"
    for bad in ("no-config", "../lora-lookup/a1", ".hidden", "missing"):
        assert lora.resolve_adapter(bad, root, {}) is None
    assert lora.list_adapters(storage.join(s3_bucket, "no-such-prefix"), {}) == {}
    local = Path(lora.local_adapter("a1", root, {}))
    assert (local / lora.ADAPTER_CONFIG).read_text() == '{"r": 8}'
    assert lora.local_adapter("a1", root, {}) == str(local)  # copied once
    assert lora.local_adapter("missing", root, {}) is None
