"""Token ids to text while they stream: never half a character, never past a stop string.

`IncrementalDetokenizer` decodes the generated ids (behind a few prompt ids, so that a sentencepiece word's leading
space survives, as in vLLM) and hands out only new text that does not end with U+FFFD: a character split over
several byte tokens (an emoji under byte-level BPE or byte fallback) waits until it is whole. `flush()` at the end
hands out whatever is left. `StopText` cuts the text before the first stop string and holds back a tail that could
still become one.
"""
from __future__ import annotations

REPLACEMENT = "\ufffd"
CONTEXT_IDS = 6  # prompt ids decoded in front of the output: they decide its leading space, and are not output


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_ids=(), skip_special_tokens: bool = True):
        self.tok, self.skip = tokenizer, skip_special_tokens
        self.ids: list[int] = list(prompt_ids)[-CONTEXT_IDS:]
        self.prefix_offset = 0            # ids[prefix_offset:read_offset] decode to text already handed out
        self.read_offset = len(self.ids)  # (the prompt context, or the last piece handed out)
        self.generated = 0

    def _decode(self, ids) -> str:
        return self.tok.decode(ids, skip_special_tokens=self.skip, clean_up_tokenization_spaces=False)

    def _delta(self, final: bool) -> str:
        prefix_text = self._decode(self.ids[self.prefix_offset:self.read_offset])
        new_text = self._decode(self.ids[self.prefix_offset:])
        if len(new_text) <= len(prefix_text) or (not final and new_text.endswith(REPLACEMENT)):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return new_text[len(prefix_text):]

    def add(self, token_id: int) -> str:
        """Append one generated id; the text that is now complete (often '')."""
        self.ids.append(int(token_id))
        self.generated += 1
        return self._delta(final=False)

    def flush(self) -> str:
        """At the end: the text still held back (an incomplete character shows as U+FFFD)."""
        return self._delta(final=True) if self.read_offset < len(self.ids) else ""


class StopText:
    """The output text so far, cut before the first stop string. `push(delta)` -> (text to send now, stopped)."""

    def __init__(self, stops=()):
        self.stops = [s for s in stops if s]
        self.text = ""  # everything decoded so far (cut at a stop string once one is found)
        self.sent = 0   # characters of self.text already handed out
        self.stopped = False

    def _held(self) -> int:
        """Length of the longest tail of self.text that begins some stop string (it may still become one)."""
        best = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.text)), best, -1):
                if self.text.endswith(s[:k]):
                    best = k
                    break
        return best

    def push(self, delta: str) -> tuple[str, bool]:
        if self.stopped or not delta:
            return "", self.stopped
        start = max(0, len(self.text) - max((len(s) for s in self.stops), default=0) + 1)
        self.text += delta
        hits = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
        if hits:
            self.text, self.stopped = self.text[:min(hits)], True
            end = len(self.text)
        else:
            end = len(self.text) - self._held()
        out = self.text[self.sent:end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return out, self.stopped

    def flush(self) -> str:
        """At the end: the held-back tail (it never became a stop string)."""
        out = self.text[self.sent:]
        self.sent = len(self.text)
        return out
