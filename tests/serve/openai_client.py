"""`kiln serve` through OpenAI's official Python client, as a real client uses it.

Run by tests/it/serve.rs against two servers of the same model (tests/it/serve.rs starts them):
`--url`, which starts each batch at once, and `--batched-url`, which waits for a full batch of 8
(`--batch-window`), where 8 concurrent clients must share one batch. `--expect` is a JSON object of
what `kiln run` generated greedily, which the answers must reproduce:
{"prompt": "hello world", "prompt_ids": [...], "ids": [...], "text": "..."}.

Prints one line per check and `N passed, 0 failed` at the end; exits 1 at the first failure.
"""

import argparse
import json
import sys
import threading

import urllib.error
import urllib.request

import openai

PASSED = []


def check(name, ok, detail=""):
    if not ok:
        print(f"FAILED {name}: {detail}")
        print(f"{len(PASSED)} passed, 1 failed")
        sys.exit(1)
    PASSED.append(name)
    print(f"ok {name}")


def extra(obj, field):
    """kiln's own fields beside OpenAI's (pydantic keeps them as extras)."""
    return (obj.model_extra or {}).get(field)


def completions(client, model, expect):
    n = len(expect["ids"])
    r = client.completions.create(model=model, prompt=expect["prompt"], max_tokens=n, temperature=0)
    choice = r.choices[0]
    check("completion: object and id", r.object == "text_completion" and r.id.startswith("cmpl-"), r)
    check("completion: greedy ids are kiln run's", extra(choice, "token_ids") == expect["ids"], choice)
    check("completion: text is kiln run's", choice.text == expect["text"], repr(choice.text))
    check("completion: finish_reason length", choice.finish_reason == "length", choice.finish_reason)
    u = r.usage
    check(
        "completion: usage",
        (u.prompt_tokens, u.completion_tokens, u.total_tokens)
        == (len(expect["prompt_ids"]), n, len(expect["prompt_ids"]) + n),
        u,
    )

    by_ids = client.completions.create(model=model, prompt=expect["prompt_ids"], max_tokens=n, temperature=0)
    check("completion: token-id prompt", extra(by_ids.choices[0], "token_ids") == expect["ids"], by_ids)

    chunks = list(
        client.completions.create(
            model=model, prompt=expect["prompt"], max_tokens=n, temperature=0, stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    ids = [i for c in chunks if c.choices for i in extra(c.choices[0], "token_ids") or []]
    check("completion stream: text and ids as whole", (text, ids) == (expect["text"], expect["ids"]), chunks)
    check("completion stream: chunks are text_completion", all(c.object == "text_completion" for c in chunks))
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    check("completion stream: ends with length", finishes == ["length"], finishes)
    check("completion stream: usage last", chunks[-1].usage.completion_tokens == n, chunks[-1])

    # A stop string: the text ends before it and the reason is `stop`.
    stop = next(ch for ch in expect["text"][len(expect["text"]) // 2:] if ch.isalnum())
    r = client.completions.create(model=model, prompt=expect["prompt"], max_tokens=n, temperature=0, stop=[stop])
    want = expect["text"][: expect["text"].index(stop)]
    check("completion: stop string", (r.choices[0].text, r.choices[0].finish_reason) == (want, "stop"), r)

    # Sampling is seeded: the same seed, the same answer.
    a, b = (
        client.completions.create(model=model, prompt="the clay", max_tokens=8, temperature=0.9, top_p=0.9, seed=5)
        for _ in range(2)
    )
    check("completion: seeded sampling repeats", extra(a.choices[0], "token_ids") == extra(b.choices[0], "token_ids"))


def chat(client, model):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello world"}]
    r = client.chat.completions.create(model=model, messages=messages, max_tokens=6, temperature=0)
    m = r.choices[0].message
    check("chat: object and role", r.object == "chat.completion" and m.role == "assistant", r)
    check("chat: usage", r.usage.completion_tokens == len(extra(r.choices[0], "token_ids")), r.usage)
    chunks = list(client.chat.completions.create(model=model, messages=messages, max_tokens=6, temperature=0, stream=True))
    check("chat stream: chunk objects", all(c.object == "chat.completion.chunk" for c in chunks))
    check("chat stream: first says the role", chunks[0].choices[0].delta.role == "assistant", chunks[0])
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    check("chat stream: content as whole", text == m.content, (text, m.content))
    check("chat stream: finish_reason", chunks[-1].choices[0].finish_reason == r.choices[0].finish_reason, chunks[-1])


def errors(client, model, url):
    def refused(name, status, call, param=None):
        try:
            call()
        except openai.APIStatusError as e:
            body = e.body or {}
            ok = e.status_code == status and isinstance(body.get("message"), str) and body.get("type") and (
                param is None or body.get("param") == param
            )
            check(f"refused: {name}", ok, (e.status_code, body))
            return
        check(f"refused: {name}", False, "no error")

    c = client.completions.create
    refused("n > 1", 400, lambda: c(model=model, prompt="x", n=2), "n")
    refused("temperature 5", 400, lambda: c(model=model, prompt="x", temperature=5), "temperature")
    refused("max_tokens past the context", 400, lambda: c(model=model, prompt="x", max_tokens=10**6), "max_tokens")
    refused("prompt too long", 400, lambda: c(model=model, prompt=[5] * 100000, max_tokens=1), "prompt")
    refused("token id outside the vocabulary", 400, lambda: c(model=model, prompt=[1, 2, 10**9]), "prompt")
    refused("unknown model", 404, lambda: c(model="gpt-7", prompt="x"), "model")
    refused("no messages", 400, lambda: client.chat.completions.create(model=model, messages=[]), "messages")
    refused(
        "unknown role", 400,
        lambda: client.chat.completions.create(model=model, messages=[{"role": "wizard", "content": "x"}]),
        "messages[0].role",
    )
    try:
        c(model=model, prompt="x", n=2)
    except openai.BadRequestError as e:
        check("BadRequestError for 400", "one choice per request" in e.message, e.message)
    req = urllib.request.Request(f"{url}/completions", data=b'{"model": ', headers={"content-type": "application/json"})
    try:
        urllib.request.urlopen(req)
        status, body = 200, {}
    except urllib.error.HTTPError as e:
        status, body = e.code, json.loads(e.read())
    ok = status == 400 and "not valid JSON" in body["error"]["message"]
    check("malformed JSON: 400 with OpenAI's error", ok, (status, body))


def concurrent(url, model, expect):
    """8 clients at once, with different options: one batch, each as it would be alone."""
    n = len(expect["ids"])
    results = [None] * 8
    errors_ = []

    def one(i):
        try:
            client = openai.OpenAI(base_url=url, api_key="none", max_retries=0)
            if i % 2 == 0:  # greedy, of different lengths: a prefix of kiln run's answer
                kw = dict(prompt=expect["prompt"], max_tokens=n - i // 2, temperature=0)
            else:
                kw = dict(prompt="the clay", max_tokens=3 + i, temperature=1.0, seed=i)
            raw = client.completions.with_raw_response.create(model=model, **kw)
            results[i] = (raw.headers.get("x-kiln-batch-size"), raw.parse(), kw)
        except Exception as e:  # noqa: BLE001: reported below
            errors_.append(f"client {i}: {e!r}")

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    check("8 clients: all answered", not errors_ and all(results), errors_)
    check("8 clients: one batch of 8", [r[0] for r in results] == ["8"] * 8, [r[0] for r in results])
    for i, (_, r, kw) in enumerate(results):
        ids = extra(r.choices[0], "token_ids")
        if i % 2 == 0:
            check(f"8 clients: greedy client {i} as alone", ids == expect["ids"][: kw["max_tokens"]], ids)
        else:
            done = len(ids) == kw["max_tokens"] or r.choices[0].finish_reason == "stop"
            check(f"8 clients: sampled client {i} length", done, ids)
    return results


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("--batched-url", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--expect", required=True)
    args = ap.parse_args()
    expect = json.loads(args.expect)
    client = openai.OpenAI(base_url=args.url, api_key="none", max_retries=0)
    models = client.models.list()
    check("models: the one model", [m.id for m in models.data] == [args.model], models)
    completions(client, args.model, expect)
    chat(client, args.model)
    errors(client, args.model, args.url)
    results = concurrent(args.batched_url, args.model, expect)
    # Each sampled answer of the batch is the one the same request gets alone.
    for i, (_, r, kw) in enumerate(results):
        if i % 2 == 1:
            solo = client.completions.create(model=args.model, **kw)
            same = extra(solo.choices[0], "token_ids") == extra(r.choices[0], "token_ids")
            check(f"8 clients: sampled client {i} as alone", same, (solo, r))
    print(f"{len(PASSED)} passed, 0 failed")

if __name__ == "__main__":
    main()
