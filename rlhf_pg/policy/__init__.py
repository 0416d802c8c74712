"""The LM as a policy: act (sample completions) and score (teacher-forced log-probs).

``sampler.py`` (``SamplingParams``, the ``Sampler`` protocol, ``make_sampler``: the one place an engine is
chosen), ``builtin.py`` (the built-in KV-cached engine), ``logprobs.py`` (``completion_logprobs`` for the update
and the reference), ``prompts.py`` (encoding, the one context-length check, decoding, stop strings),
``decoder.py`` (lean decode steps per model family), ``kernels.py`` (oneDNN linears, the chunked log-prob
head), ``packed.py`` (weights packed once for oneDNN while sampling) and ``cpu_matmul.py``
(``train.cpu_matmul``: which CPU kernel the linear layers use, re-checked between steps). Nothing is imported
here: an engine's dependencies load only when it is chosen.
"""
