"""A small Python client for jinfer.v1.Inference."""

from __future__ import annotations

from typing import Iterator

import grpc

from jinfer.serving import inference_pb2 as pb
from jinfer.serving import inference_pb2_grpc as pb_grpc

_FIELDS = ("temperature", "top_k", "top_p", "min_p", "seed", "max_tokens", "n", "stop", "stop_token_ids",
           "ignore_eos", "logprobs", "tier", "session_key", "request_id", "speculate", "intercept_token_ids",
           "intercept")


class Client:
    """Client("127.0.0.1:50051", token=..., root_cert=path) -- a channel to one server."""

    def __init__(self, target: str, *, token: str | None = None, root_cert: str | None = None,
                 max_message_bytes: int = 16 << 20):
        options = [("grpc.max_receive_message_length", max_message_bytes),
                   ("grpc.max_send_message_length", max_message_bytes)]
        if root_cert is not None:
            with open(root_cert, "rb") as f:
                self._channel = grpc.secure_channel(target, grpc.ssl_channel_credentials(f.read()), options)
        else:
            self._channel = grpc.insecure_channel(target, options)
        self._stub = pb_grpc.InferenceStub(self._channel)
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()

    def close(self) -> None:
        self._channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @staticmethod
    def request(prompt: str | list[int], **params) -> pb.GenerateRequest:
        """A GenerateRequest; params are GenerateRequest fields (temperature, max_tokens, ...)."""
        unknown = sorted(set(params) - set(_FIELDS))
        if unknown:
            raise ValueError(f"unknown GenerateRequest fields {unknown}; known: {list(_FIELDS)}")
        if isinstance(prompt, str):
            return pb.GenerateRequest(text=prompt, **params)
        return pb.GenerateRequest(token_ids=pb.TokenIds(ids=list(prompt)), **params)

    def generate_stream(self, prompt: str | list[int], *, timeout: float | None = None, **params
                        ) -> Iterator[pb.GenerateResponse]:
        """The server's stream; cancel it (iterator.cancel()) to abort the request."""
        return self._stub.Generate(self.request(prompt, **params), timeout=timeout, metadata=self._metadata)

    def resume_stream(self, request_id: str, tool_output: str | list[int], *, timeout: float | None = None
                      ) -> Iterator[pb.GenerateResponse]:
        """Continues a paused request (its stream's last message had paused set) with its
        tool's output; the next segment's stream (cancel() aborts the request)."""
        if isinstance(tool_output, str):
            req = pb.ResumeRequest(request_id=request_id, text=tool_output)
        else:
            req = pb.ResumeRequest(request_id=request_id, token_ids=pb.TokenIds(ids=list(tool_output)))
        return self._stub.Resume(req, timeout=timeout, metadata=self._metadata)

    def resume(self, request_id: str, tool_output: str | list[int], **kw) -> dict:
        """Runs a paused request's next segment to its finish or next pause (as generate())."""
        return self._collect(self.resume_stream(request_id, tool_output, **kw))[0]

    def generate(self, prompt: str | list[int], **params) -> list[dict]:
        """Runs one request to its finish (or, with intercept_token_ids, its first pause); per
        sample: token_ids, text, finish_reason, paused, usage, ttft_s."""
        return self._collect(self.generate_stream(prompt, **params))

    @staticmethod
    def _collect(stream) -> list[dict]:
        samples: dict[int, dict] = {}
        for msg in stream:
            s = samples.setdefault(msg.index, {"token_ids": [], "text": "", "logprobs": [], "finish_reason": "",
                                               "paused": False, "ttft_s": None, "request_id": msg.request_id})
            s["token_ids"] += list(msg.token_ids)
            s["text"] += msg.text
            s["logprobs"] += list(msg.logprobs)
            if msg.HasField("ttft_s"):
                s["ttft_s"] = msg.ttft_s
            s["finish_reason"], s["paused"] = msg.finish_reason, msg.paused
            u = msg.usage
            s["usage"] = {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
                          "cached_prompt_tokens": u.cached_prompt_tokens, "draft_tokens": u.draft_tokens,
                          "accepted_draft_tokens": u.accepted_draft_tokens, "spec_steps": u.spec_steps}
        return [samples[i] for i in sorted(samples)]

    def server_info(self, timeout: float | None = None) -> pb.ServerInfo:
        return self._stub.GetServerInfo(pb.GetServerInfoRequest(), metadata=self._metadata, timeout=timeout)

    def server_stats(self, timeout: float | None = None) -> pb.ServerStats:
        """Goodput per SLO tier since the server started (GetServerStats; a router answers
        UNIMPLEMENTED)."""
        return self._stub.GetServerStats(pb.GetServerStatsRequest(), metadata=self._metadata, timeout=timeout)

    def watch_replica(self, min_interval_s: float = 0.0) -> Iterator[pb.ReplicaEvent]:
        """The server's load reports and prefix-cache evictions (a stream; cancel() ends it)."""
        return self._stub.WatchReplica(pb.WatchReplicaRequest(min_interval_s=min_interval_s),
                                       metadata=self._metadata)

    def reset_prefix_cache(self, timeout: float | None = 60) -> int:
        """Drops the server's unused prefix-cache pages (a router: every replica's); returns
        how many were freed."""
        return self._stub.ResetPrefixCache(pb.ResetPrefixCacheRequest(), metadata=self._metadata,
                                           timeout=timeout).freed_pages

    def router_stats(self, timeout: float | None = None) -> pb.RouterStats:
        """A router's per-replica view (jinfer.v1.Router; plain servers answer UNIMPLEMENTED)."""
        return pb_grpc.RouterStub(self._channel).GetRouterStats(pb.GetRouterStatsRequest(),
                                                                metadata=self._metadata, timeout=timeout)
