"""rlhf-pg: policy-gradient (REINFORCE-family) fine-tuning of causal language models.

From Python (``rlhf_pg/api.py``, imported on first use: ``import rlhf_pg`` loads neither torch nor transformers):

    rlhf_pg.train(recipe, reward_funcs=[f], train_dataset=ds, overrides={...}) -> RunResult
    rlhf_pg.sft(recipe, ...) -> RunResult     rlhf_pg.evaluate(model_dir, recipe, ...) -> dict
    rlhf_pg.doctor(recipe, ...) -> Diagnosis  rlhf_pg.resolve_recipe(recipe, ...) -> Recipe
"""

import sys
import types

from .errors import RecipeError, RewardFunctionError, TrainingInterrupted, UserError

__version__ = "0.1.0"
_API = ("train", "sft", "evaluate", "doctor", "resolve_recipe", "RunResult")
__all__ = [*_API, "RecipeError", "RewardFunctionError", "TrainingInterrupted", "UserError", "__version__"]


def __getattr__(name: str):
    if name in _API:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'rlhf_pg' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_API})


class _Package(types.ModuleType):
    """``rlhf_pg.sft`` and ``rlhf_pg.doctor`` stay the API's functions once the module ``sft.py`` and the package
    ``doctor/`` are imported: the import system's ``setattr(rlhf_pg, "sft", <module>)`` is ignored (the modules are
    in ``sys.modules`` as ever: ``from rlhf_pg.sft import train_sft`` works; ``rlhf_pg.sft.train_sft`` does not)."""

    def __setattr__(self, name: str, value) -> None:
        if name in _API and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
