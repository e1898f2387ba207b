"""Calls Tollgate with the official OpenAI Python SDK until the limit answers.

    .venv/bin/python examples/clients/openai_python.py http://127.0.0.1:10000/v1 alice 6

Tollgate speaks OpenAI's dialect, so the SDK needs nothing special: a 429 from Tollgate is an
`openai.RateLimitError` carrying OpenAI's error body and `retry-after`. (The SDK retries 429s on
its own by default; `max_retries=0` shows each answer.) Prints one line per request.
"""
import sys

import openai

base_url, user, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
client = openai.OpenAI(
    base_url=base_url,
    api_key="unused-tollgate-injects-the-provider-key",
    max_retries=0,
    default_headers={"x-tollgate-user": user},
)
for i in range(count):
    try:
        raw = client.chat.completions.with_raw_response.create(
            model="mock-model", messages=[{"role": "user", "content": "Hi"}]
        )
        completion = raw.parse()
        print(f"ok remaining={raw.headers.get('x-ratelimit-remaining-requests')} "
              f"content={completion.choices[0].message.content!r}")
    except openai.RateLimitError as e:
        print(f"rate_limited code={e.code} type={e.type} retry_after={e.response.headers.get('retry-after')}")
