"""A loopback server speaking vLLM's ``/v1/completions`` prompt-logprob protocol over a real model.

``transformers serve`` returns no prompt log-probabilities (see
:mod:`kdforge.teachers.sources.served`), so the served-teacher tests run this stand-in instead:
a FastAPI app on 127.0.0.1 whose answers are the *true* top-k of a local Hugging Face model, in
vLLM's response shapes:

* ``prompt_logprobs=k``: ``choices[0].prompt_logprobs`` = ``[None, {"<id>": {"logprob", "rank",
  "decoded_token"}}, ...]`` with the top-k *and* the actual prompt token (listed first, as vLLM
  does, so it may be a (k+1)-th entry of lower rank);
* ``echo=true, logprobs=k``: ``choices[0].logprobs`` = ``{"tokens", "token_logprobs",
  "top_logprobs", "text_offset"}``, keys ``"token_id:<id>"`` with ``return_tokens_as_token_ids``,
  else the tokenizer's ``decode([id])`` strings; ``max_tokens >= 1`` appends the generated token.

``k`` above ``max_logprobs`` is refused with HTTP 400 like vLLM's ``--max-logprobs``.
``behaviour["mode"]`` switches to faults: ``"no_logprobs"`` (the field is missing, like a server
that ignores it) or ``"few"`` (only ``k - 1`` entries per position). Every request body is kept
in ``seen`` for assertions.
"""

# no `from __future__ import annotations`: FastAPI must see the real `Request` annotation
import socket
import threading
import time

import torch


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_app(model, tokenizer=None, *, max_logprobs: int = 20):
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse

    app = FastAPI()
    app.state.behaviour = {"mode": "ok"}
    app.state.seen = []

    @app.get("/health")
    def health():
        return {"ok": True}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await request.json()
        app.state.seen.append(body)
        ids = body["prompt"]
        echo = bool(body.get("echo"))
        k = body.get("prompt_logprobs") if body.get("prompt_logprobs") is not None else (
            body.get("logprobs") if echo else None)
        if k is not None and k > max_logprobs:
            return JSONResponse({"error": {"message": f"Requested logprobs {k} > max_logprobs {max_logprobs}"}},
                                status_code=400)
        with torch.no_grad():
            lp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), dim=-1)
        mode = app.state.behaviour["mode"]
        n_top = k - 1 if (mode == "few" and k) else k
        per_pos = [None]
        for j in range(1, len(ids)):
            dist = lp[j - 1]
            actual = ids[j]
            entries = {actual: (float(dist[actual]), int((dist > dist[actual]).sum()) + 1)}
            values, top = dist.topk(n_top) if n_top else (dist[:0], dist[:0].long())
            for r, (v, i) in enumerate(zip(values.tolist(), top.tolist(), strict=True)):
                entries[i] = (v, r + 1)
            if mode == "few":  # drop the actual token too when it is not in the shortened top-k
                entries = {i: e for i, e in entries.items() if e[1] <= n_top}
            per_pos.append(entries)
        generated = int(lp[-1].argmax())
        choice: dict = {"index": 0, "text": "", "finish_reason": "length"}
        if k is not None and mode != "no_logprobs":
            if body.get("prompt_logprobs") is not None:
                choice["prompt_logprobs"] = [None] + [
                    {str(i): {"logprob": v, "rank": r, "decoded_token": f"<{i}>"} for i, (v, r) in e.items()}
                    for e in per_pos[1:]]
            if echo:
                as_ids = bool(body.get("return_tokens_as_token_ids"))

                def key(i: int) -> str:
                    return f"token_id:{i}" if as_ids else tokenizer.decode([i])

                tops = [None] + [{key(i): v for i, (v, _) in e.items()} for e in per_pos[1:]]
                tokens = [key(i) for i in ids]
                token_lps = [None] + [per_pos[j][ids[j]][0] if ids[j] in per_pos[j] else None
                                      for j in range(1, len(ids))]
                if body.get("max_tokens", 16) > 0:
                    tops.append({key(generated): float(lp[-1, generated])})
                    tokens.append(key(generated))
                    token_lps.append(float(lp[-1, generated]))
                choice["logprobs"] = {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops,
                                      "text_offset": list(range(len(tokens)))}
        return {"id": "cmpl-fake", "object": "text_completion", "model": body.get("model"), "choices": [choice],
                "usage": {"prompt_tokens": len(ids), "completion_tokens": 1, "total_tokens": len(ids) + 1}}

    return app


class LoopbackServer:
    """Run a FastAPI app with uvicorn on 127.0.0.1 in a thread; ``base_url`` ends with ``/v1``."""

    def __init__(self, app) -> None:
        self.app = app
        self.port = _free_port()
        self._server = None
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def __enter__(self) -> "LoopbackServer":
        import uvicorn

        config = uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="off")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name="fake-vllm", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the fake vLLM server did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.should_exit = True
        self._thread.join(15)
