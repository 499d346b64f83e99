"""Runs a route's ``Generation`` to an HTTP response: all at once, or as a stream of SSE events.

Both ways admit the request first, abort it when the client hangs up, map engine errors to HTTP
errors while the status line is still unsent, and fill in the access log's token counts and TTFT.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import aclosing

from fastapi import Request, Response

from ferry.disconnect import ClientDisconnected, race_disconnect
from ferry.openai_errors import OpenAIError
from ferry.outputs import RequestOutput
from ferry.server.generation import Generation, engine_error, log_info
from ferry.server.responses import usage_of
from ferry.sse import SSE_DONE, SSEResponse, sse_event

# NOTE: 499 is nginx's "client closed request"; nobody receives it, it only shows in our log line.
CLIENT_CLOSED = 499

Output = tuple[int, RequestOutput]  # (prompt index, that prompt's cumulative output)
OnOutput = Callable[[int, RequestOutput], Iterable[str]]  # one output -> its SSE events
OnEnd = Callable[[list[RequestOutput]], Iterable[str]]  # each prompt's last output -> closing events


async def run_blocking(request: Request, gen: Generation) -> list[RequestOutput] | Response:
    """Run to completion, aborting if the client hangs up: each prompt's final output, or a 499."""
    gen.admit()
    try:
        try:
            outputs = await race_disconnect(request, _collect(gen))
        except ClientDisconnected:
            _log_disconnect(request)
            return Response(status_code=CLIENT_CLOSED)
        except OpenAIError:
            raise
        except Exception as exc:  # the engine failed this request: 400/500, others go on
            raise error_of(exc, gen.request_id) from exc
    finally:
        await gen.aclose()
    fill_log(request, outputs, gen)
    return outputs


async def stream_response(request: Request, gen: Generation, on_output: OnOutput,
                          on_end: OnEnd) -> Response:
    """An SSE response: ``on_output``'s events for each output, then ``on_end``'s, then [DONE].

    The first output is awaited before answering, so that early errors (admission, a bad prompt)
    still get a real status; later ones are reported in-band as an error event.
    """
    stream, first = await _prime(request, gen)
    if stream is None:
        return Response(status_code=CLIENT_CLOSED)
    return SSEResponse(_events(gen.request_id, first, stream, on_output, on_end), on_close=gen.aclose)


def error_of(exc: Exception, request_id: str) -> OpenAIError:
    """The error the client sees for an exception out of a generation (``engine_error``)."""
    if isinstance(exc, OpenAIError):
        return exc
    return engine_error(exc, request_id)


def fill_log(request: Request, outputs: list[RequestOutput], gen: Generation) -> None:
    info = log_info(request)
    if info is None:
        return
    usage = usage_of(outputs)
    info.prompt_tokens = usage.prompt_tokens
    info.completion_tokens = usage.completion_tokens
    info.cached_tokens = usage.prompt_tokens_details.cached_tokens if usage.prompt_tokens_details else 0
    info.ttft_s = gen.ttft


async def _collect(gen: Generation) -> list[RequestOutput]:
    """The last cumulative output of each prompt that produced one, in prompt order."""
    finals: list[RequestOutput | None] = [None] * len(gen.prompts)
    async for i, out in gen.start():
        finals[i] = out
    return [o for o in finals if o is not None]


async def _prime(request: Request,
                 gen: Generation) -> tuple[AsyncIterator[Output] | None, Output | None]:
    """Start streaming and wait for the first output; (None, None) when the client hung up."""
    gen.admit()
    try:
        stream = gen.start()
        first = await race_disconnect(request, anext(stream, None))
    except ClientDisconnected:
        await gen.aclose()
        _log_disconnect(request)
        return None, None
    except OpenAIError:
        await gen.aclose()
        raise
    except Exception as exc:
        await gen.aclose()
        raise error_of(exc, gen.request_id) from exc
    return stream, first


async def _events(request_id: str, first: Output | None, stream: AsyncIterator[Output],
                  on_output: OnOutput, on_end: OnEnd) -> AsyncIterator[str]:
    lasts: dict[int, RequestOutput] = {}
    try:
        async with aclosing(_chain(first, stream)) as outputs:
            async for i, out in outputs:
                lasts[i] = out
                # NOTE: all of an output's events are made before the first is sent: a failure
                # while making them sends none, and the error event follows whole outputs only.
                for event in list(on_output(i, out)):
                    yield event
        for event in on_end(list(lasts.values())):
            yield event
    except Exception as exc:  # reported in-band: the status line is already sent
        yield sse_event(error_of(exc, request_id).body())
    yield SSE_DONE


async def _chain(first: Output | None, stream: AsyncIterator[Output]) -> AsyncIterator[Output]:
    if first is not None:
        yield first
    async for item in stream:
        yield item


def _log_disconnect(request: Request) -> None:
    info = log_info(request)
    if info is not None:
        info.error = "client disconnected"
