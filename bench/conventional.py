"""The conventional build the performance targets were set against: FastAPI, sse-starlette and
the openai SDK's typed event objects, on uvicorn. It speaks just enough of the service's API for
bench/load.py (POST /threads, POST /chat as SSE, GET /health), so F can measure it on this
machine beside the floors (`bench/run.py --conventional PYTHON`, PYTHON being the interpreter of
a virtualenv with `fastapi sse-starlette uvicorn[standard]` and the service's openai: none of
them is a dependency of the service)."""

import json
import os
import uuid

from fastapi import FastAPI
from openai import AsyncOpenAI
from pydantic import BaseModel
from sse_starlette.sse import EventSourceResponse

client = AsyncOpenAI()
app = FastAPI()
MODEL = os.environ.get("OPENAI_MODEL", "gpt-4.1-mini")


class ChatRequest(BaseModel):
    thread_id: str
    message: str


@app.get("/health")
async def health() -> dict:
    return {"status": "ok"}


@app.post("/threads")
async def create_thread() -> dict:
    conversation = await client.conversations.create()
    return {"thread_id": conversation.id}


@app.post("/chat")
async def chat(request: ChatRequest) -> EventSourceResponse:
    run_id = f"run_{uuid.uuid4().hex}"

    async def events():
        yield {"event": "thread.run.created", "data": json.dumps({"run_id": run_id, "thread_id": request.thread_id})}
        stream = await client.responses.create(model=MODEL, conversation=request.thread_id,
                                               input=request.message, stream=True)
        async for event in stream:
            if event.type == "response.output_text.delta":
                yield {"event": "thread.message.delta", "data": json.dumps({"delta": {"content": event.delta}})}
            elif event.type == "response.completed":
                text = event.response.output_text
                yield {"event": "thread.message.completed", "data": json.dumps({"message": {"content": text}})}
        yield {"event": "metadata", "data": json.dumps({"thread_id": request.thread_id, "run_id": run_id})}

    return EventSourceResponse(events(), sep="\n")
