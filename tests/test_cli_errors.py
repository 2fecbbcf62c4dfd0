"""Every ``catp`` command answers bad input with one usage error (exit 2, the bad value named,
no traceback), before any model runs; nothing to run is an error; and a bug past the input
checks still shows its traceback."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest
from PIL import Image
from test_eval import FAST, jsonl_dataset, model_dir, said  # noqa: F401 (fixtures)
from typer.testing import CliRunner

from catp.adapt import CHECKPOINT_DIR, AdaptSettings
from catp.cli.app import app
from catp.models import ADAPTER_SETTINGS_FILE

# {tmp}: the test's folder (also the working directory); {model}: a tiny BLIP-2 checkpoint;
# {data}: a 10-question JSONL dataset for it. Each case: the arguments, then text the one-line
# error must hold (the bad value or the option it names).
CASES = [
    # names a method, a keep, a dataset, a model, a prompt, a dtype, a device that is not there
    (["eval", "--methods", "foo"], "unknown method 'foo'"),
    (["eval", "--methods", ""], "no method given"),
    (["eval", "--methods", "no_such_module:X"], "cannot import module 'no_such_module'"),
    (["eval", "--compare", "catp,randomm"], "unknown method 'randomm'"),
    (["eval", "--keep", "99"], "keep=99 is out of range"),
    (["eval", "--keep", "0"], "keep=0 is out of range"),
    (["eval", "--keep", "half"], "cannot read keep 'half'"),
    (["eval", "--keep", "mass:2"], "Budget mass=2.0 is out of range"),
    (["eval", "--dataset", "vqav2"], "dataset 'vqav2' needs --questions"),
    (["eval", "--dataset", "nosuchset"], "unknown dataset 'nosuchset'"),
    (["eval", "--dataset", "hf:./no/such.parquet"], "dataset 'hf:./no/such.parquet': no such file or directory"),
    (["eval", "--dataset", "easy-vqa", "--config", "x"], "--config and --columns apply to hf:NAME datasets"),
    (["eval", "--columns", "picture=img"], "unknown role 'picture'"),
    (["eval", "--model", "./no-such-model"], "./no-such-model: no such directory"),
    (["eval", "--model", "/path/that/does/not/exist"], "/path/that/does/not/exist: no such directory"),
    (["eval", "--model", "{tmp}/bert"], "a 'bert' model has no Q-Former"),
    (["eval", "--prompt", "no slot"], "prompt must contain exactly one '{}'"),
    (["eval", "--dtype", "fp8"], "got 'fp8'"),
    (["eval", "--dtype", "fp16"], "dtype must be one of auto, float32, float16, bfloat16, got 'fp16'"),
    (["eval", "--device", "cuda"], "CUDA is not available"),
    (["eval", "--device", "gpu"], "device must be cpu, cuda or cuda:N"),
    (["eval", "--out", "{tmp}/a-file"], "is a file"),
    # nothing to run
    (["eval", "--model", "{model}", "--dataset", "{tmp}/empty.jsonl", "--keep", "4"], "has no questions: nothing to run"),
    (["eval", "--model", "{model}", "--dataset", "{data}", "--methods", "first", "--keep", "mass:0.8"], "nothing to run"),
    # bench
    (["bench", "--arch", "nope"], "unknown arch 'nope'"),
    (["bench", "--methods", "nope"], "unknown method 'nope'"),
    (["bench", "--dtype", "fp8"], "got 'fp8'"),
    (["bench", "--dtype", "bf16"], "got 'bf16'"),
    (["bench", "--device", "cuda"], "CUDA is not available"),
    (["bench", "--model", "{tmp}/bert"], "a 'bert' model has no Q-Former"),
    (["bench", "--batch", "0"], "--batch must be positive integers"),
    (["bench", "--plot", "{tmp}/p.txt"], "cannot write a figure to"),
    (["bench", "--engine", "vllm", "--adapter", "{tmp}/adapter"], "--adapter: not used by --engine vllm"),
    (["bench", "--engine", "trt"], "--engine must be one of hf, vllm"),
    (["bench", "--requests", "8"], "--requests 8 would be ignored: it applies to --engine vllm"),
    (["bench", "--engine", "vllm", "--beams", "3"], "--beams: not used by --engine vllm"),
    (["bench", "--flops-only", "--repeats", "3"], "--repeats: not used by --flops-only"),
    (["bench", "--engine", "vllm", "--methods", "catp,first"], "--engine vllm times one method"),
    (["bench", "--engine", "vllm", "--keep", "8,mass:0.8"], "before the vision encoder"),
    (["bench", "--engine", "vllm", "--keep", "99"], "keep=99 is out of range"),
    (["bench", "--engine", "vllm", "--requests", "0"], "--requests': Input should be greater than or equal to 1"),
    (["bench", "--engine", "vllm", "--arch", "nope"], "unknown arch 'nope'"),
    # demo
    (["demo", "--methods", "nope"], "unknown method 'nope'"),
    (["demo", "--keep", "99"], "keep=99 is out of range"),
    (["demo", "--keeps", "8"], "No such option: --keeps"),
    (["demo", "--out", "{tmp}/d.txt"], "cannot write a figure to"),
    (["demo", "--out", "{tmp}/a-file/d.png"], "a file is in the way"),
    # explain
    (["explain", "--out", "x.png", "--keep", "99"], "keep=99 is out of range"),
    (["explain", "--out", "x.png", "--keep", "mass:0.8"], "not a budget"),
    (["explain", "--out", "x.png", "--keep", "8,4"], "give one keep value"),
    (["explain", "--out", "x.png", "--image", "no-such.png", "--question", "what?"], "image file not found: no-such.png"),
    (["explain", "--out", "x.png", "--image", "missing.png"], "image file not found: missing.png"),
    (["explain", "--out", "x.png", "--image", "{tmp}/a-file", "--question", "what?"], "as an image"),
    (["explain", "--out", "e.txt"], "cannot write a figure to 'e.txt'"),
    (["explain", "--out", "{tmp}/a-file/e.png"], "a file is in the way"),
    (["explain", "--out", "x.png", "--model", "/path/that/does/not/exist"], "no such directory"),
    # diagnose
    (["diagnose", "--methods", "nope"], "unknown method 'nope'"),
    (["diagnose", "--keep", "99"], "keep=99 is out of range"),
    (["diagnose", "--dtype", "fp8"], "got 'fp8'"),
    (["diagnose", "--dtype", "fp16"], "--dtype"),
    (["diagnose", "--device", "cuda"], "CUDA is not available"),
    (["diagnose", "--dataset", "nope"], "got 'nope'"),
    (["diagnose", "--instruction", "look"], "has no instruction input"),
    (["diagnose", "--images", "{tmp}/no-such-folder"], "must be a folder of images"),
    (["methods", "--verbose"], "No such option: --verbose"),
    # -- issue 34: every path, adapter, prompt, range and ignored option, named ---------------------------
    # output paths that cannot be written: /proc, under a file, a folder where a file goes
    (["eval", "--out", "/proc/catp-x"], "Invalid value for --out: cannot write in '/proc/catp-x'"),
    (["eval", "--out", "{tmp}/a-file/run"], "Invalid value for --out: cannot make folder '{tmp}/a-file/run': a file is in the way"),
    (["bench", "--out", "/proc/catp-x/bench.json"], "Invalid value for --out: cannot write in '/proc/catp-x'"),
    (["bench", "--out", "{tmp}/a-file/bench.json"], "Invalid value for --out: cannot make folder '{tmp}/a-file'"),
    (["bench", "--out", "{tmp}"], "Invalid value for --out: '{tmp}' is a folder; give a file name"),
    (["bench", "--plot", "/proc/catp-x/p.png"], "Invalid value for --plot: cannot write in '/proc/catp-x'"),
    (["bench", "--plot", "{tmp}/a-file/p.png"], "Invalid value for --plot: cannot make folder"),
    (["bench", "--engine", "vllm", "--out", "/proc/catp-x/b.json"], "Invalid value for --out: cannot write in '/proc/catp-x'"),
    (["explain", "--out", "/proc/catp-x/e.png"], "Invalid value for --out: cannot write in '/proc/catp-x'"),
    (["explain", "--out", "x.png", "--html", "/proc/catp-x/e.html"], "Invalid value for --html: cannot write in '/proc/catp-x'"),
    (["explain", "--out", "x.png", "--html", "{tmp}/a-file/e.html"], "Invalid value for --html: cannot make folder"),
    (["explain", "--out", "x.png", "--html", "{tmp}"], "Invalid value for --html: '{tmp}' is a folder; give a file name"),
    (["explain", "--out", "{tmp}"], "Invalid value for --out: cannot write a figure to"),
    (["diagnose", "--out", "/proc/catp-x/d.json"], "Invalid value for --out: cannot write in '/proc/catp-x'"),
    (["diagnose", "--out", "{tmp}/a-file/d.json"], "Invalid value for --out: cannot make folder"),
    (["diagnose", "--out", "{tmp}"], "Invalid value for --out: '{tmp}' is a folder; give a file name"),
    (["demo", "--out", "/proc/catp-x/d.png"], "Invalid value for --out: cannot write in '/proc/catp-x'"),
    (["demo", "--out", "{tmp}"], "Invalid value for --out: cannot write a figure to"),
    (["adapt", "--out", "/proc/catp-x"], "Invalid value for --out: cannot write in '/proc/catp-x'"),
    (["adapt", "--out", "{tmp}/a-file"], "Invalid value for --out: '{tmp}/a-file' is a file; give a folder"),
    (["adapt", "--out", "{tmp}/a-file/adapter"], "Invalid value for --out: cannot make folder '{tmp}/a-file/adapter': a file is in the way"),
    # input paths: a file where a file is needed, a folder where a folder is needed
    (["eval", "--dataset", "{tmp}/dir.jsonl"], "Invalid value for --dataset: '{tmp}/dir.jsonl' is a folder; give a JSONL file"),
    (["eval", "--dataset", "{tmp}/missing.jsonl"], "Invalid value for --dataset: '{tmp}/missing.jsonl': no such JSONL file"),
    (["eval", "--dataset", "jsonl", "--questions", "{tmp}"], "Invalid value for --questions: '{tmp}' is a folder; give a file"),
    (["eval", "--dataset", "jsonl", "--questions", "{tmp}/no.jsonl"], "Invalid value for --questions: '{tmp}/no.jsonl': no such file"),
    (["eval", "--dataset", "vqav2", "--annotations", "{tmp}"], "Invalid value for --annotations: '{tmp}' is a folder"),
    (["eval", "--dataset", "vqav2", "--images", "{tmp}/a-file"], "Invalid value for --images: '{tmp}/a-file' is a file; give a folder"),
    (["eval", "--dataset", "vqav2", "--images", "{tmp}/no-such-folder"], "Invalid value for --images: '{tmp}/no-such-folder': no such folder"),
    (["explain", "--out", "x.png", "--image", "{tmp}", "--question", "what?"], "Invalid value for --image: {tmp} is a folder; give an image file"),
    (["explain", "--out", "x.png", "--frames", "{tmp}/f.png,{tmp}/no.png", "--question", "what?"], "Invalid value for --frames: image file not found: {tmp}/no.png"),
    (["explain", "--out", "x.png", "--frames", ",", "--question", "what?"], "Invalid value for --frames: --frames names no image file"),
    (["explain", "--out", "x.png", "--image", "{tmp}/f.png", "--frames", "{tmp}/f.png"], "give --image (an image model) or --frames"),
    (["explain", "--out", "x.png", "--image", "{tmp}/f.png"], "Invalid value for --question: give the --question"),
    (["diagnose", "--images", "{tmp}/a-file"], "Invalid value for --images: --images must be a folder of images"),
    (["diagnose", "--images", "{tmp}/empty-dir"], "Invalid value for --images: no .png/.jpg/.jpeg/.bmp/.webp images in {tmp}/empty-dir"),
    (["diagnose", "--images", "{tmp}/pictures", "--dataset", "scenes"], "Invalid value for --dataset: --dataset scenes would be ignored: --images gives the images"),
    (["diagnose", "--images", "{tmp}/pictures", "--split", "train"], "Invalid value for --split: --split train would be ignored"),
    (["adapt", "--out", "{tmp}/o", "--dataset", "{tmp}/dir.jsonl"], "Invalid value for --dataset: '{tmp}/dir.jsonl' is a folder"),
    (["adapt", "--out", "{tmp}/o", "--dataset", "vqav2", "--questions", "{tmp}"], "Invalid value for --questions: '{tmp}' is a folder"),
    (["adapt", "--out", "{tmp}/o", "--dataset", "vqav2", "--images", "{tmp}/a-file"], "Invalid value for --images: '{tmp}/a-file' is a file"),
    # adapter folders: missing, a file, no config, broken JSON, no peft_type; named as --adapter, not --model
    (["eval", "--adapter", "{tmp}/no-such-adapter"], "Invalid value for --adapter: {tmp}/no-such-adapter: no such adapter directory"),
    (["eval", "--adapter", "{tmp}/a-file"], "Invalid value for --adapter: {tmp}/a-file is a file, not an adapter directory"),
    (["eval", "--adapter", "{tmp}/empty-dir"], "Invalid value for --adapter: {tmp}/empty-dir is not an adapter directory: it has no adapter_config.json"),
    (["eval", "--adapter", "{tmp}/broken-adapter"], "Invalid value for --adapter: {tmp}/broken-adapter/adapter_config.json: not valid JSON"),
    (["eval", "--adapter", "{tmp}/no-peft-type"], "Invalid value for --adapter: {tmp}/no-peft-type/adapter_config.json has no 'peft_type'"),
    (["bench", "--adapter", "{tmp}/no-such-adapter"], "Invalid value for --adapter: {tmp}/no-such-adapter: no such adapter directory"),
    (["bench", "--adapter", "{tmp}/a-file"], "Invalid value for --adapter: {tmp}/a-file is a file"),
    (["bench", "--adapter", "{tmp}/no-peft-type"], "Invalid value for --adapter: {tmp}/no-peft-type/adapter_config.json has no 'peft_type'"),
    (["bench", "--arch", "blip2-opt-2.7b", "--adapter", "{tmp}/adapter"], "Invalid value for --adapter: --adapter goes with --model"),
    (["explain", "--out", "x.png", "--adapter", "{tmp}/no-such-adapter"], "Invalid value for --adapter: {tmp}/no-such-adapter: no such adapter directory"),
    (["explain", "--out", "x.png", "--adapter", "{tmp}/no-peft-type"], "Invalid value for --adapter: {tmp}/no-peft-type/adapter_config.json has no 'peft_type'"),
    (["explain", "--out", "x.png", "--adapter", "{tmp}/a-file"], "Invalid value for --adapter: {tmp}/a-file is a file"),
    (["diagnose", "--adapter", "{tmp}/no-such-adapter"], "Invalid value for --adapter: {tmp}/no-such-adapter: no such adapter directory"),
    (["diagnose", "--adapter", "{tmp}/broken-adapter"], "Invalid value for --adapter: {tmp}/broken-adapter/adapter_config.json: not valid JSON"),
    (["diagnose", "--adapter", "{tmp}/a-file"], "Invalid value for --adapter: {tmp}/a-file is a file"),
    (["demo", "--adapter", "{tmp}/no-such-adapter"], "Invalid value for --adapter: {tmp}/no-such-adapter: no such adapter directory"),
    (["demo", "--adapter", "{tmp}/a-file"], "Invalid value for --adapter: {tmp}/a-file is a file"),
    (["demo", "--adapter", "{tmp}/empty-dir"], "Invalid value for --adapter: {tmp}/empty-dir is not an adapter directory"),
    (["demo", "--adapter", "{tmp}/no-peft-type"], "Invalid value for --adapter: {tmp}/no-peft-type/adapter_config.json has no 'peft_type'"),
    (["demo", "--adapter", "{tmp}/truncated-adapter"], "Invalid value for --adapter: {tmp}/truncated-adapter was trained with --truncate"),
    # prompt templates: exactly one {} slot
    (["eval", "--prompt", "{} and {}"], "Invalid value for --prompt: prompt must contain exactly one '{}'"),
    (["eval", "--prompt", "Question: {0} Answer:"], "Invalid value for --prompt: prompt must contain exactly one '{}'"),
    (["eval", "--prompt", "Question: {question} Answer:"], "Invalid value for --prompt: prompt must contain exactly one '{}'"),
    (["eval", "--prompt", "Question: {:>9} Answer:"], "Invalid value for --prompt: prompt must contain exactly one '{}'"),
    (["eval", "--prompt", "Question: {!r}"], "Invalid value for --prompt: prompt must contain exactly one '{}'"),
    (["eval", "--prompt", "Question: { Answer:"], "Invalid value for --prompt: prompt 'Question: { Answer:'"),
    (["eval", "--prompt", "Question: {} Answer: }"], "Invalid value for --prompt: prompt 'Question: {} Answer: }'"),
    (["eval", "--prompt", ""], "Invalid value for --prompt: prompt must contain exactly one '{}'"),
    # options that would be ignored
    (["eval", "--dataset", "scenes", "--questions", "{data}"], "--questions does not apply to dataset 'scenes', which would ignore it"),
    (["eval", "--dataset", "easy-vqa", "--annotations", "{data}"], "--annotations does not apply to dataset 'easy-vqa'"),
    (["eval", "--dataset", "easy-vqa", "--images", "{tmp}"], "--images does not apply to dataset 'easy-vqa'"),
    (["eval", "--dataset", "{data}", "--split", "train"], "--split does not apply to dataset '{data}'"),
    (["eval", "--dataset", "{data}", "--images", "{tmp}"], "--images does not apply to dataset '{data}'"),
    (["eval", "--dataset", "jsonl", "--questions", "{data}", "--annotations", "{data}"], "--annotations does not apply to dataset 'jsonl'"),
    (["eval", "--dataset", "hf:x.parquet", "--questions", "{data}"], "--questions does not apply to dataset 'hf:x.parquet'"),
    (["eval", "--methods", "none", "--keep", "4"], "Invalid value for --keep: --keep 4 would be ignored: --methods none runs the unpruned model alone"),
    (["eval", "--methods", "none", "--compare", "catp"], "Invalid value for --compare: --compare catp would be ignored"),
    (["eval", "--methods", "none", "--match-budgets"], "Invalid value for --match-budgets: --match-budgets would be ignored: --methods none"),
    (["eval", "--match-budgets"], "Invalid value for --match-budgets: --match-budgets would be ignored: it matches per-sample budgets"),
    (["eval", "--keep", "8,4", "--match-budgets"], "--match-budgets would be ignored"),
    (["bench", "--check-stat", "median"], "Invalid value for --check-stat: --check-stat median would be ignored: it applies to --check"),
    (["bench", "--check", "--check-stat", "mean"], "--check-stat must be one of min, median, got 'mean'"),
    (["bench", "--model", "{model}", "--frames", "2"], "Invalid value for --frames: --frames 2 would be ignored: it applies to video models"),
    (["bench", "--model", "{model}", "--instruction-tokens", "4"], "Invalid value for --instruction-tokens: --instruction-tokens 4 would be ignored"),
    (["bench", "--engine", "vllm", "--check-stat", "median"], "--check-stat: not used by --engine vllm"),
    (["bench", "--engine", "vllm", "--frames", "2"], "--frames: not used by --engine vllm"),
    (["bench", "--engine", "vllm", "--instruction-tokens", "2"], "--instruction-tokens: not used by --engine vllm"),
    (["bench", "--engine", "vllm", "--check"], "--check: not used by --engine vllm"),
    (["bench", "--engine", "vllm", "--plot", "p.png"], "--plot: not used by --engine vllm"),
    (["bench", "--engine", "vllm", "--device", "cuda"], "--device: not used by --engine vllm"),
    (["explain", "--out", "x.png", "--scope", "frame"], "Invalid value for --scope: --scope frame would be ignored: --scope applies to video models"),
    (["explain", "--out", "x.png", "--frames", "{tmp}/f.png", "--question", "what?", "--scope", "all"], "Invalid value for --scope: --scope must be one of video, frame, sample, group, got 'all'"),
    (["demo", "--no-adapter", "--adapter", "{tmp}/adapter"], "Invalid value for --adapter: --adapter {tmp}/adapter would be ignored: --no-adapter"),
    (["adapt", "--out", "{tmp}/o", "--truncate", "--method", "catp"], "Invalid value for --method: --method catp would be ignored: --truncate keeps the first k"),
    (["adapt", "--out", "{tmp}/o", "--val-fraction", "0.1"], "Invalid value for --val-fraction: --val-fraction 0.1 would be ignored: easy-vqa, scenes have a validation split"),
    (["adapt", "--out", "{tmp}/o", "--dataset", "scenes", "--val-fraction", "0.1"], "--val-fraction 0.1 would be ignored: scenes has a validation split of its own"),
    (["adapt", "--out", "{tmp}/o", "--dataset", "{data}", "--split", "train"], "Invalid value for --split: --split train would be ignored"),
    (["adapt", "--out", "{tmp}/o", "--questions", "{data}"], "Invalid value for --questions: --questions {data} would be ignored: no dataset of easy-vqa, scenes reads it"),
    (["adapt", "--out", "{tmp}/o", "--images", "{tmp}"], "Invalid value for --images: --images {tmp} would be ignored"),
    # nothing to run
    (["eval", "--methods", "random", "--keep", "fence:1.5"], "nothing to run"),
    (["eval", "--methods", "divprune", "--keep", "mass:0.8"], "nothing to run"),
    (["bench", "--methods", "first", "--keep", "mass:0.8"], "Invalid value for --keep: nothing to run: no method runs at any of the keeps"),
    (["bench", "--methods", "random,first", "--keep", "fence:1.5,mass:0.5"], "Invalid value for --keep: nothing to run"),
    (["bench", "--methods", "dart", "--keep", "mass:0.9"], "Invalid value for --keep: nothing to run"),
    # ranges
    (["eval", "--fraction", "0"], "Invalid value for --fraction: --fraction must be in (0, 1], got 0"),
    (["eval", "--fraction", "1.5"], "Invalid value for --fraction: --fraction must be in (0, 1], got 1.5"),
    (["eval", "--fraction", "-0.1"], "Invalid value for --fraction: --fraction must be in (0, 1], got -0.1"),
    (["eval", "--batch-size", "0"], "Invalid value for '--batch-size'"),
    (["eval", "--limit", "0"], "Invalid value for '--limit'"),
    (["eval", "--num-beams", "0"], "Invalid value for '--num-beams'"),
    (["eval", "--max-new-tokens", "0"], "Invalid value for '--max-new-tokens'"),
    (["eval", "--keep", ""], "Invalid value for --keep: --keep is empty"),
    (["eval", "--keep", "1.5"], "Invalid value for --keep"),
    (["eval", "--keep", "-2"], "Invalid value for --keep"),
    (["bench", "--repeats", "0"], "Invalid value for '--repeats'"),
    (["bench", "--warmup", "-1"], "Invalid value for '--warmup'"),
    (["bench", "--beams", "0"], "Invalid value for '--beams'"),
    (["bench", "--new-tokens", "0"], "Invalid value for '--new-tokens'"),
    (["bench", "--prompt-tokens", "0"], "Invalid value for '--prompt-tokens'"),
    (["bench", "--threads", "0"], "Invalid value for '--threads'"),
    (["bench", "--frames", "0"], "Invalid value for '--frames'"),
    (["bench", "--instruction-tokens", "-1"], "Invalid value for '--instruction-tokens'"),
    (["bench", "--batch", "a"], "Invalid value for --batch: --batch must be comma-separated integers, got 'a'"),
    (["bench", "--batch", ","], "Invalid value for --batch: --batch must be positive integers"),
    (["bench", "--keep", "half"], "Invalid value for --keep: cannot read keep 'half'"),
    (["bench", "--model", "{model}", "--keep", "99"], "Invalid value for --keep: keep=99 is out of range"),
    (["bench", "--device", "tpu"], "Invalid value for --device"),
    (["bench", "--model", "x", "--arch", "blip2-opt-2.7b"], "give --model or --arch, not both"),
    (["bench", "--engine", "vllm", "--model", "x", "--arch", "blip2-opt-2.7b"], "give --model or --arch, not both"),
    (["bench", "--engine", "vllm", "--repeats", "0"], "Invalid value for '--repeats'"),
    (["explain", "--out", "x.png", "--max-new-tokens", "0"], "Invalid value for '--max-new-tokens'"),
    (["explain", "--out", "x.png", "--keep", "0.0"], "Invalid value for --keep"),
    (["explain", "--out", "x.png", "--methods", "nope"], "Invalid value for --methods: unknown method 'nope'"),
    (["diagnose", "--limit", "0"], "Invalid value for '--limit'"),
    (["diagnose", "--split", "dev"], "Invalid value for --split: split must be 'train', 'validation' or 'test', got 'dev'"),
    (["diagnose", "--dataset", "scenes", "--split", "dev"], "Invalid value for --split: scenes split must be one of"),
    (["diagnose", "--dataset", "scenes", "--images", "{tmp}/pictures"], "--dataset scenes would be ignored"),
    (["diagnose", "--keep", "8,4"], "Invalid value for --keep: give one keep value"),
    (["diagnose", "--keep", "mass:0.8"], "Invalid value for --keep: this command takes a count or a fraction, not a budget"),
    (["diagnose", "--model", "/path/that/does/not/exist"], "Invalid value for --model: /path/that/does/not/exist: no such directory"),
    (["demo", "--keep", "mass:0.8"], "Invalid value for --keep: this command takes a count or a fraction, not a budget"),
    (["demo", "--per-task", "0"], "Invalid value for '--per-task'"),
    (["demo", "--threads", "0"], "Invalid value for '--threads'"),
    (["demo", "--methods", ""], "Invalid value for --methods: no method given"),
    (["adapt", "--out", "{tmp}/o", "--dataset", "{data}", "--val-fraction", "1.5"], "Invalid value for --val-fraction: --val-fraction must be in (0, 1), got 1.5"),
    (["adapt", "--out", "{tmp}/o", "--dataset", "{data}", "--val-fraction", "0"], "Invalid value for --val-fraction: --val-fraction must be in (0, 1), got 0"),
    (["adapt", "--out", "{tmp}/o", "--dataset", "{data}", "--val-fraction", "1"], "Invalid value for --val-fraction: --val-fraction must be in (0, 1), got 1"),
    (["adapt", "--out", "{tmp}/o", "--dataset", "{data}", "--val-fraction", "-0.2"], "Invalid value for --val-fraction: --val-fraction must be in (0, 1), got -0.2"),
    (["adapt", "--out", "{tmp}/o", "--steps", "0"], "Invalid value for '--steps'"),
    (["adapt", "--out", "{tmp}/o", "--rank", "0"], "Invalid value for '--rank'"),
    (["adapt", "--out", "{tmp}/o", "--batch-size", "0"], "Invalid value for '--batch-size'"),
    (["adapt", "--out", "{tmp}/o", "--validate-every", "0"], "Invalid value for '--validate-every'"),
    (["adapt", "--out", "{tmp}/o", "--checkpoint-every", "0"], "Invalid value for '--checkpoint-every'"),
    (["adapt", "--out", "{tmp}/o", "--threads", "0"], "Invalid value for '--threads'"),
    (["adapt", "--out", "{tmp}/o", "--val-limit", "0"], "Invalid value for '--val-limit'"),
    (["adapt", "--out", "{tmp}/o", "--lr", "0"], "Invalid value for --lr: --lr must be > 0, got 0"),
    (["adapt", "--out", "{tmp}/o", "--lr", "-1e-3"], "Invalid value for --lr: --lr must be > 0, got -0.001"),
    (["adapt", "--out", "{tmp}/o", "--keep", "mass:0.8"], "Invalid value for --keep: this command takes a count or a fraction, not a budget"),
    (["adapt", "--out", "{tmp}/o", "--split", "test-dev"], "Invalid value for --split: catp adapt trains on a training split, never on 'test-dev'"),
    (["adapt", "--out", "{tmp}/o", "--model", "{tmp}/bert"], "Invalid value for --model: a 'bert' model has no Q-Former"),
    (["adapt", "--out", "{tmp}/o", "--device", "cuda"], "Invalid value for --device: device 'cuda': CUDA is not available"),
    (["adapt", "--out", "{tmp}/o", "--method", ""], "Invalid value for --method: no method given"),
    (["adapt", "--out", "{tmp}/o", "--model", "{model}", "--keep", "2", "--truncate", "--export", "0"], "Invalid value for --export: --export 0 is out of range"),
    # an --out that holds another run
    (["adapt", "--out", "{tmp}/old-adapter", "--model", "{model}", "--keep", "2,8"], "Invalid value for --out: {tmp}/old-adapter holds an adapter trained with other settings"),
    (["adapt", "--out", "{tmp}/old-checkpoint", "--model", "{model}", "--keep", "2,8"], "Invalid value for --out: {tmp}/old-checkpoint holds a checkpoint of a run with other settings"),
    # the app itself
    (["adapt"], "Missing option '--out'"),
    (["methods", "extra"], "unexpected extra argument(s) (extra)"),
    (["nosuchcommand"], "No such command 'nosuchcommand'"),
    (["--versions"], "No such option: --versions"),
]


@pytest.fixture
def workdir(tmp_path, monkeypatch, model_dir, jsonl_dataset):  # noqa: F811
    monkeypatch.chdir(tmp_path)
    # Every case must stop at its input checks: the work itself fails loudly (and at once) if reached.
    def ran(*args, **kwargs):
        raise AssertionError("ran past the input checks")

    for module, name in (("catp.evaluation.harness", "run_sweep"), ("catp.adapt", "train_adapter"), ("catp.cli.diagnose", "diagnose"),
                         ("catp.cli.explain", "explain"), ("catp.cli.demo", "run_demo")):
        monkeypatch.setattr(importlib.import_module(module), name, ran)
    monkeypatch.setattr(importlib.import_module("catp.bench.runner").Benchmark, "run", ran)
    (tmp_path / "a-file").write_text("not an image, not a folder")
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    (tmp_path / "dir.jsonl").mkdir()
    (tmp_path / "empty-dir").mkdir()
    (tmp_path / "pictures").mkdir()
    Image.new("RGB", (8, 8), "red").save(tmp_path / "pictures" / "p.png")
    Image.new("RGB", (8, 8), "red").save(tmp_path / "f.png")
    adapters = {"adapter": {"peft_type": "LORA"}, "no-peft-type": {"r": 8}, "truncated-adapter": {"peft_type": "LORA"},
                "old-adapter": {"peft_type": "LORA"}, "old-checkpoint": None, "broken-adapter": "{not json"}
    for name, config in adapters.items():
        (tmp_path / name).mkdir()
        if config is not None:
            (tmp_path / name / "adapter_config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    (tmp_path / "truncated-adapter" / ADAPTER_SETTINGS_FILE).write_text(json.dumps({"settings": {"truncate": True}}))
    other = AdaptSettings(method="catp", keeps=(2, 8)).to_json()
    (tmp_path / "old-adapter" / ADAPTER_SETTINGS_FILE).write_text(json.dumps({"settings": other}))
    (tmp_path / "old-checkpoint" / CHECKPOINT_DIR).mkdir()
    (tmp_path / "old-checkpoint" / CHECKPOINT_DIR / "state.json").write_text(json.dumps({"settings": other, "step": 3}))
    return {"tmp": str(tmp_path), "model": str(model_dir), "data": str(jsonl_dataset)}


@pytest.mark.parametrize(("args", "named"), CASES, ids=[" ".join(a)[:60] for a, _ in CASES])
def test_bad_input_is_one_usage_error(args, named, workdir, tmp_path):
    def fill(text: str) -> str:
        for key, value in workdir.items():
            text = text.replace("{" + key + "}", value)
        return text

    result = CliRunner().invoke(app, [fill(a) for a in args])
    assert result.exit_code == 2, result.output + repr(result.exception)
    assert said(result.output, fill(named)), result.output
    assert "Traceback" not in result.output and "BytesIO" not in result.output
    written = {p.name for p in tmp_path.iterdir()}
    assert not written & {"x.png", "e.txt", "d.txt", "catp-eval", "bench.json", "catp-demo.png", "o", "bench.png"}
    assert not Path("/proc/catp-x").exists()


def test_a_bug_after_the_input_checks_keeps_its_traceback(tmp_path, monkeypatch):
    """A ValueError from the work itself (here: generation) is not reported as bad input."""
    module = importlib.import_module("catp.cli.explain")

    def broken(*args, **kwargs):
        raise ValueError("a bug")

    monkeypatch.setattr(module, "explain", broken)
    result = CliRunner().invoke(app, ["explain", "--out", str(tmp_path / "x.png")])
    assert result.exit_code == 1 and isinstance(result.exception, ValueError) and str(result.exception) == "a bug"


def test_output_paths_are_checked_and_their_folders_made(tmp_path):
    from catp.cli.options import check_figure_path, output_dir, output_file

    assert check_figure_path(tmp_path / "no" / "such" / "dir" / "e.png").parent.is_dir()
    assert output_dir(tmp_path / "run" / "a").is_dir()
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        output_dir(tmp_path / "f")
    with pytest.raises(ValueError, match="is a folder"):
        output_file(tmp_path / "run")


# -- through the real console script: nothing but the one line reaches stderr -------------------------

_WITHOUT_PEFT = "import sys; sys.modules['peft'] = None; sys.argv[0] = 'catp'; from catp.cli.app import main; main()"


@pytest.mark.parametrize(("argv", "named"), [
    (["-m", "catp", "eval", "--out", "/proc/catp-x"], "Invalid value for --out: cannot write in '/proc/catp-x'"),
    (["-m", "catp", "bench", "--out", "/proc/catp-x/bench.json"], "Invalid value for --out: cannot write in '/proc/catp-x'"),
    (["-m", "catp", "adapt", "--out", "{tmp}/never", "--val-fraction", "1.5", "--dataset", "{tmp}/q.jsonl"],
     "Invalid value for --val-fraction: --val-fraction must be in (0, 1), got 1.5"),
    (["-c", _WITHOUT_PEFT, "adapt", "--out", "{tmp}/never"], "catp adapt needs the 'peft' package: pip install \"catp[adapt]\""),
    (["-c", _WITHOUT_PEFT, "eval", "--adapter", "{tmp}/adapter"], "Invalid value for --adapter: an adapter (--adapter) needs the 'peft' package"),
], ids=["eval-proc", "bench-proc", "adapt-val-fraction", "adapt-without-peft", "eval-adapter-without-peft"])
def test_the_console_script_prints_one_usage_error(argv, named, tmp_path):
    import os
    import subprocess
    import sys

    (tmp_path / "q.jsonl").write_text("")
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, *(a.replace("{tmp}", str(tmp_path)) for a in argv)], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path, env=env)
    assert done.returncode == 2, done.stdout + done.stderr
    assert said(done.stderr, named.replace("{tmp}", str(tmp_path))), done.stderr
    assert "Traceback" not in done.stderr + done.stdout and "Error:" not in done.stderr.replace("─ Error ─", "")
    assert not (tmp_path / "never").exists()


# -- Ctrl-C: one line, exit 130, how to resume where the command can ----------------------------------

def _interrupt(*args, **kwargs):
    raise KeyboardInterrupt


@pytest.mark.parametrize(("args", "target", "resume"), [
    (["eval", "--model", "{model}", "--dataset", "{data}", "--out", "{tmp}/run", *FAST], ("catp.evaluation.harness", "run_sweep"),
     "interrupted: rerun the same command to resume from {tmp}/run"),
    (["explain", "--out", "{tmp}/e.png"], ("catp.cli.explain", "explain"), "interrupted"),
    (["diagnose", "--model", "{model}", "--limit", "2"], ("catp.cli.diagnose", "diagnose"), "interrupted"),
])
def test_ctrl_c_is_one_line_and_exit_130(args, target, resume, model_dir, jsonl_dataset, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setattr(importlib.import_module(target[0]), target[1], _interrupt)
    values = {"{model}": str(model_dir), "{data}": str(jsonl_dataset), "{tmp}": str(tmp_path)}

    def fill(text: str) -> str:
        for key, value in values.items():
            text = text.replace(key, value)
        return text

    result = CliRunner().invoke(app, [fill(a) for a in args])
    assert result.exit_code == 130, result.output + repr(result.exception)
    assert result.output.strip().splitlines()[-1] == fill(resume) and "Traceback" not in result.output


# -- the smaller things: --version, whole tables off a terminal ---------------------------------------

def test_version():
    import catp
    from catp.cli.app import version

    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output == f"catp {version()}\n"
    assert version() == catp.__version__  # the installed metadata and the package agree


def test_tables_are_whole_when_the_output_is_not_a_terminal():
    """A log or a pipe gets every cell in full, not cut to 80 columns (CliRunner's output is not a terminal)."""
    from catp.cli.app import plain_text
    from catp.methods import METHODS, method_class

    result = CliRunner().invoke(app, ["methods"])
    assert result.exit_code == 0
    lines = result.output.splitlines()
    for name in METHODS:
        first = plain_text((method_class(name).__doc__ or "").strip().splitlines()[0])
        assert any(first in line for line in lines), first
    assert max(map(len, lines)) > 80


def test_a_missing_reference_checkpoint_names_the_command_that_trains_one(tmp_path, monkeypatch):
    import catp.reference as reference

    monkeypatch.setattr(reference, "_CHECKPOINT", tmp_path / "none")
    with pytest.raises(FileNotFoundError, match=r"python -m lab\.train --out DIR") as error:
        reference.reference_model_path()
    assert "train-reference" not in str(error.value)
    assert Path("lab/train.py").is_file() or (Path(__file__).parents[1] / "lab" / "train.py").is_file()


def test_output_checks_probe_and_leave_nothing_behind(tmp_path):
    from catp.cli.options import output_dir, output_file

    output_dir(tmp_path / "a" / "b", make=False)
    assert not (tmp_path / "a").exists()  # checked in the nearest existing folder; nothing made
    assert output_dir(tmp_path / "c").is_dir() and not list((tmp_path / "c").iterdir())
    (tmp_path / "f").write_text("x")
    for check in (lambda: output_file(tmp_path / "f" / "x.json"), lambda: output_dir(tmp_path / "f" / "d", make=False)):
        with pytest.raises(ValueError, match="a file is in the way"):
            check()
    with pytest.raises(ValueError, match="cannot write in '/proc/catp-x'"):
        output_file(Path("/proc/catp-x/out.json"))
