"""One call through the gateway with the SDK users run, printed as one JSON line.

    client.py <openai|anthropic> <chat|stream|responses|error> <gateway port> [header=value ...]

`chat` and `stream` print the answer's usage, why it stopped and the quota headers the SDK saw
(`responses`: OpenAI's Responses API, streamed); `error`
expects the SDK to raise, and prints the exception's class and what the SDK read from the
reply. Retries are off, so every call is one request.
"""

import json
import sys


def openai_call(kind, port, headers):
    import openai

    client = openai.OpenAI(
        base_url=f"http://127.0.0.1:{port}/v1",
        api_key="sk-test",
        max_retries=0,
        default_headers=headers,
    )
    messages = [{"role": "user", "content": "Say hello."}]
    if kind == "responses":
        usage, text, last, reason = None, "", None, None
        # The SDK's stream helper: it checks that the response keeps its id, and gathers the
        # output from the stream.
        with client.responses.stream(model="gpt-4o-mini", input="Say hello.") as stream:
            events = list(stream)
        for event in events:
            last = event.type
            if event.type == "response.output_text.delta":
                text += event.delta
            if event.type in ("response.completed", "response.incomplete"):
                usage = event.response.usage.total_tokens
                details = event.response.incomplete_details
                reason = details.reason if details else event.response.status
        return {"usage": usage, "text_bytes": len(text), "stop": reason, "last": last}
    if kind == "stream":
        usage, text, stop = None, "", None
        with client.chat.completions.with_streaming_response.create(
            model="gpt-4o-mini",
            messages=messages,
            stream=True,
            stream_options={"include_usage": True},
        ) as raw:
            seen = dict(raw.headers)
            for chunk in raw.parse():
                if chunk.usage is not None:
                    usage = chunk.usage.total_tokens
                for choice in chunk.choices:
                    text += choice.delta.content or ""
                    stop = choice.finish_reason or stop
        return {"usage": usage, "text_bytes": len(text), "stop": stop, "headers": seen}
    raw = client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=messages
    )
    completion = raw.parse()
    return {
        "usage": completion.usage.total_tokens,
        "text_bytes": len(completion.choices[0].message.content or ""),
        "headers": dict(raw.headers),
    }


def anthropic_call(kind, port, headers):
    import anthropic

    client = anthropic.Anthropic(
        base_url=f"http://127.0.0.1:{port}",
        api_key="sk-ant-test",
        max_retries=0,
        default_headers=headers,
    )
    messages = [{"role": "user", "content": "Say hello."}]
    if kind == "stream":
        with client.messages.stream(
            model="claude-sonnet-4-5", max_tokens=64, messages=messages
        ) as stream:
            text = "".join(stream.text_stream)
            final = stream.get_final_message()
        usage = final.usage
        return {
            "usage": usage.input_tokens + usage.output_tokens,
            "text_bytes": len(text),
            "stop": final.stop_reason,
            "headers": {},
        }
    raw = client.messages.with_raw_response.create(
        model="claude-sonnet-4-5", max_tokens=64, messages=messages
    )
    message = raw.parse()
    return {
        "usage": message.usage.input_tokens + message.usage.output_tokens,
        "text_bytes": sum(len(b.text) for b in message.content if b.type == "text"),
        "headers": dict(raw.headers),
    }


def main():
    sdk, kind, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    headers = dict(arg.split("=", 1) for arg in sys.argv[4:])
    call = openai_call if sdk == "openai" else anthropic_call
    if kind != "error":
        print(json.dumps(call(kind, port, headers)))
        return
    try:
        call("chat", port, headers)
    except Exception as e:  # the SDK's own error class is the point
        response = getattr(e, "response", None)
        print(
            json.dumps(
                {
                    "class": f"{type(e).__module__.split('.')[0]}.{type(e).__name__}",
                    "status": getattr(e, "status_code", None),
                    "message": getattr(e, "message", str(e)),
                    "code": getattr(e, "code", None),
                    "type": getattr(e, "type", None),
                    "body": getattr(e, "body", None),
                    "headers": dict(response.headers) if response is not None else {},
                }
            )
        )
        return
    print(json.dumps({"class": None}))


if __name__ == "__main__":
    main()
