"""Bad input, as a new user types it: one line naming the offending value, exit code 2, no
traceback, and nothing left behind, before any work starts. One table over every subcommand."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import REPO

from optimer_merge import cli

OBJECTIVE = str(REPO / "recipes/objectives/dev-bpb.yaml")


@dataclass
class Case:
    id: str
    argv: list[str]  # formatted with the fields of `paths` below
    expect: list[str]  # substrings of the one-line message (the offending value among them)
    leaves_no: list[str] = field(default_factory=lambda: ["{out}"])  # paths that must not exist afterwards


RECIPE = """merge_method: optimer
base_model: {zoo}/tiny-text/base
models:
  - model: {zoo}/tiny-text/ja
    parameters: {{weight: {weight}}}
  - model: {zoo}/tiny-text/zh
    parameters: {{weight: 0.5}}
parameters: {{{parameters}}}
dtype: float32
{extra}"""


def search(*extra: str) -> list[str]:
    return ["search", "--base", "{base}", "--objective", OBJECTIVE, "--output", "{out}", "--trials", "2", "--limit", "2", "--finalist-limit", "4",
            "--vector", "ja={zoo}/tiny-text/ja", "--vector", "zh={zoo}/tiny-text/zh", *extra]  # fmt: skip


def train(*extra: str) -> list[str]:
    return ["train", "--base", "{base}", "--output", "{out}", "--dataset", "ja", "--max-steps", "2", "--seq-len", "32", "--no-progress", *extra]


def extract(*models: str, out: str = "{out}") -> list[str]:
    argv = ["vectors", "extract", "--base", "{base}", "--out", out]
    for model in models:
        argv += ["--model", model]
    return argv


def evaluate(*extra: str) -> list[str]:
    return ["eval", "{base}", "--tasks", "optimer_ja_dev_bpb", "--limit", "2", "--output", "{out}", *extra]


CASES = [
    # merge: recipes are checked in full before mergekit starts
    Case("merge-unknown-parameter", ["merge", "{recipe_normalise}", "{out}"], ["unknown parameter 'normalise'", "optimer"]),
    Case("merge-misspelt-scale", ["merge", "{recipe_scael}", "{out}"], ["unknown parameter 'scael'"]),
    Case("merge-unknown-top-level-key", ["merge", "{recipe_outdtype}", "{out}"], ["unknown top-level key(s) outdtype"]),
    Case("merge-misspelt-models", ["merge", "{recipe_modles}", "{out}"], ["unknown top-level key(s) modles"]),
    Case("merge-nan-weight", ["merge", "{recipe_nan}", "{out}"], ["weight", "finite", "nan"]),
    Case("merge-inf-scale", ["merge", "{recipe_inf}", "{out}"], ["scale", "finite", "inf"]),
    Case("merge-boolean-weight", ["merge", "{recipe_yes}", "{out}"], ["weight: expected a number, got true"]),
    Case("merge-unknown-method", ["merge", "{recipe_method}", "{out}"], ["unknown merge_method 'optimr'"]),
    Case("merge-missing-model", ["merge", "{recipe_missing}", "{out}"], ["tiny-text/nope does not exist"]),
    Case("merge-malformed-yaml", ["merge", "{bad_yaml}", "{out}"], ["bad.yaml:3:", "malformed YAML"]),
    Case("merge-empty-model-path", ["merge", "{recipe_emptymodel}", "{out}"], ["a model is an empty path"]),
    Case("merge-empty-base-path", ["merge", "{recipe_emptybase}", "{out}"], ["base_model is an empty path"]),
    Case("merge-recipe-missing", ["merge", "{tmp}/none.yml", "{out}"], ["none.yml does not exist"]),
    Case("merge-recipe-is-folder", ["merge", "{zoo}", "{out}"], ["is a folder"]),
    Case("merge-out-is-file", ["merge", "{recipe_ok}", "{file}"], ["a-file.txt is a file"], []),
    Case("merge-out-not-empty", ["merge", "{recipe_ok}", "{zoo}/tiny-text"], ["tiny-text is not empty"], []),
    Case("merge-out-merge-holding-a-folder", ["merge", "{recipe_ok}", "{merge_and_notes}"], ["holds an earlier merge and also notes/", "move them out"], []),
    Case("merge-no-base", ["merge", "{recipe_nobase}", "{out}"], ["requires a base input", "set base_model"]),
    Case("merge-filtered-weight-without-default", ["merge", "{recipe_filtered}", "{out}"],
         ["models[0]", "tiny-text/ja", "weight has no value for tensor model.embed_tokens.weight", "without `filter`"]),
    Case("merge-missing-weight", ["merge", "{recipe_noweight}", "{out}"], ["models[0]", "tiny-text/ja", "requires parameter 'weight'"]),
    Case("merge-model-twice", ["merge", "{recipe_twice}", "{out}"], ["tiny-text/ja is listed twice"]),
    Case("merge-slice-without-base", ["merge", "{recipe_slices_nobase}", "{out}"], ["slices[0]", "base model {zoo}/tiny-text/base is not among"]),
    Case("merge-slice-layer-range", ["merge", "{recipe_slices_layers}", "{out}"], ["slices[0].sources[0]", "layer_range [0, 9] does not fit the model's 2 layers"]),
    Case("merge-unknown-dtype", ["merge", "{recipe_dtype}", "{out}"], ["unknown dtype 'float33'"]),
    Case("merge-normalize-zero-sum", ["merge", "{recipe_zerosum}", "{out}"], ["normalize: true", "which is 0"]),
    Case("merge-truncated-model", ["merge", "{recipe_truncated}", "{out}"], ["truncated/model.safetensors is not a readable safetensors file"]),
    Case("merge-device-unknown", ["merge", "{recipe_ok}", "{out}", "--device", "tpu"], ["--device 'tpu' is not a torch device"]),
    Case("merge-threads-over-cpus", ["merge", "{recipe_ok}", "{out}", "--threads", "100000"], ["argument --threads: this machine has"]),
    Case("merge-threads-zero", ["merge", "{recipe_ok}", "{out}", "--threads", "0"], ["--threads", "got 0"]),
    Case("merge-shard-size", ["merge", "{recipe_ok}", "{out}", "--out-shard-size", "lots"], ["'lots'"]),
    Case("merge-zero-shard-size", ["merge", "{recipe_ok}", "{out}", "--out-shard-size", "0"], ["--out-shard-size '0'"]),
    # vectors
    Case("extract-repeated-name", extract("ja={zoo}/tiny-text/ja", "ja={zoo}/tiny-text/zh"), ["'ja' is given twice"]),
    Case("extract-same-model-twice", extract("a={zoo}/tiny-text/ja", "b={zoo}/tiny-text/ja/"), ["model b", "is the same as model a"]),
    Case("extract-model-already-in-out", extract("again={zoo}/tiny-text/ja", out="{tmp}/vectors"),
         ["model again", "is already in", "as vector ja", "remove", "vectors/ja.safetensors first"], ["{tmp}/vectors/again.safetensors"]),
    Case("extract-path-in-name", extract("../evil={zoo}/tiny-text/ja"), ["'../evil'", "plain file name"]),
    Case("extract-name-too-long", extract("x" * 300 + "={zoo}/tiny-text/ja"), ["(300 characters)", "at most 128 characters"]),
    Case("extract-name-with-newline", extract("ja\n={zoo}/tiny-text/ja"), ["'ja\\n'", "plain file name"]),
    Case("extract-other-base", extract("ja={foreign}"), ["trained from a different base", "0123456789abcdef"]),
    Case("extract-into-other-base", ["vectors", "extract", "--base", "{zoo}/tiny-bf16/base", "--out", "{tmp}/vectors", "--model", "ja={zoo}/tiny-bf16/ja"],
         ["vectors holds vectors of another base", "choose another --out"]),
    Case("extract-truncated", extract("ja={truncated}"), ["truncated/model.safetensors is not a readable safetensors file"]),
    Case("extract-base-is-file", ["vectors", "extract", "--base", "{file}", "--out", "{out}", "--model", "ja={zoo}/tiny-text/ja"], ["a-file.txt is a file"]),
    Case("extract-out-is-file", extract("ja={zoo}/tiny-text/ja", out="{file}"), ["a-file.txt is a file"], []),
    Case("extract-into-model-folder", extract("ja={zoo}/tiny-text/ja", out="{zoo}/tiny-text/zh"), ["tiny-text/zh is not empty", "holds no vectors"],
         ["{zoo}/tiny-text/zh/ja.safetensors", "{zoo}/tiny-text/zh/vectors.json"]),
    Case("extract-into-other-files", extract("ja={zoo}/tiny-text/ja", out="{not_a_run}"), ["not-a-run is not empty and holds no vectors"], ["{not_a_run}/.lock"]),
    Case("extract-unknown-flag", [*extract("ja={zoo}/tiny-text/ja"), "--threads", "2"],
         ["optimer-merge vectors extract: error: unrecognized arguments: --threads 2", "optimer-merge vectors extract --help"]),
    Case("extract-no-equals", extract("{zoo}/tiny-text/ja"), ["expects NAME=PATH"]),
    Case("stats-nan", ["vectors", "stats", "nan={nan_vector}", "--out", "{out}"], ["vector nan", "NaN/Inf"]),
    Case("stats-model-folder", ["vectors", "stats", "ja={zoo}/tiny-text/ja", "--out", "{out}"], ["tiny-text/ja is a folder", "model folder"]),
    Case("stats-plain-file", ["vectors", "stats", "{nan_vector}"], ["nan.safetensors is a file"], []),
    Case("stats-same-file-twice", ["vectors", "stats", "a={nan_vector}", "b={nan_vector}", "--out", "{out}"], ["vector b", "is the same as vector a"]),
    Case("stats-folder-among-entries", ["vectors", "stats", "{zoo}", "a={nan_vector}", "--out", "{out}"], ["give one folder", "only NAME=FILE"]),
    # search: the config, the objective, the vectors and the folder before any trial
    Case("search-nan-bounds", search("--set", "bounds=[.nan, 1]"), ["bounds.0", "finite", "nan"]),
    Case("search-inf-bounds", search("--set", "bounds=[0, .inf]"), ["bounds.1", "finite", "inf"]),
    Case("search-bounds-too-wide", search("--set", "bounds=[-1e308, 1e308]"), ["bounds [-1e+308, 1e+308] are wider than a float holds"]),
    Case("search-fixed-bounds", search("--set", "bounds=[0.5, 0.5]"), ["min = max", "nothing is left to search"]),
    Case("search-nothing-given", ["search"], ["base: required: give --base", "give --vector NAME=", "give --objective"], []),
    Case("search-zero-trials", search("--trials", "0"), ["--trials", "got 0"]),
    Case("search-batch-size", search("--set", "batch_size=0"), ["batch_size", "greater than 0", "got 0"]),
    Case("search-batch-size-auto-hf", search("--set", "batch_size=auto"), ["batch size 'auto' is for the vllm backend", "give hf a number"]),
    Case("search-unknown-dtype", search("--set", "dtype=float8"), ["dtype", "'float8'"]),
    Case("search-negative-limit", search("--set", "limit=-1"), ["limit", "got -1"]),
    Case("search-unknown-key", search("--set", "trails=5"), ["trails", "not permitted"]),
    Case("search-boolean-trials", search("--set", "trials=true"), ["trials: expected a number, got true"]),
    Case("search-boolean-in-bounds", search("--set", "bounds=[0, yes]"), ["bounds: expected a number, got a boolean in [0, true]"]),
    Case("search-ray-address-nobody-answers", search("--parallel", "2", "--set", "ray_address=127.0.0.1:1"), ["ray_address 127.0.0.1:1", "nothing answers"]),
    Case("search-ray-address-no-port", search("--parallel", "2", "--set", "ray_address=headnode"), ["ray_address 'headnode'", "HOST:PORT"]),
    Case("search-ray-address-one-worker", search("--set", "ray_address=127.0.0.1:6379"), ["ray_address '127.0.0.1:6379'", "parallel >= 2"]),
    Case("search-unknown-metric", search("--objective", "{objective_accuracy}"), ["no metric 'accuracy'", "bits_per_byte"]),
    Case("search-unknown-filter", search("--objective", "{objective_filter}"), ["optimer_ja_dev_bpb has no filter 'strict-match'", "none"]),
    Case("search-direction-against-lm-eval", search("--objective", "{objective_direction}"), ["direction: maximize contradicts lm-eval", "lower is better"]),
    Case("search-infinite-objective-weight", search("--objective", "{objective_weight}"), ["objective-weight.yaml", "weight", "finite", "inf"]),
    Case("search-reference-lacks-task", search("--objective", "{objective_reference_elsewhere}"), ["results.json: task 'optimer_ja_dev_bpb' is not in the results"]),
    Case("search-reference-not-json", search("--objective", "{objective_reference_not_json}"), ["a-file.txt is not a JSON file"]),
    Case("search-reference-nan", search("--objective", "{objective_reference_nan}"), ["reference-nan.json", "optimer_ja_dev_bpb/bits_per_byte is nan"]),
    Case("search-reference-not-a-number", search("--objective", "{objective_reference_text}"), ["reference-text.json", "'N/A', not a number"]),
    Case("search-config-folder", ["search", "--config", "{zoo}"], ["is a folder"], []),
    Case("search-out-is-file", search("--output", "{file}"), ["a-file.txt is a file"], []),
    Case("search-vector-name-too-long", search("--vector", "x" * 200 + "={zoo}/tiny-text/math"), ["vectors.2.name", "at most 128 characters", "(200 characters)"]),
    Case("search-into-other-files", search("--output", "{not_a_run}"), ["not-a-run is not empty and holds no search"], ["{not_a_run}/.lock"]),
    Case("search-repeated-vector", search("--vector", "ja={zoo}/tiny-text/zh"), ["'ja' is given twice"]),
    Case("search-other-base", search("--vector", "x={foreign}"), ["trained from a different base"]),
    Case("search-vllm-setting-on-hf", search("--set", "gpu_memory_utilization=0.5"), ["gpu_memory_utilization: 0.5", "vllm backend"]),
    Case("search-objective-term-twice", ["search", "--base", "{base}", "--objective", "{objective_twice}", "--output", "{out}", "--vector", "ja={zoo}/tiny-text/ja"],
         ["optimer_ja_dev_bpb/bits_per_byte is listed twice"]),
    Case("search-config-key-twice", search("--config", "{search_key_twice}"), ["search-key-twice.yaml:3:1", "key 'trials' is given twice"]),
    Case("search-base-as-vector", search("--vector", "b={base}"), ["model b", "is the base itself"]),
    Case("search-vector-model-missing", search("--vector", "x={tmp}/no-model"), ["model x", "no-model does not exist"]),
    Case("search-output-uncreatable", search("--output", "/proc/optimer-merge-test/run"), ["search folder /proc/optimer-merge-test/run cannot be created"], []),
    Case("search-same-model-twice", search("--vector", "ja2={zoo}/tiny-text/ja"), ["model ja2", "is the same as model ja"]),
    Case("search-vector-of-a-given-model", search("--vector", "jv={ja_vector}"), ["vector jv and model ja both come from the model", "give it once"]),
    Case("search-export-missing-model", search("--export", "--vector", "gone={orphan_vector}"), ["--export", "no longer exist", "gone-model"]),
    Case("search-negative-seed", search("--seed=-1"), ["seed", "got -1"]),
    Case("search-parallel-over-trials", search("--parallel", "3"), ["parallel 3 is more than trials 2"]),
    Case("search-threads-over-cpus", search("--threads", "100000"), ["threads: this machine has", "(got 100000)"]),
    Case("search-parallel-over-cpus", search("--parallel", "2", "--threads", "512"), ["parallel 2 workers need 1024 CPUs", "lower parallel"]),
    Case("search-base-without-tokenizer", ["search", "--base", "{no_tokenizer}", "--objective", OBJECTIVE, "--output", "{out}", "--vector", "ja={zoo}/tiny-text/ja"],
         ["base", "tokenizerless holds no tokenizer"]),
    # train
    Case("train-empty-output-in-config", train("--set", "output=' '"), ["output: path is empty"]),
    Case("train-empty-dataset-source", train("--dataset", ":2"), ["datasets.1.source: path is empty"]),
    Case("train-inf-ratio", train("--dataset", "zh:inf"), ["ratio", "finite", "inf"]),
    Case("train-inf-lr", train("--lr", "inf"), ["lr", "finite", "inf"]),
    Case("train-inf-weight-decay", train("--set", "weight_decay=.inf"), ["weight_decay", "finite"]),
    Case("train-betas", train("--set", "betas=[0.9, 1.0]"), ["betas", "[0.9, 1.0]"]),
    Case("train-boolean-lr", train("--set", "lr=on"), ["lr: expected a number, got true"]),
    Case("train-unknown-flag", train("--eval-every", "5"), ["optimer-merge train: error: unrecognized arguments: --eval-every 5", "optimer-merge train --help"]),
    Case("train-threads-over-cpus", train("--threads", "100000"), ["threads: this machine has", "(got 100000)"]),
    Case("train-threads-zero", train("--threads", "0"), ["--threads", "expected 'auto' or a whole number >= 1, got 0"]),
    Case("search-threads-not-a-number", search("--threads", "abc"), ["--threads", "expected 'auto' or a whole number >= 1, got 'abc'"]),
    Case("train-precision", train("--precision", "bf99"), ["precision", "'bf99'"]),
    Case("train-not-utf8", train("--dataset", "{latin1}"), ["latin1.jsonl:2: not UTF-8"]),
    Case("train-non-string-text", train("--dataset", "{numbers}"), ["numbers.jsonl:1: 'text' is not a string but int 42"]),
    Case("train-unknown-source", train("--dataset", "jp"), ["unknown dataset source 'jp'"]),
    Case("train-set-inside-a-list", train("--set", "datasets.0.text_field=body"), ["cannot set datasets.0.text_field: datasets is a list", "--set 'datasets=[...]'"]),
    Case("train-eval-dataset-trained-on", train("--eval-dataset", "ja"), ["eval_datasets: ja is also a training dataset", "leave it out"]),
    Case("train-base-missing", ["train", "--base", "{tmp}/nobase", "--output", "{out}", "--dataset", "ja", "--max-steps", "2"], ["nobase does not exist"]),
    Case("train-seq-len", train("--seq-len", "100000"), ["seq_len=100000", "maximum"]),
    Case("train-token-cache-is-a-file", train("--set", "token_cache={bad_yaml}"), ["token_cache folder", "bad.yaml is a file; give a folder"]),
    Case("train-token-cache-uncreatable", train("--set", "token_cache=/proc/optimer-merge-test/tokens"),
         ["token_cache folder /proc/optimer-merge-test/tokens cannot be created"]),
    Case("train-unknown-strategy", train("--strategy", "fdsp"), ["unknown strategy 'fdsp'", "choose fsdp"]),
    Case("train-velocitune-one-dataset", train("--mixture", "velocitune"), ["velocitune", "at least 2", "got ja"]),
    Case("train-overwrite-not-a-run", ["train", "--base", "{base}", "--output", "{zoo}/tiny-text", "--dataset", "ja", "--max-steps", "2", "--overwrite"],
         ["tiny-text is not empty and holds no training run", "--overwrite deletes only a training run"], []),
    Case("train-into-other-files", train("--output", "{not_a_run}"), ["not-a-run is not empty and holds no training run"], ["{not_a_run}/.lock"]),
    Case("train-zero3", train("--strategy", "deepspeed_stage_3"), ["'deepspeed_stage_3'", "ZeRO stage 3", "use strategy fsdp"]),
    Case("train-strategy-unknown-option", train("--set", "strategy.name=ddp", "--set", "strategy.options.bogus=1"),
         ["strategy 'ddp' has no option 'bogus'", "find_unused_parameters"]),
    Case("train-strategy-options-on-auto", train("--set", "strategy.options.bucket_cap_mb=10"), ["auto takes no options", "bucket_cap_mb", "name: ddp"]),
    Case("train-strategy-options-on-fsdp", train("--set", "strategy.name=fsdp", "--set", "strategy.options.cpu_offload=true"),
         ["fsdp takes no options", "cpu_offload"]),
    Case("train-activation-checkpointing-on-ddp", train("--set", "strategy={{name: ddp, activation_checkpointing: true}}"),
         ["activation_checkpointing is a setting of fsdp", "'ddp'"]),
    Case("train-strategy-timeout-not-seconds", train("--set", "strategy.name=ddp", "--set", "strategy.options.timeout=10m"),
         ["timeout", "seconds", "'10m'"]),
    Case("train-fsdp-devices", train("--strategy", "fsdp", "--devices", "auto"), ["strategy fsdp", "'auto'"]),
    Case("train-devices-not-a-number", train("--devices", "abc"), ["devices", "got 'abc'", "'auto'"]),
    Case("train-device-indices-on-cpu", train("--devices", "0,1", "--accelerator", "cpu"), ["devices='0,1'", "CPUAccelerator"]),
    Case("train-nodes-without-launcher", train("--num-nodes", "2"), ["num_nodes=2", "NODE_RANK"]),
    Case("train-malformed-config", ["train", "--config", "{bad_yaml}"], ["bad.yaml:3:", "malformed YAML"], []),
    Case("train-seed-too-large", train("--seed", "4294967296"), ["seed", "4294967295", "got 4294967296"]),
    Case("train-no-budget", ["train", "--base", "{base}", "--output", "{out}", "--dataset", "ja"], ["exactly one of max_tokens and max_steps", "--max-tokens N"]),
    Case("train-base-without-tokenizer", ["train", "--base", "{no_tokenizer}", "--output", "{out}", "--dataset", "ja", "--max-steps", "2"], ["tokenizerless holds no tokenizer"]),
    # eval
    Case("eval-url-without-server", evaluate("--url", "http://127.0.0.1:9"), ["--url http://127.0.0.1:9 needs --backend server"]),
    Case("eval-tensor-parallel-hf", evaluate("--tensor-parallel-size", "2"), ["--tensor-parallel-size 2", "--backend vllm or server"]),
    Case("eval-objective-group", ["eval", "{base}", "--objective", "{objective_group}", "--output", "{out}"], ["optimer_dev is a group", "optimer_ja_dev_bpb"]),
    Case("eval-task-twice", evaluate("--tasks", "optimer_ja_dev_bpb,optimer_ja_dev_bpb"), ["optimer_ja_dev_bpb twice"]),
    Case("eval-url-not-http", evaluate("--backend", "server", "--url", "localhost:8000"), ["server url 'localhost:8000'", "http(s)://HOST:PORT"]),
    Case("eval-empty-tasks", ["eval", "{base}", "--tasks", "", "--output", "{out}"], ["--tasks ''"]),
    Case("eval-empty-output", evaluate("--output", ""), ["argument --output: expected a file or folder path, got ''"]),
    Case("eval-objective-empty-file", evaluate("--objective", "{empty}"), ["empty.yaml: expected an objective", "got an empty file"]),
    Case("eval-group-and-its-task", evaluate("--tasks", "optimer_dev,optimer_ja_dev_bpb"), ["tasks optimer_dev and optimer_ja_dev_bpb both run optimer_ja_dev_bpb", "leave one of them out"]),
    Case("eval-threads-over-cpus", evaluate("--threads", "100000"), ["argument --threads: this machine has", "CPUs; give at most", "(got 100000)"]),
    Case("eval-zero-limit", evaluate("--limit", "0"), ["--limit", "got 0"]),
    Case("eval-batch-size-auto-hf", evaluate("--batch-size", "auto"), ["batch size 'auto' is for the vllm backend", "give hf a number"]),
    Case("eval-unknown-task", ["eval", "{base}", "--tasks", "optimer_jp_dev", "--output", "{out}"], ["optimer_jp_dev"]),
    Case("eval-unknown-dtype", evaluate("--dtype", "float8"), ["'float8'"]),
    Case("eval-output-uncreatable", evaluate("--output", "/proc/optimer-merge-test/run"), ["--output /proc/optimer-merge-test/run cannot be created"], []),
    Case("eval-output-name-too-long", evaluate("--output", "{tmp}/made/" + "x" * 300), ["--output", "cannot be created: File name too long"], ["{tmp}/made"]),
    Case("eval-output-named-like-a-file", evaluate()[:-1] + ["{tmp}/scores.json"], ["--output", "scores.json names a file", "give a folder"], ["{tmp}/scores.json"]),
    Case("eval-out-is-file", evaluate("--output", "{file}"), ["a-file.txt is a file"], []),
    Case("eval-truncated-model", ["eval", "{truncated}", "--tasks", "optimer_ja_dev_bpb", "--output", "{out}"], ["truncated/model.safetensors is not a readable"]),
    Case("eval-not-a-model", ["eval", "{tmp}", "--tasks", "optimer_ja_dev_bpb", "--output", "{out}"], ["has no config.json"]),
    Case("eval-model-without-tokenizer", ["eval", "{no_tokenizer}", "--tasks", "optimer_ja_dev_bpb", "--output", "{out}"], ["tokenizerless holds no tokenizer", "tokenizer.json"]),
    # data, demo, leaderboard
    Case("data-unknown-domain", ["data", "check", "--domains", "ja", "xx", "--sources", "{out}"], ["unknown domain(s) 'xx'"]),
    Case("data-tokenizer-missing", ["data", "sizes", "--tokenizer", "{tmp}/no-tokenizer"], ["no-tokenizer does not exist"], []),
    Case("demo-empty-run-dir", ["demo", "--run-dir", " "], ["argument --run-dir: expected a file or folder path, got ' '"]),
    Case("demo-zero-workers", ["demo", "--run-dir", "{out}", "--workers", "0"], ["--workers", "got 0"]),
    Case("demo-inf-lr", ["demo", "--run-dir", "{out}", "--lr", "inf"], ["--lr", "inf"]),
    Case("demo-run-dir-is-file", ["demo", "--run-dir", "{file}"], ["a-file.txt is a file"], []),
    Case("demo-into-other-files", ["demo", "--run-dir", "{not_a_run}"], ["not-a-run is not empty and holds no demo"], ["{not_a_run}/.lock"]),
    Case("demo-seeds-into-other-files", ["demo", "--run-dir", "{not_a_run}", "--seeds", "2"], ["not-a-run is not empty and holds no multi-seed demo"], ["{not_a_run}/.lock"]),
    Case("demo-zero-seeds", ["demo", "--run-dir", "{out}", "--seeds", "0"], ["--seeds", "got 0"]),
    Case("demo-cpt-tokens-below-one-step", ["demo", "--run-dir", "{out}", "--cpt-tokens", "100"], ["--cpt-tokens 100", "less than one training step", "2048"]),
    Case("demo-report-dir-one-seed", ["demo", "--run-dir", "{out}", "--report-dir", "{tmp}/report"], ["--report-dir", "needs --seeds 2 or more"]),
    Case("demo-report-dir-is-file", ["demo", "--run-dir", "{out}", "--seeds", "2", "--report-dir", "{file}"], ["a-file.txt is a file"], []),
    Case("demo-report-dir-uncreatable", ["demo", "--run-dir", "{out}", "--seeds", "2", "--report-dir", "/proc/optimer-merge-test/report"],
         ["--report-dir /proc/optimer-merge-test/report cannot be created"]),
    Case("demo-seeds-past-range", ["demo", "--run-dir", "{out}", "--seed", "4294967295", "--seeds", "2"], ["--seed 4294967295 with --seeds 2"]),
    Case("demo-search-workers-over-cpus", ["demo", "--run-dir", "{out}", "--search-workers", "4096"], ["--search-workers 4096", "CPUs"]),
    Case("data-base-out-not-a-base", ["data", "base", "--out", "{zoo}", "--work", "{out}"], ["is not empty and holds no earlier base (BUILD.json)"]),
    Case("data-option-of-another-action", ["data", "check", "--out", "{out}"], ["--out does not apply to `check`"]),
    Case("data-not-a-tokenizer", ["data", "sizes", "--tokenizer", "{zoo}"], ["holds no tokenizer"]),
    Case("data-base-work-uncreatable", ["data", "base", "--out", "{out}", "--work", "/proc/optimer-merge-test/work"],
         ["--work /proc/optimer-merge-test/work cannot be created"]),
    Case("data-base-with-domains", ["data", "base", "--domains", "ja", "--work", "{out}"], ["--domains does not apply to `base`", "`build` and `check`"]),
    Case("leaderboard-missing", ["leaderboard", "{tmp}/none.json", "--output", "{out}"], ["none.json: no such file"]),
    Case("leaderboard-not-json", ["leaderboard", "{file}", "--output", "{out}"], ["a-file.txt: not a JSON file"]),
    Case("leaderboard-same-label", ["leaderboard", "a={results}", "a={results2}", "--output", "{out}"], ["labelled 'a'", "NAME=RESULTS"]),
    Case("leaderboard-same-file-twice", ["leaderboard", "{results}", "{results}", "--output", "{out}"], ["{results} is given twice"]),
    Case("leaderboard-unknown-metric", ["leaderboard", "{results}", "--output", "{out}", "--metrics", "accuracy"], ["--metrics: accuracy not in the results"]),
    Case("leaderboard-empty-results", ["leaderboard", "a=", "--output", "{out}"], ["'a=' gives no results file or folder"]),
    Case("leaderboard-empty-name", ["leaderboard", "={results}", "--output", "{out}"], ["the NAME before '=' is empty"]),
]


@pytest.fixture(scope="module")
def paths(tmp_path_factory, tiny_zoo) -> dict[str, str]:
    """Bad inputs on disk, built once: recipes, broken checkpoints, bad datasets."""
    import torch
    from safetensors.torch import load_file, save_file

    root = tmp_path_factory.mktemp("bad")
    zoo = str(tiny_zoo)
    p = {"zoo": zoo, "base": f"{zoo}/tiny-text/base", "tmp": str(root)}
    (root / "a-file.txt").write_text("not a folder, not JSON\n")
    p["file"] = str(root / "a-file.txt")
    recipes = {  # each: RECIPE's fields, and one (old, new) text replacement
        "ok": {},
        "normalise": {"parameters": "normalise: true"},
        "scael": {"parameters": "scael: 1.0"},
        "outdtype": {"extra": "outdtype: bfloat16\n"},
        "nan": {"weight": ".nan"},
        "filtered": {"weight": "[{filter: mlp, value: 0.3}]"},
        "yes": {"weight": "yes"},
        "inf": {"parameters": "scale: .inf"},
        "method": {"replace": ("merge_method: optimer", "merge_method: optimr")},
        "missing": {"replace": ("tiny-text/zh", "tiny-text/nope")},
        "modles": {"replace": ("models:", "modles:")},
        "nobase": {"replace": (f"base_model: {zoo}/tiny-text/base\n", "")},
        "noweight": {"replace": ("parameters: {weight: 0.5}", "parameters: {}")},
        "twice": {"replace": ("tiny-text/zh", "tiny-text/ja")},
        "dtype": {"replace": ("dtype: float32", "dtype: float33")},
        "zerosum": {"weight": "-0.5", "parameters": "normalize: true"},
        "emptymodel": {"replace": (f"model: {zoo}/tiny-text/zh", 'model: ""')},
        "emptybase": {"replace": (f"base_model: {zoo}/tiny-text/base", "base_model: ''")},
    }
    for name, parts in recipes.items():
        text = RECIPE.format(zoo=zoo, weight=parts.get("weight", "0.5"), parameters=parts.get("parameters", ""), extra=parts.get("extra", ""))
        old, new = parts.get("replace", ("", ""))
        assert old in text
        (root / f"recipe-{name}.yml").write_text(text.replace(old, new) if old else text)
        p[f"recipe_{name}"] = str(root / f"recipe-{name}.yml")
    sliced = "merge_method: optimer\nbase_model: {zoo}/tiny-text/base\nslices:\n  - sources:\n{sources}dtype: float32\n"
    source = "    - model: {zoo}/tiny-text/{name}\n      layer_range: {layers}\n      parameters: {{weight: 0.5}}\n"
    for name, sources in (("nobase", [("ja", "[0, 2]")]), ("layers", [("ja", "[0, 9]"), ("base", "[0, 9]")])):
        text = sliced.format(zoo=zoo, sources="".join(source.format(zoo=zoo, name=n, layers=r) for n, r in sources))
        (root / f"recipe-slices-{name}.yml").write_text(text)
        p[f"recipe_slices_{name}"] = str(root / f"recipe-slices-{name}.yml")
    (root / "bad.yaml").write_text("merge_method: optimer\nbase_model: x\n  models: y\n")
    p["bad_yaml"] = str(root / "bad.yaml")
    # a CPT model whose train_meta.json records another base
    shutil.copytree(tiny_zoo / "tiny-text/ja", root / "foreign")
    (root / "foreign/train_meta.json").write_text(json.dumps({"base_fingerprint": "0123456789abcdef"}))
    p["foreign"] = str(root / "foreign")
    (root / "empty.yaml").write_text("")
    p["empty"] = str(root / "empty.yaml")
    (root / "not-a-run").mkdir()  # a folder of the user's own files
    (root / "not-a-run/notes.txt").write_text("mine\n")
    p["not_a_run"] = str(root / "not-a-run")
    (root / "merge-and-notes/notes").mkdir(parents=True)  # an earlier merge's folder the user put a folder into
    (root / "merge-and-notes/mergekit_config.yml").write_text("merge_method: optimer\n")
    p["merge_and_notes"] = str(root / "merge-and-notes")
    # a model folder with a truncated checkpoint
    shutil.copytree(tiny_zoo / "tiny-text/ja", root / "truncated")
    data = (root / "truncated/model.safetensors").read_bytes()
    (root / "truncated/model.safetensors").write_bytes(data[: len(data) // 2])
    p["truncated"] = str(root / "truncated")
    (root / "recipe-truncated.yml").write_text(RECIPE.format(zoo=zoo, weight="0.5", parameters="", extra="").replace(f"{zoo}/tiny-text/zh", p["truncated"]))
    p["recipe_truncated"] = str(root / "recipe-truncated.yml")
    # a model folder without a tokenizer (transformers would build an empty one from it, silently)
    (root / "tokenizerless").mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_zoo / "tiny-text/base" / name, root / "tokenizerless" / name)
    p["no_tokenizer"] = str(root / "tokenizerless")
    # vectors: one with a NaN, one whose source model is gone
    assert cli.main([a.format(**p) for a in extract("ja={zoo}/tiny-text/ja", out=str(root / "vectors"))]) == 0
    p["ja_vector"] = str(root / "vectors/ja.safetensors")
    vector = load_file(p["ja_vector"])
    from safetensors import safe_open

    with safe_open(p["ja_vector"], "pt") as reader:
        metadata = reader.metadata()
    bad = {k: v.clone() for k, v in vector.items()}
    next(iter(bad.values())).view(-1)[0] = float("nan")
    save_file(bad, str(root / "nan.safetensors"), metadata=metadata)
    p["nan_vector"] = str(root / "nan.safetensors")
    shutil.copytree(tiny_zoo / "tiny-text/zh", root / "gone-model")
    assert cli.main([a.format(**p) for a in extract(f"gone={root / 'gone-model'}", out=str(root / "orphan"))]) == 0
    shutil.rmtree(root / "gone-model")
    p["orphan_vector"] = str(root / "orphan/gone.safetensors")
    assert torch.isnan(load_file(p["nan_vector"])[next(iter(bad))]).any()
    # objectives
    (root / "objective-accuracy.yaml").write_text("tasks:\n- {task: optimer_ja_dev_bpb, metric: accuracy}\n")
    (root / "objective-group.yaml").write_text("tasks:\n- {task: optimer_dev, metric: bits_per_byte}\n")
    p["objective_group"] = str(root / "objective-group.yaml")
    (root / "objective-twice.yaml").write_text("tasks:\n" + "- {task: optimer_ja_dev_bpb, metric: bits_per_byte}\n" * 2)
    (root / "search-key-twice.yaml").write_text("trials: 2\nlimit: 2\ntrials: 100\n")
    p["search_key_twice"] = str(root / "search-key-twice.yaml")
    p["objective_twice"] = str(root / "objective-twice.yaml")
    p["objective_accuracy"] = str(root / "objective-accuracy.yaml")
    for name, term in (("filter", "filter: strict-match"), ("direction", "direction: maximize"), ("weight", "weight: .inf")):
        (root / f"objective-{name}.yaml").write_text(f"tasks:\n- {{task: optimer_ja_dev_bpb, metric: bits_per_byte, {term}}}\n")
        p[f"objective_{name}"] = str(root / f"objective-{name}.yaml")
    for name, value in (("nan", "NaN"), ("text", '"N/A"')):  # references whose value is no score
        (root / f"reference-{name}.json").write_text('{"results": {"optimer_ja_dev_bpb": {"bits_per_byte,none": %s}}}' % value)
    for name, reference in (("elsewhere", "results.json"), ("not-json", "a-file.txt"), ("nan", "reference-nan.json"), ("text", "reference-text.json")):
        (root / f"objective-reference-{name}.yaml").write_text(f"tasks:\n- {{task: optimer_ja_dev_bpb, metric: bits_per_byte}}\nreference: {reference}\n")
        p[f"objective_reference_{name.replace('-', '_')}"] = str(root / f"objective-reference-{name}.yaml")
    # datasets
    (root / "latin1.jsonl").write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    p["latin1"] = str(root / "latin1.jsonl")
    (root / "numbers.jsonl").write_text('{"text": 42}\n')
    p["numbers"] = str(root / "numbers.jsonl")
    # an lm-eval results file
    (root / "results.json").write_text(json.dumps({"results": {"t": {"acc,none": 0.5, "sample_len": 3}}, "higher_is_better": {"t": {"acc": True}}}))
    p["results"] = str(root / "results.json")
    shutil.copy(root / "results.json", root / "results-2.json")
    p["results2"] = str(root / "results-2.json")
    return p


def run(argv: list[str]) -> int:
    try:
        return cli.main(argv)
    except SystemExit as done:  # argparse's own refusals
        return int(done.code)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_line_before_any_work(case, paths, capfd, tmp_path):
    fields = {**paths, "out": str(tmp_path / "out" / "run")}
    argv = [a.format(**fields) for a in case.argv]
    code = run(argv)
    out, err = capfd.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert out == "", f"a refused command said it was starting: {out!r}"
    assert len(lines) == 1 and lines[0].startswith(f"optimer-merge {argv[0]}"), err
    for text in case.expect:
        assert text.format(**fields) in lines[0]
    for path in case.leaves_no:
        assert not Path(path.format(**fields)).exists(), f"{path} left behind"
    assert not (tmp_path / "out").exists(), "the refused run left its folder behind"


def test_the_table_covers_every_subcommand():
    assert len(CASES) >= 40
    assert {c.argv[0] for c in CASES} == set(cli.COMMANDS)


def test_a_disk_too_small_is_refused_before_any_work(paths, monkeypatch, capfd, tmp_path):
    """Merges, vectors, an export and training checkpoints that cannot fit are refused up front, with
    what they need and what the disk has (the disk reports 100 KiB free; a tiny model takes ~400 KiB)."""
    import errno
    from collections import namedtuple

    import optimer_merge.io.files as files

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(files.shutil, "disk_usage", lambda path: usage(2**30, 2**30 - 100 * 1024, 100 * 1024))
    out = str(tmp_path / "out" / "run")
    fields = {**paths, "out": out}
    for argv, needed in (
        (["merge", "{recipe_ok}", "{out}"], "the merge needs about 391 KiB"),
        (extract("ja={zoo}/tiny-text/ja", "zh={zoo}/tiny-text/zh"), "extracting 2 vector(s) needs about 782 KiB"),
        (search("--export"), "--export needs about 391 KiB"),
        (train(), "training (3 checkpoints of 1.1 MiB at once, then the model) needs about 3.8 MiB"),
    ):
        assert run([a.format(**fields) for a in argv]) == 2
        lines = [line for line in capfd.readouterr().err.splitlines() if line.strip()]
        assert len(lines) == 1 and needed in lines[0] and "its disk has 100 KiB" in lines[0], lines
        assert not (tmp_path / "out").exists()
    monkeypatch.undo()

    # a disk that fills up anyway (here while the training data is tokenized): one line, no folder left
    from optimer_merge.cpt import datasets

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(datasets, "tokenize_to_file", disk_full)
    assert run([a.format(**fields) for a in train()]) == 2
    lines = [line for line in capfd.readouterr().err.splitlines() if line.strip()]
    assert lines == ["optimer-merge train: error: the disk is full: free some space or choose an output folder on another disk; "
                     "the same command resumes where this run stopped"]  # fmt: skip
    assert not (tmp_path / "out").exists()


def test_a_search_does_not_resume_over_changed_weights(paths, capfd, tmp_path):
    """A vector's source retrained in place (same path, new weights) between two runs of a search:
    the trials so far scored another pool, so the rerun is refused; unchanged, it resumes."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(Path(paths["zoo"]) / "tiny-text/ja", tmp_path / "ja")
    fields = {**paths, "out": str(tmp_path / "run")}
    argv = [[a.format(**fields).replace(f"{paths['zoo']}/tiny-text/ja", str(tmp_path / "ja")) for a in search("--trials", t)] for t in ("2", "3")]
    assert run(argv[0]) == 0
    record = json.loads((tmp_path / "run/search_config.json").read_text())["inputs"]
    assert set(record) == {"base", "vector ja", "vector zh"}
    weights = load_file(str(tmp_path / "ja/model.safetensors"))
    name = next(iter(weights))
    weights[name] = weights[name] + 0.01
    save_file(weights, str(tmp_path / "ja/model.safetensors"), metadata={"format": "pt"})
    capfd.readouterr()
    assert run(argv[1]) == 2
    lines = [line for line in capfd.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and "vector ja changed since" in lines[0], lines
    assert len((tmp_path / "run/trials.jsonl").read_text().splitlines()) == 2  # nothing ran, nothing was lost
    shutil.copy(Path(paths["zoo"]) / "tiny-text/ja/model.safetensors", tmp_path / "ja/model.safetensors")
    assert run(argv[1]) == 0
    assert len((tmp_path / "run/trials.jsonl").read_text().splitlines()) == 3


SLOW_IMPORTS = [  # (argv, libraries that take seconds to import and must not be loaded for the refusal)
    (["merge", "{out}/missing.yaml", "{out}/merged"], ["mergekit"]),
    (["merge", "{bad_yaml}", "{out}/merged"], ["mergekit"]),
    (["train", "--base", "{out}/missing", "--dataset", "ja", "--output", "{out}/run", "--max-steps", "2"], ["lightning", "transformers"]),
    (["train", "--base", "{base}", "--dataset", "{out}/missing.jsonl", "--output", "{out}/run", "--max-steps", "2"], ["lightning", "transformers"]),
    (["eval", "{out}/missing", "--output", "{out}/run"], ["lm_eval.tasks", "transformers"]),
]


@pytest.mark.parametrize("argv, libraries", SLOW_IMPORTS, ids=["merge-missing", "merge-malformed", "train-base", "train-dataset", "eval-model"])
def test_a_missing_input_is_refused_before_the_slow_libraries_load(argv, libraries, paths, tmp_path):
    """A typo costs a fraction of a second, not the seconds mergekit, Lightning or lm-eval's task
    index take to load."""
    import subprocess
    import sys

    argv = [a.format(**{**paths, "out": str(tmp_path)}) for a in argv]
    probe = f"import sys; from optimer_merge import cli; code = cli.main({argv!r}); print(code, [m for m in {libraries!r} if m in sys.modules])"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.stdout.splitlines()[-1] == "2 []", done.stdout + done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"optimer-merge {argv[0]}: error: "), done.stderr
