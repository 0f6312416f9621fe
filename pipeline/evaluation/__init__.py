"""The evaluation service: every stage opens a task, gets its splits, scores predictions into a row and
saves or reads a model through this package, and nowhere else.

- :mod:`.protocol`: per task, which images train and which are scored, how rows are scored and ranked;
- :mod:`.rows`: a leaderboard row, how it is scored from predictions and how the best one is picked;
- :mod:`.card`: the card beside every saved head (its task, classes and feature specs);
- :mod:`.runfolder`: the run folder's layout and files (``ARTIFACTS``), its rows, and ``open_task``, the
  one policy by which a stage reuses a run's protocol.
"""

from .card import CardPart, HeadCard
from .protocol import HOLDOUT_SPLITS, TRAIN_ONLY, Protocol, decide, eval_split, join_groups, unused_split_note
from .rows import Row, best_row, clean_ranking, columns, score_row
from .runfolder import ARTIFACTS, POLICIES, ROW_PLOTS, Labelled, RunFolder, open_task, slug

__all__ = ["ARTIFACTS", "HOLDOUT_SPLITS", "POLICIES", "ROW_PLOTS", "TRAIN_ONLY", "CardPart", "HeadCard", "Labelled", "Protocol",
           "Row", "RunFolder", "best_row", "clean_ranking", "columns", "decide", "eval_split", "join_groups",
           "open_task", "score_row", "slug", "unused_split_note"]
