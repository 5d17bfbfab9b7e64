"""Evaluation runs on Ray (`kvmerger eval --executor ray`): one Ray task per sample group.

The driver (the `kvmerger eval` process) starts a pool of Ray actors, `GroupWorker`s, each with
`worker_cpus` CPUs (and one GPU when the device is a CUDA one). Each loads the model once with
`load_model` (torch limited to its CPUs) and keeps it for every group it is sent. A group is one
sample under one protocol: one prefill, then every method and budget (runner.Group). The driver
sends each group with a cell left to run to an idle worker and, when the task returns, appends its
records to its own `records.jsonl`. So:

* The records are those of the serial runner, made by the same code (`Runner.compute_group`);
  only their timings, dates and hardware (the worker's host, CPUs and torch threads) differ.
  They are written in the order the groups finish.
* Resuming works as in the serial runner: only groups with a missing cell are sent, with only
  their missing cells. A crash or Ctrl-C loses the groups in flight (their cells run again when
  the run is resumed), never a finished group's records.
* The driver loads no model: the first worker plans the run (the samples need the tokenizer, the
  cell keys the model's identity), and every worker must have loaded the same weights.
* Ray is imported here only, and this module only when `--executor ray` is asked for. With
  `address` the driver joins that cluster; without, it starts a local Ray instance on this machine
  (or uses the one this process already started) and stops what it started when it is done.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvmerger.evaluation.progress import CellProgress
from kvmerger.evaluation.records import RecordStore
from kvmerger.evaluation.runner import Group, Runner, RunOutcome, RunSettings, check_same_model

INSTALL = "pip install 'kvmerger[ray]'"
IDENTITY = ("config_hash", "weights_fingerprint", "dtype")  # what every worker's model must share


def import_ray():
    """The ray module, or an ImportError that names the install command."""
    try:
        import ray
    except ImportError:
        raise ImportError(f"--executor ray needs Ray, which is not installed: {INSTALL}") from None
    return ray


@dataclass(frozen=True)
class ModelSource:
    """What every worker loads: `load_model(path, dtype=dtype, device=device)`, recorded as `name`."""

    path: str | None  # None: the default model
    dtype: str
    device: str
    name: str

    @property
    def needs_gpu(self) -> bool:
        return self.device.split(":")[0] == "cuda"


@dataclass(frozen=True)
class RayOptions:
    address: str | None = None  # a running cluster ("HOST:6379", "auto"); None: a local Ray instance
    workers: int | None = None  # None: as many as the cluster's CPUs (GPUs, for a CUDA device) allow
    worker_cpus: int = 1  # each worker's CPUs, and its torch threads


class GroupWorker:
    """A Ray actor: loads the model once (`load`), then plans the run or computes the groups it is sent.

    The model loads in a method, not in the constructor: an error there (a missing model, a length
    the model cannot take) then reaches the driver as itself, where a constructor's error would
    arrive as a bare ActorDiedError."""

    runner: Runner

    def load(self, source: ModelSource, settings: RunSettings, folder: str, threads: int, command: str) -> dict[str, Any]:
        import torch

        from kvmerger.models import load_model

        torch.set_num_threads(threads)
        model, tokenizer = load_model(source.path, dtype=source.dtype, device=source.device)
        # The folder only names the run in messages: a worker hands its records back and writes nothing.
        self.runner = Runner(
            model, tokenizer, settings, Path(folder), model_name=source.name, progress=False, command=command
        )
        return {"model": self.runner.model_info, "host": platform.node(), "provenance": self.runner.provenance}

    def plan(self, done: set[str]) -> tuple[list[Group], int]:
        return self.runner.groups(done)

    def compute(self, group: Group) -> list[dict[str, Any]]:
        records: list[dict[str, Any]] = []
        self.runner.compute_group(group, records.append)
        return records


class RayRunner:
    """Runs `settings` as Ray tasks and appends every record to `folder`/records.jsonl, as Runner does.

    Starting it starts (or joins) Ray and the workers, whose models load in parallel; `provenance`
    is the first worker's. Use it as a context manager, or call `close()`: it stops the workers,
    and Ray if it started it."""

    def __init__(
        self,
        settings: RunSettings,
        folder: Path,
        source: ModelSource,
        options: RayOptions = RayOptions(),
        *,
        command: str,
        progress: bool = True,
    ) -> None:
        self.ray = import_ray()
        self.options = options
        self.settings = settings
        self.store = RecordStore(folder)
        self.progress = progress
        self.started_ray = False
        self.actors: list[Any] = []
        try:
            self.start_ray(options.address)
            count = self.worker_count(options, source)
            actor = self.ray.remote(GroupWorker).options(
                num_cpus=options.worker_cpus, num_gpus=1 if source.needs_gpu else 0
            )
            self.actors = [actor.remote() for _ in range(count)]
            load = (source, settings, str(folder), options.worker_cpus, command)
            identities = self.get([worker.load.remote(*load) for worker in self.actors])
        except BaseException:
            self.close()
            raise
        self.check_identities(identities)
        self.model_info = identities[0]["model"]
        self.provenance = identities[0]["provenance"]
        self.hosts = sorted({identity["host"] for identity in identities})

    def describe(self) -> dict[str, Any]:
        """The executor, for run.json."""
        return {"name": "ray", **dataclasses.asdict(self.options), "workers": len(self.actors), "hosts": self.hosts}

    # -- Ray and the workers ---------------------------------------------------------------
    def start_ray(self, address: str | None) -> None:
        if self.ray.is_initialized():
            return
        quiet = dict(log_to_driver=False, logging_level=logging.WARNING)  # workers log to Ray's session folder
        if address is None:
            # "local": a new instance, even where `ray start` left (or a crash left) a cluster file behind
            self.ray.init(address="local", include_dashboard=False, **quiet)
            self.started_ray = True
        else:
            try:
                self.ray.init(address=address, **quiet)
            except ConnectionError as error:
                raise ConnectionError(
                    f"--address {address}: no Ray cluster answers there ({' '.join(str(error).split())[:200]}); "
                    "start one with `ray start --head`, or leave --address out to start a local one"
                ) from None
            self.started_ray = True  # connected by this process: disconnect when done

    def worker_count(self, options: RayOptions, source: ModelSource) -> int:
        resources = self.ray.cluster_resources()
        fit = int(resources.get("CPU", 0) // options.worker_cpus)
        unit = f"{options.worker_cpus} CPU{'s' if options.worker_cpus > 1 else ''}"
        if source.needs_gpu:
            fit = min(fit, int(resources.get("GPU", 0)))
            unit += " and 1 GPU"
        where = f"the Ray cluster ({int(resources.get('CPU', 0))} CPUs, {int(resources.get('GPU', 0))} GPUs)"
        if fit < 1:
            raise ValueError(f"{where} has no room for one worker of {unit}; lower --worker-cpus or add nodes")
        if options.workers is not None and options.workers > fit:
            raise ValueError(
                f"{where} has room for {fit} workers of {unit}, not {options.workers}; lower --workers or --worker-cpus"
            )
        return options.workers or fit

    def check_identities(self, identities: list[dict[str, Any]]) -> None:
        first = identities[0]
        for other in identities[1:]:
            if {k: other["model"][k] for k in IDENTITY} != {k: first["model"][k] for k in IDENTITY}:
                raise ValueError(
                    f"the workers on {first['host']} and {other['host']} loaded different models (weights "
                    f"{first['model']['weights_fingerprint']} and {other['model']['weights_fingerprint']}); "
                    "give every node the same model files"
                )

    def get(self, refs):
        """ray.get, with an error raised in a worker re-raised as itself (a ValueError stays one), and a
        worker that died (killed, out of memory, its node lost) as a ChildProcessError that says so."""
        try:
            return self.ray.get(refs)
        except self.ray.exceptions.RayTaskError as error:
            if isinstance(error.cause, Exception):
                raise error.cause from error
            raise
        except self.ray.exceptions.RayActorError as error:
            reason = " ".join(str(error).split())[:300]
            raise ChildProcessError(
                f"a Ray worker stopped ({reason}); the records of every sample group that had finished are saved in "
                f"{self.store.path}: give fewer --workers if memory ran out, then run the same command to resume"
            ) from error

    def close(self) -> None:
        for worker in self.actors:
            self.ray.kill(worker)
        self.actors = []
        if self.started_ray:
            self.ray.shutdown()
            self.started_ray = False

    def __enter__(self) -> RayRunner:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # -- running ---------------------------------------------------------------------------
    def run(self) -> RunOutcome:
        start = time.perf_counter()
        loaded = self.store.load()
        check_same_model(self.store.folder, self.model_info, loaded.records)
        groups, total = self.get(self.actors[0].plan.remote(loaded.keys))
        pending = sum(len(group.cells) for group in groups)
        for extra in self.actors[len(groups) :]:  # more workers than groups: let the idle ones go
            self.ray.kill(extra)
        del self.actors[len(groups) :]
        bar = CellProgress(groups, enabled=self.progress)
        bar.set_description(f"ray, {len(self.actors)} workers")
        try:
            self.dispatch(groups, bar)
        finally:
            bar.close()
        return RunOutcome(self.store.folder, total, total - pending, pending, loaded.truncated, time.perf_counter() - start)

    def dispatch(self, groups: list[Group], bar: CellProgress) -> None:
        """One group in flight per worker, in plan order; each group's records appended as it returns."""
        waiting = list(reversed(groups))
        idle = list(self.actors)
        running: dict[Any, tuple[Any, Group]] = {}
        while waiting or running:
            while waiting and idle:
                worker, group = idle.pop(), waiting.pop()
                running[worker.compute.remote(group)] = (worker, group)
            [ref], _ = self.ray.wait(list(running), num_returns=1)
            worker, group = running.pop(ref)
            for record in self.get(ref):
                self.store.append(record)
            bar.update(len(group.cells))
            bar.set_postfix_str(group.title)
            bar.group_done(group)
            idle.append(worker)


def model_source(model: str | None, dtype: str, device: str, name: str) -> ModelSource:
    """A ModelSource for `--model` as typed: a local path made absolute (the workers' working folder
    may differ), anything else (a model id, None) as it is. `name` keeps the text typed, so that
    cell keys match a serial run's."""
    if device.startswith("cuda:"):
        raise ValueError(f"--device {device}: with --executor ray give --device cuda; Ray gives each worker its own GPU")
    if model is not None and os.path.exists(model):
        model = str(Path(model).resolve())
    return ModelSource(model, dtype, device, name)
