"""prompt_template, Replicate's input for a caller's own prompt format: filled in as Python's format
does, then read as the legacy tokenizer read text in training, its <s> and </s> the control tokens."""

from __future__ import annotations

import pytest

from notus.params import MAX_PROMPT_CHARS
from notus.prompt_template import fill
from test_prompt import BOS, EOS, HISTORY, PLAIN, UNK

ZEPHYR = "<|system|>\n{system_prompt}</s>\n<|user|>\n{prompt}</s>\n<|assistant|>\n"


@pytest.mark.parametrize("system_prompt,prompt", PLAIN)
def test_the_zephyr_template_written_as_a_prompt_template_gives_the_chat_templates_ids(engine, system_prompt, prompt):
    assert engine.prompt.formatted_ids(fill(ZEPHYR, prompt, system_prompt)) == engine.prompt.ids(system_prompt, prompt)


@pytest.mark.parametrize("turns", [0, 4])
def test_a_conversation_formatted_by_the_caller_and_sent_raw_gives_the_chat_templates_ids(engine, turns):
    """'{prompt}' with the text notus's template renders: the </s> the caller wrote end the turns."""
    conversation = [("system", "Be brief."), *HISTORY[:turns], ("user", "And now?")]
    text = engine.prompt.conversation_text(conversation)
    assert engine.prompt.formatted_ids(fill("{prompt}", text, "")) == engine.prompt.conversation_ids(conversation)


def test_control_tokens_split_the_text_as_the_legacy_tokenizer_does_with_one_bos(engine, sp):
    """As the legacy tokenizer reads "<s>[INST] ..." (split at its special tokens, each piece encoded
    on its own), but with one BOS, not two, wherever the <s> and </s> came from."""
    template = "<s>[INST] {system_prompt}\n{prompt} [/INST]"
    ids = engine.prompt.formatted_ids(fill(template, "Hi [/INST] Sure.</s><s>[INST] And again?", "Be brief."))
    assert ids == [BOS, *sp.encode("[INST] Be brief.\nHi [/INST] Sure."), EOS, BOS,
                   *sp.encode("[INST] And again? [/INST]")]


@pytest.mark.parametrize("template,text", [
    ("{prompt}", "Hello there"),  # the text as it is, one BOS first
    ("[INST] {prompt} [/INST]", "[INST] Hello there [/INST]"),  # a BOS even where the template has none
    ("{{\"q\": \"{prompt}\"}}", "{\"q\": \"Hello there\"}"),  # doubled braces are literal ones
    ("Q: {prompt}\nQ again: {prompt}\nA:", "Q: Hello there\nQ again: Hello there\nA:"),
])
def test_a_template_fills_its_fields_as_python_format_does(engine, sp, template, text):
    assert template.format(prompt="Hello there", system_prompt="") == text  # cog-vllm's formatting
    assert fill(template, "Hello there", "") == text
    assert engine.prompt.formatted_ids(text) == [BOS, *sp.encode(text)]


@pytest.mark.parametrize("text,pieces", [
    ("<s>", []), ("<s><s>Hi", [BOS, "Hi"]), ("\n<s>Hi", ["\n", BOS, "Hi"]), ("<s>\nHi</s><s>", ["\nHi", EOS, BOS]),
    ("a<unk>b </s>", ["a", UNK, "b ", EOS]),
])
def test_special_tokens_in_a_formatted_prompt_are_read_as_the_legacy_tokenizer_reads_them(engine, sp, text, pieces):
    """Split at <s>, </s> and <unk>, each piece encoded on its own; one BOS first, the text's own if it starts with one."""
    expected = [BOS] + [token for piece in pieces for token in ([piece] if isinstance(piece, int) else sp.encode(piece))]
    assert engine.prompt.formatted_ids(text) == expected


def test_a_template_without_fields_is_the_whole_prompt_when_no_prompt_is_given(engine, sp):
    assert engine.prompt.formatted_ids(fill("Tell me a joke.", "", "")) == [BOS, *sp.encode("Tell me a joke.")]


@pytest.mark.parametrize("template,prompt,system_prompt,messages,error", [
    ("{prompt", "Hi", "", None, "prompt_template has a '{' at character 1 that opens no field: its fields are "
     "{prompt} and {system_prompt}; write '{{' for a literal brace"),
    ("{prompt} }", "Hi", "", None, "prompt_template has a '}' at character 10 that closes no field"),
    ("{prompt:{system_prompt}}", "Hi", "", None, "has {prompt:{system_promp...: conversions (!r), format specs"),
    ("{}", "Hi", "", None, "prompt_template has {}: its fields are"),
    ("{user}: {prompt}", "Hi", "", None, "prompt_template has {user}: its fields are {prompt} and {system_prompt}"),
    ("{0} {prompt}", "Hi", "", None, "prompt_template has {0}: its fields are"),
    ("{" + "x" * 1000 + "}", "", "", None, "prompt_template has {" + "x" * 36 + "...: its fields are"),  # cut short
    ("{prompt!r}", "Hi", "", None, "prompt_template has {prompt!r}: conversions (!r), format specs (:>10) and "
     "attribute or index access are not supported; write {prompt}"),
    ("{system_prompt:>10} {prompt}", "Hi", "", None, "has {system_prompt:>10}: conversions"),
    ("{prompt.upper}", "Hi", "", None, "has {prompt.upper}: conversions"),
    ("{prompt[0]}", "Hi", "", None, "has {prompt[0]}: conversions"),
    ("[INST] hello [/INST]", "Hi", "", None, "prompt_template has no {prompt}, so the prompt given would not be used"),
    ("{{prompt}}", "Hi", "", None, "prompt_template has no {prompt}"),  # braces doubled: a literal "{prompt}"
    ("{prompt}", "Hi", "Be brief.", None,
     "prompt_template has no {system_prompt}, so the system_prompt given would not be used"),
    ("<s>[INST] {prompt} [/INST]", "", "", None, "prompt_template has {prompt} but prompt is empty: give prompt"),
    ("{system_prompt}", "", "", None, "prompt_template and the prompt it formats are empty"),
    ("{prompt}", "", "", [{"role": "user", "content": "Hi"}], "prompt_template formats prompt and system_prompt; "
     "messages is rendered with notus's chat template: send one or the other"),
])
def test_a_template_that_cannot_be_filled_is_refused_naming_why(template, prompt, system_prompt, messages, error):
    with pytest.raises(ValueError) as refused:
        fill(template, prompt, system_prompt, messages)
    assert error in str(refused.value)


def test_a_field_repeated_past_the_prompts_limit_is_refused_before_the_text_is_built():
    prompt = "x" * 1000
    times = MAX_PROMPT_CHARS // len(prompt) + 1
    with pytest.raises(ValueError) as refused:
        fill("{prompt}" * times, prompt, "")
    assert f"the prompt prompt_template makes holds {times * 1000:,} characters; at most {MAX_PROMPT_CHARS:,}" in str(refused.value)
    with pytest.raises(ValueError, match="bytes of UTF-8"):  # 4-byte characters: the byte limit
        fill("{prompt}" * 300, "\U0001f999" * 1500, "")
