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
    """The output text so far, cut before the first stop string. `push(delta)` -> (text to send now, stopped).

    Text handed out never begins a stop string (a tail that may still become one is held back), so only the text not
    handed out yet is searched: the held tail (shorter than the longest stop string) plus the new delta. A token
    costs O(stops x (longest stop + delta)), whatever the length of the output so far."""

    def __init__(self, stops=()):
        self.stops = [s for s in stops if s]
        self.parts: list[str] = []  # the text handed out, piece by piece
        self.pending = ""           # decoded and not handed out: a tail that may still begin a stop string
        self.stopped = False
        self.matched: str | None = None  # the stop string found

    @property
    def text(self) -> str:
        """Everything decoded so far (cut before the stop string once one is found)."""
        return "".join(self.parts) + self.pending

    def _held(self, text: str) -> int:
        """Length of the longest tail of `text` that begins some stop string (it may still become one)."""
        best = 0
        for s in self.stops:
            tail = text[max(0, len(text) - len(s) + 1):] if len(s) > 1 else ""
            i = tail.find(s[0])  # leftmost first: the longest candidate
            while 0 <= i and len(tail) - i > best:
                if s.startswith(tail[i:]):
                    best = len(tail) - i
                    break
                i = tail.find(s[0], i + 1)
        return best

    def push(self, delta: str) -> tuple[str, bool]:
        if self.stopped or not delta:
            return "", self.stopped
        text = self.pending + delta
        hits = [(i, s) for s in self.stops if (i := text.find(s)) >= 0]
        if hits:
            end, self.matched = min(hits, key=lambda hit: hit[0])
            out, self.pending, self.stopped = text[:end], "", True
        else:
            end = len(text) - self._held(text)
            out, self.pending = text[:end], text[end:]
        if out:
            self.parts.append(out)
        return out, self.stopped

    def flush(self) -> str:
        """At the end: the held-back tail (it never became a stop string)."""
        out, self.pending = self.pending, ""
        if out:
            self.parts.append(out)
        return out
