"""The conversation a prediction answers: `prompt` (and `system_prompt`), or `messages`, checked.

`messages` is a list of {"role": "system" | "user" | "assistant", "content": "..."}: at most one
system message and only first, then user and assistant in turn, ending with a user message (the one
the reply answers). Each mistake is reported with the message and the field it is in; nothing
malformed reaches the model.
"""

from __future__ import annotations

from notus.params import CONTEXT_LENGTH, MAX_PROMPT_BYTES, MAX_PROMPT_CHARS

Conversation = list[tuple[str, str]]  # (role, content), as notus/prompt.py renders it
MAX_MESSAGES = CONTEXT_LENGTH // 4  # each message renders to at least 4 tokens: more cannot fit


def conversation(prompt: str = "", system_prompt: str = "", messages: list | None = None) -> Conversation:
    """The (role, content) turns of a prediction's inputs, or a ValueError saying what is wrong."""
    if messages:
        given = [name for name, value in (("prompt", prompt), ("system_prompt", system_prompt)) if value]
        if given:
            raise ValueError(f"messages replaces prompt and system_prompt, which must then be empty; "
                             f"{' and '.join(given)} {'was' if len(given) == 1 else 'were'} given too")
        return checked(messages)
    if not prompt:
        alone = "; system_prompt alone is not a message" if system_prompt else ""
        raise ValueError(f"give prompt (your message) or messages (a conversation): both are empty{alone}")
    lengths = {name: (len(text), utf8_bytes(text))  # each text encoded once: up to 2 MB
               for name, text in (("prompt", prompt), ("system_prompt", system_prompt))}
    for name, (chars, size) in lengths.items():
        check_length(name, chars, size)
    check_length("prompt + system_prompt", *(sum(both) for both in zip(*lengths.values())))
    return [("system", system_prompt), ("user", prompt)]


def checked(messages: list) -> Conversation:
    """`messages` as (role, content) turns, or a ValueError naming the message and field at fault."""
    if not isinstance(messages, list):
        raise ValueError(f"messages must be a list of {{role, content}} objects, got {type(messages).__name__}")
    if len(messages) > MAX_MESSAGES:
        raise ValueError(f"messages holds {len(messages):,} messages; at most {MAX_MESSAGES:,} fit the "
                         f"{CONTEXT_LENGTH:,}-token context (each takes at least 4 tokens)")
    turns: Conversation = []
    expected, chars, size = "user", 0, 0  # the role the next user/assistant message must have; text so far
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise ValueError(f"{where} must be an object with role and content, got {_kind(message)}")
        unknown = sorted(set(message) - {"role", "content"})
        if unknown:
            raise ValueError(f"{where} has {', '.join(map(repr, unknown))}: a message holds only role and content")
        for field in ("role", "content"):
            if field not in message:
                raise ValueError(f"{where}.{field} is missing")
        role, content = message["role"], message["content"]
        if role not in ("system", "user", "assistant"):
            raise ValueError(f"{where}.role must be 'system', 'user' or 'assistant', got {role!r}")
        if not isinstance(content, str):
            raise ValueError(f"{where}.content must be a string, got {_kind(content)}")
        if role == "system":
            if turns:
                raise ValueError(f"{where} is a system message: only the first message can be one")
        elif role != expected:
            raise ValueError(f"{where}.role must be {expected!r} (user and assistant take turns, "
                             f"starting with user), got {role!r}")
        else:
            expected = "assistant" if role == "user" else "user"
        if role == "user" and not content:
            raise ValueError(f"{where}.content is empty: a user message needs text")
        chars, size = chars + len(content), size + utf8_bytes(content)
        check_length("messages", chars, size)
        turns.append((role, content))
    if not turns or turns[-1][0] != "user":
        last = f"messages[{len(turns) - 1}] is {turns[-1][0]!r}" if turns else "messages is empty"
        raise ValueError(f"messages must end with a user message, the one the reply answers: {last}")
    return turns


def check_length(name: str, chars: int, size: int) -> None:
    """Text longer than any that fits the context is refused before it is tokenized (notus/params.py)."""
    if chars > MAX_PROMPT_CHARS:
        raise ValueError(f"{name} holds {chars:,} characters; at most {MAX_PROMPT_CHARS:,} can fit the "
                         f"{CONTEXT_LENGTH:,}-token context")
    if size > MAX_PROMPT_BYTES:
        raise ValueError(f"{name} holds {size:,} bytes of UTF-8; at most {MAX_PROMPT_BYTES:,} can fit the "
                         f"{CONTEXT_LENGTH:,}-token context")


def utf8_bytes(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass"))  # a lone surrogate counts, rather than raising here


def _kind(value) -> str:
    return "null" if value is None else {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
                                         int: "a number", float: "a number"}.get(type(value), type(value).__name__)
