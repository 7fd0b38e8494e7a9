"""`TwoTowerPredictor`: a callable class for `ray.data.Dataset.map_batches` that loads a TwoTower model
once per actor and decodes each batch of requests through the continuous-batching engine, with the
request schema and the output records of `twotower batch` (needs the `ray` extra for pyarrow).

    ds = ray.data.read_json("prompts/")          # columns: id, prompt, optional options
    out = ds.map_batches(
        TwoTowerPredictor,
        fn_constructor_kwargs={"model": "/models/twotower", "device": "cuda", "defaults": {"max_tokens": 256}},
        batch_size=128,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=8),
        num_gpus=1,
    )

Input: either one `request` column holding each request as JSON text (a `twotower batch` input line)
or one column per request field (`id`, `prompt`, and any of the options of `twotower batch`; a null
means "not given"). Rows are validated exactly as `twotower batch` validates a line; a bad row is
reported in the `error` column instead of failing the batch. Prefer `batch_format="pyarrow"`: numpy
and pandas batches turn an integer column with nulls into floats, which are rejected as non-integers.

Output: every input column except `request`, then
  record             the `twotower batch` output record as JSON text (null for a rejected row)
  error              why the row was rejected (null for a decoded row)
  text, finish_reason, prompt_tokens, completion_tokens   copied from the record, for convenience
  nfe                denoiser forwards this row took (AR: one per token), summed over its blocks
Rows without a `seed` sample with one derived from the predictor's `seed` and the row's id, as
`twotower batch --seed` does, so an output never depends on how rows were batched.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import replace

import pyarrow as pa

from ..batch_generate import generate_outputs
from ..batch_job import LINE_FIELDS, Job, LineError, derive_seed, id_key, parse_line
from ..workload import Limits, Options, parse_options

REQUEST_COLUMN = "request"
DEFAULT_MAX_BATCH_SIZE = 32
DEFAULT_MAX_PROMPT_TOKENS = 8192
OUTPUT_TYPES = {
    "record": pa.string(),
    "error": pa.string(),
    "text": pa.string(),
    "finish_reason": pa.string(),
    "prompt_tokens": pa.int64(),
    "completion_tokens": pa.int64(),
    "nfe": pa.int64(),
}


class TwoTowerPredictor:
    """One model per actor; `__call__` decodes one batch (see the module docstring for the columns).

    `model`, `dtype`, `device`, `denoiser_device`, `quantize`: as the `--model ...` options of every
    command (`twotower.loading.load_for_inference`). `defaults`: generation options for fields a row
    does not give (an `Options`, or a mapping with the request field names, e.g. {"mode": "ar"}).
    `max_batch_size`: rows decoded together by the engine; `max_prompt_tokens`: longer prompts are
    rejected; `seed`: the base of the derived per-row seeds; `stop_at_eos=False` ignores EOS;
    `engine_step`: the engine's steps (`twotower.decode.static.resolve_engine_step`; compiled graphs
    are built once per actor)."""

    def __init__(
        self,
        *,
        model: str | None = None,
        dtype: str = "auto",
        device: str = "cpu",
        denoiser_device: str | None = None,
        quantize: str = "none",
        defaults: Options | Mapping | None = None,
        max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
        max_prompt_tokens: int = DEFAULT_MAX_PROMPT_TOKENS,
        seed: int = 0,
        stop_at_eos: bool = True,
        engine_step: str = "auto",
    ) -> None:
        from ..decode.static import resolve_engine_step
        from ..loading import load_for_inference

        if not isinstance(max_batch_size, int) or max_batch_size < 1:
            raise ValueError(f"max_batch_size must be a positive integer, got {max_batch_size!r}")
        self.limits = Limits(max_prompt_tokens=max_prompt_tokens, max_tokens=1 << 30)
        self.defaults = default_options(defaults, self.limits)
        self.max_batch_size = max_batch_size
        self.seed = seed
        self.loaded = load_for_inference(
            model, device=device, denoiser_device=denoiser_device, dtype=dtype, quantize=quantize
        )
        self.eos_ids = tuple(self.loaded.model.config.eos_token_ids) if stop_at_eos else ()
        self.engine_step = resolve_engine_step(engine_step, self.loaded.model.context_device)

    def __call__(self, batch) -> pa.Table:
        columns = batch_columns(batch)
        check_columns(columns)
        lines = request_lines(columns)
        jobs, errors = self.parse(lines)
        records = self.generate(jobs)
        return output_table(columns, [j.key if j else None for j in jobs], errors, records)

    def parse(self, lines: list[bytes]) -> tuple[list[Job | None], list[str | None]]:
        """Per row: its Job (seed filled in) or None, and None or why it was rejected."""
        jobs: list[Job | None] = []
        errors: list[str | None] = []
        seen: dict[str, int] = {}
        for number, raw in enumerate(lines, start=1):
            job = parse_line(raw, number, self.loaded.tokenizer, self.defaults, self.limits)
            if isinstance(job, LineError):
                jobs.append(None)
                errors.append(job.error)
            elif job.key in seen:
                jobs.append(None)
                errors.append(f"duplicate id {job.id!r} (first in row {seen[job.key]} of this batch)")
            else:
                seen[job.key] = number
                jobs.append(with_seed(job, self.seed))
                errors.append(None)
        return jobs, errors

    def generate(self, jobs: list[Job | None]) -> dict[str, dict]:
        """Output records by id key, for the valid jobs (each with its forwards, `nfe`)."""
        todo = [j for j in jobs if j is not None]
        records: dict[str, dict] = {}

        def on_step(finished: list[dict], _new_tokens: int) -> None:
            for record in finished:
                records[id_key(record["id"])] = record

        if todo:
            generate_outputs(
                self.loaded.model,
                self.loaded.tokenizer,
                todo,
                model_name=self.loaded.name,
                max_batch_size=self.max_batch_size,
                eos_ids=self.eos_ids,
                on_step=on_step,
                decode_step=self.engine_step,
            )
        return records


def default_options(defaults: Options | Mapping | None, limits: Limits) -> Options:
    """The predictor's defaults, validated; ValueError names a bad field."""
    if isinstance(defaults, Options):
        return parse_options({}, defaults, limits=limits)
    return parse_options(dict(defaults or {}), Options(), limits=limits)


def with_seed(job: Job, base: int) -> Job:
    """`job` with its own seed, or one derived from `base` and its id (as `twotower batch`)."""
    if job.options.seed is not None:
        return job
    return replace(job, options=replace(job.options, seed=derive_seed(base, job.key)))


# ---- columns ----------------------------------------------------------------------------------------
def batch_columns(batch) -> dict[str, list]:
    """A Ray Data batch (a dict of numpy arrays, a pandas DataFrame or a pyarrow Table) as plain Python
    lists, one per column."""
    if isinstance(batch, pa.Table):
        return batch.to_pydict()
    if hasattr(batch, "to_dict") and hasattr(batch, "columns"):  # pandas, without importing it
        return {str(c): [missing_to_none(plain(v)) for v in batch[c].tolist()] for c in batch.columns}
    if isinstance(batch, Mapping):
        return {str(k): [plain(v) for v in (v.tolist() if hasattr(v, "tolist") else list(v))] for k, v in batch.items()}
    raise TypeError(f"a batch must be a dict of columns, a pandas DataFrame or a pyarrow Table, got {type(batch)}")


def missing_to_none(value):
    """pandas marks a missing value with NaN (also in string columns): None, as elsewhere."""
    return None if isinstance(value, float) and math.isnan(value) else value


def plain(value):
    """numpy scalars and arrays inside object columns -> Python values."""
    return value.tolist() if hasattr(value, "tolist") else value


def check_columns(columns: dict[str, list]) -> None:
    """ValueError if an input column has an output column's name (it would be overwritten)."""
    clash = sorted(set(columns) & set(OUTPUT_TYPES))
    if clash:
        raise ValueError(f"input column(s) {', '.join(clash)} clash with output columns; rename them")


def request_lines(columns: dict[str, list]) -> list[bytes]:
    """Each row as the JSON text of a `twotower batch` input line."""
    if REQUEST_COLUMN in columns:
        return [v.encode("utf-8") if isinstance(v, str) else bytes(v or b"") for v in columns[REQUEST_COLUMN]]
    fields = [name for name in columns if name in LINE_FIELDS]
    if "prompt" not in fields:
        raise ValueError(f"a batch needs a {REQUEST_COLUMN!r} column or a 'prompt' column, got {sorted(columns)}")
    n = len(columns["prompt"])
    return [json_line({name: columns[name][i] for name in fields}) for i in range(n)]


def json_line(row: Mapping) -> bytes:
    """A row of field columns as a request line; nulls (and NaN, pandas' missing number) are left out."""
    given = {k: v for k, v in row.items() if v is not None and not (isinstance(v, float) and math.isnan(v))}
    return json.dumps(given, ensure_ascii=False).encode("utf-8")


def output_table(
    columns: dict[str, list],
    keys: list[str | None],
    errors: list[str | None],
    records: dict[str, dict],
) -> pa.Table:
    """The input's other columns followed by the output columns, one row per input row."""
    out = {name: [] for name in OUTPUT_TYPES}
    for key, error in zip(keys, errors):
        record = records.get(key) if key is not None else None
        if record is None and error is None:
            error = "no output was produced"  # defensive: every valid job finishes in generate_outputs
        if record is not None and record.get("error"):
            error = record["error"]  # its decoding failed (`batch_generate.error_record`)
        out["record"].append(None if record is None else json.dumps(record, ensure_ascii=False))
        out["error"].append(error)
        for name in ("text", "finish_reason", "prompt_tokens", "completion_tokens"):
            out[name].append(None if record is None else record[name])
        out["nfe"].append(None if record is None else record["nfe"])
    kept = {name: pa.array(values) for name, values in columns.items() if name != REQUEST_COLUMN}
    outputs = {name: pa.array(values, type=OUTPUT_TYPES[name]) for name, values in out.items()}
    return pa.table({**kept, **outputs})
