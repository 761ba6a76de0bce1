"""Step-time cost model of one replica: what the router's load estimates and the simulator's
clock run on.

One engine step computes a ragged batch: sequence i adds q_i tokens after c_i cached ones.
    t = fixed_s + per_token_s·Σq_i + per_attn_s·Σq_i(c_i + (q_i+1)/2) + per_kv_s·Σ(c_i+q_i) + per_seq_s·n
(weights read once per step; linear layers per token; attention per query-key pair; KV read per
context token; per-sequence overhead). `fit` estimates the coefficients from measured steps
(tools/profile_engine.py); `analytic_7b_h100` derives them from roofline numbers instead.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np

FEATURES = ("fixed_s", "per_token_s", "per_attn_s", "per_kv_s", "per_seq_s")


def step_features(seqs) -> np.ndarray:
    """seqs: iterable of (new_tokens, cached_tokens) -> the model's feature vector."""
    t = a = k = n = 0.0
    for q, c in seqs:
        t += q
        a += q * (c + (q + 1) / 2)
        k += c + q
        n += 1
    return np.array([1.0, t, a, k, n])


@dataclasses.dataclass(frozen=True)
class CostModel:
    name: str
    fixed_s: float
    per_token_s: float
    per_attn_s: float
    per_kv_s: float
    per_seq_s: float
    notes: str = ""

    def __post_init__(self):
        for f in FEATURES:
            if getattr(self, f) < 0:
                raise ValueError(f"{f}={getattr(self, f)} must be >= 0")

    @property
    def coefficients(self) -> np.ndarray:
        return np.array([getattr(self, f) for f in FEATURES])

    def step_time(self, seqs) -> float:
        """Seconds for one step; seqs: (new_tokens, cached_tokens) per sequence."""
        return float(step_features(seqs) @ self.coefficients)

    def prefill_time(self, tokens: int, cached: int = 0) -> float:
        """One request's prefill of `tokens` after `cached` ones, alone in a step."""
        if tokens <= 0:
            return 0.0
        return self.step_time([(tokens, cached)])

    def decode_time(self, output_tokens: int, context: int, batch: int = 1) -> float:
        """This request's share of `output_tokens` decode steps in a batch of `batch` sequences
        around `context` tokens each."""
        if output_tokens <= 0:
            return 0.0
        step = self.step_time([(1, context)] * batch)
        return output_tokens * step / batch

    # -- fitting and storage ---------------------------------------------------------------

    @classmethod
    def fit(cls, samples, name: str, notes: str = "") -> "CostModel":
        """Least squares with non-negative coefficients (features fitted negative are dropped
        and the rest refitted). samples: [(seqs, seconds)]."""
        x = np.stack([step_features(s) for s, _ in samples])
        y = np.array([t for _, t in samples], dtype=float)
        active = list(range(len(FEATURES)))
        while True:
            scale = np.maximum(np.abs(x[:, active]).max(axis=0), 1e-30)  # condition the solve
            coef, *_ = np.linalg.lstsq(x[:, active] / scale, y, rcond=None)
            coef = coef / scale
            if (coef >= 0).all() or len(active) == 1:
                break
            active = [a for a, c in zip(active, coef) if c >= 0]
        full = np.zeros(len(FEATURES))
        full[active] = np.maximum(coef, 0)
        return cls(name, *map(float, full), notes=notes)

    def relative_error(self, samples) -> float:
        """Median |predicted − measured| / measured over samples."""
        errs = [abs(self.step_time(s) - t) / t for s, t in samples]
        return float(np.median(errs))

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1)

    @classmethod
    def load(cls, path: str) -> "CostModel":
        with open(path) as f:
            d = json.load(f)
        unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"{path}: unknown cost model fields {unknown}")
        return cls(**d)


def analytic_7b_h100() -> CostModel:
    """A 7B-class model (Llama-3-8B shape: 32 layers, hidden 4096, 8 KV heads of 128, bf16) on one
    H100, from roofline numbers, not a measurement: weights 16 GB read per step at ~2.5 TB/s
    effective (6.4 ms); 2·8e9 FLOPs per token at ~600 TFLOP/s effective (27 µs); attention
    4·32·4096 FLOPs per query-key pair (0.9 ns); KV 128 KiB per context token read at ~2.5 TB/s
    (52 ns); 30 µs of per-sequence host and kernel overhead."""
    return CostModel("analytic-7b-h100", fixed_s=6.4e-3, per_token_s=2.7e-5, per_attn_s=0.9e-9,
                     per_kv_s=5.2e-8, per_seq_s=3.0e-5, notes=analytic_7b_h100.__doc__.split("\n\n")[0])


def analytic_8b_h100_tp(tp: int, allreduce_latency_s: float = 8e-6, allreduce_bw: float = 300e9) -> CostModel:
    """analytic_7b_h100 (the Llama-3-8B shape) on `tp` H100s of one NVLink node, tensor
    parallel: weights, FLOPs, attention pairs and KV reads split over tp devices (the per-
    sequence overhead does not); every layer adds two all-reduces of the step's activations
    (hidden 4096, bf16: 8 KiB per token), each `allreduce_latency_s` plus a ring's
    2(tp-1)/tp of the bytes at `allreduce_bw` bytes/s per device. The defaults (8 µs, 300 GB/s)
    are assumptions for NVLink 4 through NVSwitch, not measurements."""
    if tp < 1:
        raise ValueError(f"tp={tp} must be >= 1")
    base = analytic_7b_h100()
    layers, hidden_bytes = 32, 4096 * 2
    comm_fixed = comm_token = 0.0
    if tp > 1:
        comm_fixed = 2 * layers * allreduce_latency_s
        comm_token = 2 * layers * 2 * (tp - 1) / tp * hidden_bytes / allreduce_bw
    return CostModel(f"analytic-8b-h100-tp{tp}", fixed_s=base.fixed_s / tp + comm_fixed,
                     per_token_s=base.per_token_s / tp + comm_token, per_attn_s=base.per_attn_s / tp,
                     per_kv_s=base.per_kv_s / tp, per_seq_s=base.per_seq_s,
                     notes=f"tp={tp}: " + analytic_8b_h100_tp.__doc__.split("\n\n")[0].replace("\n", " "))
