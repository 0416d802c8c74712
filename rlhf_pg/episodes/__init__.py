"""Multi-turn episodes: a recipe with ``tools`` or an ``environment``.

``spec.py`` (the vocabulary: turns, episodes, the environment contract, ``EpisodeSpec``, scores after the
rollout), ``sampler.py`` (``EpisodeSampler``, a ``Sampler`` whose completions are episodes, on one KV cache),
``tools.py`` (tool functions: resolution, call formats, calls in threads with timeouts). Nothing is imported
here, so ``recipe.py`` can read the tool formats without loading the sampler.
"""
