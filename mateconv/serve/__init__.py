"""OpenAI-compatible HTTP server over a saved model (FastAPI + uvicorn).

    python -m mateconv.serve --model_path out/sft/final --host 127.0.0.1 --port 8000 --served_model_name mateconv

Endpoints: GET /health, GET /v1/models, POST /v1/chat/completions and POST /v1/completions (JSON or server-sent
events with "stream": true; `logprobs`/`top_logprobs` on both, `echo` on completions, as lm-eval's API models use).
Chat takes OpenAI tool calling (`tools`, `tool_choice` "auto"/"none"/"required"/a named function, `tool_calls` and
`tool` turns, rendered as SFT records are) and returns the reply's <tool_call> blocks as `tool_calls` and a leading
<think> block as `reasoning_content`; forced calls (their arguments held to the function's parameters) and
`response_format` json_object and json_schema are held to JSON by constrained decoding (mateconv/json_grammar.py,
mateconv/json_schema.py).
Generation runs in worker threads, at most `max_concurrent` at a time; up to `max_queued` more requests wait, and
the rest get 429 at once. Every error is answered in OpenAI's JSON shape: {"error": {"message", "type", "param", "code"}},
with OpenAI's wording where clients parse it (context length, API key). With `--api_key` (or MATECONV_API_KEY) every
endpoint but /health wants `Authorization: Bearer KEY`.

Modules: schema (requests, errors), replies (stop strings, reasoning and tool calls in a reply), engine (the model's
generation and log-probabilities), app (endpoints, admission, streaming), cli (the command line).
"""
