"""The router's gRPC services: `jinfer.v1.Inference`, served as one server would (each call
routed and relayed by the RouterServer), and `jinfer.v1.Router` (what the policy sees)."""

from __future__ import annotations

import asyncio
import contextlib

import grpc

from jinfer.serving import inference_pb2 as pb
from jinfer.serving import inference_pb2_grpc as pb_grpc
from jinfer.serving.frontend import ServingError
from jinfer.serving.grpc_host import clip_details


class RouterInferenceServicer(pb_grpc.InferenceServicer):
    def __init__(self, owner):
        self.o = owner  # the RouterServer

    async def Generate(self, request, context):
        try:
            async with contextlib.aclosing(self.o.generate(request)) as stream:
                async for msg in stream:  # (closed at once if the client goes away mid-yield)
                    yield msg
        except ServingError as e:
            await context.abort(grpc.StatusCode[e.code], clip_details(e.message))

    async def Resume(self, request, context):
        try:
            async with contextlib.aclosing(self.o.resume(request)) as stream:
                async for msg in stream:
                    yield msg
        except ServingError as e:
            await context.abort(grpc.StatusCode[e.code], clip_details(e.message))

    async def GetServerInfo(self, request, context):
        return self.o.info()

    async def GetServerStats(self, request, context):
        await context.abort(grpc.StatusCode.UNIMPLEMENTED,
                            "a router judges no SLOs itself: ask each replica's GetServerStats "
                            "(GetRouterStats lists them)")

    async def WatchReplica(self, request, context):
        await context.abort(grpc.StatusCode.UNIMPLEMENTED,
                            "a router has no KV cache of its own: watch its replicas (GetRouterStats lists them)")
        yield pb.ReplicaEvent()  # never reached: a streaming handler is an async generator

    async def ResetPrefixCache(self, request, context):
        """Resets every up replica's prefix cache; the evictions reach the policy's tree (a down
        replica's entries are gone already)."""
        o = self.o
        up = [rep for rep in o.links if rep.up]
        if not up:
            await context.abort(grpc.StatusCode.UNAVAILABLE, o.links.why_none_up())
        try:
            freed = await asyncio.gather(*(rep.stub.ResetPrefixCache(pb.ResetPrefixCacheRequest(),
                                                                     metadata=rep.metadata, timeout=60)
                                           for rep in up))
        except grpc.aio.AioRpcError as e:
            await context.abort(e.code(), f"a replica failed to reset: {e.details()}")
        return pb.ResetPrefixCacheResponse(freed_pages=sum(f.freed_pages for f in freed))


class RouterStatsServicer(pb_grpc.RouterServicer):
    def __init__(self, owner):
        self.o = owner  # the RouterServer

    async def GetRouterStats(self, request, context):
        return self.o.stats()
