"""Constrained decoding, driven by the official clients: a forced tool choice
always gives calls whose arguments validate against the tool's schema, and
`response_format` always gives JSON (matching the schema). The bundled tiny
model never writes a tool call or JSON on its own, so only the grammar can
make these pass; each runs 50 seeded samples at temperature 1.

`server` renders with the model's own template (Hermes JSON calls),
`coder_server` with Qwen3-Coder's (XML calls).
"""
import json

import anthropic
import jsonschema
import openai
import pytest

from conftest import API_KEY

SEEDS = range(50)

# Bounded strings and integers: the grammar guarantees the shape, the bounds
# that a weak model also reaches the end within max_tokens (an unbounded
# string, or a `number`'s fraction, lets it write digits until the budget
# is spent: the grammar cannot make a model stop, only keep it valid).
READ = {"type": "object", "properties": {
    "path": {"type": "string", "maxLength": 24},
    "start_line": {"type": "integer", "minimum": 1, "maximum": 999},
}, "required": ["path"], "additionalProperties": False}
RUN = {"type": "object", "properties": {
    "command": {"type": "string", "enum": ["ls", "pwd", "make test"]},
    "timeout": {"type": "integer", "minimum": 0, "maximum": 60},
    "background": {"type": "boolean"},
}, "required": ["command", "background"], "additionalProperties": False}
TOOLS = [
    {"type": "function", "function": {"name": "read_file", "description": "Read a file.", "parameters": READ}},
    {"type": "function", "function": {"name": "run", "description": "Run a command.", "parameters": RUN}},
]
SCHEMAS = {"read_file": READ, "run": RUN}
MSGS = [{"role": "user", "content": "What is in setup.py?"}]


def openai_client(s, key=API_KEY):
    return openai.OpenAI(base_url=s.url + "/v1", api_key=key, max_retries=0, timeout=120)


def check_calls(message, names, finish_reason, most=None):
    """The reply is only calls, each to one of `names`, arguments valid."""
    assert finish_reason == "tool_calls", (finish_reason, message)
    assert not message.content, message
    calls = message.tool_calls or []
    assert calls and (most is None or len(calls) <= most), message
    for c in calls:
        assert c.function.name in names, c
        jsonschema.validate(json.loads(c.function.arguments), SCHEMAS[c.function.name])
    return calls


@pytest.mark.parametrize("fixture", ["server", "coder_server"])
def test_required_tool_choice_always_gives_schema_valid_calls(fixture, request):
    client = openai_client(request.getfixturevalue(fixture))
    counts = {}
    for seed in SEEDS:
        r = client.chat.completions.create(model="t", messages=MSGS, tools=TOOLS, tool_choice="required",
                                           parallel_tool_calls=False, temperature=1, seed=seed, max_tokens=160)
        calls = check_calls(r.choices[0].message, SCHEMAS, r.choices[0].finish_reason, most=1)
        counts[calls[0].function.name] = counts.get(calls[0].function.name, 0) + 1
    # The model picks the function: both are reachable (it is sampled, not forced).
    assert set(counts) == set(SCHEMAS), counts


@pytest.mark.parametrize("fixture", ["server", "coder_server"])
def test_named_tool_choice_always_calls_that_tool_streamed(fixture, request):
    client = openai_client(request.getfixturevalue(fixture))
    named = {"type": "function", "function": {"name": "run"}}
    for seed in SEEDS:
        stream = client.chat.completions.create(model="t", messages=MSGS, tools=TOOLS, tool_choice=named,
                                                parallel_tool_calls=False, temperature=1, seed=seed,
                                                max_tokens=160, stream=True)
        chunks = [c for c in stream if c.choices]
        text = "".join(c.choices[0].delta.content or "" for c in chunks)
        deltas = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
        finish = [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason]
        assert text == "" and finish == ["tool_calls"], (text, finish)
        assert {d.index for d in deltas} == {0} and deltas[0].function.name == "run"
        jsonschema.validate(json.loads("".join(d.function.arguments or "" for d in deltas)), RUN)


def test_parallel_calls_are_each_valid(server):
    """With parallel calls allowed the grammar lets the model go on to more
    calls after the first (the tiny model always does, until max_tokens cuts
    the last one off, which then comes back as text); every complete call is
    valid."""
    client = openai_client(server)
    most = 0
    for seed in range(10):
        r = client.chat.completions.create(model="t", messages=MSGS, tools=TOOLS, tool_choice="required",
                                           temperature=1, seed=seed, max_tokens=200)
        choice = r.choices[0]
        calls = choice.message.tool_calls or []
        if choice.finish_reason == "length":
            assert choice.message.content is None or choice.message.content.startswith("<tool_call>")
        else:
            assert choice.finish_reason == "tool_calls" and not choice.message.content, choice
        assert calls, choice
        for c in calls:
            jsonschema.validate(json.loads(c.function.arguments), SCHEMAS[c.function.name])
        most = max(most, len(calls))
    assert most >= 2


@pytest.mark.parametrize("fixture", ["server", "coder_server"])
def test_anthropic_any_and_tool_choice_give_valid_tool_use(fixture, request):
    s = request.getfixturevalue(fixture)
    client = anthropic.Anthropic(base_url=s.url, api_key=API_KEY, max_retries=0, timeout=120)
    # Anthropic's API has no seed: these 50 samples are unseeded.
    tools = [{"name": t["function"]["name"], "description": t["function"]["description"],
              "input_schema": t["function"]["parameters"]} for t in TOOLS]
    for seed in SEEDS:
        choice = {"type": "any", "disable_parallel_tool_use": True} if seed % 2 else \
            {"type": "tool", "name": "read_file", "disable_parallel_tool_use": True}
        m = client.messages.create(model="t", max_tokens=160, messages=MSGS, tools=tools, tool_choice=choice,
                                   extra_body={"temperature": 1})
        assert m.stop_reason == "tool_use", m
        assert [b.type for b in m.content] == ["tool_use"], m
        use = m.content[0]
        assert choice["type"] == "any" or use.name == "read_file"
        jsonschema.validate(use.input, SCHEMAS[use.name])


PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "minLength": 1, "maxLength": 20},
    "age": {"type": "integer", "minimum": 0, "maximum": 130},
    "languages": {"type": "array", "items": {"type": "string", "enum": ["python", "rust", "c"]},
                  "maxItems": 3},
}, "required": ["name", "age", "languages"], "additionalProperties": False}


@pytest.mark.parametrize("fixture", ["server", "coder_server"])
def test_json_schema_response_format_always_matches(fixture, request):
    client = openai_client(request.getfixturevalue(fixture))
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    for seed in SEEDS:
        r = client.chat.completions.create(model="t", messages=[{"role": "user", "content": "Describe a programmer."}],
                                           response_format=fmt, temperature=1, seed=seed, max_tokens=200)
        assert r.choices[0].finish_reason == "stop", r
        jsonschema.validate(json.loads(r.choices[0].message.content), PERSON)


def test_json_object_response_format_is_an_object(server):
    client = openai_client(server)
    for seed in range(20):
        r = client.chat.completions.create(model="t", messages=[{"role": "user", "content": "Reply in JSON."}],
                                           response_format={"type": "json_object"}, temperature=0.7, seed=seed,
                                           max_tokens=200)
        if r.choices[0].finish_reason == "length":
            # Any object may be unbounded; a cut one is not a failure of the
            # grammar, but most must finish.
            continue
        assert isinstance(json.loads(r.choices[0].message.content), dict)
    # The raw completions endpoint takes it too.
    r = client.completions.create(model="t", prompt="def f():", temperature=1, seed=1, max_tokens=200,
                                  extra_body={"response_format": {"type": "json_schema",
                                                                  "json_schema": {"name": "p", "schema": PERSON}}})
    jsonschema.validate(json.loads(r.choices[0].text), PERSON)


def test_unenforceable_constraints_are_400s_naming_the_field(server, coder_server):
    client = openai_client(server)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="t", messages=MSGS, response_format={"type": "yaml"})
    assert e.value.param == "response_format"
    bad = {"type": "object", "properties": {"c": {"type": "string", "format": "no-such-format"}}}
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="t", messages=MSGS, response_format={
            "type": "json_schema", "json_schema": {"name": "x", "schema": bad, "strict": True}})
    assert e.value.param == "response_format" and "no-such-format" in e.value.message
    # Integers in an enum cannot be written as XML's raw text values.
    ints = [{"type": "function", "function": {"name": "pick", "parameters": {
        "type": "object", "properties": {"n": {"enum": [1, 2]}}}}}]
    with pytest.raises(openai.BadRequestError) as e:
        openai_client(coder_server).chat.completions.create(model="t", messages=MSGS, tools=ints,
                                                           tool_choice="required")
    assert e.value.param == "tools"


def test_responses_text_format_and_anthropic_output_format(server):
    """The same JSON-schema constraint through the Responses API's
    `text.format` and Anthropic's `output_config.format`."""
    client = openai_client(server)
    for seed in range(5):
        r = client.responses.create(model="t", input="Describe a programmer.", max_output_tokens=200,
                                    temperature=1, text={"format": {"type": "json_schema", "name": "person",
                                                                    "schema": PERSON, "strict": True}})
        assert r.status == "completed", r
        jsonschema.validate(json.loads(r.output_text), PERSON)
    a = anthropic.Anthropic(base_url=server.url, api_key=API_KEY, max_retries=0, timeout=120)
    for _ in range(5):
        m = a.messages.create(model="t", max_tokens=200, messages=[{"role": "user", "content": "A programmer?"}],
                              extra_body={"temperature": 1,
                                          "output_config": {"format": {"type": "json_schema", "schema": PERSON}}})
        assert m.stop_reason == "end_turn", m
        jsonschema.validate(json.loads(m.content[0].text), PERSON)
