"""`prompt_template`: the caller's own prompt format instead of notus's chat template, as Replicate's
language models take it (cog-vllm's input of that name): Python's format syntax with two fields,
`{prompt}` and `{system_prompt}`, and `{{` / `}}` for literal braces (no conversions, format specs or
attribute access). `{prompt}` alone sends the prompt as it is: a caller who formats the text themselves.

A template is checked whole before anything runs: a field it does not have, a lone brace, a
prompt (or system prompt) given that it would leave out, or `{prompt}` with no prompt fails the
prediction naming the problem, where cog-vllm would drop the text silently, answer an empty prompt
or fail with Python's own message. With a template the
caller writes the format, so the filled-in text is read as the legacy tokenizer reads a prompt:
`<s>`, `</s>` and `<unk>` are special tokens wherever they came from (ChatPrompt.formatted_ids).
"""

from __future__ import annotations

import re

from notus.messages import check_length, utf8_bytes

FIELDS = ("prompt", "system_prompt")
# A literal brace pair, a field, or a brace on its own.
_MARK = re.compile(r"\{\{|\}\}|\{([^{}]*)\}|[{}]")


def fill(template: str, prompt: str, system_prompt: str, messages: list | None = None) -> str:
    """The template with its fields filled in, or a ValueError saying what is wrong."""
    if messages:
        raise ValueError("prompt_template formats prompt and system_prompt; messages is rendered with notus's "
                         "chat template: send one or the other")
    values = {"prompt": prompt, "system_prompt": system_prompt}
    parts: list[str] = []
    used: set[str] = set()
    start = 0
    for mark in _MARK.finditer(template):
        parts.append(template[start : mark.start()])
        start = mark.end()
        text, name = mark.group(), mark.group(1)
        if text in ("{{", "}}"):
            parts.append(text[0])
        elif name in values:
            parts.append(values[name])
            used.add(name)
        else:
            raise ValueError(_not_a_field(template, mark))
    parts.append(template[start:])
    for name in FIELDS:
        if values[name] and name not in used:
            raise ValueError(f"prompt_template has no {{{name}}}, so the {name} given would not be used: put "
                             f"{{{name}}} where it goes (or send the whole text as prompt with prompt_template "
                             "'{prompt}')")
    if "prompt" in used and not prompt:  # as without a template: a reply needs a message to answer
        raise ValueError("prompt_template has {prompt} but prompt is empty: give prompt (a template without "
                         "{prompt} is the whole prompt itself)")
    # A field may appear many times: the text is counted before it is built (a count cannot take long).
    name = "the prompt prompt_template makes"
    check_length(name, sum(map(len, parts)), 0)
    filled = "".join(parts)
    if not filled:
        raise ValueError("prompt_template and the prompt it formats are empty: there is nothing to answer")
    check_length(name, 0, utf8_bytes(filled))
    return filled


def _not_a_field(template: str, mark: re.Match) -> str:
    """What is wrong with a brace that is not one of the template's fields."""
    text, name = mark.group(), mark.group(1)
    shown = text if len(text) <= 40 else text[:37] + "..."  # a whole template may sit between two braces
    if text == "{":  # a field with a nested spec ({prompt:{system_prompt}}), or a brace that opens nothing
        name, shown = template[mark.end() :], "{" + template[mark.end() :][:20] + "..."
    spec = re.match(r"(prompt|system_prompt)[!:.\[]", name or "")
    if spec:  # {prompt!r}, {prompt:>10}, {prompt.upper}, {prompt[0]}: what Python's format does besides fields
        return (f"prompt_template has {shown}: conversions (!r), format specs (:>10) and attribute or index "
                f"access are not supported; write {{{spec.group(1)}}}")
    if text in ("{", "}"):
        return (f"prompt_template has a {text!r} at character {mark.start() + 1} that "
                f"{'opens' if text == '{' else 'closes'} no field: its fields are {{prompt}} and {{system_prompt}}; "
                f"write {text * 2!r} for a literal brace")
    return f"prompt_template has {shown}: its fields are {{prompt}} and {{system_prompt}}; write {{{{ and }}}} for a literal brace"
