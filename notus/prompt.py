"""Chat prompt -> token ids, exactly as notus-7b-v1 saw them in training.

Training rendered the zephyr chat template (from tokenizer_config.json) and tokenized the text with
the legacy Llama SentencePiece tokenizer, special tokens recognised, BOS added. In legacy mode the
text is split at each `</s>` and every segment is encoded on its own with a leading `▁`
(so `</s>\\n` becomes `2, 28705, 13`).

We reproduce that segment by segment, with one difference that matters for safety: only the
template's own `</s>` become the control token. Text inside a message that spells `</s>`, `<s>` or
`<unk>` stays plain text, so nobody can end their turn early or forge a system turn.
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path

from jinja2.sandbox import ImmutableSandboxedEnvironment
from sentencepiece import SentencePieceProcessor
from tokenizers import AddedToken, Tokenizer, decoders, normalizers
from tokenizers.models import BPE
from transformers.tokenization_utils_base import generate_merges

# Stand-ins for the message contents while the template renders: message i is `\x00notus-i\x00`,
# which holds no `</s>` and no character the template or a user could produce by accident.
_PLACEHOLDER = re.compile("\x00notus-([0-9]+)\x00")

def load_tokenizer(weights_dir: str | Path) -> tuple[Tokenizer, str]:
    """The legacy Llama tokenizer of notus, and its chat template (tokenizer_config.json's).

    Built from tokenizer.model (SentencePiece, what training used) when present, else read from
    tokenizer.json. transformers 5's own conversion loses the legacy behaviour (no `▁` after a
    special token, merges in another order, so `\n  x` tokenizes differently), so we build the
    BPE from the SentencePiece pieces and scores ourselves and set the legacy pipeline explicitly.
    """
    weights_dir = Path(weights_dir)
    config = json.loads((weights_dir / "tokenizer_config.json").read_text())
    if (weights_dir / "tokenizer.model").is_file():
        tokenizer = _from_sentencepiece(weights_dir / "tokenizer.model")
    else:
        tokenizer = Tokenizer.from_file(str(weights_dir / "tokenizer.json"))
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tokenizer.pre_tokenizer = None
    tokenizer.post_processor = None  # BOS is added by ChatPrompt, once
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    # Text never turns into control tokens: `</s>` typed by a user is just characters.
    tokenizer.encode_special_tokens = True
    if not config.get("chat_template"):
        raise ValueError(f"{weights_dir / 'tokenizer_config.json'} has no chat_template")
    return tokenizer, config["chat_template"]


def _from_sentencepiece(path: Path) -> Tokenizer:
    sp = SentencePieceProcessor(model_file=str(path))
    pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    vocab = {piece: i for i, piece in enumerate(pieces)}
    # SentencePiece BPE merges the pair whose result scores highest: order the merges that way.
    merges = generate_merges(vocab, {piece: sp.get_score(i) for i, piece in enumerate(pieces)})
    tokenizer = Tokenizer(BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tokenizer.add_special_tokens([AddedToken(sp.id_to_piece(i), special=True, normalized=False) for i in (0, 1, 2)])
    return tokenizer


@functools.lru_cache(maxsize=16)  # one frame per conversation length: a handful in practice
def render_frame(chat_template: str, roles: tuple[str, ...], eos_token: str = "</s>") -> str:
    """The template rendered as transformers renders it, for messages of these roles, each content a
    placeholder (message i: `\x00notus-i\x00`), ending with the generation prompt."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    messages = [{"role": role, "content": f"\x00notus-{i}\x00"} for i, role in enumerate(roles)]
    return env.from_string(chat_template).render(
        messages=messages, add_generation_prompt=True, eos_token=eos_token, bos_token="<s>"
    )


class ChatPrompt:
    """Builds the token ids of a conversation, ending at `<|assistant|>\n`."""

    def __init__(self, tokenizer: Tokenizer, chat_template: str, bos_token: str = "<s>", eos_token: str = "</s>",
                 unk_token: str = "<unk>"):
        self.tokenizer = tokenizer
        self.bos_id = tokenizer.token_to_id(bos_token)
        self.eos_id = tokenizer.token_to_id(eos_token)
        self._template, self._eos_token = chat_template, eos_token
        # The special tokens a caller's formatted prompt (formatted_ids) is split at, the split kept.
        self._bos_token = bos_token
        self._control_ids = {token: tokenizer.token_to_id(token) for token in (bos_token, eos_token, unk_token)}
        self._controls = re.compile("(" + "|".join(map(re.escape, self._control_ids)) + ")")

    def text(self, system_prompt: str, prompt: str) -> str:
        """The rendered prompt as text (for logs and debugging)."""
        return self.conversation_text([("system", system_prompt), ("user", prompt)])

    def ids(self, system_prompt: str, prompt: str) -> list[int]:
        """One system + user exchange (an empty system prompt is the empty system turn of training)."""
        return self.conversation_ids([("system", system_prompt), ("user", prompt)])

    def conversation_text(self, messages: list[tuple[str, str]]) -> str:
        contents = self._contents(messages)
        return self._eos_token.join(self._fill(s, contents) for s in self._segments(messages))

    def conversation_ids(self, messages: list[tuple[str, str]]) -> list[int]:
        """(role, content) pairs, checked by notus/messages.py: the system message first if any (else
        the empty system turn, as in training), then user and assistant in turn, ending with a user.

        The template's own EOS tokens split the rendered text into segments, each tokenized on its
        own, as the legacy tokenizer split the text in training; message text is only ever text.
        """
        contents = self._contents(messages)
        ids = [self.bos_id]
        for i, segment in enumerate(self._segments(messages)):
            if i:
                ids.append(self.eos_id)
            text = self._fill(segment, contents)
            if text:
                ids.extend(self._encode(text))
        return ids

    def formatted_ids(self, text: str) -> list[int]:
        """A prompt the caller formatted (a filled-in prompt_template), read as the legacy tokenizer read
        text in training: the special tokens `<s>`, `</s>` and `<unk>` split it into segments, each
        tokenized on its own. One BOS first: the text's own, where it starts with `<s>` (the legacy
        tokenizer would add a second)."""
        pieces = self._controls.split(text)  # text, control, text, ...: the controls kept
        if len(pieces) > 1 and not pieces[0] and pieces[1] == self._bos_token:
            pieces = pieces[2:]  # its own BOS is the one
        ids = [self.bos_id]
        for piece in pieces:
            if piece in self._control_ids:
                ids.append(self._control_ids[piece])
            elif piece:
                ids.extend(self._encode(piece))
        return ids

    def _encode(self, text: str) -> list[int]:
        # encode_batch lets go of the GIL while it works (encode holds it: 0.4 to 1.5 s for the longest
        # prompts, during which no other thread, the engine's included, runs a line of Python). One
        # text a call: several go to tokenizers' shared thread pool, where a short prompt waited
        # 0.37 s behind two long ones; a batch of one runs on the calling thread.
        return self.tokenizer.encode_batch([text], add_special_tokens=False)[0].ids

    def _segments(self, messages: list[tuple[str, str]]) -> list[str]:
        roles = tuple(role for role, _ in self._with_system(messages))
        return render_frame(self._template, roles, self._eos_token).split(self._eos_token)

    def _contents(self, messages: list[tuple[str, str]]) -> list[str]:
        return [content for _, content in self._with_system(messages)]

    @staticmethod
    def _with_system(messages: list[tuple[str, str]]) -> list[tuple[str, str]]:
        return list(messages) if messages and messages[0][0] == "system" else [("system", ""), *messages]

    @staticmethod
    def _fill(segment: str, contents: list[str]) -> str:
        # One pass, so a message that happens to contain a placeholder is not substituted twice.
        return _PLACEHOLDER.sub(lambda m: contents[int(m.group(1))], segment)
