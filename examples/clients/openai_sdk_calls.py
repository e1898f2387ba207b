"""Runs a list of chat calls through Tollgate with the official OpenAI Python SDK and prints what
the SDK made of each answer, one JSON object per line.

    echo '[{"name": "hi", "model": "claude-sonnet"},
           {"name": "s", "model": "gemini-flash", "stream": true, "include_usage": true}]' |
        .venv/bin/python examples/clients/openai_sdk_calls.py http://127.0.0.1:8787/v1

With a policy that maps models to providers (core/src/routing.rs), Tollgate translates
`POST /v1/chat/completions` to Anthropic, Gemini or an OpenAI-compatible API, streaming
included, so the client only ever speaks OpenAI. The SDK's API key is Tollgate's business:
Tollgate adds the provider's own key and never forwards the client's `authorization`.

A call is `{"name", "model", "stream", "include_usage", "headers", "messages", "tools",
"max_tokens"}` (only `model` is required; `messages` defaults to one "Hi"; `headers` are sent as
the SDK's `extra_headers`). host-tests/tests/workerd_translation.rs uses it with the mock
provider's `x-mock-fixture` header to pick a recorded provider answer.

A non-stream call reports the completion (id, model, content, tool calls, finish reason, usage)
and the response's `x-ratelimit-*` headers; a stream call uses the SDK's own accumulator
(`client.chat.completions.stream(...).get_final_completion()`) and counts the chunks. A call the
SDK raises on reports the exception class, status, OpenAI error code/type/message and
`retry-after`. The SDK never retries (`max_retries=0`): every answer is seen as it came.
"""
import json
import sys

import openai

HI = [{"role": "user", "content": "Hi"}]


def completion_fields(c):
    choice = c.choices[0] if c.choices else None
    message = choice.message if choice else None
    calls = [
        {"id": t.id, "name": t.function.name, "arguments": t.function.arguments}
        for t in ((message.tool_calls or []) if message else [])
    ]
    return {
        "id": c.id,
        "model": c.model,
        "content": message.content if message else None,
        "tool_calls": calls,
        "finish_reason": choice.finish_reason if choice else None,
        "usage": c.usage.model_dump(exclude_none=True) if c.usage else None,
    }


def run(client, call):
    args = {
        "model": call["model"],
        "messages": call.get("messages", HI),
        "extra_headers": call.get("headers", {}),
    }
    for name in ("tools", "max_tokens"):
        if name in call:
            args[name] = call[name]
    out = {"name": call.get("name", call["model"])}
    try:
        if call.get("stream"):
            if call.get("include_usage"):
                args["stream_options"] = {"include_usage": True}
            chunks = 0
            with client.chat.completions.stream(**args) as stream:
                for event in stream:
                    chunks += event.type == "chunk"
                try:
                    final = stream.get_final_completion()
                except openai.LengthFinishReasonError as e:  # the helper's way to say "length"
                    final = e.completion
                out.update(completion_fields(final))
            out["chunks"] = chunks
        else:
            raw = client.chat.completions.with_raw_response.create(**args)
            out.update(completion_fields(raw.parse()))
            out["status"] = raw.status_code
            out["headers"] = {k: v for k, v in raw.headers.items() if k.startswith("x-ratelimit-")}
    except openai.APIError as e:  # status errors, and an error event in the middle of a stream
        response = getattr(e, "response", None)
        out.update({
            "error": type(e).__name__,
            "status": getattr(e, "status_code", None),
            "code": e.code,
            "type": e.type,
            "message": e.message,
            "retry_after": response.headers.get("retry-after") if response is not None else None,
        })
    return out


def main():
    if len(sys.argv) != 2:
        sys.exit("usage: openai_sdk_calls.py BASE_URL < calls.json")
    client = openai.OpenAI(base_url=sys.argv[1], api_key="tollgate-client-key-not-a-provider-key", max_retries=0)
    for call in json.load(sys.stdin):
        print(json.dumps(run(client, call)), flush=True)


if __name__ == "__main__":
    main()
