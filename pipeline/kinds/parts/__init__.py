"""The parts a task kind is made of, one concern per module, each a mixin that implements its share of
:class:`pipeline.kinds.TaskKind`:

- :mod:`.labels`: ``parse``, ``format``, ``names``, ``check``, ``values``, ``target`` (``ClassLabels``,
  ``TagLabels``, ``NumberLabels``);
- :mod:`.splits`: ``folds``, ``subsplit`` (``StratifiedSplits``, ``TagStratifiedSplits``, ``ShuffledSplits``);
- :mod:`.scoring`: ``primary``, ``interval``, ``core_columns``, ``chance``, ``score``, ``primary_score``,
  ``p_same``, ``breakdown`` (``AccuracyScoring``, ``MeanAPScoring``, ``R2Scoring``; the paired bootstrap in :mod:`.bootstrap`);
- :mod:`.predictions`: ``predict``, ``scores``, ``format_predictions``, ``parse_predictions``,
  ``prediction``, ``predict_columns`` (``ClassPredictions``, ``TagPredictions``, ``NumberPredictions``);
- :mod:`.layers`: the fine-tuned network's last layer, ``outputs``, ``loss``, ``loss_scale``, ``targets``,
  ``from_logits``, ``logit_scores``, ``initial_bias``, ``linear_start`` (``SoftmaxLayer``, ``SigmoidLayer``,
  ``LinearLayer``).

A kind lists one part of each concern before ``TaskKind`` (so the parts' methods win over its defaults)
and sets its attributes; a part may call another concern's methods through ``self`` (tag splits and
scoring read ``target``'s 0/1 matrix).
"""

from .labels import ClassLabels, NumberLabels, TagLabels
from .layers import LinearLayer, SigmoidLayer, SoftmaxLayer
from .predictions import ClassPredictions, NumberPredictions, TagPredictions
from .scoring import AccuracyScoring, MeanAPScoring, R2Scoring
from .splits import ShuffledSplits, StratifiedSplits, TagStratifiedSplits

__all__ = [
    "ClassLabels", "TagLabels", "NumberLabels",
    "StratifiedSplits", "TagStratifiedSplits", "ShuffledSplits",
    "AccuracyScoring", "MeanAPScoring", "R2Scoring",
    "ClassPredictions", "TagPredictions", "NumberPredictions",
    "SoftmaxLayer", "SigmoidLayer", "LinearLayer",
]
