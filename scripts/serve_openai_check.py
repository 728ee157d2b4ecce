"""`qscript serve` through the official `openai` client: models, chat and completions (whole and
streamed), `n` choices, errors as the client raises them, and concurrent streams that each get exactly their
own tokens. Run by scripts/serve_openai_check.sh (which starts the server on a tiny model)."""

import concurrent.futures
import sys

import openai

base_url, key = sys.argv[1], sys.argv[2]
client = openai.OpenAI(base_url=base_url + "/v1", api_key=key, max_retries=0)

ids = [m.id for m in client.models.list().data]
assert ids == ["tiny", "mine"], ids


def chat(model, text, n=16, stream=False):
    msgs = [{"role": "user", "content": text}]
    if not stream:
        r = client.chat.completions.create(model=model, messages=msgs, max_tokens=n, temperature=0)
        assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
        assert r.usage.completion_tokens <= n
        return r.choices[0].message.content, r.choices[0].finish_reason
    out, finish = [], None
    for c in client.chat.completions.create(
        model=model, messages=msgs, max_tokens=n, temperature=0, stream=True
    ):
        if c.choices:
            out.append(c.choices[0].delta.content or "")
            finish = c.choices[0].finish_reason or finish
    return "".join(out), finish


for model in ids:
    whole = chat(model, "hello there")
    streamed = chat(model, "hello there", stream=True)
    assert whole == streamed, (model, whole, streamed)
assert chat("tiny", "hello there") != chat("mine", "hello there")

c = client.completions.create(model="tiny", prompt="Once upon", max_tokens=8, temperature=0)
s = "".join(
    x.choices[0].text
    for x in client.completions.create(
        model="tiny", prompt="Once upon", max_tokens=8, temperature=0, stream=True
    )
)
assert c.choices[0].text == s, (c.choices[0].text, s)

# n choices: each the greedy text, indexed 0..n.
r = client.chat.completions.create(
    model="tiny", messages=[{"role": "user", "content": "hello there"}], max_tokens=16,
    temperature=0, n=3,
)
assert [x.index for x in r.choices] == [0, 1, 2], r.choices
assert all(x.message.content == chat("tiny", "hello there")[0] for x in r.choices), r.choices

# Log-probabilities through the client's types: one entry a token, the greedy token first among
# its alternatives; completions' legacy fields.
r = client.chat.completions.create(
    model="tiny", messages=[{"role": "user", "content": "hello there"}], max_tokens=8,
    temperature=0, logprobs=True, top_logprobs=3,
)
lp = r.choices[0].logprobs.content
assert len(lp) == r.usage.completion_tokens, lp
assert all(len(e.top_logprobs) == 3 and e.top_logprobs[0].token == e.token and e.logprob <= 0 for e in lp), lp
c = client.completions.create(model="tiny", prompt="Once upon", max_tokens=8, temperature=0, logprobs=2)
assert len(c.choices[0].logprobs.tokens) == c.usage.completion_tokens, c.choices[0].logprobs

for call, exc, says in [
    (lambda: chat("gpt-4", "hi"), openai.NotFoundError, "does not exist"),
    (
        lambda: client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=-1
        ),
        openai.BadRequestError,
        "max_tokens",
    ),
    (
        lambda: client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "x" * 5000}]
        ),
        openai.BadRequestError,
        "maximum context length",
    ),
    (
        lambda: openai.OpenAI(base_url=base_url + "/v1", api_key="wrong", max_retries=0).models.list(),
        openai.AuthenticationError,
        "API key",
    ),
]:
    try:
        call()
        raise SystemExit(f"no error for {says}")
    except exc as e:
        assert says in str(e), (says, str(e))

prompts = [(f"client {i}: " + "xy" * i, "mine" if i % 4 == 0 else "tiny") for i in range(24)]
alone = [chat(m, p, 24) for p, m in prompts]
with concurrent.futures.ThreadPoolExecutor(24) as pool:
    together = list(pool.map(lambda pm: chat(pm[1], pm[0], 24, stream=True), prompts))
assert together == alone, [i for i, (a, b) in enumerate(zip(alone, together)) if a != b]
print(f"openai {openai.__version__}: models, chat, completions, streams, logprobs, errors and 24 concurrent streams as served alone: ok")
