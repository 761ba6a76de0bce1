"""Nitsum, side by side: every static partition of the devices vs the adaptive-TP controller on a
tiered workload whose mix and load shift over time, simulated at 8B-on-H100 cost and live on
this host's (fake CPU) devices.

  python tools/bench_nitsum.py --out=benchmarks/nitsum.md
  python tools/bench_nitsum.py --parts=sim --profile          # re-measure the simulated profile
  python tools/bench_nitsum.py --parts=live --live_profile_out=benchmarks/nitsum_profile_cpu.json
  python tools/bench_nitsum.py --smoke --parts=sim            # tiny sizes, a check that it runs
  python tools/bench_nitsum.py --parts=regroups --config=configs/default.py --num_devices=6 \
      --degrees=1,3 --initial=3,3                             # only the measured regroups, any model

Simulated (scheduler/simulation/nitsum_sim.py): --num_devices devices, each instance jinfer's Scheduler
with the SLO-aware policy (scheduler/slo/policies.py) on the cost model of its TP degree
(cost_model.analytic_8b_h100_tp). The profile (SLO-safe req/s per tier and degree) is read from
--sim_profile, or measured by simulation first with --profile (scheduler/adaptive_tp/profile.py)
and written there. Then the workload (--sim_phases, lengths --sim_shapes) is served by every
static partition (scheduler/adaptive_tp/study.py: every multiset of degrees with shared instances;
per multiset, the dedicated assignment the controller ranks first at the average rates; the
controller's plan for each phase), by the best of them with FCFS inside the instances, and by
the adaptive controller (from --initial; its knobs: --window_s, --confirm, --dwell_s, --hysteresis,
--horizon_s, --smoothing, --flap_window_s).

Live (scheduler/adaptive_tp/live.py): the model of --config (default: the test model, configs/test_5m.py)
as an InstanceGroup on --num_devices devices (XLA is asked for that many CPU devices), the
SLO-aware policy in every instance. First the adaptive group's regroups are measured: built from
--initial (its other device groups' step programs compiled, as a server does), it regroups
through one partition per degree and back while requests run; ReconfigModel.fit of those
pauses is the reconfiguration time of the simulation on these cost models and, unless
--live_reconfig_s is set, the live controller's estimate. The profile comes from the cost models of
--live_cost_models (one per degree, tools/profile_engine.py --config.model.tp=N), by the same
simulation, written to --live_profile_out; the best static partition is the one the simulator
finds best on those cost models. Both it and the adaptive group then serve the same workload
(--live_phases) in wall-clock time; every output is compared with a single-engine greedy run
of the same prompts.

Reported: goodput (SLO-met requests/s from the first arrival to the last finish) and
attainment per tier and overall, weighted goodput (tier weights), the adaptive run against the
best static one, its reconfigurations (count, pause, weight bytes moved against the minimum
and a full reload, KV moved, requests migrated) and the controller's switches.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time

from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from jinfer.launch import define_config_flag, parse_flags  # noqa: E402 - after the path

FLAGS = flags.FLAGS
CONFIG = define_config_flag(os.path.join(ROOT, "configs", "test_5m.py"))
flags.DEFINE_string("out", "", "Write the Markdown report here (else stdout only).")
flags.DEFINE_list("parts", ["sim", "live"], "sim (the simulator at 8B-on-H100 cost) and/or live (this host); "
                  "regroups: only the live part's measured regroups, for any --config (e.g. the default model with "
                  "--num_devices=6 --degrees=1,3 --initial=3,3).")
flags.DEFINE_integer("num_devices", 8, "Devices to partition.", lower_bound=1)
flags.DEFINE_list("degrees", ["1", "2", "4", "8"], "TP degrees an instance may have.")
flags.DEFINE_float("attainment", 0.9, "Profiles: the attainment a rate must keep to count as SLO-safe.",
                   lower_bound=0, upper_bound=1)
flags.DEFINE_integer("profile_requests", 600, "Profiles: requests per trial rate (at least six TTFT targets' "
                     "worth of time).", lower_bound=1)
flags.DEFINE_float("profile_tol", 0.05, "Profiles: relative width the rate search stops at.", lower_bound=1e-3)
flags.DEFINE_integer("seed", 0, "Workload seed.")
flags.DEFINE_bool("smoke", False, "Tiny sizes: short phases, a few static partitions, a small profile.")
# -- the controller --
flags.DEFINE_float("window_s", 1.0, "Control window (seconds).", lower_bound=1e-3)
flags.DEFINE_integer("confirm", 2, "Windows in a row that must choose the same new partition.", lower_bound=1)
flags.DEFINE_float("dwell_s", 5.0, "Least time between two reconfigurations (seconds).", lower_bound=0)
flags.DEFINE_float("hysteresis", 0.1, "Least relative gain in weighted goodput that justifies a switch.",
                   lower_bound=0)
flags.DEFINE_float("horizon_s", 10.0, "A switch must pay for its pause within this many seconds.", lower_bound=0)
flags.DEFINE_list("initial", ["2", "2", "2", "2"], "TP degrees the adaptive controller starts from, every "
                  "instance shared by all tiers (simulated and live).")
flags.DEFINE_float("flap_window_s", 30.0, "Changes this close together double the controller's dwell (0: off).",
                   lower_bound=0)
flags.DEFINE_float("smoothing", 0.5, "Weight of the newest window in the smoothed arrival rates.",
                   lower_bound=1e-3, upper_bound=1)
# -- simulated --
flags.DEFINE_list("sim_tiers", ["interactive:250:5:4", "agent:150:50:2", "batch:5000:150:1"],
                  "Simulated tiers, highest first: name:ttft_ms:tpot_ms:weight (jinfer.config.Tier.parse).")
flags.DEFINE_list("sim_shapes", ["interactive:512:64", "agent:6144:64:0.33", "batch:1024:128"],
                  "Request lengths per tier: name:prompt:output[:spread] (mean tokens; uniform within "
                  "+-spread, default 0.5).")
flags.DEFINE_multi_string("sim_phases", ["interactive=60:interactive:100,batch:2,agent:0.5",
                                         "batch=90:interactive:4,batch:200,agent:0.5",
                                         "agent=60:interactive:4,batch:2,agent:11.5"],
                          "Workload phases in order, one per flag: name=seconds:tier:req/s,tier:req/s...")
flags.DEFINE_string("sim_profile", os.path.join(ROOT, "benchmarks", "nitsum_profile_8b_h100.json"),
                    "Profile JSON of the simulated tiers (scheduler.adaptive_tp.nitsum.Profile).")
flags.DEFINE_bool("profile", False, "Measure the simulated profile (writes --sim_profile) instead of reading it.")
flags.DEFINE_bool("sim_study", True, "Run the partition study (off: only the profile, with --profile).")
flags.DEFINE_integer("jobs", 1, "Simulations (study runs, profile searches) run in this many processes at once.",
                     lower_bound=1)
flags.DEFINE_integer("sim_max_num_seqs", 256, "Simulated instance: sequences per step.", lower_bound=1)
flags.DEFINE_integer("sim_max_num_batched_tokens", 4096, "Simulated instance: tokens per step.", lower_bound=1)
flags.DEFINE_integer("sim_num_pages", 25_000, "Simulated instance: KV pages of 16 tokens (any degree).",
                     lower_bound=1)
flags.DEFINE_bool("slow_knobs", True, "Also run the adaptive controller switching slowly (confirm 3, dwell "
                  "10 s, hysteresis 0.2; the rest as its flags): the paper's slow-switching ablation.")
flags.DEFINE_bool("fcfs", True, "Also run the best static partition with FCFS inside the instances.")
# -- live --
flags.DEFINE_list("live_tiers", ["interactive:400:45:4", "agent:500:150:2", "batch:8000:300:1"],
                  "Live tiers, highest first (as --sim_tiers).")
flags.DEFINE_list("live_shapes", ["interactive:48:24", "agent:320:16:0.25", "batch:96:96"],
                  "Live request lengths per tier (as --sim_shapes; within the model's max_model_len).")
flags.DEFINE_multi_string("live_phases", ["interactive=25:interactive:30,batch:0.3",
                                          "batch=25:interactive:0.5,batch:30", "agent=25:interactive:0.5,agent:9"],
                  "Live workload phases (as --sim_phases).")
flags.DEFINE_list("live_cost_models", [f"{tp}:benchmarks/cost_model_test_5m_cpu_tp{tp}.json" for tp in (1, 2, 4, 8)],
                  "tp:path per degree: cost models measured here (tools/profile_engine.py --config.model.tp=N).")
flags.DEFINE_bool("live_shared_host", True, "Scale each degree's cost model by num_devices / tp: the instances "
                  "of a partition into that degree step one after another on one host thread (all busy), so each "
                  "sees its next step that much later. Off: every instance as if alone on the host.")
flags.DEFINE_string("live_profile_out", "", "Write the live tiers' profile JSON here.")
flags.DEFINE_float("live_reconfig_s", 0.0, "The live controller's estimate of a regroup's pause (seconds), for its "
                   "horizon rule; 0: the measured regroups' fit (one full weight copy).", lower_bound=0)
flags.DEFINE_bool("live_replay", True, "Serve the live workload (off: stop after its profile and simulation).")
flags.DEFINE_integer("live_check", 0, "Outputs compared with a single-engine greedy run: this many (0: all).",
                     lower_bound=0)


def _parsed(prefix):
    """(tiers, shapes, phases) of the sim_ or live_ flags; UsageError naming a bad one."""
    from jinfer.config import Tier
    from scheduler.adaptive_tp.profile import Phase, TierShape
    try:
        tiers = tuple(Tier.parse(s) for s in FLAGS[f"{prefix}_tiers"].value)
        shapes = dict(TierShape.parse(s) for s in FLAGS[f"{prefix}_shapes"].value)
        phases = [Phase.parse(s) for s in FLAGS[f"{prefix}_phases"].value]
    except ValueError as e:
        raise app.UsageError(f"--{prefix}_*: {e}") from None
    names = {t.name for t in tiers}
    loose = sorted(({t for p in phases for t in p.rates} | set(shapes)) - names)
    unshaped = sorted(names - set(shapes))
    if loose or unshaped:
        raise app.UsageError(f"--{prefix}_phases/_shapes name tiers {loose} not in --{prefix}_tiers, "
                             f"or tiers {unshaped} have no shape")
    return tiers, shapes, phases


def _controller_kw():
    return dict(window_s=FLAGS.window_s, confirm=FLAGS.confirm, min_dwell_s=FLAGS.dwell_s,
                hysteresis=FLAGS.hysteresis, horizon_s=FLAGS.horizon_s, smoothing=FLAGS.smoothing,
                flap_window_s=FLAGS.flap_window_s)


def _initial():
    from scheduler.adaptive_tp.nitsum import InstancePlan, Partition
    return Partition(tuple(InstancePlan(int(n)) for n in FLAGS.initial))


def _log(line):
    print(line, file=sys.stderr, flush=True)


def _slo_policy(clock=None):
    from scheduler.slo.policies import SloAware
    return SloAware(admission=True) if clock is None else SloAware(clock=clock, admission=True)


def _workload_lines(tiers, shapes, phases):
    from scheduler.adaptive_tp.profile import average_rates
    names = [t.name for t in tiers]
    avg = average_rates(phases)
    lines = ["Tiers: " + ", ".join(f"{t.name} (TTFT {t.ttft_s * 1e3:g} ms, TPOT {t.tpot_s * 1e3:g} ms, weight "
                                   f"{t.weight:g})" for t in tiers) + ".",
             "Lengths (mean tokens, uniform within ±spread): " + ", ".join(
                 f"{n} prompt {s.prompt} / output {s.output} (±{s.spread:.0%})" for n, s in shapes.items()) + ".", "",
             "| phase | seconds | " + " | ".join(f"{n} req/s" for n in names) + " |",
             "|---|---:|" + "---:|" * len(names)]
    for k, p in enumerate(phases):
        lines.append(f"| {p.name or k + 1} | {p.duration_s:g} | " + " | ".join(f"{p.rates.get(n, 0):g}" for n in names)
                     + " |")
    lines.append(f"| average | {sum(p.duration_s for p in phases):g} | "
                 + " | ".join(f"{avg.get(n, 0):.2f}" for n in names) + " |")
    return lines


def _profile(costs, tiers, shapes, replica, path, measure, label):
    """The profile at `path`, measured first (and written there) when `measure`."""
    from scheduler.adaptive_tp.nitsum import Profile
    from scheduler.adaptive_tp.profile import profile_rates
    if not measure:
        with open(path) as f:
            return Profile.from_dict(json.load(f)), "read from"
    import multiprocessing

    t0 = time.perf_counter()
    kw = dict(replica=replica, policy=_slo_policy, attainment=FLAGS.attainment, requests=FLAGS.profile_requests,
              rel_tol=FLAGS.profile_tol, seed=FLAGS.seed, progress=_log,
              notes=f"{label}; tools/bench_nitsum.py: SloAware(admission=True) in one instance, "
                    f"{FLAGS.profile_requests} requests per trial, rate within {FLAGS.profile_tol:.0%}")
    if FLAGS.jobs > 1:
        with multiprocessing.get_context("fork").Pool(FLAGS.jobs) as pool:
            profile = profile_rates(costs, tiers, shapes, pool_map=pool.imap, **kw)
    else:
        profile = profile_rates(costs, tiers, shapes, **kw)
    _log(f"profile measured in {time.perf_counter() - t0:.0f} s")
    if path:
        with open(path, "w") as f:
            json.dump(profile.to_dict(), f, indent=1)
            f.write("\n")
    return profile, "measured into"


_STUDY = {}  # what forked simulation workers share: the Study and the adaptive controller's profile


def _simulate(task):
    """One study run: ("static", label, partition, policy name) or ("adaptive", ...)."""
    from scheduler.adaptive_tp import study as ns
    from scheduler.adaptive_tp.nitsum import Partition
    from scheduler.slo.policies import FirstCome

    kind, label, part, policy = task
    study = _STUDY["study"]
    make = _slo_policy if policy == "slo" else (lambda clock: FirstCome())
    if kind == "static":
        return study.static(label, Partition.parse(part), make, policy)
    knobs = _controller_kw()
    if kind == "adaptive_slow":
        knobs.update(confirm=3, min_dwell_s=10.0, hysteresis=0.2)
    control = ns.adaptive_control(_STUDY["profile"], study.tiers, study.num_devices, initial=_initial(),
                                  reconfig_s=ns.modelled_pause(study.reconfig), **knobs)
    return study.run(control, label, "adaptive", make, policy)


def _map(tasks):
    """The runs of `tasks`, in order, in --jobs processes (forked: they share _STUDY)."""
    if FLAGS.jobs == 1 or len(tasks) == 1:
        yield from map(_simulate, tasks)
        return
    import multiprocessing
    with multiprocessing.get_context("fork").Pool(min(FLAGS.jobs, len(tasks))) as pool:
        yield from pool.imap(_simulate, tasks)


def _study(costs, tiers, shapes, phases, profile, replica, vocab, limit=None, reconfig=None):
    """Every static partition, FCFS on the best, the adaptive controller, in the simulator
    (reconfig: its ReconfigModel; None: the default, an assumption for 8B over NVLink)."""
    from scheduler.adaptive_tp import study as ns
    from scheduler.adaptive_tp.profile import shifting_workload
    from scheduler.simulation.nitsum_sim import ReconfigModel

    items = shifting_workload(phases, shapes, vocab=vocab, seed=FLAGS.seed)
    _STUDY["study"] = ns.Study(costs, tiers, items, replica, reconfig or ReconfigModel(), FLAGS.num_devices,
                               FLAGS.window_s)
    _STUDY["profile"] = profile
    planner = ns.make_controller(profile, tiers, FLAGS.num_devices, window_s=FLAGS.window_s)
    candidates = ns.static_partitions(planner, phases)[:limit]
    _log(f"{len(items)} requests; {len(candidates)} static partitions")
    tasks = [("adaptive", "controller", "", "slo")]
    if FLAGS.slow_knobs:
        tasks.append(("adaptive_slow", "controller, slow switching", "", "slo"))
    tasks += [("static", label, str(p), "slo") for label, p in candidates]
    runs = []
    for run in _map(tasks):
        runs.append(run)
        _log(f"  {run.partition} ({run.label}): {run.goodput:.2f} req/s ({run.wall_s:.0f} s)")
    adaptive, others, runs = runs[0], runs[1:len(tasks) - len(candidates)], runs[len(tasks) - len(candidates):]
    best = max(runs, key=lambda r: r.goodput)
    extra = list(_map([("static", best.label, best.partition, "fcfs")])) if FLAGS.fcfs else []
    return items, runs, best, extra + others, adaptive


def _decisions(run, limit=40):
    lines = ["| time s | from | to | reason |", "|---:|---|---|---|"]
    for d in run.decisions[:limit]:
        lines.append(f"| {d.time_s:.0f} | `{d.current}` | `{d.candidate}` | {d.reason} |")
    if len(run.decisions) > limit:
        lines.append(f"| ... | | | {len(run.decisions) - limit} more |")
    return lines


def _verdict(runs, best, adaptive, tiers, target):
    ratio = adaptive.goodput / best.goodput if best.goodput else float("nan")
    wbest = max(runs, key=lambda r: r.weighted_goodput(tiers))
    wratio = adaptive.weighted_goodput(tiers) / wbest.weighted_goodput(tiers)
    return (f"Best static partition: `{best.partition}` ({best.label}), overall goodput {best.goodput:.2f} req/s. "
            f"Adaptive: {adaptive.goodput:.2f} req/s = **{ratio:.2f}x** the best static (target >= {target:g}x: "
            f"{'met' if ratio >= target else 'missed'}). Weighted goodput (tier weights): adaptive "
            f"{adaptive.weighted_goodput(tiers):.2f} vs the best static by that measure, `{wbest.partition}`, "
            f"{wbest.weighted_goodput(tiers):.2f} ({wratio:.2f}x).")


def _bound_line(profile, tiers, phases):
    from scheduler.adaptive_tp import study as ns
    static, part, switching = ns.profile_bound(ns.make_controller(profile, tiers, FLAGS.num_devices), phases)
    return (f"By the profile alone (predicted goodput: min(capacity, arrivals) per tier, dedicated instances, no "
            f"interference, free switches): the best single partition, `{part}`, {static:.1f} req/s averaged over "
            f"the phases; the best partition for each phase, {switching:.1f} req/s: a ceiling of "
            f"{switching / static:.2f}x for switching (shared instances, which the profile cannot score, are not "
            f"in it).")


def sim_section():
    from scheduler.adaptive_tp import study as ns
    from scheduler.cost_model import analytic_8b_h100_tp
    from scheduler.adaptive_tp.profile import profile_table
    from scheduler.simulation.simulator import ReplicaConfig

    tiers, shapes, phases = _parsed("sim")
    degrees = sorted(int(d) for d in FLAGS.degrees)
    costs = {tp: analytic_8b_h100_tp(tp) for tp in degrees}
    replica = ReplicaConfig(num_pages=FLAGS.sim_num_pages, max_num_batched_tokens=FLAGS.sim_max_num_batched_tokens,
                            max_num_seqs=FLAGS.sim_max_num_seqs)
    t0 = time.perf_counter()
    profile, how = _profile(costs, tiers, shapes, replica, FLAGS.sim_profile, FLAGS.profile,
                            "analytic_8b_h100_tp per degree")
    if not FLAGS.sim_study:
        return [f"## Simulated profile ({how} `{FLAGS.sim_profile}`)", "", profile_table(profile), "",
                f"{time.perf_counter() - t0:.0f} s of wall time."]
    items, runs, best, extra, adaptive = _study(costs, tiers, shapes, phases, profile, replica, (0, 32000),
                                                limit=4 if FLAGS.smoke else None)
    rc = ns.reconfiguration_summary(adaptive)
    out = [f"## Simulated: {FLAGS.num_devices} devices, cost model `analytic_8b_h100_tp`", "",
           *_workload_lines(tiers, shapes, phases), "",
           f"{len(items)} requests, seed {FLAGS.seed}. Instance: {replica.capacity_tokens} KV tokens in pages of "
           f"{replica.page_size} (any degree), token budget {replica.max_num_batched_tokens}, "
           f"{replica.max_num_seqs} sequences per step; SloAware with admission in every instance.", "",
           f"### Profile (SLO-safe req/s per instance, attainment >= {profile.attainment:g}; {how} "
           f"`{os.path.relpath(FLAGS.sim_profile, ROOT) if FLAGS.sim_profile else '-'}`)", "",
           profile_table(profile), "",
           "### Goodput", "",
           "Goodput: requests meeting both their tier's targets per second from the first arrival to the last "
           "finish (attainment in brackets: met / arrived). Overall: every tier's requests; weighted: "
           "sum of weight x tier goodput.", "",
           ns.goodput_table(runs + extra + [adaptive], tiers, best), "",
           _verdict(runs, best, adaptive, tiers, 1.2), "",
           _bound_line(profile, tiers, phases), "",
           f"Controller: window {FLAGS.window_s:g} s, confirm {FLAGS.confirm}, dwell {FLAGS.dwell_s:g} s, hysteresis "
           f"{FLAGS.hysteresis:g}, horizon {FLAGS.horizon_s:g} s, smoothing {FLAGS.smoothing:g}; its reconfiguration "
           f"estimate {ns.modelled_pause(ns.ReconfigModel())(None, None):.2f} s (one full weight copy over the link).",
           "",
           f"Reconfigurations: {rc['count']}, total pause {rc['pause_s']:.2f} s (modelled), weights moved "
           f"{rc['weight_bytes'] / 1e9:.1f} GB (the minimum: only slices devices lack) vs "
           f"{rc['weight_full_reload'] / 1e9:.1f} GB for a full reload of every new instance, "
           f"{rc['kv_tokens']} KV tokens and {rc['requests_migrated']} requests migrated.", "",
           *[f"Switching slowly: {ns.reconfiguration_summary(r)['count']} reconfigurations, "
             f"{ns.reconfiguration_summary(r)['pause_s']:.2f} s of pause." for r in extra if r.partition == "adaptive"],
           "", "Switches:", "", *_decisions(adaptive), "",
           f"{time.perf_counter() - t0:.0f} s of wall time."]
    return out


def _cost_models():
    """--live_cost_models, each scaled by num_devices / tp with --live_shared_host."""
    import dataclasses

    from scheduler.cost_model import FEATURES, CostModel
    costs = {}
    for spec in FLAGS.live_cost_models:
        tp, _, path = spec.partition(":")
        if not tp.isdigit() or not path:
            raise app.UsageError(f"--live_cost_models entry {spec!r} must look like tp:path")
        cost = CostModel.load(path if os.path.isabs(path) else os.path.join(ROOT, path))
        if FLAGS.live_shared_host:
            k = FLAGS.num_devices / int(tp)
            cost = dataclasses.replace(cost, name=f"{cost.name}-x{k:g}", notes=f"{cost.notes}; times {k:g}: "
                                       f"{k:g} instances of this degree step in turn on one host",
                                       **{f: getattr(cost, f) * k for f in FEATURES})
        costs[int(tp)] = cost
    return costs


def _live_runs(launch, tiers, items, best, profile, reconfig):
    """The best static partition, then the adaptive group (from --initial), over the same
    items; then one engine's greedy outputs for the check. Every group is built (and its
    step programs compiled, when the config warms up) before its clock starts."""
    import dataclasses

    from jinfer.engine import Engine
    from jinfer.instances import InstanceGroup, Instances
    from jinfer.launch import load_model
    from jinfer.sampling_params import SamplingParams
    from scheduler.adaptive_tp import study as ns
    from scheduler.adaptive_tp.nitsum import Partition
    from scheduler.adaptive_tp.live import replay
    from scheduler.simulation.nitsum_sim import StaticControl

    model, tok = load_model(launch.model)
    kw = dict(cache_config=launch.cache, scheduler_config=launch.scheduler, options=launch.engine,
              policy_factory=_slo_policy)
    part = Partition.parse(best.partition)
    control = ns.adaptive_control(profile, tiers, FLAGS.num_devices, initial=_initial(),
                                  reconfig_s=(lambda old, new: FLAGS.live_reconfig_s) if FLAGS.live_reconfig_s
                                  else ns.modelled_pause(reconfig), **_controller_kw())
    groups = {"static": lambda: InstanceGroup(Instances(model, tok, list(part.sizes), **kw),
                                              StaticControl(part, FLAGS.window_s)),
              "adaptive": lambda: InstanceGroup(Instances(model, tok, list(control.sizes), **kw), control)}
    runs = {}
    for name, build in groups.items():
        t0 = time.perf_counter()
        group = build()
        if name == "adaptive" and launch.engine.warmup:
            # A serving process does this at start (entrypoints.build): regroups then take the step
            # programs of their new device groups from the instances' ProgramStore.
            group.instances.precompile(control.degrees)
        _log(f"{name}: built in {time.perf_counter() - t0:.0f} s")
        runs[name] = (replay(group, items, tiers), group)
        _log(f"  served in {runs[name][0].wall_s:.0f} s, {len(group.reconfigurations)} regroups")
    ref = Engine(model, tok, launch.cache, launch.scheduler, options=dataclasses.replace(launch.engine, warmup=False))
    check = list(range(len(items)))[:FLAGS.live_check or None]
    outs = ref.generate([list(items[k].prompt) for k in check],
                        [SamplingParams(temperature=0, max_tokens=items[k].max_tokens, ignore_eos=True) for k in check])
    return runs, {k: tuple(o.token_ids) for k, o in zip(check, outs)}, control


def _measure_reconfig(launch):
    """(ReconfigModel fitted to the adaptive group's measured regroups, their records): the group
    built from --initial with its other device groups compiled, then regrouped through one
    partition per degree (and the largest degree beside the smallest, when it leaves devices over) and
    back while requests run (scheduler.adaptive_tp.live.measure_regroups)."""
    import jax
    import numpy as np

    from jinfer.instances import InstanceGroup, Instances
    from jinfer.launch import load_model
    from scheduler.adaptive_tp.live import measure_regroups
    from scheduler.simulation.nitsum_sim import ReconfigModel

    bad = [d for d in FLAGS.degrees if int(d) < 1 or FLAGS.num_devices % int(d)]
    if bad:
        raise app.UsageError(f"--degrees {bad} do not divide --num_devices={FLAGS.num_devices}")
    model, tok = load_model(launch.model)
    group = InstanceGroup(Instances(model, tok, [int(n) for n in FLAGS.initial], cache_config=launch.cache,
                                    scheduler_config=launch.scheduler, options=launch.engine))
    if launch.engine.warmup:
        group.instances.precompile([int(d) for d in FLAGS.degrees])
    n, start = FLAGS.num_devices, list(group.instances.sizes)
    degrees = sorted({int(d) for d in FLAGS.degrees}, reverse=True)
    cycle = [[d] * (n // d) for d in degrees]
    big, small = degrees[0], degrees[-1]
    if big < n and (n - big) % small == 0:  # the largest degree beside the smallest
        cycle.append([big] + [small] * ((n - big) // small))
    cycle += [start]
    cycle = [c for k, c in enumerate(cycle) if c != ([start] + cycle)[k]]  # no regroup into what it is
    rng = np.random.default_rng(FLAGS.seed)
    prompts = [rng.integers(2, tok.vocab_size, 48).tolist() for _ in range(4 * len(group.engines))]
    records = measure_regroups(group, cycle, prompts)
    weight_bytes = sum(x.nbytes for x in jax.tree.leaves(group.engines[0].runner.state))  # global sizes
    kv_per_token = model.config.kv_bytes_per_token(jax.numpy.dtype(launch.model.dtype).itemsize)
    fit = ReconfigModel.fit([(r.seconds, r.weights_moved + r.kv_moved) for r in records], weight_bytes, kv_per_token)
    return fit, records


def _reconfig_lines(fit, records, title="### Regroups measured before the runs",
                    use=" (the simulation below, and the live controller's estimate unless --live_reconfig_s)"):
    rows = ["| from | to | seconds | weights moved MB | KV moved MB | requests migrated |", "|---|---|---:|---:|---:|---:|"]
    rows += [f"| {r.old} | {r.new} | {r.seconds:.2f} | {r.weights_moved / 2**20:.1f} | {r.kv_moved / 2**20:.2f} | "
             f"{r.requests_migrated} |" for r in records]
    return [title, "", *rows, "",
            f"Median pause {statistics.median(r.seconds for r in records):.2f} s. Fitted reconfiguration model"
            f"{use}: {fit.fixed_s:.2f} s + bytes at {fit.bandwidth / 1e9:.2f} GB/s."]


def _live_setup():
    """(launch config, cost models, instance config as the simulator's ReplicaConfig)."""
    import jax

    from jinfer.launch import resolve
    from scheduler.adaptive_tp.profile import check_fits
    from scheduler.simulation.simulator import ReplicaConfig

    try:
        launch = resolve(CONFIG.value)
        costs = _cost_models()
    except (ValueError, OSError) as e:
        raise app.UsageError(str(e)) from None
    if jax.device_count() < FLAGS.num_devices:
        raise app.UsageError(f"{jax.device_count()} devices, --num_devices={FLAGS.num_devices}")
    sched, cache = launch.scheduler, launch.cache
    replica = ReplicaConfig(page_size=cache.page_size, num_pages=cache.num_pages,
                            max_num_batched_tokens=sched.max_num_batched_tokens, max_num_seqs=sched.max_num_seqs,
                            max_model_len=sched.max_model_len)
    try:
        check_fits(dict(_parsed("live")[1]), replica)
    except ValueError as e:
        raise app.UsageError(f"--live_shapes: {e}") from None
    return launch, costs, replica


def _live_report(live, want, control, tiers, best):
    """The live table, the adaptive group's regroups and switches, the output check."""
    import dataclasses

    from scheduler.adaptive_tp import study as ns
    from scheduler.adaptive_tp.live import reconfiguration_summary

    rows, checks = [], []
    for name, (run, group) in live.items():
        rows.append(ns.StudyRun("live", best.partition if name == "static" else "adaptive", "slo",
                                run.result.tier_stats(), group.reconfigurations, wall_s=run.wall_s))
        done = [k for k in want if not run.result.records[k].error]
        same = sum(run.tokens[k] == want[k] for k in done)
        checks.append(f"{name}: {same} of {len(done)} finished requests' outputs equal a single engine's greedy run "
                      f"({len(want) - len(done)} refused at admission)")
    static, adaptive = rows
    run, group = live["adaptive"]
    rc = reconfiguration_summary(group)
    regroups = ["| time s | from | to | seconds | weights moved MB | minimum MB | full reload MB | KV moved MB | "
                "requests migrated |", "|---:|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in group.reconfigurations:
        regroups.append(f"| {r.time_s - run.start:.1f} | {r.old} | {r.new} | {r.seconds:.2f} | "
                        f"{r.weights_moved / 2**20:.1f} | {r.weights_minimum / 2**20:.1f} | "
                        f"{r.weights_full_reload / 2**20:.1f} | {r.kv_moved / 2**20:.2f} | {r.requests_migrated} |")
    ratio = adaptive.goodput / static.goodput if static.goodput else float("nan")
    switches = [dataclasses.replace(d, time_s=d.time_s - run.start) for d in control.controller.history if d.switched]
    mb = lambda n: f"{n / 2**20:.1f} MB"  # noqa: E731
    return ["### Live", "", ns.goodput_table([static, adaptive], tiers, static), "",
            f"Adaptive / best static (by the simulator), live: **{ratio:.2f}x** overall goodput (target >= 1x: "
            f"{'met' if ratio >= 1 else 'missed'}). Adaptive started from `{_initial()}`.", "",
            f"Regroups: {rc['count']}, {rc['seconds']:.2f} s in all; weights moved {mb(rc['weights_moved'])} "
            f"(minimum {mb(rc['weights_minimum'])}, full reload {mb(rc['weights_full_reload'])}); KV moved "
            f"{mb(rc['kv_moved'])}; {rc['requests_migrated']} requests migrated.", "",
            *(regroups + [""] if rc["count"] else []),
            "Switches of the live controller (seconds from the start of its run):", "",
            *_decisions(ns.StudyRun("", "", "", {}, [], switches)), "",
            "Outputs: " + "; ".join(checks) + "."]


def regroups_section():
    from harness.experiments import describe_host
    from jinfer.launch import resolve

    try:
        launch = resolve(CONFIG.value)
    except (ValueError, OSError) as e:
        raise app.UsageError(str(e)) from None
    fit, measured = _measure_reconfig(launch)
    return [f"## Regroups: {launch.model.display_name} on {FLAGS.num_devices} fake CPU devices", "",
            f"Host: {describe_host()}. Instances as the config: {launch.cache.num_pages} KV pages of "
            f"{launch.cache.page_size} tokens, token budget {launch.scheduler.max_num_batched_tokens}.", "",
            *_reconfig_lines(fit, measured, "### Regroups measured (requests running)", "")]


def live_section():
    from harness.experiments import describe_host
    from jinfer.launch import load_tokenizer
    from scheduler.adaptive_tp import study as ns
    from scheduler.adaptive_tp.profile import profile_table

    tiers, shapes, phases = _parsed("live")
    launch, costs, replica = _live_setup()
    t0, load_before = time.perf_counter(), os.getloadavg()[0]
    profile, how = _profile(costs, tiers, shapes, replica, FLAGS.live_profile_out, True,
                            "test model on fake CPU devices, cost models from tools/profile_engine.py")
    vocab = (2, load_tokenizer(launch.model).vocab_size)  # above BOS and EOS
    fit, measured = _measure_reconfig(launch)
    _log(f"regroups measured: {[round(r.seconds, 2) for r in measured]} s")
    items, runs, best, extra, sim_adaptive = _study(costs, tiers, shapes, phases, profile, replica, vocab,
                                                     limit=4 if FLAGS.smoke else None, reconfig=fit)
    scaled = ", each times num_devices / tp: the instances of one degree step in turn on one host thread"
    out = [f"## Live: {launch.model.display_name} on {FLAGS.num_devices} fake CPU devices", "",
           *_workload_lines(tiers, shapes, phases), "",
           f"{len(items)} requests, seed {FLAGS.seed}; instances as the config: {replica.capacity_tokens} KV tokens "
           f"in pages of {replica.page_size}, token budget {replica.max_num_batched_tokens}, "
           f"{replica.max_num_seqs} sequences per step; SloAware with admission in every instance.", "",
           "Cost models (tools/profile_engine.py --config.model.tp=N" + (scaled if FLAGS.live_shared_host else "") +
           "; ms): " + "; ".join(f"tp{tp}: fixed {c.fixed_s * 1e3:.2f}, per token {c.per_token_s * 1e3:.4f}, per "
                                 f"sequence {c.per_seq_s * 1e3:.3f}" for tp, c in sorted(costs.items())) + ".", "",
           *_reconfig_lines(fit, measured), "",
           f"### Profile ({how} `{FLAGS.live_profile_out or '-'}`)", "", profile_table(profile), "",
           "### The same workload in the simulator on these cost models", "",
           ns.goodput_table(runs + extra + [sim_adaptive], tiers, best), "",
           _verdict(runs, best, sim_adaptive, tiers, 1.0), "", "Switches:", "", *_decisions(sim_adaptive), ""]
    if FLAGS.live_replay:
        live, want, control = _live_runs(launch, tiers, items, best, profile, fit)
        out += [f"Host: {describe_host()}; load average {load_before:.1f} before the live part, "
                f"{os.getloadavg()[0]:.1f} after. The fake devices share the host's cores, so a higher degree is "
                "slower here, not faster, and the instances step one after another on one host thread.", "",
                *_live_report(live, want, control, tiers, best), ""]
    return out + [f"{time.perf_counter() - t0:.0f} s of wall time."]


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    unknown = sorted(set(FLAGS.parts) - {"sim", "live", "regroups"})
    if unknown:
        raise app.UsageError(f"--parts names {unknown}; known: sim, live, regroups")
    if FLAGS.smoke:
        FLAGS.sim_phases = ["a=4:interactive:20,batch:2", "b=4:batch:10,agent:1"]
        FLAGS.live_phases = ["a=3:interactive:2,batch:0.5", "b=3:batch:1,agent:0.5"]
        FLAGS.profile_requests, FLAGS.profile_tol = 40, 0.3
    if "live" in FLAGS.parts or "regroups" in FLAGS.parts:
        from harness.experiments import use_fake_devices
        use_fake_devices(FLAGS.num_devices)
    out = (sim_section() if "sim" in FLAGS.parts else []) + (live_section() if "live" in FLAGS.parts else [])
    if "regroups" in FLAGS.parts:
        out += regroups_section()
    report = f"Command: `python tools/bench_nitsum.py {' '.join(sys.argv[1:])}`\n\n" + "\n".join(out)
    print(report)
    if FLAGS.out:
        with open(FLAGS.out, "w") as f:
            f.write("# Nitsum: adaptive tensor parallelism vs static partitions\n\n" + report + "\n")


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
