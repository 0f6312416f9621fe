"""The stages, one module each (``extract``, ``fit``, ``finetune``, ``predict``, ``audit``, ...): each is a
function exported by :mod:`pipeline` under the stage's name, and kept here so that importing a stage's
module never hides that function (``from pipeline.stages.fit import FitConfig`` then ``from pipeline
import fit`` gives the function)."""
