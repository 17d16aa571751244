"""``raylm chat``: LLaMA-Factory's ``llamafactory-cli chat`` against a served model.

An interactive loop on the terminal that sends the whole conversation to the app's OpenAI
endpoint (``raylm serve``) with the ``openai`` client and streams the reply; the history
lives here, in the client. As in LLaMA-Factory, ``clear`` forgets the history and
``exit`` quits.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any

Complete = Callable[[list[dict[str, str]]], Iterable[str]]
"""Sends the messages, yields the reply in pieces."""


def chat_loop(
    complete: Complete,
    read: Callable[[str], str] = input,
    write: Callable[[str], None] = lambda s: print(s, end="", flush=True),
    system: str | None = None,
) -> list[dict[str, str]]:
    """Read a turn, stream the reply, keep both; returns the history at ``exit``/EOF."""
    start = [{"role": "system", "content": system}] if system else []
    history = list(start)
    write("raylm chat: 'clear' forgets the history, 'exit' quits\n")
    while True:
        try:
            query = read("\nUser: ")
        except (EOFError, KeyboardInterrupt):
            write("\n")
            return history
        if query.strip() == "exit":
            return history
        if query.strip() == "clear":
            history = list(start)
            write("History has been removed.\n")
            continue
        history.append({"role": "user", "content": query})
        write("Assistant: ")
        reply = ""
        for piece in complete(history):
            write(piece)
            reply += piece
        write("\n")
        history.append({"role": "assistant", "content": reply})


def openai_complete(
    url: str, model: str | None, api_key: str | None, sampling: dict[str, Any]
) -> Complete:
    """Streaming chat completions from the app at ``url`` (``.../v1``); ``model`` None:
    the first model the app lists."""
    from openai import OpenAI

    client = OpenAI(base_url=url, api_key=api_key or "none")
    name = model or client.models.list().data[0].id

    def complete(messages: list[dict[str, str]]) -> Iterator[str]:
        stream = client.chat.completions.create(
            model=name,
            messages=messages,  # type: ignore[arg-type]
            stream=True,
            **sampling,
        )
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                yield chunk.choices[0].delta.content

    return complete


def main(url: str, model: str | None, api_key_env: str, system: str | None,
         sampling: dict[str, Any]) -> int:  # fmt: skip
    key = (os.environ.get(api_key_env) or "").split(",")[0].strip() or None
    chat_loop(openai_complete(url, model, key, sampling), system=system)
    return 0
