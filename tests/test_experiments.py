"""The experiments API behind the notebooks: collective bytes read from compiled HLO (by hand
and on a real sharded program), tables, sizes, and the routing comparison."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from harness.experiments import hlo, notebook_size, use_fake_devices
from harness.experiments.partitions import partition_name
from harness.experiments.report import cdf, markdown_table
from harness.experiments.tensor_parallel import megatron_bytes
from jinfer.models.config import scaled_llama

# A compiled module's text as XLA prints it, cut down: an all-reduce of a tuple on the straight
# path, one in a while body, an all-gather in a conditional branch, an async all-gather whose
# operand names its shape inline, and a reduce-scatter reached through a call.
HLO = """\
HloModule jit_step, is_scheduled=true, num_partitions=4

%add (x: f32[], y: f32[]) -> f32[] {
  %x = f32[] parameter(0)
  %y = f32[] parameter(1)
  ROOT %sum = f32[] add(%x, %y)
}

%body (p: (s32[], f32[8,4])) -> (s32[], f32[8,4]) {
  %p = (s32[], f32[8,4]{1,0}) parameter(0)
  %gte = f32[8,4]{1,0} get-tuple-element(%p), index=1
  %all-reduce.2 = f32[8,4]{1,0} all-reduce(%gte), channel_id=2, replica_groups={{0,1,2,3}}, to_apply=%add
  ROOT %t = (s32[], f32[8,4]{1,0}) tuple(%i, %all-reduce.2)
}

%cond (p.1: (s32[], f32[8,4])) -> pred[] {
  %p.1 = (s32[], f32[8,4]{1,0}) parameter(0)
  ROOT %lt = pred[] compare(%a, %b), direction=LT
}

%branch_0 (q: bf16[2,16]) -> bf16[8,16] {
  %q = bf16[2,16]{1,0} parameter(0)
  ROOT %all-gather.1 = bf16[8,16]{1,0} all-gather(%q), channel_id=3, dimensions={0}
}

%branch_1 (q.1: bf16[2,16]) -> bf16[8,16] {
  %q.1 = bf16[2,16]{1,0} parameter(0)
  ROOT %b = bf16[8,16]{1,0} broadcast(%q.1), dimensions={0,1}
}

%scatter (r: f32[16]) -> f32[4] {
  %r = f32[16]{0} parameter(0)
  ROOT %reduce-scatter.1 = f32[4]{0} reduce-scatter(%r), channel_id=5, dimensions={0}, to_apply=%add
}

ENTRY %main.1_spmd (a: f32[8,4], c: bf16[2,16], v: f32[16]) -> f32[8,4] {
  %a = f32[8,4]{1,0} parameter(0)
  %c = bf16[2,16]{1,0} parameter(1)
  %v = f32[16]{0} parameter(2)
  %all-reduce.1 = (f32[8,4]{1,0}, s32[3]{0}) all-reduce(%a, %idx), channel_id=1, to_apply=%add
  %ags = (s32[5]{0}, s32[20]{0}) all-gather-start(s32[5]{0} %idx5), channel_id=6, dimensions={0}
  %agd = s32[20]{0} all-gather-done(%ags)
  %w = (s32[], f32[8,4]{1,0}) while(%init), condition=%cond, body=%body
  %k = bf16[8,16]{1,0} conditional(%pred, %c, %c), branch_computations={%branch_0, %branch_1}
  %rs = f32[4]{0} call(%v), to_apply=%scatter
  %idx = s32[3]{0} constant({1, 2, 3})
  ROOT %out = f32[8,4]{1,0} copy(%a)
}
"""


def test_collective_traffic_by_hand():
    t = hlo.collective_traffic(HLO)
    got = {op.name: (op.kind, op.bytes, op.context) for op in t.ops}
    assert got == {
        "all-reduce.2": ("all-reduce", 8 * 4 * 4, "loop"),
        "all-gather.1": ("all-gather", 2 * 16 * 2, "branch"),
        "reduce-scatter.1": ("reduce-scatter", 16 * 4, "step"),
        "all-reduce.1": ("all-reduce", 8 * 4 * 4 + 3 * 4, "step"),  # a tuple of operands
        "ags": ("all-gather", 5 * 4, "step"),  # the async start, its operand's shape inline; -done skipped
    }
    assert t.bytes() == 64 + 140 + 20 and t.bytes("loop") == 128 and t.bytes(None) == 64 + 140 + 20 + 128 + 64
    assert t.by_kind() == {"all-reduce": (1, 140), "all-gather": (1, 20), "reduce-scatter": (1, 64),
                           "all-to-all": (0, 0), "collective-permute": (0, 0)}


def test_shape_bytes():
    assert hlo.shape_bytes("f32[16,512]{1,0}") == 16 * 512 * 4
    assert hlo.shape_bytes("(bf16[2,3]{1,0}, /*index=1*/pred[7], s32[])") == 12 + 7 + 4
    assert hlo.shape_bytes("token[]") == 0


@pytest.mark.multi_device
def test_collective_traffic_of_a_sharded_matmul():
    # x @ w with the contracted dimension split over 4 devices: each device holds a partial
    # [8, 4] f32 product, and one all-reduce of those 128 bytes makes it whole.
    mesh = Mesh(np.array(jax.devices()[:4]), ("tp",))
    x = jax.device_put(jnp.ones((8, 16)), NamedSharding(mesh, PartitionSpec(None, "tp")))
    w = jax.device_put(jnp.ones((16, 4)), NamedSharding(mesh, PartitionSpec("tp", None)))
    f = jax.jit(lambda x, w: x @ w, out_shardings=NamedSharding(mesh, PartitionSpec()))
    t = hlo.collective_traffic(f.lower(x, w).compile().as_text())
    assert t.by_kind()["all-reduce"] == (1, 8 * 4 * 4) and t.bytes() == 128
    assert hlo.collective_traffic(jax.jit(lambda x: x * 2).lower(jnp.ones(3)).compile().as_text()).ops == ()


def test_megatron_bytes():
    cfg = scaled_llama(512, 2, 4096)
    assert megatron_bytes(cfg, 16, 1) == 0
    assert megatron_bytes(cfg, 16, 4) == (2 * 2 + 1) * 16 * 512 * 4
    assert megatron_bytes(cfg, 16, 4, vocab_parallel=False) == 2 * 2 * 16 * 512 * 4
    assert megatron_bytes(scaled_llama(512, 2, 4097), 16, 4) == 2 * 2 * 16 * 512 * 4  # vocab not divisible


def test_markdown_table_and_cdf():
    assert markdown_table(["a", "b"], [[1, "x"]]) == "| a | b |\n|---|---:|\n| 1 | x |"
    with pytest.raises(ValueError, match=r"row \[1\] has 1 cells, the header 2"):
        markdown_table(["a", "b"], [[1]])
    with pytest.raises(ValueError, match="align='l' has 1 columns, the header 2"):
        markdown_table(["a", "b"], [], align="l")
    x, y = cdf([3.0, 1.0, 2.0, 2.0])
    assert x.tolist() == [1, 2, 2, 3] and y.tolist() == [0.25, 0.5, 0.75, 1.0]


def test_sizes_and_devices(monkeypatch):
    monkeypatch.delenv("JINFER_NOTEBOOK_SIZE", raising=False)
    assert notebook_size() == "full" and notebook_size("small") == "small"
    monkeypatch.setenv("JINFER_NOTEBOOK_SIZE", "tiny")
    with pytest.raises(ValueError, match=r"JINFER_NOTEBOOK_SIZE='tiny' must be one of \('small', 'full'\)"):
        notebook_size()
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_enable_fast_math=false")
    use_fake_devices(4)
    import os
    assert os.environ["XLA_FLAGS"] == "--xla_cpu_enable_fast_math=false --xla_force_host_platform_device_count=4"
    use_fake_devices(8)  # a count already set is kept
    assert os.environ["XLA_FLAGS"].endswith("count=4")


def test_partition_names():
    assert [partition_name(s) for s in ([8], [4, 4], [2] * 4, [1] * 8, [4, 2, 1, 1])] == \
        ["8", "4+4", "2+2+2+2", "8x1", "4+2+1+1"]


def test_routing_comparison_runs_every_router_on_the_same_requests():
    from harness.experiments.routing import E2_ABLATION, RoutingRuns, RoutingSetup, findings
    from scheduler.routing.policies import ROUTERS
    runs = RoutingRuns(RoutingSetup(num_requests=40, scale=8))
    c = runs.compare("toolbench", 1.0)
    assert list(c.results) == list(ROUTERS) and runs.requests == 4 * 40
    assert all(len(r.records) == 40 and not any(x.error for x in r.records) for r in c.results.values())
    prompts = {r: [x.prompt_tokens for x in res.records] for r, res in c.results.items()}
    assert all(p == prompts["round-robin"] for p in prompts.values())
    assert len(runs.ablation("toolbench", 1.0)) == len(E2_ABLATION)
    assert findings([c]).startswith("- toolbench (rate x1, ")
