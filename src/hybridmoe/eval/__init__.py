"""Evaluation: RULER's 13 synthetic long-context tasks (`ruler`) and perplexity / bits per byte (`perplexity`).

`hybridmoe eval ruler CHECKPOINT --lengths 4k,8k` and `hybridmoe eval ppl CHECKPOINT DATA` call `run_ruler` and
`evaluate_perplexity`; `report` writes the RULER table and heatmap, `haystack` makes the text prompts are built from.
"""

from .perplexity import evaluate_perplexity
from .ruler import TASKS, make_sample, run_ruler, string_match_all, string_match_part

__all__ = ["TASKS", "evaluate_perplexity", "make_sample", "run_ruler", "string_match_all", "string_match_part"]
