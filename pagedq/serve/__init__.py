"""The serving layer: pagedq's shared engine over an OpenAI-compatible HTTP API.

* :mod:`.protocol` — request and response schemas (pydantic), their one mapping onto
  ``SamplingParams``; :mod:`.openapi` — the OpenAPI document generated from them;
  :mod:`.errors` — OpenAI's error shape and the status of each failure;
* :mod:`.worker` — the engine process; :mod:`.supervisor` — starts it, routes requests to it,
  restarts it when it dies;
* :mod:`.handlers`, :mod:`.completions`, :mod:`.chat`, :mod:`.app` — the tornado app used by
  ``pagedq serve``, the jupyter-server extension and the JupyterHub service;
* :mod:`.admission` — limits; :mod:`.identity` — who is calling; :mod:`.config` — the options;
* :mod:`.client` — ``pagedq.connect()``.

Nothing here imports torch in the server process; the engine process does.
"""
