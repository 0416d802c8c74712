"""Pure tensor functions of the policy-gradient estimator: no model, device or process in here.

``mdp`` (the rollout batch), ``advantages`` (returns and baselines), ``losses`` (aggregations, KL
estimators), ``kl_control`` and ``estimator`` (the one composition returns -> baseline -> whiten -> A,
and the name tables the recipes validate against). The LM trainer, the gym track, the variance lab and
the tests all call these.
"""
