"""Hosting gRPC services: a grpc.aio server on its own event-loop thread, bearer auth, health,
reflection, and registration that answers undecodable requests with INVALID_ARGUMENT.

The jinfer server (jinfer/serving/server.py) and the router (jinfer/router/server.py) both run on one.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import threading

import grpc
from google.protobuf import message_factory
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from jinfer.errors import shorten  # noqa: F401  (re-exported for the servers)

log = logging.getLogger(__name__)

MAX_DETAILS_CHARS = 1024
"""Status details longer than this are cut (gRPC carries them in a size-limited header)."""


def clip_details(details: str) -> str:
    if len(details) <= MAX_DETAILS_CHARS:
        return details
    return details[:MAX_DETAILS_CHARS] + f"... ({len(details)} chars)"


async def abort(context, code: grpc.StatusCode, details: str) -> None:
    """context.abort(code, details), quiet when the call has already ended.

    A call whose deadline passes (or whose client leaves) just as the handler answers has no
    one to send a status to: gRPC fails the send and, unless the news of the call's end reached
    Python first, logs that as an ERROR with a traceback. It is an expected event, so it is
    logged here at DEBUG and the handler ends as a cancelled call does (gRPC logs that at DEBUG
    too). Like context.abort, this never returns."""
    try:
        await context.abort(code, details)
    except grpc.aio.InternalError as e:  # the core refused to send the status
        remaining = context.time_remaining()
        expired = remaining is not None and remaining <= 0
        if not (expired or context.done() or context.cancelled()):
            raise  # the call is not over: a real failure, logged as one
        why = "its deadline had passed" if expired else "its client had left"
        log.debug("%s not sent, %s (%s)", code.name, why, e)
        raise asyncio.CancelledError from None


class Undecodable:
    """What a handler receives instead of a request whose bytes did not parse."""

    __slots__ = ("error",)

    def __init__(self, error: Exception):
        self.error = error


def _safe_parser(cls):
    def parse(data: bytes):
        try:
            return cls.FromString(data)
        except Exception as e:  # noqa: BLE001 - protobuf's DecodeError, or invalid UTF-8 in a string
            return Undecodable(e)
    return parse


def _guarded(method, streaming: bool):
    """method, answering an Undecodable request INVALID_ARGUMENT before it runs."""
    async def refuse(request, context):
        await abort(context, grpc.StatusCode.INVALID_ARGUMENT,
                    clip_details(f"request could not be decoded: {request.error}"))

    if streaming:
        async def stream(request, context):
            if isinstance(request, Undecodable):
                await refuse(request, context)
            async for item in method(request, context):
                yield item
        return stream

    async def unary(request, context):
        if isinstance(request, Undecodable):
            await refuse(request, context)
        return await method(request, context)
    return unary


def add_service(server, servicer, service) -> None:
    """Registers every method of `service` (a protobuf ServiceDescriptor) on `servicer`, like
    the generated add_*Servicer_to_server, except that bytes that do not parse as the request
    message (truncated or garbage protobuf, invalid UTF-8 in a string field) are answered
    INVALID_ARGUMENT instead of gRPC's UNKNOWN and an error in the server log."""
    handlers = {}
    for m in service.methods:
        request_cls = message_factory.GetMessageClass(m.input_type)
        response_cls = message_factory.GetMessageClass(m.output_type)
        if m.client_streaming:
            raise NotImplementedError(f"{m.full_name}: client-streaming methods are not supported")
        make = grpc.unary_stream_rpc_method_handler if m.server_streaming else grpc.unary_unary_rpc_method_handler
        handlers[m.name] = make(_guarded(getattr(servicer, m.name), m.server_streaming),
                                request_deserializer=_safe_parser(request_cls),
                                response_serializer=response_cls.SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
    server.add_registered_method_handlers(service.full_name, handlers)


class BearerAuth(grpc.aio.ServerInterceptor):
    """Every call but health and reflection needs `authorization: Bearer <token>`."""

    def __init__(self, token: str):
        self._expected = f"Bearer {token}".encode()

        async def deny(request, context):
            await abort(context, grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")

        self._deny_unary = grpc.unary_unary_rpc_method_handler(deny)
        self._deny_stream = grpc.unary_stream_rpc_method_handler(deny)

    async def intercept_service(self, continuation, details):
        if details.method.startswith(("/grpc.health.", "/grpc.reflection.")):
            return await continuation(details)
        given = [value for key, value in details.invocation_metadata or () if key == "authorization"]
        # Exactly one, compared in constant time: several would each be judged by a different
        # proxy or framework.
        if len(given) == 1 and hmac.compare_digest(given[0].encode(), self._expected):
            return await continuation(details)
        streaming = details.method.endswith(("/Generate", "/WatchReplica"))
        return self._deny_stream if streaming else self._deny_unary


class GrpcHost:
    """A grpc.aio server on its own event-loop thread: bearer auth on every call but health and
    reflection, grpc.health.v1 and reflection for the services given."""

    def __init__(self, name: str):
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self.server = None
        self.health = None
        self.services: tuple[str, ...] = ()

    def run(self, coro):
        """Runs a coroutine on the host's loop (started on first use) and returns its result."""
        if not self._thread.is_alive():
            self._thread.start()
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    async def serve(self, register, services: tuple[str, ...], address: str, *, auth_token: str | None = None,
                    options=(), credentials=None) -> int:
        """Builds the server, lets `register(server)` add the servicers, binds `address`
        (TLS with `credentials`), starts it and marks `services` SERVING; returns the port."""
        self.server = grpc.aio.server(interceptors=[BearerAuth(auth_token)] if auth_token else [],
                                      options=list(options))
        register(self.server)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.services = tuple(services)
        reflection.enable_server_reflection(self.services + (health.SERVICE_NAME, reflection.SERVICE_NAME),
                                            self.server)
        port = (self.server.add_secure_port(address, credentials) if credentials is not None
                else self.server.add_insecure_port(address))
        await self.server.start()
        await self.set_serving(True)
        return port

    async def set_serving(self, serving: bool) -> None:
        """Health of the server and of each of its services."""
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("",) + self.services:
            await self.health.set(name, status)

    async def drain(self, grace: float, before_stop=None) -> None:
        """Marks the services NOT_SERVING, runs before_stop(), then stops the server letting
        in-flight calls finish for up to `grace` seconds."""
        if self.server is None:
            return
        await self.set_serving(False)
        if before_stop is not None:
            before_stop()
        await self.server.stop(grace)

    def close(self) -> None:
        """Stops the event loop and joins its thread."""
        if self._thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join()
