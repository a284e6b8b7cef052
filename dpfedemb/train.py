"""The DP federated round loop: sampling, rounds, budget stop, checkpoints, outputs, CLI.

``python -m dpfedemb.train --clients PARTITION_DIR --init MODEL_DIR --output MODEL_DIR ...``
trains a private phase (``--phase train`` or ``finetune``); ``--prior-privacy`` composes the new
phase with earlier ones (fine-tuning after training). Outputs: the backbone (a model directory),
``privacy.json`` (every DP parameter, relation, accountant, epsilon, delta, population, rounds
run) and ``metrics.json`` (per-round loss, epsilon, non-private diagnostics).

Checkpoints hold the whole process state (backbone, server optimizer, aggregator state), the
sampler's RNG state and the privacy ledger, written every ``checkpoint_every`` rounds through
``tff.program.FileProgramStateManager`` into a staging folder, moved into place, and then named in
``LATEST`` (written atomically), so a kill at any point resumes from the last complete one.
Checkpoints are secrets: the sampler state reveals who took part, and tree aggregation keeps its
noise seeds in the aggregator state. Keep them beside the pseudonym key, never in artifacts.
"""
from __future__ import annotations

import argparse
import asyncio
import atexit
import dataclasses
import gc
import json
import logging
import math
import sys
import time
import uuid
from typing import Any, Optional, Sequence

import psutil

from dpfedemb import clients as clients_lib
from dpfedemb import model as model_lib
from dpfedemb import privacy, storage
from dpfedemb.config import (ConfigError, LifetimeConfig, ModelConfig, PrivacyConfig, TrainConfig,
                             as_dict)

log = logging.getLogger("dpfedemb.train")
LATEST = "LATEST"
WORKER_RSS_LIMIT = 2 * 2**30


def _workers() -> list[psutil.Process]:
    out = []
    for child in psutil.Process().children(recursive=True):
        try:
            if "worker_binary" in " ".join(child.cmdline()):
                out.append(child)
        except psutil.NoSuchProcess:
            pass
    return out


def stop_tff_workers() -> None:
    """Stop the C++ worker_binary processes TFF's default context started from this process
    (they outlive Python otherwise). TFF keeps working afterwards: a fresh execution context
    replaces the old one and starts a new worker when next needed.

    The workers get SIGKILL first: TFF's own shutdown sends SIGINT and waits, which hangs for
    ever when the process was started with SIGINT ignored (``cmd &`` in a script, nohup)."""
    for w in _workers():
        try:
            w.kill()  # not reaped here: TFF's ServiceManager reaps it when the context goes
        except psutil.NoSuchProcess:
            pass
    tff = sys.modules.get("tensorflow_federated")
    if tff is not None:
        tff.backends.native.set_sync_local_cpp_execution_context()
        gc.collect()
    for w in _workers():
        try:
            w.kill()
            w.wait(5)
        except (psutil.NoSuchProcess, psutil.TimeoutExpired):
            pass


def worker_rss_bytes() -> int:
    """Resident memory of this process's TFF workers."""
    total = 0
    for w in _workers():
        try:
            total += w.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


atexit.register(stop_tff_workers)


@dataclasses.dataclass
class Progress:
    """What a run has done so far (saved in every checkpoint, with the TFF state)."""

    rounds_run: int = 0
    history: list = dataclasses.field(default_factory=list)
    sampler: Optional[dict] = None
    stopped_by_budget: bool = False


def _checkpoint_save(ckpt_dir: str, state: Any, progress: Progress) -> None:
    import tensorflow_federated as tff

    stage = storage.join(ckpt_dir, f"staging-{uuid.uuid4().hex}")
    version = progress.rounds_run
    manager = tff.program.FileProgramStateManager(stage, prefix="round_")
    asyncio.run(manager.save({"state": state, "progress": json.dumps(dataclasses.asdict(progress))},
                             version))
    final = storage.join(ckpt_dir, f"round_{version}")
    # publish_dir renames locally and copies object by object on gs:// (no directory rename).
    storage.publish_dir(storage.join(stage, f"round_{version}"), final)
    storage.write_json_atomic(storage.join(ckpt_dir, LATEST), {"version": version})
    # Older versions and the debris of saves killed midway are never read again.
    for old in storage.glob(storage.join(ckpt_dir, "round_*")) + \
            storage.glob(storage.join(ckpt_dir, "staging-*")):
        if old.rstrip("/").rsplit("/", 1)[-1] != f"round_{version}":
            storage.remove_tree(old)


def _checkpoint_load(ckpt_dir: str, structure: Any) -> Optional[tuple[Any, Progress]]:
    latest = storage.join(ckpt_dir, LATEST)
    if not storage.exists(latest):
        return None
    import tensorflow_federated as tff

    version = int(storage.read_json(latest)["version"])
    manager = tff.program.FileProgramStateManager(ckpt_dir, prefix="round_")
    saved = asyncio.run(manager.load(version, {"state": structure, "progress": ""}))
    p = saved["progress"]
    p = json.loads(p.decode() if isinstance(p, bytes) else str(p))
    return saved["state"], Progress(**p)


def phase_mechanisms(phases: list) -> list[tuple[privacy.Mechanism, int]]:
    """(Mechanism, rounds run) of each phase recorded in a privacy.json."""
    from dpfedemb.ledger import mechanism_of
    return [(mechanism_of(ph), int(ph["rounds_run"])) for ph in phases]


def privacy_record(phase: str, mech: privacy.Mechanism, rounds_run: int,
                   prior: Optional[dict], population: dict) -> dict:
    """privacy.json: this phase composed with earlier ones; flat keys describe this phase."""
    phases = list((prior or {}).get("phases", []))
    this = {"phase": phase, **mech.to_dict(), "rounds_run": rounds_run,
            "epsilon": privacy.epsilon_json(privacy.epsilon(mech, rounds_run)),
            "dp_event": repr(privacy.phase_event(mech, rounds_run))}
    phases.append(this)
    total = privacy.epsilon_of(phase_mechanisms(phases), mech.delta)
    return {"unit": "user (all of one user's examples)", "phases": phases,
            "epsilon": privacy.epsilon_json(total), "delta": mech.delta,
            "private": not math.isinf(total),
            "mechanism": mech.mechanism, "noise_multiplier": mech.noise_multiplier,
            "clip_norm": mech.clip_norm, "sampling": mech.sampling,
            "sampling_rate": mech.sampling_rate, "clients_per_round": mech.clients_per_round,
            "rounds": sum(int(ph["rounds_run"]) for ph in phases),
            "users_per_client": mech.users_per_client,
            "neighboring_relation": mech.neighboring_relation,
            "accountant": mech.effective_accountant, **population}


def run_training(partition_dir: str, init: str, output: str, train: TrainConfig,
                 priv: PrivacyConfig, *, phase: str = "train", prior: Optional[dict] = None,
                 checkpoint_dir: Optional[str] = None, lifetime: Optional[LifetimeConfig] = None,
                 stop_after: Optional[int] = None) -> dict:
    """Run (or resume) a private phase and write its outputs; returns privacy.json's content.

    With ``lifetime``, the phase is checked against the population's lifetime budget before any
    round (refusing spends nothing) and recorded in its ledger when it completes (idempotent per
    run and phase, so a resumed phase is counted once).
    ``stop_after`` ends the process after that many rounds of this invocation (fault tests)."""
    import tensorflow_federated as tff
    from dpfedemb import federated

    backbone, model_cfg = model_lib.load_backbone(init)
    store = clients_lib.ClientStore(partition_dir, model_cfg.image,
                                    local_labels=train.algorithm == "dp_fedemb")
    head_classes = store.max_local_classes if train.algorithm == "dp_fedemb" \
        else store.num_global_classes
    if priv.clients_per_round > len(store.ids):
        raise ConfigError(f"invalid clients_per_round={priv.clients_per_round}: the partition has "
                          f"only {len(store.ids)} virtual clients")
    mech = privacy.mechanism_from(priv, len(store.ids), store.users_per_client, train.rounds)
    population = {"num_users": store.num_users, "num_clients": len(store.ids)}
    prior_mechs = phase_mechanisms((prior or {}).get("phases", []))
    budget_rounds = train.rounds
    if priv.epsilon_budget is not None and mech.private:
        budget_rounds = _rounds_within_budget(mech, prior_mechs, priv.epsilon_budget, train.rounds)
        if budget_rounds < train.rounds:
            log.warning("epsilon budget %.3f allows %d of the %d rounds; stopping there",
                        priv.epsilon_budget, budget_rounds, train.rounds)

    if lifetime is not None and lifetime.budget is not None and mech.private:
        from dpfedemb import ledger
        would_be = ledger.check_budget(lifetime.ledger_uri, lifetime.population_id,
                                       [(mech, budget_rounds)], lifetime.budget)
        log.info("lifetime budget check passed: population %s would reach epsilon %.4f of %.4f",
                 lifetime.population_id, would_be, lifetime.budget)
    spec = federated.ProcessSpec(model=model_cfg, train=train, privacy=priv,
                                 head_classes=head_classes)
    # Keras models built before TFF traces its computations (in v1 graphs) become unusable, so
    # take the weights out first and rebuild the backbone at the end.
    initial = federated.weights_of(backbone, spec)
    del backbone
    process = federated.build_process(spec)
    state = process.initialize()
    state = process.set_model_weights(state, initial)
    mode = "epoch" if priv.mechanism == "tree_aggregation" else priv.sampling
    sampler = clients_lib.Sampler(store.ids, mode, priv.clients_per_round, seed=train.seed)
    progress = Progress()
    ckpt = checkpoint_dir or f"{output.rstrip('/')}-checkpoints"
    restored = _checkpoint_load(ckpt, state)
    if restored:
        state, progress = restored
        sampler.set_state(progress.sampler)
        log.info("resumed from checkpoint after round %d", progress.rounds_run)

    t0, examples, started = time.time(), 0.0, progress.rounds_run
    while progress.rounds_run < budget_rounds:
        r = progress.rounds_run + 1
        sampled = sampler.sample()
        data = [store.dataset(c, sampler.rng, train.max_examples_per_client, train.batch_size)
                for c in sampled]
        out = process.next(state, data)
        state = out.state
        cw = out.metrics["client_work"]
        eps = privacy.epsilon_of(prior_mechs + [(mech, r)], mech.delta)
        examples += float(cw["examples"])
        done = r - started
        rate = examples / (time.time() - t0)
        eta = (time.time() - t0) / done * (budget_rounds - r)
        row = {"round": r, "clients": int(cw["clients"]), "loss": _num(cw["loss"]),
               "fraction_clipped": _num(cw["fraction_clipped"]),
               "mean_update_norm": _num(cw["mean_update_norm"]),
               "nonfinite_updates": int(cw["nonfinite_updates"]),
               "epsilon": privacy.epsilon_json(eps), "examples_per_second": rate}
        if priv.mechanism == "gaussian_adaptive":
            row["clip"] = float(out.metrics["aggregator"]["dp_query_metrics"]["clip"])
        progress.history.append(row)
        progress.rounds_run = r
        log.info("round %d/%d clients %d loss %s clipped %s (non-private diagnostics) "
                 "epsilon %s %.0f examples/s eta %.0fs", r, budget_rounds, row["clients"],
                 _fmt(row["loss"]), _fmt(row["fraction_clipped"]), _fmt(eps), rate, eta)
        if r % train.checkpoint_every == 0 or r == budget_rounds:
            progress.sampler = sampler.get_state()
            _checkpoint_save(ckpt, state, progress)
        if worker_rss_bytes() > WORKER_RSS_LIMIT:
            # TFF 0.87's worker keeps ~150-190 MB per round of this process and never frees it
            # (measured); the state lives here, so a fresh worker continues the same run.
            log.info("restarting TFF's worker (%.1f GB resident)", worker_rss_bytes() / 2**30)
            stop_tff_workers()
        if stop_after is not None and r - started >= stop_after:
            return {}
    progress.stopped_by_budget = budget_rounds < train.rounds
    record = privacy_record(phase, mech, progress.rounds_run, prior, population)
    record["stopped_by_budget"] = progress.stopped_by_budget
    if progress.rounds_run:
        record["aggregator_dp_event"] = aggregator_dp_event(state)
    if lifetime is not None:
        record["lifetime"] = _record_lifetime(lifetime, phase, mech, progress.rounds_run)
    backbone = model_lib.build_backbone(model_cfg)
    federated.assign_backbone(backbone, process.get_model_weights(state), spec)
    metrics = {"phase": phase, "rounds": progress.history, "rounds_run": progress.rounds_run,
               "params": as_dict(train), "privacy_params": as_dict(priv),
               "diagnostics_note": "loss, fraction_clipped and update norms are non-private "
                                   "diagnostics, not covered by epsilon"}
    model_lib.save_backbone(backbone, model_cfg, output,
                            extra={"trained_by": phase, "privacy": record},
                            json_files={"privacy.json": record, "metrics.json": metrics})
    return record


def _record_lifetime(lifetime: LifetimeConfig, phase: str, mech: privacy.Mechanism,
                     rounds_run: int) -> dict:
    """Append this phase to the population's ledger; returns what privacy.json records of it."""
    from dpfedemb import ledger
    entry = ledger.make_entry(lifetime.run_id, lifetime.pipeline_job, phase,
                              dataclasses.replace(mech, rounds=rounds_run), rounds_run)
    doc = ledger.append(lifetime.ledger_uri, lifetime.population_id, entry)
    total = ledger.lifetime_epsilon(doc["entries"], doc["delta"])
    return {"ledger_uri": lifetime.ledger_uri, "population_id": lifetime.population_id,
            "entry_id": entry["entry_id"], "entries": len(doc["entries"]),
            "lifetime_epsilon": privacy.epsilon_json(total),
            "lifetime_epsilon_budget": lifetime.budget}


def _num(x: Any) -> Optional[float]:
    """A float for JSON; NaN (a round where Poisson sampling picked no client) becomes None."""
    v = float(x)
    return None if math.isnan(v) else v


def _fmt(x: Optional[float]) -> str:
    return "n/a" if x is None else ("inf" if math.isinf(x) else f"{x:.4f}")


def aggregator_dp_event(state: Any) -> str:
    """The per-round DpEvent TFF's aggregator reports in its state (sampling not included)."""
    import dp_accounting
    return repr(dp_accounting.DpEvent.from_named_tuple(state.aggregator.dp_event))


def _rounds_within_budget(mech: privacy.Mechanism, prior: list, budget: float, rounds: int) -> int:
    """Largest t <= rounds with composed epsilon <= budget (epsilon is monotone in t)."""
    ok = lambda t: privacy.epsilon_of(prior + [(mech, t)], mech.delta) <= budget  # noqa: E731
    if ok(rounds):
        return rounds
    lo, hi = 0, rounds
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    return lo


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dpfedemb.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", required=True, help="partition directory (virtual clients)")
    p.add_argument("--init", required=True, help="model directory to start from")
    p.add_argument("--output", required=True, help="model directory to write")
    p.add_argument("--phase", default="train", choices=["train", "finetune"])
    p.add_argument("--prior-privacy", default=None, help="privacy.json of earlier phases")
    p.add_argument("--checkpoint-dir", default=None)
    for f in dataclasses.fields(TrainConfig) + dataclasses.fields(PrivacyConfig):
        kind = float if f.type in ("float", "Optional[float]") else int \
            if f.type in ("int", "Optional[int]") else str
        p.add_argument("--" + f.name.replace("_", "-"), type=kind, default=None)
    return p


def configs_from_args(a: argparse.Namespace) -> tuple[TrainConfig, PrivacyConfig]:
    def pick(cls: Any) -> Any:
        return cls(**{f.name: getattr(a, f.name) for f in dataclasses.fields(cls)
                      if getattr(a, f.name) is not None})
    return pick(TrainConfig), pick(PrivacyConfig)


def main(argv: Optional[Sequence[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", force=True)
    a = build_parser().parse_args(argv)
    try:
        train, priv = configs_from_args(a)
        prior = storage.read_json(a.prior_privacy) if a.prior_privacy else None
        record = run_training(a.clients, a.init, a.output, train, priv, phase=a.phase,
                              prior=prior, checkpoint_dir=a.checkpoint_dir)
    except (ConfigError, storage.StorageError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        stop_tff_workers()
    print(json.dumps({"output": a.output, "epsilon": record["epsilon"], "delta": record["delta"],
                      "rounds": record["rounds"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
