"""The Anthropic surface, driven by the official `anthropic` client."""
# This SDK release has no temperature argument on messages.create (the API
# still accepts the field), so tests pass it through extra_body.
import anthropic
import pytest

from conftest import API_KEY

USER = "Write a Python function `read_lines(path)`: Return the lines of a text file without trailing newlines."


def prompt_tokens(m):
    """All prompt tokens: `input_tokens` leaves out those read from the cache."""
    return m.usage.input_tokens + (m.usage.cache_read_input_tokens or 0)


@pytest.fixture(scope="module")
def client(server):
    # The SDK sends the key as x-api-key.
    return anthropic.Anthropic(base_url=server.url, api_key=API_KEY, max_retries=0, timeout=120)


def test_message_matches_transformers_greedy(client, reference):
    ref = reference["chat"]
    m = client.messages.create(model="tiny", max_tokens=48, extra_body={"temperature": 0},
                               messages=[{"role": "user", "content": USER}])
    assert m.type == "message" and m.role == "assistant"
    assert [b.type for b in m.content] == ["text"]
    assert m.content[0].text == ref["greedy_text"]
    assert m.stop_reason == "max_tokens"
    # Prompt tokens read from the server's cache are reported apart, never twice.
    assert m.usage.input_tokens + (m.usage.cache_read_input_tokens or 0) == len(ref["ids"])
    assert m.usage.output_tokens == 48


def test_system_prompt_reaches_the_template(client):
    base = client.messages.create(model="t", max_tokens=1, messages=[{"role": "user", "content": "hi"}])
    sys = client.messages.create(model="t", max_tokens=1, system="You are a careful Rust reviewer.",
                                 messages=[{"role": "user", "content": "hi"}])
    assert prompt_tokens(sys) > prompt_tokens(base) + 5


def test_stream_event_sequence_and_text(client, reference):
    ref = reference["chat"]
    events = list(client.messages.create(model="t", max_tokens=48, extra_body={"temperature": 0}, stream=True,
                                         messages=[{"role": "user", "content": USER}]))
    kinds = [e.type for e in events]
    assert kinds[0] == "message_start"
    assert kinds[-2:] == ["message_delta", "message_stop"]
    body = [k for k in kinds[1:-2] if k != "ping"]
    assert body[0] == "content_block_start" and body[-1] == "content_block_stop"
    assert set(body[1:-1]) == {"content_block_delta"}
    text = "".join(e.delta.text for e in events if e.type == "content_block_delta")
    assert text == ref["greedy_text"]
    delta = events[-2]
    assert delta.delta.stop_reason == "max_tokens" and delta.usage.output_tokens == 48


def test_stream_helper_accumulates(client, reference):
    with client.messages.stream(model="t", max_tokens=48, extra_body={"temperature": 0},
                                messages=[{"role": "user", "content": USER}]) as s:
        streamed = "".join(s.text_stream)
        final = s.get_final_message()
    assert streamed == reference["chat"]["greedy_text"] == final.content[0].text


def test_stop_sequence(client, reference):
    t = reference["chat"]["greedy_text"]
    m = client.messages.create(model="t", max_tokens=48, extra_body={"temperature": 0}, stop_sequences=["lines of"],
                               messages=[{"role": "user", "content": USER}])
    assert m.stop_reason == "stop_sequence" and m.stop_sequence == "lines of"
    assert m.content[0].text == t[: t.index("lines of")]


def test_errors_are_anthropic_shaped(client, server):
    with pytest.raises(anthropic.BadRequestError) as e:
        client.messages.create(model="t", max_tokens=5, messages=[])
    assert e.value.body["type"] == "error"
    assert e.value.body["error"]["type"] == "invalid_request_error"
    with pytest.raises(anthropic.BadRequestError):
        client.messages.create(model="t", max_tokens=5, messages=[{"role": "user", "content": "word " * 5000}])
    bad = anthropic.Anthropic(base_url=server.url, api_key="nope", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError):
        bad.messages.create(model="t", max_tokens=5, messages=[{"role": "user", "content": "hi"}])


def test_tools_and_tool_results(coder_server):
    client = anthropic.Anthropic(base_url=coder_server.url, api_key="unused", max_retries=0, timeout=120)
    tool = {"name": "get_weather", "description": "Weather in a city.",
            "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
    msgs = [{"role": "user", "content": "Weather in Oslo?"}]
    plain = client.messages.create(model="t", max_tokens=1, messages=msgs)
    tooled = client.messages.create(model="t", max_tokens=1, messages=msgs, tools=[tool])
    assert prompt_tokens(tooled) > prompt_tokens(plain) + 50
    msgs += [
        {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "get_weather",
                                           "input": {"city": "Oslo"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "sunny"}]},
    ]
    m = client.messages.create(model="t", max_tokens=8, extra_body={"temperature": 0}, messages=msgs, tools=[tool])
    assert prompt_tokens(m) > prompt_tokens(tooled)
    assert m.stop_reason in ("end_turn", "max_tokens", "tool_use")


def test_forced_tool_choice_gives_a_tool_use_block(coder_server):
    """tool_choice {"type": "tool"} gives one tool_use block for that tool,
    streamed and not. The tiny model writes poor arguments: the structure
    and the name are asserted, the input only to be an object."""
    client = anthropic.Anthropic(base_url=coder_server.url, api_key="unused", max_retries=0, timeout=120)
    tools = [{"name": "get_weather", "description": "Weather in a city.",
              "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}},
             {"name": "now", "description": "The time.", "input_schema": {"type": "object", "properties": {}}}]
    choice = {"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True}
    msgs = [{"role": "user", "content": "Weather in Oslo?"}]
    m = client.messages.create(model="t", max_tokens=64, extra_body={"temperature": 0}, messages=msgs,
                               tools=tools, tool_choice=choice)
    uses = [b for b in m.content if b.type == "tool_use"]
    assert len(uses) == 1 and uses[0].name == "get_weather" and uses[0].id.startswith("toolu_")
    assert isinstance(uses[0].input, dict)
    assert m.stop_reason in ("tool_use", "max_tokens")
    with client.messages.stream(model="t", max_tokens=64, extra_body={"temperature": 0}, messages=msgs,
                                tools=tools, tool_choice=choice) as s:
        final = s.get_final_message()
    uses = [b for b in final.content if b.type == "tool_use"]
    assert len(uses) == 1 and uses[0].name == "get_weather" and isinstance(uses[0].input, dict)
    with pytest.raises(anthropic.BadRequestError):
        client.messages.create(model="t", max_tokens=4, messages=msgs, tools=tools,
                               tool_choice={"type": "tool", "name": "nope"})


def test_count_tokens_equals_the_prompt_tokens_of_the_same_request(client):
    kw = dict(model="t", system="Be brief.", messages=[{"role": "user", "content": "Count me, please."}],
              tools=[{"name": "now", "description": "The time.", "input_schema": {"type": "object"}}])
    counted = client.messages.count_tokens(**kw).input_tokens
    m = client.messages.create(max_tokens=2, **kw)
    assert counted == m.usage.input_tokens + (m.usage.cache_read_input_tokens or 0)
    assert counted > client.messages.count_tokens(model="t", messages=kw["messages"]).input_tokens


def test_system_message_inside_messages_is_accepted_and_rendered(client):
    """Claude Code sends `role: system` messages inside `messages`, with its
    thinking/context-management/effort fields and a max_tokens larger than
    the context (issue 23: it got a 400 and stopped)."""
    msgs = [{"role": "user", "content": "hi"}]
    base = client.messages.count_tokens(model="t", messages=msgs).input_tokens
    with_sys = msgs + [{"role": "system", "content": "Reply in French from now on, please."}]
    assert client.messages.count_tokens(model="t", messages=with_sys).input_tokens > base + 5
    m = client.messages.create(model="t", max_tokens=1_000_000, messages=with_sys,
                               extra_body={"thinking": {"type": "adaptive"}, "output_config": {"effort": "high"},
                                           "context_management": {"edits": [{"type": "clear_thinking_20251015",
                                                                               "keep": "all"}]}},
                               extra_headers={"anthropic-beta": "context-management-2025-06-27"})
    assert m.stop_reason in ("end_turn", "max_tokens") and m.content


def test_trailing_assistant_message_is_continued(client, reference):
    """Prefill: the reply continues the given assistant text; greedy, the
    continuation of the first N reference tokens is the rest of the reference."""
    ref = reference["chat"]["greedy_text"]
    # Cut after a newline, where the model's own tokens break too.
    head = ref[: ref.index("\n", len(ref) // 3) + 1]
    full = client.messages.create(model="t", max_tokens=48, extra_body={"temperature": 0},
                                  messages=[{"role": "user", "content": USER}])
    cont = client.messages.create(model="t", max_tokens=6, extra_body={"temperature": 0},
                                  messages=[{"role": "user", "content": USER}, {"role": "assistant", "content": head}])
    assert full.content[0].text == ref
    text = cont.content[0].text if cont.content else ""
    assert text and ref[len(head):].startswith(text), (head, text)
    assert prompt_tokens(cont) > prompt_tokens(full)
