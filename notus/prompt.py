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

import json
import re
from pathlib import Path

from jinja2.sandbox import ImmutableSandboxedEnvironment
from sentencepiece import SentencePieceProcessor
from tokenizers import AddedToken, Tokenizer, decoders, normalizers
from tokenizers.models import BPE
from transformers.tokenization_utils_base import generate_merges

# Stand-ins for the message contents while the template renders; they hold no `</s>` and no
# character the template or a user could produce by accident.
_SYSTEM = "\x00notus-system\x00"
_USER = "\x00notus-user\x00"
_PLACEHOLDER = re.compile(f"{re.escape(_SYSTEM)}|{re.escape(_USER)}")


def load_tokenizer(weights_dir: str | Path) -> tuple[Tokenizer, str]:
    """The legacy Llama tokenizer of notus, and its chat template rendered with placeholders.

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
    return tokenizer, render_frame(config["chat_template"], config.get("eos_token", "</s>"))


def _from_sentencepiece(path: Path) -> Tokenizer:
    sp = SentencePieceProcessor(model_file=str(path))
    pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    vocab = {piece: i for i, piece in enumerate(pieces)}
    # SentencePiece BPE merges the pair whose result scores highest: order the merges that way.
    merges = generate_merges(vocab, {piece: sp.get_score(i) for i, piece in enumerate(pieces)})
    tokenizer = Tokenizer(BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tokenizer.add_special_tokens([AddedToken(sp.id_to_piece(i), special=True, normalized=False) for i in (0, 1, 2)])
    return tokenizer


def render_frame(chat_template: str, eos_token: str = "</s>") -> str:
    """The template rendered once, as transformers renders it, with placeholder contents.

    The system turn is always there (empty when the user gives none), as in training.
    """
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    messages = [{"role": "system", "content": _SYSTEM}, {"role": "user", "content": _USER}]
    return env.from_string(chat_template).render(
        messages=messages, add_generation_prompt=True, eos_token=eos_token, bos_token="<s>"
    )


class ChatPrompt:
    """Builds the token ids of one system + user exchange, ending at `<|assistant|>\\n`."""

    def __init__(self, tokenizer: Tokenizer, frame: str, bos_token: str = "<s>", eos_token: str = "</s>"):
        self.tokenizer = tokenizer
        self.bos_id = tokenizer.token_to_id(bos_token)
        self.eos_id = tokenizer.token_to_id(eos_token)
        # The template's own EOS tokens split the frame into segments, as the legacy tokenizer
        # split the rendered text in training.
        self._segments = frame.split(eos_token)

    def text(self, system_prompt: str, prompt: str) -> str:
        """The rendered prompt as text (for logs and debugging)."""
        return "</s>".join(self._fill(s, system_prompt, prompt) for s in self._segments)

    def ids(self, system_prompt: str, prompt: str) -> list[int]:
        ids = [self.bos_id]
        for i, segment in enumerate(self._segments):
            if i:
                ids.append(self.eos_id)
            text = self._fill(segment, system_prompt, prompt)
            if text:
                ids.extend(self.tokenizer.encode(text, add_special_tokens=False).ids)
        return ids

    @staticmethod
    def _fill(segment: str, system_prompt: str, prompt: str) -> str:
        # One pass, so a message that happens to contain a placeholder is not substituted twice.
        return _PLACEHOLDER.sub(lambda m: system_prompt if m.group() == _SYSTEM else prompt, segment)
