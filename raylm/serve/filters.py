"""Optional input and output filters of a served model: a blocklist and a PII scrubber.

Both are the data job's own (``raylm.data.guide_filters.Blocklist``, an Aho-Corasick
automaton matching whole words, CJK phrases anywhere; ``raylm.data.pii.scrub``, typed
placeholders with Luhn and ID-checksum validation), so a phrase blocked from the training
corpus is matched the same way in a request.

- Input: a prompt holding a blocked phrase is refused with 400 ``content_filter``
  (checked after PII scrubbing, on every text the engine would see); with ``pii`` on, the
  prompt's e-mails, phones, IPs, card and ID numbers are replaced by placeholders before
  the engine sees them.
- Output (``output: true``): a choice whose text holds a blocked phrase is withheld: its
  text becomes "" and its ``finish_reason`` ``content_filter`` (OpenAI's own signal), the
  other choices and ``usage`` unchanged. The whole text must be seen to match a phrase
  split across chunks, so streaming is refused (400) while output filtering is on.
"""

from __future__ import annotations

from typing import Any

from raylm.serve.validation import ApiError


class ContentFilters:
    """The filters one replica applies; built once (the automaton is loaded per replica)."""

    def __init__(
        self, blocklist: list[str] | None = None, pii: bool = False, output: bool = True
    ) -> None:
        from raylm.data.config import PiiConfig
        from raylm.data.guide_filters import load_blocklist

        self.blocked = load_blocklist(tuple(blocklist)) if blocklist else None
        self.pii = PiiConfig() if pii else None
        self.output = output and self.blocked is not None

    @property
    def enabled(self) -> bool:
        return self.blocked is not None or self.pii is not None

    def scrub(self, text: str) -> str:
        if self.pii is None:
            return text
        from raylm.data.pii import scrub

        return scrub(text, self.pii)[0]

    def _text(self, text: str, param: str) -> str:
        text = self.scrub(text)
        if self.blocked is not None and self.blocked.hits(text, 0):
            raise ApiError(
                400,
                f"'{param}' holds a phrase this server does not accept (filters.blocklist)",
                param=param,
                code="content_filter",
            )
        return text

    def check_input(self, body: dict[str, Any], route: str) -> bool:
        """Scrub and check every prompt text of ``body`` in place; True if it changed."""
        before = repr(body)
        if route == "chat":
            for i, m in enumerate(body.get("messages") or []):
                self._content(m, f"messages[{i}].content")
        elif route == "completion":
            prompt = body.get("prompt")
            if isinstance(prompt, str):
                body["prompt"] = self._text(prompt, "prompt")
            elif isinstance(prompt, list):
                body["prompt"] = [
                    self._text(p, f"prompt[{i}]") if isinstance(p, str) else p
                    for i, p in enumerate(prompt)
                ]
        else:  # responses
            if isinstance(body.get("instructions"), str):
                body["instructions"] = self._text(body["instructions"], "instructions")
            value = body.get("input")
            if isinstance(value, str):
                body["input"] = self._text(value, "input")
            elif isinstance(value, list):
                for i, item in enumerate(value):
                    if isinstance(item, dict):
                        self._content(item, f"input[{i}].content")
        return repr(body) != before

    def _content(self, item: dict[str, Any], param: str) -> None:
        content = item.get("content")
        if isinstance(content, str):
            item["content"] = self._text(content, param)
        elif isinstance(content, list):
            for j, part in enumerate(content):
                if isinstance(part, dict) and isinstance(part.get("text"), str):
                    part["text"] = self._text(part["text"], f"{param}[{j}]")

    def refuse_stream(self, body: dict[str, Any]) -> None:
        """400 for ``stream: true`` while output filtering is on (see the module doc)."""
        if self.output and body.get("stream"):
            raise ApiError(
                400,
                "Streaming is not available on this server: its output filter "
                "(filters.output) must see a whole completion. Send stream=false.",
                param="stream",
                code="unsupported_parameter",
            )

    def check_output(self, response: dict[str, Any]) -> bool:
        """Withhold each blocked choice of a chat or completion response in place; True if
        any was."""
        if not self.output or self.blocked is None:
            return False
        withheld = False
        for choice in response.get("choices") or []:
            message = choice.get("message")
            if isinstance(message, dict) and isinstance(message.get("content"), str):
                if self.blocked.hits(message["content"], 0):
                    message["content"] = ""
                    choice["finish_reason"] = "content_filter"
                    withheld = True
            elif isinstance(choice.get("text"), str) and self.blocked.hits(choice["text"], 0):
                choice["text"] = ""
                choice["finish_reason"] = "content_filter"
                withheld = True
        return withheld

    def check_response_output(self, response: dict[str, Any]) -> bool:
        """The Responses API's counterpart: blocked ``output_text`` parts become ""."""
        if not self.output or self.blocked is None:
            return False
        withheld = False
        for item in response.get("output") or []:
            for part in item.get("content") or [] if isinstance(item, dict) else []:
                text = part.get("text") if isinstance(part, dict) else None
                if isinstance(text, str) and self.blocked.hits(text, 0):
                    part["text"] = ""
                    withheld = True
        if withheld:
            response["incomplete_details"] = {"reason": "content_filter"}
        return withheld
