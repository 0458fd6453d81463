"""Client side of the job event stream (`client.jobs.events(job_id)`, `AsyncClient` too):
`iter_events` / `aiter_events` follow `GET /v1/jobs/{id}/events/stream` until the job's `end`,
reconnecting with `Last-Event-ID` after a dropped connection (nothing is missed or repeated),
skipping heartbeats. httpx + httpx-sse only (no server imports)."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
from httpx_sse import aconnect_sse, connect_sse


@dataclass(frozen=True)
class StreamMessage:
    """`event`: an event type (`job.started`, …), `metric` (a metric point) or `end` (the job is
    terminal; the last message). `id`: pass as `last_event_id` to resume after this message."""

    event: str
    id: str
    data: dict[str, Any]


RETRYABLE = (httpx.TransportError, httpx.RemoteProtocolError)


def iter_events(
    client: httpx.Client,
    job_id: str,
    *,
    last_event_id: str | None = None,
    metrics: bool = True,
    max_reconnects: int = 100,
    reconnect_delay_s: float = 1.0,
) -> Iterator[StreamMessage]:
    """Every event (and metric point) of the job from the start or after `last_event_id`, until `end`.
    `client` carries the base URL and the `Authorization` header."""
    failures = 0
    while True:
        headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
        try:
            with connect_sse(
                client,
                "GET",
                f"/v1/jobs/{job_id}/events/stream",
                params={"metrics": str(metrics).lower()},
                headers=headers,
            ) as source:
                source.response.raise_for_status()
                for sse in source.iter_sse():
                    if not sse.data:  # heartbeat comment
                        continue
                    failures = 0
                    last_event_id = sse.id or last_event_id
                    message = StreamMessage(sse.event, sse.id, json.loads(sse.data))
                    yield message
                    if message.event == "end":
                        return
        except RETRYABLE:
            failures += 1
            if failures > max_reconnects:
                raise
            time.sleep(reconnect_delay_s)
        # a clean close before `end` (the server's events_stream_max_s): reconnect at once


async def aiter_events(
    client: httpx.AsyncClient,
    job_id: str,
    *,
    last_event_id: str | None = None,
    metrics: bool = True,
    max_reconnects: int = 100,
    reconnect_delay_s: float = 1.0,
) -> AsyncIterator[StreamMessage]:
    """The async twin of `iter_events`."""
    import asyncio

    failures = 0
    while True:
        headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
        try:
            async with aconnect_sse(
                client,
                "GET",
                f"/v1/jobs/{job_id}/events/stream",
                params={"metrics": str(metrics).lower()},
                headers=headers,
            ) as source:
                source.response.raise_for_status()
                async for sse in source.aiter_sse():
                    if not sse.data:
                        continue
                    failures = 0
                    last_event_id = sse.id or last_event_id
                    message = StreamMessage(sse.event, sse.id, json.loads(sse.data))
                    yield message
                    if message.event == "end":
                        return
        except RETRYABLE:
            failures += 1
            if failures > max_reconnects:
                raise
            await asyncio.sleep(reconnect_delay_s)
