"""The OpenAI surface, driven by the official `openai` client."""
import json

import openai
import pytest

from conftest import API_KEY

CHAT_USER = "Write a Python function `read_lines(path)`: Return the lines of a text file without trailing newlines."


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)


def test_models_lists_the_served_model(client):
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny-qwen3-moe-coder"]


def test_models_retrieve_by_id(client):
    m = client.models.retrieve("tiny-qwen3-moe-coder")
    assert m.id == "tiny-qwen3-moe-coder" and m.object == "model"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-none")


def test_greedy_chat_matches_transformers(client, reference):
    """temperature 0 through the chat template reproduces transformers' greedy
    continuation of the same rendered prompt (reference.json `chat`)."""
    ref = reference["chat"]
    r = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": CHAT_USER}], temperature=0, max_tokens=48
    )
    assert r.choices[0].message.content == ref["greedy_text"]
    assert r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == len(ref["ids"])
    assert r.usage.completion_tokens == 48
    assert r.usage.total_tokens == len(ref["ids"]) + 48


def test_streaming_chat_equals_non_streaming(client, reference):
    ref = reference["chat"]
    stream = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": CHAT_USER}], temperature=0, max_tokens=48,
        stream=True, stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == ref["greedy_text"]
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 48
    assert len({c.id for c in chunks}) == 1


def test_legacy_completion_matches_transformers(client, reference):
    ref = reference["python"]
    r = client.completions.create(model="tiny", prompt=ref["text"], temperature=0, max_tokens=48)
    assert r.choices[0].text == ref["greedy_text"]
    assert r.usage.prompt_tokens == len(ref["ids"])
    stream = client.completions.create(model="tiny", prompt=ref["text"], temperature=0, max_tokens=48, stream=True)
    assert "".join(c.choices[0].text for c in stream) == ref["greedy_text"]


def test_logprobs_are_consistent_with_the_sampled_tokens(client, reference):
    """Greedy: each token is its own most likely alternative, the tokens
    spell the text, the first matches transformers' greedy token, and the
    streamed log-probabilities are the same numbers as the whole reply's."""
    ref = reference["python"]
    r = client.completions.create(model="tiny", prompt=ref["text"], temperature=0, max_tokens=24, logprobs=3)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == r.usage.completion_tokens == 24
    assert "".join(lp.tokens) == r.choices[0].text == ref["greedy_text"][: len(r.choices[0].text)]
    for tok, l, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert l <= 0 and len(top) >= 1
        assert max(top.values()) == l and top[tok] == l

    kw = dict(model="tiny", messages=[{"role": "user", "content": CHAT_USER}], temperature=0, max_tokens=24,
              logprobs=True, top_logprobs=3)
    r = client.chat.completions.create(**kw)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    assert "".join(t.token for t in content) == r.choices[0].message.content
    for t in content:
        assert len(t.top_logprobs) == 3
        assert (t.top_logprobs[0].token, t.top_logprobs[0].logprob) == (t.token, t.logprob)
        assert bytes(t.bytes) == t.token.encode()
    streamed = [t for c in client.chat.completions.create(**kw, stream=True)
                if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert [(t.token, t.logprob) for t in streamed] == [(t.token, t.logprob) for t in content]
    assert sum(t.logprob for t in streamed) == sum(t.logprob for t in content)


def test_stop_sequence_cuts_the_text(client, reference):
    ref = reference["python"]
    stop = "Parameters"
    cut = ref["greedy_text"].index(stop)
    r = client.completions.create(model="tiny", prompt=ref["text"], temperature=0, max_tokens=48, stop=[stop])
    assert r.choices[0].text == ref["greedy_text"][:cut]
    assert r.choices[0].finish_reason == "stop"
    r = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": CHAT_USER}], temperature=0, max_tokens=48, stop="lines of"
    )
    assert r.choices[0].message.content == ref_chat_prefix(reference, "lines of")
    assert r.choices[0].finish_reason == "stop"


def ref_chat_prefix(reference, stop):
    t = reference["chat"]["greedy_text"]
    return t[: t.index(stop)]


def test_seed_reproduces_sampling(client):
    kw = dict(model="tiny", messages=[{"role": "user", "content": "Write a haiku about Rust."}],
              temperature=1.0, top_p=1.0, max_tokens=24)
    a = client.chat.completions.create(seed=7, **kw).choices[0].message.content
    b = client.chat.completions.create(seed=7, **kw).choices[0].message.content
    c = client.chat.completions.create(seed=8, **kw).choices[0].message.content
    d = client.chat.completions.create(seed=9, **kw).choices[0].message.content
    assert a == b
    assert len({a, c, d}) > 1, "three seeds gave the same sample: seed is not reaching the sampler"


def test_max_completion_tokens_and_prefix_reuse(client, server):
    code = "\n".join(f"def add_{i}(a, b):\n    return a + b + {i}\n" for i in range(60))
    history = [{"role": "user", "content": code + "\nWhat do these do?"}]
    r1 = client.chat.completions.create(model="tiny", messages=history, temperature=0, max_completion_tokens=7)
    assert r1.usage.completion_tokens == 7 and r1.choices[0].finish_reason == "length"
    assert r1.usage.prompt_tokens > 1024, r1.usage.prompt_tokens
    history += [{"role": "assistant", "content": r1.choices[0].message.content},
                {"role": "user", "content": "Now subtract."}]
    r2 = client.chat.completions.create(model="tiny", messages=history, temperature=0, max_tokens=4)
    # The second turn's prompt starts with the first turn's tokens: the
    # server kept the whole 512-token prefill chunks of them (reported as
    # cached tokens), and only those, so that the reply is what a fresh
    # prefill gives.
    cached = r2.usage.prompt_tokens_details.cached_tokens
    assert cached == r1.usage.prompt_tokens // 512 * 512, (cached, r1.usage.prompt_tokens)


def test_errors_are_openai_shaped(client, server):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=[])
    assert e.value.body["type"] == "invalid_request_error"
    long = "word " * 5000
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": long}])
    assert e.value.code == "context_length_exceeded"
    # OpenAI's and vLLM's wording, which litellm (Aider) maps to its
    # context-window error.
    assert "This model's maximum context length is" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], temperature=5)
    assert e.value.param == "temperature"
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


def test_tools_are_rendered_through_the_template_and_tool_results_accepted(coder_server):
    client = openai.OpenAI(base_url=coder_server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    msgs = [{"role": "user", "content": "Weather in Oslo?"}]
    plain = client.chat.completions.create(model="t", messages=msgs, temperature=0, max_tokens=1)
    tooled = client.chat.completions.create(model="t", messages=msgs, tools=[WEATHER], temperature=0, max_tokens=1)
    none = client.chat.completions.create(model="t", messages=msgs, tools=[WEATHER], tool_choice="none",
                                          temperature=0, max_tokens=1)
    # The Qwen3-Coder template writes a <tools> block into the system turn.
    assert tooled.usage.prompt_tokens > plain.usage.prompt_tokens + 50
    assert none.usage.prompt_tokens == plain.usage.prompt_tokens
    followup = msgs + [
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": json.dumps({"city": "Oslo"})}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"},
    ]
    r = client.chat.completions.create(model="t", messages=followup, tools=[WEATHER], temperature=0, max_tokens=8)
    assert r.usage.prompt_tokens > tooled.usage.prompt_tokens
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")


NOW = {"type": "function", "function": {
    "name": "now", "description": "The current time.", "parameters": {"type": "object", "properties": {}}}}


def test_forced_tool_choice_comes_back_as_a_parsed_call(coder_server):
    """tool_choice naming a function (and "required" with one tool) gives a
    parsed call to that function, streamed and not. The tiny model writes
    poor arguments, so only the structure and the name are asserted: the
    arguments must be a JSON object, whatever it holds."""
    client = openai.OpenAI(base_url=coder_server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    msgs = [{"role": "user", "content": "Weather in Oslo?"}]
    named = {"type": "function", "function": {"name": "get_weather"}}
    for tools, choice in (([WEATHER, NOW], named), ([WEATHER], "required")):
        r = client.chat.completions.create(model="t", messages=msgs, tools=tools, tool_choice=choice,
                                           parallel_tool_calls=False, temperature=0, max_tokens=64)
        msg = r.choices[0].message
        assert msg.tool_calls and len(msg.tool_calls) == 1, msg
        call = msg.tool_calls[0]
        assert call.type == "function" and call.function.name == "get_weather"
        assert call.id.startswith("call_")
        assert isinstance(json.loads(call.function.arguments), dict)
        assert r.choices[0].finish_reason in ("tool_calls", "length")

    stream = client.chat.completions.create(model="t", messages=msgs, tools=[WEATHER, NOW], tool_choice=named,
                                            parallel_tool_calls=False, temperature=0, max_tokens=64, stream=True)
    deltas = [tc for c in stream if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert deltas and deltas[0].function.name == "get_weather" and deltas[0].id
    assert {d.index for d in deltas} == {0}
    assert isinstance(json.loads("".join(d.function.arguments or "" for d in deltas)), dict)


def test_unknown_tool_choice_name_is_a_400(coder_server):
    client = openai.OpenAI(base_url=coder_server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="t", messages=[{"role": "user", "content": "x"}], tools=[WEATHER],
                                       tool_choice={"type": "function", "function": {"name": "get_wether"}})
    assert e.value.param == "tool_choice"


def test_responses_api_matches_chat_completions(client, reference):
    """`/v1/responses` (Codex CLI's API) gives the same greedy text as chat
    completions, with Responses usage and status."""
    ref = reference["chat"]
    r = client.responses.create(model="t", input=[{"role": "user", "content": CHAT_USER}],
                                max_output_tokens=48, temperature=0, store=False)
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.output_text == ref["greedy_text"]
    assert r.usage.input_tokens == len(ref["ids"]) and r.usage.output_tokens == 48


def test_responses_api_stream_event_sequence(client, reference):
    ref = reference["chat"]
    events = list(client.responses.create(model="t", instructions=None, input=[{"role": "user", "content": CHAT_USER}],
                                          max_output_tokens=48, temperature=0, stream=True))
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-1] == "response.incomplete"
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == ref["greedy_text"]
    assert events[-1].response.output_text == text


def test_responses_api_function_call_round_trip(coder_server):
    client = openai.OpenAI(base_url=coder_server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    tools = [{"type": "function", "name": "get_weather", "description": "Weather in a city.",
              "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}]
    r = client.responses.create(model="t", input="Weather in Oslo?", tools=tools, max_output_tokens=64,
                                temperature=0, tool_choice={"type": "function", "name": "get_weather"})
    calls = [o for o in r.output if o.type == "function_call"]
    assert len(calls) == 1 and calls[0].name == "get_weather" and calls[0].call_id
    assert isinstance(json.loads(calls[0].arguments), dict)
    follow = client.responses.create(model="t", tools=tools, max_output_tokens=4, temperature=0, input=[
        {"role": "user", "content": "Weather in Oslo?"},
        {"type": "function_call", "call_id": calls[0].call_id, "name": "get_weather", "arguments": calls[0].arguments},
        {"type": "function_call_output", "call_id": calls[0].call_id, "output": "sunny, 21 C"},
    ])
    assert follow.usage.input_tokens > r.usage.input_tokens
