"""Serving: `llada-v serve`, an OpenAI-compatible chat server on Ray Serve (docs/serving.md).

- `options.py`: `ServeOptions`, every server setting, validated;
- `command.py`: the `llada-v serve` arguments and run (the hook `cli.py` calls);
- `openai_api.py`: the OpenAI chat-completions request parser (one `ApiError` per problem) and the JSON bodies
  of responses, stream chunks and errors;
- `media.py`: `image_url` parts -> PIL images (data URLs, http(s) URLs through the library's loader, files under
  the folder the operator allows);
- `batching.py`: jobs, settings groups, one `generate_texts` call per group (split on failure), committed-text
  streaming from the sampler's step callback;
- `service.py`: the model a replica holds and what it does with a request body (no Ray);
- `http_app.py`: the ASGI routes (`/v1/chat/completions`, `/v1/models`, `/health`), admission and SSE;
- `app.py`: the Ray Serve deployment (`@serve.batch`), `app_builder` for `serve run` / `serve deploy`, and
  `run_server` behind `llada-v serve`.

Only `app.py` imports Ray (and `http_app.py` Starlette); `llada-v --help` imports `command.py` and `options.py`
only. The remote code imports nothing from here.
"""
