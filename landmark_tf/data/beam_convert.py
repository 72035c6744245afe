"""landmark-tfrecords --runner beam: the image work of the conversion as an Apache Beam pipeline.

Design: planning stays in the launcher and is the local converter's own code. convert_dataset
reads and validates the CSVs, drops rare landmarks, relabels, splits, fixes the shard counts in
the manifest and assigns examples to shards (planning.build_plan, planning.assign_shards) exactly as
for --runner local; only the unfinished shards go to Beam, through convert_dataset's
`write_shards` hook. Both runners therefore share one plan, one manifest (either runner resumes
or confirms the other's output), one dataset_info.json and label_map.csv, and write
byte-identical files. Planning all 4.1M GLDv2 train rows takes ~2 CPU minutes and 2 GB in the
launcher (bench/README.md); the image work is what needs a cluster.

Pipeline, for unfinished shard k and planned position i within it:
  ReadFromText(STATE_DIR/beam-plan.jsonl)  one line [k, i, id, label, landmark_id, is_clean] per
        example, written by the launcher (a job graph cannot carry millions of elements)
  -> Reshuffle        spread the image work evenly over workers, whatever the read splits are
  -> convert          shards.serialize or the SkipImage reason  =>  (k, (i, label, record, skip))
  -> GroupByKey(k)    one shard's examples, records included, at one worker
  -> write shard k    sorted by i: temporary name, report, rename to the final name
A retried bundle rewrites the same bytes and its rename overwrites, so retries never duplicate
examples; the writer holds one shard (about --shard_size_mb) in memory.

apache_beam is imported only here, and only when this runner is used.
"""

from __future__ import annotations

import collections
import json
import os
import shlex
import sys
from typing import Any

import PIL
import tensorflow as tf

from landmark_tf import fileio
from landmark_tf.data import convert, gldv2, images, shards
from landmark_tf.data.shards import ImageOptions, ShardTask
from landmark_tf.errors import UserError

PLAN_FILE = "beam-plan.jsonl"
INSTALL_HINT = "pip install landmark-tf[beam]"
_RECORD_FRAMING = 16  # TFRecord: 8-byte length + 4-byte length CRC + 4-byte data CRC
_METRICS = "landmark_tf"
_DATAFLOW_NEEDS = ("project", "region", "temp_location")
_WORKER_ENV = ("sdk_container_image", "setup_file", "requirements_file", "extra_packages")


def convert_dataset_beam(
    cfg: convert.ConvertConfig,
    beam_runner: str = "DirectRunner",
    beam_options: list[str] | tuple[str, ...] = (),
    progress: bool = True,
) -> dict[str, Any]:
    """convert.convert_dataset with the shards written by a Beam pipeline on `beam_runner`.

    `beam_options`: extra pipeline arguments, each one or more space-separated `--name=value`
    (e.g. "--project=p --region=us-central1 --temp_location=gs://b/tmp"). Returns the local
    converter's summary plus "beam": {"runner", "job_id", "state"}. Raises UserError when
    apache-beam is missing, for bad options, and when the job fails.
    """
    cfg.validate()
    if cfg.attribution_csv:
        raise UserError("--attribution_csv works with --runner=local only (the Beam plan lines "
                        "carry no tags yet)")
    args = pipeline_args(cfg, beam_runner, beam_options)
    writer = _BeamShardWriter(args, progress)
    summary = convert.convert_dataset(cfg, progress=progress, write_shards=writer)
    summary["beam"] = {"runner": beam_runner, **writer.job}
    return summary


def import_beam():
    """The apache_beam module, or a UserError saying how to install it."""
    try:
        import apache_beam
    except ImportError as e:
        raise UserError(f"--runner=beam needs apache-beam ({e}); {INSTALL_HINT}") from None
    return apache_beam


def pipeline_args(cfg: convert.ConvertConfig, runner: str, extra) -> list[str]:
    """Validated pipeline arguments: --runner, DirectRunner parallelism defaults from
    cfg.num_workers, then `extra`. Raises UserError naming the bad option."""
    beam = import_beam()
    from apache_beam.options.pipeline_options import PipelineOptions

    try:
        user = [arg for opt in extra for arg in shlex.split(opt)]
    except ValueError as e:
        raise UserError(f"--beam_options: {e}") from None
    for arg in user:
        if not arg.startswith("--") or arg.split("=")[0] == "--runner":
            raise UserError(f"--beam_options: {arg!r} is not a pipeline option --name=value "
                            "(the runner is set by --beam_runner)")
    args = [f"--runner={runner}", *_direct_defaults(runner, cfg.num_workers, user), *user]
    options = PipelineOptions(args)
    unknown = sorted(set(options.get_all_options(retain_unknown_options=True))
                     - set(options.get_all_options()))
    if unknown:
        raise UserError(f"--beam_options: unknown pipeline option --{unknown[0]}")
    try:
        beam.runners.create_runner(runner)
    except ValueError as e:
        raise UserError(f"--beam_runner={runner}: {e}") from None
    if runner in ("DataflowRunner", "dataflow"):
        _check_dataflow(cfg, options)
    return args


def _direct_defaults(runner: str, num_workers: int, user: list[str]) -> list[str]:
    given = {arg.split("=")[0] for arg in user}
    if runner not in ("DirectRunner", "direct") or "--direct_num_workers" in given:
        return []
    mode = "multi_processing" if num_workers > 1 else "in_memory"
    return [f"--direct_num_workers={num_workers}", f"--direct_running_mode={mode}"]


def _check_dataflow(cfg: convert.ConvertConfig, options) -> None:
    from apache_beam.options.pipeline_options import GoogleCloudOptions

    gcp = options.view_as(GoogleCloudOptions)
    for name in _DATAFLOW_NEEDS:
        if not getattr(gcp, name):
            raise UserError(f"--beam_runner=DataflowRunner needs --beam_options=--{name}=...")
    for flag, path in (("--image_dir", cfg.image_dir), ("--output_dir", cfg.output_dir),
                       ("--temp_location", gcp.temp_location)):
        if not path.startswith("gs://"):
            raise UserError(f"{flag}={path}: Dataflow workers need a gs:// path")
    everything = options.get_all_options()
    if not any(everything.get(name) for name in _WORKER_ENV):
        raise UserError(
            "Dataflow workers need landmark-tf and tensorflow-cpu: pass one of "
            + ", ".join(f"--{n}" for n in _WORKER_ENV) + " in --beam_options (beam/README.md)")


class _BeamShardWriter:
    """convert_dataset's `write_shards` hook: runs the pipeline over the unfinished shards."""

    def __init__(self, args: list[str], progress: bool):
        self.args, self.progress = args, progress
        self.job: dict[str, Any] = {"job_id": None, "state": "NOT_RUN"}

    def __call__(self, todo: list[ShardTask]) -> None:
        if not todo:
            return
        output_dir, state_dir = os.path.dirname(todo[0].path), os.path.dirname(
            todo[0].report_path)
        plan_path = fileio.join(state_dir, PLAN_FILE)
        write_plan(plan_path, todo)
        table = {k: (t.path, t.report_path, len(t.examples)) for k, t in enumerate(todo)}
        self._say(f"{sum(n for *_, n in table.values())} images into {len(todo)} shards")
        self._run(plan_path, table, todo[0].image_dir, todo[0].options)
        tf.io.gfile.remove(plan_path)
        fileio.remove_temporaries(output_dir)  # leftovers of attempts that were retried
        fileio.remove_temporaries(state_dir)

    def _run(self, plan_path: str, table: dict, image_dir: str, options: ImageOptions) -> None:
        beam = import_beam()
        from apache_beam.options.pipeline_options import PipelineOptions

        pipeline = beam.Pipeline(options=PipelineOptions(self.args))
        _ = (
            pipeline
            | "ReadPlan" >> beam.io.ReadFromText(plan_path)
            | "Spread" >> beam.Reshuffle()
            | "Convert" >> beam.Map(convert_line, image_dir, options, PIL.__version__)
            | "ByShard" >> beam.GroupByKey()
            | "WriteShard" >> beam.Map(write_grouped_shard, table)
        )
        result = pipeline.run()
        self.job["job_id"] = _job_id(result)
        if self.job["job_id"]:
            self._say(f"job {self.job['job_id']} started; waiting for it to finish")
        try:
            state = result.wait_until_finish()
        except Exception as e:
            if type(e).__name__ != "DataflowRuntimeException":
                raise
            raise UserError(f"Beam job {self.job['job_id']} failed: {str(e).splitlines()[0]} "
                            "(worker logs in the Dataflow console); rerun the same command to "
                            "resume: finished shards are kept") from None
        self.job["state"] = str(state).rsplit(".", 1)[-1]
        if self.job["state"] != "DONE":
            raise UserError(f"Beam job {self.job['job_id']} ended in state {self.job['state']}; "
                            "rerun the same command to resume")

    def _say(self, message: str) -> None:
        if self.progress:
            runner = self.args[0].split("=", 1)[1]
            print(f"landmark-tfrecords: {runner}: {message}", file=sys.stderr, flush=True)


def _job_id(result) -> str | None:
    job_id = getattr(result, "job_id", None)
    return job_id() if callable(job_id) else None


def write_plan(path: str, todo: list[ShardTask]) -> None:
    """One JSON line [shard, position, id, label, landmark_id, is_clean] per planned example,
    written atomically (a rerun replaces it)."""
    with fileio.removed_on_failure(fileio.tmp_name(path)) as tmp:
        with tf.io.gfile.GFile(tmp, "w") as f:
            for k, task in enumerate(todo):
                # Ids match gldv2's [0-9A-Za-z_-]{3,}, so quoting them needs no escaping (and an
                # f-string is ~4x faster than json.dumps over 4.1M lines).
                f.write("".join(f'[{k},{i},"{ex.image_id}",{ex.label},{ex.landmark_id},'
                                f'{int(ex.is_clean)}]\n' for i, ex in enumerate(task.examples)))
        tf.io.gfile.rename(tmp, path, overwrite=True)


def convert_line(line: str, image_dir: str, options: ImageOptions, pillow_version: str):
    """One plan line -> (shard, (position, label, is_clean, serialized tf.train.Example or b"",
    skip or None)); skip is {"id", "path", "reason"} as in the local converter's reports."""
    if PIL.__version__ != pillow_version:  # Pillow defines the JPEG bytes
        raise RuntimeError(f"worker has Pillow {PIL.__version__}, the launcher {pillow_version}: "
                           "install the same version on the workers (beam/README.md)")
    from apache_beam.metrics import Metrics

    shard, position, image_id, label, landmark_id, is_clean = json.loads(line)
    example = gldv2.Example(image_id, label, landmark_id, bool(is_clean))
    try:
        record, skip = shards.serialize(example, image_dir, options), None
    except images.SkipImage as e:
        path = gldv2.image_path(image_dir, image_id)
        record, skip = b"", {"id": image_id, "path": path, "reason": e.reason}
        Metrics.counter(_METRICS, f"skipped_{e.category}").inc()
    else:
        Metrics.counter(_METRICS, "images_converted").inc()
    return shard, (position, label, bool(is_clean), record, skip)


def write_grouped_shard(item, table: dict[int, tuple[str, str, int]]) -> str:
    """Writes shard `k` of (k, values) like shards.write_shard: records in planned order under a
    temporary name, the JSON report, then the rename. Returns the shard's file name."""
    from apache_beam.metrics import Metrics

    shard, values = item
    path, report_path, planned = table[shard]
    ordered = sorted(values, key=lambda v: v[0])
    if [v[0] for v in ordered] != list(range(planned)):
        raise RuntimeError(f"{path}: got positions {[v[0] for v in ordered][:10]}..., "
                           f"expected 0..{planned - 1} once each")
    with fileio.removed_on_failure(fileio.tmp_name(path)) as tmp:
        counts: collections.Counter = collections.Counter()
        not_clean: collections.Counter = collections.Counter()
        skipped, size = [], 0
        with tf.io.TFRecordWriter(tmp) as writer:
            for _, label, is_clean, record, skip in ordered:
                if skip is not None:
                    skipped.append(skip)
                    continue
                writer.write(record)
                counts[label] += 1
                not_clean[label] += 0 if is_clean else 1
                size += len(record) + _RECORD_FRAMING
        report = {
            "shard": os.path.basename(path),
            "planned": planned,
            "examples": sum(counts.values()),
            "bytes": size,
            "label_counts": {str(k): v for k, v in sorted(counts.items())},
            "not_clean_label_counts": {str(k): v for k, v in sorted(not_clean.items()) if v},
            "skipped": skipped,
            "tail_crc32": shards.tail_crc32(tmp, size),
        }
        fileio.write_json_atomic(report_path, report)
        tf.io.gfile.rename(tmp, path, overwrite=True)
    Metrics.counter(_METRICS, "shards_written").inc()
    return report["shard"]
