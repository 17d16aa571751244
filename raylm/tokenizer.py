"""The one tokenizer loader: the data job, the train driver and the train workers all
load through ``load_tokenizer``, so they agree on the chat template and EOS.

With ``template`` (a name from ``raylm.templates``) the tokenizer gets that template as
its ``chat_template`` and, where LLaMA-Factory replaces EOS (``replace_eos``), the
template's stop word as its EOS, as LLaMA-Factory's ``fix_special_tokens`` does. Unlike
LLaMA-Factory it never adds a token to the vocabulary (that would need the model's
embeddings resized): a template whose EOS word the tokenizer lacks is refused.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from raylm import templates
from raylm.config import ConfigError, local_model


def load_tokenizer(
    name_or_path: str, template: str | None = None, default_system: str | None = None, **kw: Any
) -> Any:
    """``AutoTokenizer`` for a model dir or hub id, with the named chat template applied
    (None keeps the tokenizer's own), ``default_system`` as its system prompt for
    conversations with none (``with_default_system``) and a pad token (EOS when it has
    none); ``kw`` goes to ``from_pretrained`` (``trust_remote_code``)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(local_model(name_or_path), **kw)
    if template is not None:
        apply_template(tok, template, where=name_or_path, default_system=default_system)
    elif default_system is not None and getattr(tok, "chat_template", None):
        tok.chat_template = with_default_system(tok.chat_template, default_system)
    if tok.pad_token_id is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return tok


def apply_template(
    tok: Any, name: str, where: str = "the tokenizer", default_system: str | None = None
) -> None:
    """Give ``tok`` the named template (and its EOS word, if the template replaces EOS);
    ``default_system`` replaces the template's default system prompt ('' clears it), as
    LLaMA-Factory's ``default_system`` overrides its template's."""
    tpl = templates.get(name)
    if default_system is not None:
        tpl = dataclasses.replace(tpl, default_system=default_system)
    word = tpl.eos_word
    if word is not None and tok.eos_token != word:
        if word not in tok.get_vocab():
            raise ConfigError(
                f"template={name!r} ends assistant turns with {word!r}, which {where}'s "
                "vocabulary lacks (LLaMA-Factory would add it and resize the embeddings; "
                "raylm does not): pick a template made for this model, e.g. one whose "
                "tokens the tokenizer has"
            )
        tok.add_special_tokens({"eos_token": word})
    tok.chat_template = tpl.jinja()


def with_default_system(chat_template: str, system: str) -> str:
    """A Jinja chat template whose conversations lacking a system turn (or with an empty
    one) start with ``system``: LLaMA-Factory's ``system or default_system`` ahead of a
    model's own template, which then renders it as any system turn (its own default, if
    any, is not used)."""
    lead = (
        "{%- if messages and not (messages[0]['role'] == 'system' and messages[0]['content']) -%}"
        "{%- set messages = [{'role': 'system', 'content': " + templates.lit(system) + "}] + "
        "(messages[1:] if messages[0]['role'] == 'system' else messages) -%}{%- endif -%}\n"
    )
    return lead + chat_template


def stop_token_ids(tok: Any, template: str | None) -> list[int]:
    """Token ids generation should stop at: EOS plus the template's stop words that are
    tokens of this vocabulary (LLaMA-Factory's ``get_stop_token_ids``)."""
    ids = [tok.eos_token_id] if tok.eos_token_id is not None else []
    vocab = tok.get_vocab()
    for word in templates.get(template).stop_words if template else ():
        if word in vocab and vocab[word] not in ids:
            ids.append(vocab[word])
    return ids


def stop_at_template(template: str | None, tok: Any, generation_config: Any) -> None:
    """With a named template, generation must stop at its EOS and stop words (which the
    base model's generation config may not know: qwen's <|im_end|> on a base Qwen), so
    engines reading ``generation_config.json`` (vLLM, transformers) stop where the model
    was trained to; the base's own EOS ids are kept too."""
    if not template:
        return
    ids = stop_token_ids(tok, template)
    old = generation_config.eos_token_id
    for i in old if isinstance(old, list) else [old]:
        if i is not None and i not in ids:
            ids.append(i)
    generation_config.eos_token_id = ids[0] if len(ids) == 1 else ids


def require_chat_template(tok: Any, stage: str, key: str) -> None:
    """sft / dpo / kto render conversations: a base tokenizer without a template cannot, so
    fail before any record is read, naming the config key that fixes it."""
    if stage in ("sft", "dpo", "kto") and not getattr(tok, "chat_template", None):
        raise ConfigError(
            f"stage {stage} renders conversations with a chat template, but the tokenizer "
            f"{getattr(tok, 'name_or_path', '')!r} has none (a base model?): set {key} to a "
            f"named template, e.g. {key}=chatml or {key}=default. "
            f"Named templates: {', '.join(sorted(templates.TEMPLATES))}"
        )
