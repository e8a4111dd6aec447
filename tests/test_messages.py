"""The conversation a prediction answers (notus/messages.py): prompt or messages, every mistake named."""

from __future__ import annotations

import pytest

from notus.messages import conversation
from notus.params import MAX_PROMPT_CHARS


def test_prompt_and_system_prompt_are_one_exchange():
    assert conversation("Hi") == [("system", ""), ("user", "Hi")]
    assert conversation("Hi", "Be brief.") == [("system", "Be brief."), ("user", "Hi")]


def test_messages_are_the_conversation_as_given():
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": ""}, {"role": "user", "content": "Again?"}]
    assert conversation(messages=messages) == [(m["role"], m["content"]) for m in messages]
    assert conversation(messages=messages[1:]) == [(m["role"], m["content"]) for m in messages[1:]]


@pytest.mark.parametrize(
    "inputs,error",
    [
        ({}, "give prompt (your message) or messages (a conversation): both are empty"),
        ({"system_prompt": "Be brief."}, "give prompt (your message) or messages (a conversation): both are empty; "
                                         "system_prompt alone is not a message"),
        ({"prompt": "Hi", "messages": [{"role": "user", "content": "Hi"}]},
         "messages replaces prompt and system_prompt, which must then be empty; prompt was given too"),
        ({"system_prompt": "S", "messages": [{"role": "user", "content": "Hi"}]},
         "messages replaces prompt and system_prompt, which must then be empty; system_prompt was given too"),
        ({"prompt": "Hi", "system_prompt": "S", "messages": [{"role": "user", "content": "Hi"}]},
         "messages replaces prompt and system_prompt, which must then be empty; prompt and system_prompt were given too"),
        ({"prompt": "x" * (MAX_PROMPT_CHARS + 1)}, "prompt holds 524,289 characters; at most 524,288 can fit"),
        # Within the characters, more bytes than tokens that fit the context can hold (refused untokenized).
        ({"prompt": "\N{GRINNING FACE}" * 400_000},
         "prompt holds 1,600,000 bytes of UTF-8; at most 1,572,864 can fit the 32,768-token context"),
        ({"prompt": "x" * 300_000, "system_prompt": "y" * 300_000},
         "prompt + system_prompt holds 600,000 characters; at most 524,288 can fit"),
    ],
)
def test_prompt_or_messages_not_both_nor_neither(inputs, error):
    with pytest.raises(ValueError) as raised:
        conversation(**inputs)
    assert str(raised.value).startswith(error)


USER = {"role": "user", "content": "Hi"}
ASSISTANT = {"role": "assistant", "content": "Hello!"}


@pytest.mark.parametrize(
    "messages,error",
    [
        ("[{\"role\": \"user\"}]", "messages must be a list of {role, content} objects, got str"),
        ([USER, "Hello"], "messages[1] must be an object with role and content, got a string"),
        ([None], "messages[0] must be an object with role and content, got null"),
        ([{"content": "Hi"}], "messages[0].role is missing"),
        ([{"role": "user"}], "messages[0].content is missing"),
        ([{"role": "User", "content": "Hi"}], "messages[0].role must be 'system', 'user' or 'assistant', got 'User'"),
        ([{"role": "tool", "content": "x"}], "messages[0].role must be 'system', 'user' or 'assistant', got 'tool'"),
        ([{"role": "user", "content": ["Hi"]}], "messages[0].content must be a string, got a list"),
        ([{"role": "user", "content": None}], "messages[0].content must be a string, got null"),
        ([{"role": "user", "content": "Hi", "name": "bob"}], "messages[0] has 'name': a message holds only role and content"),
        ([{"role": "user", "content": ""}], "messages[0].content is empty: a user message needs text"),
        ([ASSISTANT, USER], "messages[0].role must be 'user' (user and assistant take turns, starting with user), got 'assistant'"),
        ([USER, USER], "messages[1].role must be 'assistant' (user and assistant take turns, starting with user), got 'user'"),
        ([USER, ASSISTANT, ASSISTANT], "messages[2].role must be 'user' (user and assistant take turns, starting with user), got 'assistant'"),
        ([USER, {"role": "system", "content": "late"}], "messages[1] is a system message: only the first message can be one"),
        ([{"role": "system", "content": "a"}, {"role": "system", "content": "b"}, USER],
         "messages[1] is a system message: only the first message can be one"),
        ([USER, ASSISTANT], "messages must end with a user message, the one the reply answers: messages[1] is 'assistant'"),
        ([{"role": "system", "content": "Be brief."}],
         "messages must end with a user message, the one the reply answers: messages[0] is 'system'"),
        ([{"role": "user", "content": "x" * (MAX_PROMPT_CHARS // 2 + 1)}, ASSISTANT,
          {"role": "user", "content": "x" * (MAX_PROMPT_CHARS // 2)}], "messages holds 524,295 characters; at most 524,288"),
        ([{"role": "user", "content": "\N{GRINNING FACE}" * 200_000}, ASSISTANT,
          {"role": "user", "content": "\N{GRINNING FACE}" * 200_000}], "messages holds 1,600,006 bytes of UTF-8; at most 1,572,864"),
        ([USER, ASSISTANT] * 4097, "messages holds 8,194 messages; at most 8,192 fit the 32,768-token context"),
    ],
)
def test_a_malformed_conversation_is_refused_saying_what_and_where(messages, error):
    with pytest.raises(ValueError) as raised:
        conversation(messages=messages)
    assert str(raised.value).startswith(error), str(raised.value)


def test_the_longest_conversation_that_can_fit_is_checked_in_one_pass():
    messages = [USER, ASSISTANT] * 4095 + [USER]  # 8,191 messages, a few characters each
    assert len(conversation(messages=messages)) == 8191
