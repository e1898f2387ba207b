"""The official OpenAI Python SDK talking to Anthropic, Gemini and OpenAI through Tollgate.

Tollgate's front door is OpenAI Chat Completions whatever the provider behind a model name, so
the SDK needs nothing special: pick a model the policy maps (examples/envoy/providers.yaml maps
`claude-sonnet`, `gemini-flash`, `gpt-4o-mini`, ...), stream or not, tools or not.

    .venv/bin/python examples/clients/openai_translation.py http://127.0.0.1:10000/v1 claude-sonnet "Hello"
    .venv/bin/python examples/clients/openai_translation.py http://127.0.0.1:10000/v1 gemini-flash "Hello" --stream

Test mode (host-tests/tests/envoy_translation.rs): `--scenarios JSON` runs a list of requests
and prints one JSON line per request with what the SDK made of the answer. A scenario is
`{"name", "model", "user", "stream", "fixture", "retry_after", "tools", "n"}`; `fixture` and
`retry_after` become the mock provider's `x-mock-fixture` / `x-mock-retry-after` headers (it
replays that recorded provider answer). The SDK never retries here (`max_retries=0`).
"""
import json
import sys

import openai

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"location": {"type": "string"}},
            "required": ["location"],
        },
    },
}


def client(base_url, user=None):
    headers = {"x-tollgate-user": user} if user else {}
    # The key is Tollgate's business (identity comes from x-tollgate-user here); the provider
    # key is added by Envoy per provider and never seen by the client.
    return openai.OpenAI(base_url=base_url, api_key="sk-client-not-a-provider-key", max_retries=0,
                         default_headers=headers)


def run(base_url, s):
    extra = {}
    if s.get("fixture"):
        extra["x-mock-fixture"] = s["fixture"]
    if s.get("retry_after"):
        extra["x-mock-retry-after"] = str(s["retry_after"])
    args = dict(model=s["model"], messages=[{"role": "user", "content": "What is the weather in San Francisco?"}],
                extra_headers=extra)
    if s.get("tools"):
        args["tools"] = [WEATHER_TOOL]
    if s.get("n"):
        args["n"] = s["n"]
    out = {"name": s["name"]}
    try:
        if s.get("stream"):
            raw = client(base_url, s.get("user")).chat.completions.with_raw_response.create(
                stream=True, stream_options={"include_usage": True}, **args)
            out.update(remaining=raw.headers.get("x-ratelimit-remaining-requests"),
                       content_type=raw.headers.get("content-type"))
            text, calls, finish, usage, ids, models, chunks = "", {}, None, None, set(), set(), 0
            for chunk in raw.parse():
                chunks += 1
                ids.add(chunk.id)
                models.add(chunk.model)
                if chunk.usage is not None:
                    usage = chunk.usage.model_dump(exclude_none=True)
                for choice in chunk.choices:
                    delta = choice.delta
                    text += delta.content or ""
                    for call in delta.tool_calls or []:
                        acc = calls.setdefault(call.index, {"id": None, "name": "", "arguments": ""})
                        acc["id"] = call.id or acc["id"]
                        if call.function is not None:
                            acc["name"] += call.function.name or ""
                            acc["arguments"] += call.function.arguments or ""
                    finish = choice.finish_reason or finish
            out.update(ok=True, chunks=chunks, ids=sorted(ids), models=sorted(models), content=text,
                       tool_calls=[calls[i] for i in sorted(calls)], finish_reason=finish, usage=usage)
        else:
            raw = client(base_url, s.get("user")).chat.completions.with_raw_response.create(**args)
            completion = raw.parse()
            message = completion.choices[0].message
            out.update(ok=True, remaining=raw.headers.get("x-ratelimit-remaining-requests"),
                       content_type=raw.headers.get("content-type"), ids=[completion.id],
                       models=[completion.model], content=message.content,
                       tool_calls=[{"id": c.id, "name": c.function.name, "arguments": c.function.arguments}
                                   for c in message.tool_calls or []],
                       finish_reason=completion.choices[0].finish_reason,
                       usage=completion.usage.model_dump(exclude_none=True) if completion.usage else None)
    except openai.APIStatusError as e:
        out.update(ok=False, error=type(e).__name__, status=e.status_code, code=e.code, type=e.type,
                   message=e.message, retry_after=e.response.headers.get("retry-after"),
                   remaining=e.response.headers.get("x-ratelimit-remaining-requests"))
    except openai.APIError as e:  # e.g. an error event in the middle of a stream
        out.update(ok=False, error=type(e).__name__, message=e.message)
    return out


def main():
    base_url = sys.argv[1]
    if sys.argv[2] == "--scenarios":
        for s in json.loads(sys.argv[3]):
            print(json.dumps(run(base_url, s)), flush=True)
        return
    model, prompt = sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else "Hello!"
    c = client(base_url)
    messages = [{"role": "user", "content": prompt}]
    if "--stream" in sys.argv:
        for chunk in c.chat.completions.create(model=model, messages=messages, stream=True):
            for choice in chunk.choices:
                print(choice.delta.content or "", end="", flush=True)
        print()
    else:
        print(c.chat.completions.create(model=model, messages=messages).choices[0].message.content)


if __name__ == "__main__":
    main()
