"""Wall time per training step and memory of LoRA optimizers on one LLaMA model (issue 6, bench 2).

One PEFT LoRA model (random weights, no downloads) and one fixed batch of random tokens are
shared by every method, wrapped as a ``Task``; each method gets its own training run on it,
``reflora_analysis.train.build_run`` (AdamW base optimizer, the method's transform in its
step hooks), and a timed step is the package's own training step,
``reflora_analysis.train.train_step``: batch, forward, backward, the non-finite checks of
every gradient and weight, ``optimizer.step()`` (the method's hooks inside), ``zero_grad``.

Model sizes (``--model-size``):

- ``tiny`` (CPU default): LLaMA, hidden 256, intermediate 688, 4 layers, 4 heads (2 KV
  heads), vocabulary 1024; batch 2 x 64 tokens; float32. One step is ~60 ms on one core,
  so the refactoring overhead is visible but measurable.
- ``1b`` (GPU): LLaMA, hidden 2048, intermediate 5632, 22 layers, 32 heads (4 KV heads),
  vocabulary 32000 (1.10 B parameters, TinyLlama's shape); batch 4 x 512 tokens; bfloat16.

LoRA: r = 16, alpha = 32, on q, k, v, o, gate, up, down. The factors start at PEFT's
``init_lora_weights=False`` (both factors random), a generic mid-training point: from the
PEFT start (``lora_B = 0``) RefLoRA needs ``warmup_steps`` anyway, and a singular Gram would
time the degenerate-Gram path instead of the normal one.

Timing: ``reflora_analysis.experiments.round_robin``, the package's one step timer (also the
overhead notebook's): ``--warmup`` untimed steps per method, then ``--repeats`` rounds; in each
round every method runs ``--steps`` timed steps, methods taken in turn (a rotated order each
round), so background load on a shared machine hits all of them alike. Before each method's turn
the LoRA weights are reset to the common start (outside the timed region; optimizer state is
kept). ``ms/step`` is the median over all timed steps; ``ratio`` is the method's ``ms/step`` over
lora's, and in brackets the range over rounds of (method's median in the round / lora's median
in the same round), a direct view of the noise; ``opt ms`` is the median time of
``optimizer.step()`` alone (AdamW + the method's hooks, timed by the same timer through torch's
global optimizer-step hooks; minus lora's it is the hooks' cost) and ``rest ms`` that of the rest
of the step (forward, backward, finiteness checks, ``zero_grad``), the same computation for every
method, so its spread across methods is pure machine noise. ``ratio from opt.step`` is
``1 + (opt.step ms - lora's opt.step ms) / lora's ms/step``: the overhead with that noise
removed (the methods differ only inside ``optimizer.step()``; on CUDA the timed regions are
synchronised, so nothing of the step leaks into the next forward).
Clock: ``cpu`` (process CPU time; the default for a single-threaded CPU run, so that time the
process spends descheduled on a shared machine does not count) or ``wall`` (default on CUDA,
with ``torch.cuda.synchronize()`` around every timed region).

Memory:

- ``state MB``: persistent bytes the method keeps between steps, i.e. every tensor in
  ``optimizer.state`` plus every tensor reachable from its transform object (moments, Gram
  buffers, workspaces), each storage counted once, parameters and gradients excluded. Exact
  on every device.
- ``peak MB`` (CUDA only): the peak of allocated memory while the method trains, computed as
  (model + batch, allocated before any optimizer exists) + (the method's own state at the start
  of its turn) + (``torch.cuda.max_memory_allocated()`` during its turn - memory allocated at
  the start of its turn). The other methods' states, resident because the methods are
  interleaved, are thereby excluded. On CPU ``n/a``: PyTorch's CPU allocator keeps no peak
  counter (``tracemalloc`` does not see it, process RSS never shrinks), so transient buffers
  inside a step are not measured there.
- ``extra MB``: ``peak`` (CUDA) or ``state`` (CPU) minus lora's; the issue's target is
  ``extra <= size of the LoRA parameters`` (printed in the header).

The last line is the headline: reflora/lora and reflora-s/lora step-time ratios.

    python benchmarks/training_overhead.py --quick                       # < 2 min on a CPU
    python benchmarks/training_overhead.py --device cuda --model-size 1b
"""

from __future__ import annotations

import argparse
import os
import statistics
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

METHODS = ("lora", "reflora", "reflora-s", "scaledgd", "lora-rite", "lora-pro")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MODEL_SIZES = {  # LlamaConfig fields and the batch (rows, tokens)
    "tiny": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=1024, batch=(2, 64)),
    # SmolLM2-135M's layer shapes (step time and memory depend on shapes, not values); the
    # head is untied here (167.7 M parameters; the real model ties it: 134.5 M)
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                         batch=(8, 256)),
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
               num_attention_heads=32, num_key_value_heads=4, vocab_size=32000, batch=(4, 512)),
}
LORA_RANK, LORA_ALPHA, LR = 16, 32.0, 1e-4
#: issue 15's step-time targets relative to LoRA (the baselines': their papers' GPU figures)
TARGET_RATIOS = {"reflora": 1.05, "reflora-s": 1.02, "lora-rite": 1.38, "lora-pro": 1.66}
MB = 2.0**20


def build_model(size: str, device: torch.device, dtype: torch.dtype, seed: int = 0,
                batch: tuple[int, int] | None = None):
    """A random-weight LLaMA of ``MODEL_SIZES[size]`` with PEFT LoRA, and one token batch
    (``batch`` = (rows, tokens) overrides the size's default)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    spec = dict(MODEL_SIZES[size])
    rows, tokens = batch or spec.pop("batch")
    spec.pop("batch", None)
    config = LlamaConfig(**spec, max_position_embeddings=max(tokens, 128),
                         tie_word_embeddings=False)
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build in the target dtype (1b: no 4.4 GB float32 copy)
    try:
        with device:
            base = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    base.requires_grad_(False)
    lora = LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, lora_dropout=0.0, bias="none",
                      init_lora_weights=False, target_modules=TARGETS)
    model = get_peft_model(base, lora).to(device=device, dtype=dtype)
    model.train()
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, config.vocab_size, (rows, tokens), generator=gen).to(device)
    return model, {"input_ids": ids, "labels": ids}


def _tensors_in(obj, seen_objects: set[int], depth: int = 0):
    """Every tensor reachable from ``obj`` through containers and plain object attributes."""
    if id(obj) in seen_objects or depth > 12:  # deep enough for state kept in helper objects
        return
    seen_objects.add(id(obj))
    if isinstance(obj, Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors_in(v, seen_objects, depth + 1)
    elif isinstance(obj, (list, tuple, set)):
        for v in obj:
            yield from _tensors_in(v, seen_objects, depth + 1)
    elif isinstance(obj, (nn.Module, torch.optim.Optimizer)):
        return  # the model and the optimizer are counted elsewhere (or are not extra state)
    elif hasattr(obj, "__dict__") and type(obj).__module__.startswith("reflora_analysis"):
        yield from _tensors_in(vars(obj), seen_objects, depth + 1)


def state_bytes(optimizer: torch.optim.Optimizer, transform, model: nn.Module) -> int:
    """Bytes of the optimizer state and the transform's tensors, parameters/grads excluded."""
    exclude = set()
    for p in model.parameters():
        exclude.add(p.untyped_storage().data_ptr())
        if p.grad is not None:
            exclude.add(p.grad.untyped_storage().data_ptr())
    seen_objects: set[int] = set()
    tensors = list(_tensors_in(list(optimizer.state.values()), seen_objects))
    if transform is not None:
        tensors += list(_tensors_in(vars(transform), seen_objects))
    storages: dict[int, int] = {}
    for t in tensors:
        s = t.untyped_storage()
        if s.data_ptr() not in exclude:
            storages[s.data_ptr()] = s.nbytes()
    return sum(storages.values())


def as_task(model, batch, pairs):
    """The model and its one batch as a ``reflora_analysis`` task (what ``build_run`` trains)."""
    from reflora_analysis.tasks import Task

    return Task(name="llama-benchmark", model=model, pairs=pairs,
                loss=lambda b: model(**b).loss, batch=lambda step: batch, evaluate=dict,
                default_lr={"adamw": LR, "sgd": LR})


@dataclass
class Runner:
    """One method's training run on the shared model, and what was measured for it."""

    name: str
    run: object  # reflora_analysis.train.Run
    step_times: list[list[float]] = field(default_factory=list)  # per round
    opt_times: list[float] = field(default_factory=list)
    fb_times: list[float] = field(default_factory=list)  # the rest of the step
    peak_bytes: int = 0
    before: int = 0
    own: int = 0


def run(args) -> dict[str, Runner]:
    from reflora_analysis.experiments.timing import make_run, round_robin, run_step
    from reflora_analysis.pairs import find_lora_pairs

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    model, batch = build_model(args.model_size, device, dtype, batch=args.batch)
    pairs = find_lora_pairs(model)
    task = as_task(model, batch, pairs)
    lora_params = [p for pair in pairs for p in pair.params]
    start = [p.detach().clone() for p in lora_params]
    n_params = sum(p.numel() for p in model.parameters())
    lora_bytes = sum(p.numel() * p.element_size() for p in lora_params)
    cuda = device.type == "cuda"
    base_bytes = torch.cuda.memory_allocated(device) if cuda else 0
    total = args.warmup + args.repeats * args.steps + 1  # the end step updates nothing
    runners = {name: Runner(name, make_run(task, name, optimizer="adamw", lr=LR,
                                           device=args.device, steps=total))
               for name in args.methods}
    from refactor_overhead import machine_line

    print(f"# machine: {machine_line()}")
    print(f"# training_overhead: model={args.model_size} ({n_params / 1e6:.1f} M params, "
          f"{len(pairs)} LoRA pairs, r={LORA_RANK}, LoRA params {lora_bytes / MB:.2f} MB = "
          f"{sum(p.numel() for p in lora_params) / 1e6:.3f} M) batch={tuple(batch['input_ids'].shape)} "
          f"device={device} dtype={args.dtype} threads={torch.get_num_threads()} "
          f"clock={args.clock} steps={args.steps} repeats={args.repeats} warmup={args.warmup} "
          f"optimizer=AdamW lr={LR} torch={torch.__version__}", flush=True)

    def before_turn(name: str, timed: bool) -> None:
        with torch.no_grad():  # every turn starts from the common weights
            for p, p0 in zip(lora_params, start):
                p.copy_(p0)
        if timed and cuda:
            r = runners[name]
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            r.before = torch.cuda.memory_allocated(device)
            r.own = state_bytes(r.run.optimizer, r.run.transform, model)

    def after_turn(name: str, timed: bool) -> None:
        if timed and cuda:
            r = runners[name]
            peak = base_bytes + r.own + torch.cuda.max_memory_allocated(device) - r.before
            r.peak_bytes = max(r.peak_bytes, peak)

    times = round_robin({name: (lambda r: lambda step: run_step(r.run, step))(r)
                         for name, r in runners.items()},
                        rounds=args.repeats, per_turn=args.steps, warmup=args.warmup,
                        device=args.device, clock=args.clock, before_turn=before_turn,
                        after_turn=after_turn, time_optimizer=True)
    for name, r in runners.items():
        r.step_times, r.opt_times = times[name].rounds, times[name].optimizer_seconds
        r.fb_times = [s - o for s, o in zip(times[name].seconds, r.opt_times)]
    report(args, runners, model, lora_bytes)
    return runners


def report(args, runners: dict[str, Runner], model, lora_bytes: int) -> None:
    lora = runners["lora"]
    states = {n: state_bytes(r.run.optimizer, r.run.transform, model) for n, r in runners.items()}
    cuda = args.device.startswith("cuda")
    mem = {n: (r.peak_bytes if cuda else states[n]) for n, r in runners.items()}
    header = ("method", "ms/step", "rest ms", "opt.step ms",
              "ratio vs lora [range over rounds]", "ratio from opt.step", "state MB", "peak MB",
              "extra MB vs lora", "extra <= LoRA params")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    ratios, opt_ratios = {}, {}
    lora_steps = [t for s in lora.step_times for t in s]
    lora_opt = statistics.median(lora.opt_times)
    for name, r in runners.items():
        per_round = [statistics.median(s) / statistics.median(b)
                     for s, b in zip(r.step_times, lora.step_times)]
        all_steps = [t for s in r.step_times for t in s]
        ratios[name] = statistics.median(all_steps) / statistics.median(lora_steps)
        opt_ms = statistics.median(r.opt_times)
        opt_ratios[name] = 1.0 + (opt_ms - lora_opt) / statistics.median(lora_steps)
        extra = mem[name] - mem["lora"]
        print(f"| {name} | {1e3 * statistics.median(all_steps):.2f} | "
              f"{1e3 * statistics.median(r.fb_times):.2f} | {1e3 * opt_ms:.2f} | "
              f"{ratios[name]:.3f} [{min(per_round):.3f}-{max(per_round):.3f}] | "
              f"{opt_ratios[name]:.3f} | {states[name] / MB:.2f} | "
              + (f"{r.peak_bytes / MB:.0f}" if cuda else "n/a") +
              f" | {extra / MB:+.2f} | {'yes' if extra <= lora_bytes else 'NO'} |")
    parts = [f"{m}/lora = {ratios[m]:.3f}x ({opt_ratios[m]:.3f}x from opt.step; target <= {t}x)"
             for m, t in TARGET_RATIOS.items() if m in ratios]
    print("headline: " + ", ".join(parts))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    parser.add_argument("--model-size", choices=sorted(MODEL_SIZES), default=None,
                        help="tiny (CPU default), smollm2-135m (SmolLM2-135M shapes) or 1b (CUDA default)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                        help="float32 (tiny default) or bfloat16 (1b default)")
    parser.add_argument("--batch", default=None, metavar="ROWSxTOKENS",
                        help="override the batch, e.g. 4x128 (tiny default 2x64, 1b default 4x512)")
    parser.add_argument("--methods", default=",".join(METHODS),
                        help="comma list; lora is always included (the baseline)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per method and round")
    parser.add_argument("--repeats", type=int, default=10, help="rounds over all methods")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per method")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (CPU)")
    parser.add_argument("--clock", choices=["auto", "wall", "cpu"], default="auto",
                        help="auto: cpu for a single-threaded CPU run, wall otherwise")
    parser.add_argument("--quick", action="store_true",
                        help="fewer rounds and steps (10 x 6, 2 warm-up), same code path")
    args = parser.parse_args(argv)
    if args.device != "cpu" and not args.device.startswith("cuda"):
        parser.error(f"--device must be cpu or cuda[:N], got {args.device!r}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    for flag in ("steps", "repeats", "threads"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    if args.warmup < 1:  # AdamW's lazy state and reflora-s's first rescale belong to warm-up
        parser.error(f"--warmup must be >= 1, got {args.warmup}")
    if args.batch is not None:
        try:
            rows, tokens = (int(x) for x in args.batch.lower().split("x"))
        except ValueError:
            parser.error(f"--batch must look like 4x128 (rows x tokens), got {args.batch!r}")
        if rows < 1 or tokens < 2:
            parser.error(f"--batch needs rows >= 1 and tokens >= 2, got {args.batch!r}")
        args.batch = (rows, tokens)
    from reflora_analysis.methods import available_methods

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in available_methods()]
    if unknown:
        parser.error(f"unknown method(s) {', '.join(unknown)}; valid: {', '.join(available_methods())}")
    args.methods = ["lora"] + [m for m in dict.fromkeys(methods) if m != "lora"]
    if args.model_size is None:
        args.model_size = "1b" if args.device.startswith("cuda") else "tiny"
    if args.dtype is None:
        args.dtype = "bfloat16" if args.model_size == "1b" else "float32"
    if args.quick:
        args.repeats, args.steps, args.warmup = min(args.repeats, 10), min(args.steps, 6), 2
    if args.clock == "auto":
        args.clock = "cpu" if args.device == "cpu" and args.threads == 1 else "wall"
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    run(args)


if __name__ == "__main__":
    main()
