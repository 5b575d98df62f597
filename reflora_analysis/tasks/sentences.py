r"""Human-rated sentences (VADER, Hutto & Gilbert, ICWSM 2014) as LoRA tasks: real evidence.

Eight tasks on four corpora of sentences rated on [-4, 4] by independent human raters
(``movies``: Rotten Tomatoes snippets, the sentences SST-2 comes from; ``tweets``;
``amazon``: product-review sentences; ``nyt``: New York Times editorial sentences):

* ``vader-<corpus>``: binary polarity (label 1 if ``mean > 0.5``, 0 if ``mean < -0.5``,
  near-neutral dropped), accuracy and macro-F1;
* ``vader-<corpus>-reg``: every sentence, target ``mean / 4``, MSE, Pearson / Spearman;

with fixed, seeded, stratified train / validation / test splits (10 % / 10 % / 80 %, set by
``split_seed`` alone), a pretrained MiniLM-L6 encoder with PEFT LoRA, and ``evaluate()`` =
validation metrics plus ``test_*`` ones. ``lm-vader-movies`` (:mod:`.lm_sentences`) asks the
same binary question of a causal LM.

This module is the public face of two:

* :mod:`.sentence_data`: the corpora (fetched once from the pinned ``vaderSentiment``
  sdist), parsing, merging of repeated texts, labels, the stratified splits, one task's data;
* :mod:`.sentence_tasks`: the model, the metrics, the evaluation contract
  (:class:`SentenceTask`), the task builders and :data:`VADER_TASKS`, :func:`describe_splits`,
  :func:`task_examples` and :data:`SPLIT_SIZES`.

Offline with nothing cached, building a task raises
:class:`reflora_analysis.assets.AssetUnavailable` whose message is one line with the
command that fetches the sdist on a connected machine.
"""

from __future__ import annotations

from ..assets import AssetUnavailable
from .sentence_data import (ASSET, CORPORA, DEFAULT_THRESHOLD, INNER_ARCHIVE, SPLITS, Corpus,  # noqa: F401
                            SentenceExamples, load_vader_sentences, polarity, sentence_examples,
                            stratified_split, vader_sentences_path)
from .sentence_tasks import (SPLIT_SIZES, VADER_TASK_SUMMARIES, VADER_TASKS, SentenceTask, describe_splits,
                             make_vader_amazon, make_vader_amazon_reg, make_vader_movies,
                             make_vader_movies_reg, make_vader_nyt, make_vader_nyt_reg, make_vader_tweets,
                             make_vader_tweets_reg, task_examples)

__all__ = ["CORPORA", "SPLITS", "SPLIT_SIZES", "VADER_TASKS", "VADER_TASK_SUMMARIES", "DEFAULT_THRESHOLD",
           "SentenceTask", "AssetUnavailable", "load_vader_sentences", "vader_sentences_path",
           "sentence_examples", "polarity", "stratified_split", "describe_splits", "task_examples",
           "make_vader_movies", "make_vader_tweets", "make_vader_amazon", "make_vader_nyt",
           "make_vader_movies_reg", "make_vader_tweets_reg", "make_vader_amazon_reg", "make_vader_nyt_reg",
           "SentenceExamples"]
